"""Convert gpt-oss expert weights between transformers' training layout and the released MXFP4 layout.

transformers' `GptOssExperts` holds, per layer (E experts, hidden H, expert intermediate I):
    mlp.experts.gate_up_proj  [E, H, 2I]   (x @ W: input dim first; gate/linear columns interleaved)
    mlp.experts.down_proj     [E, I, H]
    mlp.experts.*_bias        [E, 2I] / [E, H]
The released checkpoints (and vLLM, and transformers' Mxfp4 loader) store them quantised along the
INPUT dimension, rows = output features:
    mlp.experts.gate_up_proj_blocks [E, 2I, H/32, 16] uint8,  gate_up_proj_scales [E, 2I, H/32] uint8
    mlp.experts.down_proj_blocks    [E, H, I/32, 16] uint8,   down_proj_scales    [E, H, I/32] uint8
    biases unchanged.
So packing is `quantize(W.transpose(-1, -2))` and unpacking `dequantize(...).transpose(-1, -2)`; this is
the exact inverse of transformers' `convert_moe_packed_tensors` (tested bit for bit).

Usage:
    save_mxfp4_checkpoint(model, "out/ckpt")            # model.safetensors + config.json
    model = load_mxfp4_checkpoint("out/ckpt", dtype=torch.float32)
    # transformers reads the same folder: GptOssForCausalLM.from_pretrained(path,
    #     quantization_config=Mxfp4Config(dequantize=True)); vLLM serves it as quant_method "mxfp4".

Departures: one unsharded `model.safetensors` (no index file); non-expert tensors are written in
`dtype` (bf16 by default, as released).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kernels.mxfp4 import dequantize, quantize

EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # key suffixes that get packed
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
# What the released gpt-oss config.json lists: everything but the experts stays in bf16.
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
QUANTIZATION_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT}


def _is_expert_weight(key: str) -> bool:
    return key.endswith(EXPERT_WEIGHTS)


def pack_state_dict(
    sd: Mapping[str, torch.Tensor], *, scale_rule: str = "floor", backend: str | None = None
) -> dict[str, torch.Tensor]:
    """transformers state dict -> released layout: expert weights become `_blocks` + `_scales`."""
    out = {}
    for key, value in sd.items():
        if not _is_expert_weight(key):
            out[key] = value
            continue
        if value.ndim != 3:
            raise ValueError(f"{key}: expected [experts, in, out], got {value.shape=}")
        # [E, in, out] -> [E, out, in]: groups of 32 run along the input dimension.
        blocks, scales = quantize(value.detach().transpose(-1, -2), scale_rule=scale_rule, backend=backend)
        out[key + BLOCKS_SUFFIX] = blocks  # [E, out, in/32, 16]
        out[key + SCALES_SUFFIX] = scales  # [E, out, in/32]
    return out


def unpack_state_dict(
    sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16, *, backend: str | None = None
) -> dict[str, torch.Tensor]:
    """Released layout -> transformers state dict with expert weights dequantised to `dtype`."""
    out = {}
    for key, value in sd.items():
        if key.endswith(SCALES_SUFFIX) and _is_expert_weight(key.removesuffix(SCALES_SUFFIX)):
            continue  # consumed with its blocks
        if not (key.endswith(BLOCKS_SUFFIX) and _is_expert_weight(key.removesuffix(BLOCKS_SUFFIX))):
            out[key] = value
            continue
        name = key.removesuffix(BLOCKS_SUFFIX)
        scales_key = name + SCALES_SUFFIX
        if scales_key not in sd:
            raise KeyError(f"{key} has no matching {scales_key} in the state dict")
        weight = dequantize(value, sd[scales_key], dtype, backend=backend)  # [E, out, in]
        out[name] = weight.transpose(-1, -2).contiguous()  # [E, in, out]
    orphans = [
        k for k in sd if k.endswith(SCALES_SUFFIX) and _is_expert_weight(name := k.removesuffix(SCALES_SUFFIX))
        and name not in out
    ]  # fmt: skip
    if orphans:
        raise KeyError(f"scales without blocks: {orphans}")
    return out


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a partial one


def save_mxfp4_checkpoint(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    scale_rule: str = "floor",
    dtype: torch.dtype | None = torch.bfloat16,
) -> Path:
    """Write `model` (a GptOssForCausalLM) as a released-style MXFP4 checkpoint; returns the folder.

    Non-expert float tensors are cast to `dtype` (None keeps them as they are).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = pack_state_dict({k: v.detach() for k, v in model.state_dict().items()}, scale_rule=scale_rule)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu().contiguous() for k, v in sd.items()
    }
    _write_atomically(out_dir / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))

    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # vLLM picks the model class from this
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    _write_atomically(out_dir / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return out_dir


def load_mxfp4_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Read a released-style MXFP4 checkpoint into a GptOssForCausalLM with dequantised experts.

    Every weight is a `dtype` master copy (fp32 or bf16). Values equal what transformers'
    `from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype)` gives (which
    leaves the experts in bf16 whatever `dtype` says). The returned config has no quantization_config:
    the model holds plain weights.
    """
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    path = Path(path)
    config = GptOssConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is None:
        raise ValueError(f"{path / CONFIG_NAME} has no quantization_config: not an MXFP4 checkpoint")
    del config.quantization_config
    config.dtype = dtype

    sd = unpack_state_dict(load_file(str(path / WEIGHTS_NAME)), dtype)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    with torch.device("meta"):  # no random init of weights we are about to overwrite
        model = GptOssForCausalLM(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.model.rotary_emb = GptOssRotaryEmbedding(config=config)  # its buffers are not in the checkpoint
    return model.eval()
