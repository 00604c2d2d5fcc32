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
    save_mxfp4_checkpoint(model, "out/ckpt", max_shard_size="5GB")  # model-0000i-of-0000n.safetensors
                                                        # + model.safetensors.index.json, as released
    model = load_mxfp4_checkpoint("out/ckpt", dtype=torch.float32)
    # transformers reads the same folder: GptOssForCausalLM.from_pretrained(path,
    #     quantization_config=Mxfp4Config(dequantize=True)); vLLM serves it as quant_method "mxfp4".

Sharding: the released gpt-oss folders are sharded (`model.safetensors.index.json` maps each tensor to
its file); `load_mxfp4_checkpoint` reads either form, `save_mxfp4_checkpoint` writes shards when given
`max_shard_size` (split by huggingface_hub, the splitter transformers' own `save_pretrained` uses).
`write_weight_files` writes any state dict handed over piece by piece, one file a piece, and
`released_tensors` packs a piece: the FSDP learner group exports through them without ever holding the
whole model (rl/learner_group.py).

Departures: non-expert tensors are written in `dtype` (bf16 by default, as released); shard names
count from 1 (huggingface_hub's `model-00001-of-00003`), the released folders count from 0 - the
index, not the names, is what loaders read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kernels.mxfp4 import dequantize, quantize

EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # key suffixes that get packed
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
INDEX_NAME = "model.safetensors.index.json"
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


def released_tensors(sd: Mapping[str, torch.Tensor], *, scale_rule: str = "floor",
                     dtype: torch.dtype | None = torch.bfloat16) -> dict[str, torch.Tensor]:
    """What a released-style file holds for (part of) a transformers state dict: experts packed
    (`pack_state_dict`), other float tensors cast to `dtype` (None: as they are), contiguous on CPU."""
    sd = pack_state_dict({k: v.detach() for k, v in sd.items()}, scale_rule=scale_rule)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu().contiguous()
            for k, v in sd.items()}


def shard_names(n: int) -> list[str]:
    """Weight file names of a checkpoint in `n` files (huggingface_hub's pattern when n > 1)."""
    return [WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_weight_files(out_dir: str | os.PathLike, shards: Iterable[Mapping[str, torch.Tensor]],
                       n_shards: int | None = None) -> None:
    """Write the pieces of a state dict, in order, as the files transformers and vLLM read:
    `model.safetensors` for one, `shard_names(n)` + `model.safetensors.index.json` for several. Pieces
    are taken one at a time (a caller can produce each when it is asked for: rl/learner_group.py
    gathers a sharded model piece by piece, rl/lora.py merges adapters parameter by parameter), each
    goes to a hidden temporary file, and once all are written they are renamed into place (atomic
    per file) and the index written last; weight files of an earlier save in the folder that this one
    does not use are removed. `n_shards`, if given, is checked against the number of pieces."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    temps, weight_map, total = [], {}, 0
    try:
        for i, shard in enumerate(shards):
            shard = {k: v.cpu().contiguous() for k, v in shard.items()}
            temps.append(out_dir / f".piece-{i:05d}.safetensors.tmp")
            save_file(shard, str(temps[-1]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, i))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        if not temps or (n_shards is not None and len(temps) != n_shards):
            raise ValueError(f"write_weight_files: got {len(temps)} pieces, expected {n_shards or 'at least 1'}")
        names = shard_names(len(temps))
        for tmp, name in zip(temps, names):
            os.replace(tmp, out_dir / name)  # readers see the old file or the whole new one
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    if len(names) > 1:  # the index goes last: a reader that finds it finds every shard it names
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
        _write_atomically(out_dir / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=2, sort_keys=True)))
    stale = {p for p in out_dir.glob("model*.safetensors*") if p.name not in names}  # includes an old index
    if len(names) > 1:
        stale.discard(out_dir / INDEX_NAME)
    for p in stale:
        p.unlink()


def write_config(out_dir: str | os.PathLike, config, architecture: str, dtype: torch.dtype | None,
                 mxfp4: bool) -> None:
    """config.json for the weights in `out_dir`: `config` (a transformers config) with `architecture`
    (vLLM picks the model class from it), `dtype`, and the released `quantization_config` when `mxfp4`
    (without: none, even if `config` came from an MXFP4 checkpoint, since the experts written are dense)."""
    data = config.to_dict()
    data["architectures"] = [architecture]
    data.pop("quantization_config", None)
    if mxfp4:
        data["quantization_config"] = dict(QUANTIZATION_CONFIG)
    if dtype is not None:
        data["dtype"] = str(dtype).removeprefix("torch.")
    _write_atomically(Path(out_dir) / CONFIG_NAME, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True)))


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
    max_shard_size: int | str | None = None,
) -> Path:
    """Write `model` (a GptOssForCausalLM) as a released-style MXFP4 checkpoint; returns the folder.

    Non-expert float tensors are cast to `dtype` (None keeps them as they are). `max_shard_size`
    (bytes or e.g. "5GB") splits the tensors over several files plus an index; weight files of an
    earlier save in the folder that the new one does not use are removed after the index is written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    out_dir = Path(out_dir)
    tensors = released_tensors(model.state_dict(), scale_rule=scale_rule, dtype=dtype)
    groups = [list(tensors)] if max_shard_size is None else \
        list(split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size).filename_to_tensors.values())
    write_weight_files(out_dir, ({k: tensors[k] for k in keys} for keys in groups), len(groups))
    write_config(out_dir, model.config, type(model).__name__, dtype, mxfp4=True)
    return out_dir


def require_checkpoint(path: str | os.PathLike) -> Path:
    """`path` as a Path; FileNotFoundError unless it holds `model.safetensors` or the shard index (a cheap
    check before reading anything)."""
    path = Path(path)
    if not (path / INDEX_NAME).exists() and not (path / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    return path


def index_shards(weight_map, index_path: str | os.PathLike) -> list[str]:
    """The shard files a `model.safetensors.index.json` `weight_map` names, sorted; ValueError unless it
    is a non-empty mapping (what transformers reads; `rl.checkpoint` requires the same files)."""
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map")
    return sorted(set(weight_map.values()))


def tensor_files(path: str | os.PathLike) -> dict[str, str]:
    """{tensor name: the file of `path` that holds it}, from the index when there is one (nothing is read
    but the index or the single file's header; a sharded learner then reads its slices alone)."""
    from safetensors import safe_open

    path = require_checkpoint(path)
    index_path = path / INDEX_NAME
    if index_path.exists():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        index_shards(weight_map, index_path)  # a non-empty mapping
        return dict(weight_map)
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        return dict.fromkeys(f.keys(), WEIGHTS_NAME)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder: `model.safetensors.index.json` + its shards when the
    index is there (the released gpt-oss layout), else `model.safetensors`."""
    path = require_checkpoint(path)
    index_path = path / INDEX_NAME
    if index_path.exists():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        sd: dict[str, torch.Tensor] = {}
        for name in index_shards(weight_map, index_path):
            if not (path / name).exists():
                raise FileNotFoundError(f"{index_path} names {name}, which is not in {path}")
            sd.update(load_file(str(path / name)))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise KeyError(f"{index_path} maps {len(missing)} tensor(s) its shards do not hold, e.g. {missing[:3]}")
        return sd
    return load_file(str(path / WEIGHTS_NAME))


def load_mxfp4_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
                          packed_experts: bool = False):
    """Read a released-style MXFP4 checkpoint into a GptOssForCausalLM with dequantised experts.

    Every weight is a `dtype` master copy (fp32 or bf16). Values equal what transformers'
    `from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype)` gives (which
    leaves the experts in bf16 whatever `dtype` says). The returned config has no quantization_config:
    the model holds plain weights.

    `packed_experts=True` keeps the experts as released instead: each layer's `mlp.experts` is a frozen
    `kernels.moe.FrozenMxfp4Experts` holding the 4-bit blocks and scales (decoded one expert at a time
    inside the MoE kernel, in `dtype`), never a dense copy: the frozen base under LoRA (rl/lora.py).
    """
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    path = Path(path)
    config = GptOssConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is None:
        raise ValueError(f"{path / CONFIG_NAME} has no quantization_config: not an MXFP4 checkpoint")
    del config.quantization_config
    config.dtype = dtype

    sd = read_state_dict(path)
    sd = sd if packed_experts else unpack_state_dict(sd, dtype)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    with torch.device("meta"):  # no random init of weights we are about to overwrite
        model = GptOssForCausalLM(config)
        if packed_experts:
            from kernels.moe import FrozenMxfp4Experts

            for layer in model.model.layers:
                old = layer.mlp.experts
                layer.mlp.experts = FrozenMxfp4Experts(old.num_experts, old.hidden_size, old.intermediate_size,
                                                       old.alpha, old.limit, compute_dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    model.model.rotary_emb = GptOssRotaryEmbedding(config=config)  # its buffers are not in the checkpoint
    return model.eval()
