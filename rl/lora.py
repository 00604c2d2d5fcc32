"""LoRA over the frozen base (`learner.lora`, README "LoRA"): what trains, the KL reference for free,
merged weights for the rollout engine, adapter checkpoints.

What: `load_lora_policy(path, cfg, dtype)` gives the policy the learner trains. The base is loaded
frozen as the checkpoint holds it: a released-style MXFP4 folder keeps its experts 4-bit
(`kernels.moe.FrozenMxfp4Experts`, decoded one active expert at a time inside the MoE kernel, never
the whole model dense), a dense folder (the tiny world's) keeps its dense experts; every other weight is
in `learner.dtype`. Adapters go on `learner.lora.target_modules` with one `peft.inject_adapter_in_model`
call: PEFT's own LoRA layers on the attention projections (q/k/v/o_proj, nn.Linear), and `ExpertsLora`
on the experts (gate_up_proj/down_proj: a rank-r pair per expert), a PEFT-convention LoRA layer that PEFT
dispatches to through `LoraConfig._register_custom_module`. Adapters are fp32 (16 B a parameter with
grad and AdamW moments); nothing else has `requires_grad`, so only they reach the optimizer. The model
stays a `GptOssForCausalLM` (the learner's `token_logprobs` reads `model.model` and `model.lm_head`).

Why not PEFT's `target_parameters` for the experts (checked with PEFT 0.21.2): its `ParamWrapper`
does adapt transformers' dense `GptOssExperts`, our grouped kernel included (it parametrises
gate_up_proj/down_proj as W + s A B for the forward), but it has nothing to wrap on the 4-bit experts
(blocks and scales are uint8 buffers), it forms the dense delta of the whole expert stack every
forward and its dense gradient every backward (on gpt-oss-20b 0.5B weights a layer), and it refuses
dropout. `ExpertsLora` adds the adapters inside our grouped MoE kernel in low-rank form
(`kernels.moe.ExpertLora`: u += s (x A1) B1, z += s (w y A2) B2) over either base. Expert adapters take
no dropout (`learner.lora.dropout` must be 0 with expert targets, as in PEFT's `ParamWrapper`).

KL reference (`algo.kl_coef > 0`): `adapters_disabled(model)` is the initial policy, exactly (LoRA starts
at B = 0 and the base never changes), so a LoRA learner keeps no second model.

Weight sync: `merged_state(model)` yields the HF-named state dict the engines take (rl/vllm_weights.py),
base + (alpha / r) B A computed one parameter at a time and moved to the CPU (experts: one expert at a
time, 4-bit experts decoded first), so the device holds one merged tensor at most. The engine gets
dense expert tensors: what vLLM's dense path (the CPU engine) loads. A GPU engine serving the experts
4-bit (`rollout.quantization=mxfp4`) cannot take them; see README "LoRA" for that caveat.

Checkpoints (`save` / `load_adapters`): the checkpoint folder is the merged model as an ordinary HF
folder (what `rl.evaluate`, vLLM and transformers load; the merged experts are dense), plus
`adapter/adapter_model.safetensors` (the adapters under their module names) and
`adapter/adapter_config.json`; the learner adds the optimizer, step and RNG. Resume reloads the base
from the run's initial policy and the adapters from `adapter/`, so it is exact. The adapters live in a
subfolder because transformers reads an `adapter_config.json` at the top of a folder as a PEFT adapter
and would load its base instead.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from kernels.moe import ExpertLora, FrozenMxfp4Experts, grouped_experts
from rl.config import EXPERT_TARGETS, LoraConfig

ADAPTER_DIR, ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter", "adapter_model.safetensors", "adapter_config.json"
MAX_SHARD_BYTES = 5 * 2**30  # merged export: safetensors shards of at most this much (one in host memory at a time)


class ExpertsLora(nn.Module, LoraLayer):
    """LoRA on gpt-oss experts (transformers' `GptOssExperts` or our frozen 4-bit `FrozenMxfp4Experts`),
    following PEFT's LoRA-layer conventions (adapter dicts `lora_A` / `lora_B`, `scaling`, enable/disable).

    Per adapted projection p and expert e: A (in, r) and B (r, out) in the experts' (E, in, out) layout, so
    expert e computes with W_e + scaling A_e B_e. A starts as PEFT's default (uniform in +-1/sqrt(in)), B at 0.
    """

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: float = 1,
                 projections: tuple[str, ...] = EXPERT_TARGETS, **kwargs):
        super().__init__()
        self.projections = projections
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.hidden_size, module.hidden_size

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        if config.lora_dropout:
            raise ValueError("expert adapters take no dropout (set learner.lora.dropout=0)")
        base = self.get_base_layer()
        E, H, I = base.num_experts, base.hidden_size, base.intermediate_size
        shapes = {"gate_up_proj": ((E, H, r), (E, r, 2 * I)), "down_proj": ((E, I, r), (E, r, H))}
        device = base.gate_up_proj_bias.device
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Identity()
        a, b = nn.ParameterDict(), nn.ParameterDict()
        for p in self.projections:
            (sa, sb) = shapes[p]
            a[p] = nn.Parameter(torch.empty(sa, device=device).uniform_(-1, 1) / math.sqrt(sa[1]))
            # PEFT: init_lora_weights=False leaves B random too (a non-identity start, for tests)
            b[p] = nn.Parameter(torch.zeros(sb, device=device) if config.init_lora_weights is not False
                                else torch.empty(sb, device=device).uniform_(-1, 1) / math.sqrt(r))
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self.set_adapter(self.active_adapters)

    def adapters(self) -> ExpertLora | None:
        """The active adapter as the kernel takes it; None when disabled or none is active here."""
        active = [n for n in self.active_adapters if n in self.lora_A]
        if self.disable_adapters or not active:
            return None
        if len(active) > 1:
            raise NotImplementedError(f"one active expert adapter at a time, got {active}")
        a, b = self.lora_A[active[0]], self.lora_B[active[0]]
        return ExpertLora(a.get("gate_up_proj"), b.get("gate_up_proj"), a.get("down_proj"), b.get("down_proj"),
                          self.scaling[active[0]])

    def forward(self, hidden_states, router_indices, routing_weights):  # (N, H), (N, k), (N, k) -> (N, H)
        base, lora = self.get_base_layer(), self.adapters()
        if lora is None:
            return base(hidden_states, router_indices, routing_weights)
        if isinstance(base, FrozenMxfp4Experts):
            return base(hidden_states, router_indices, routing_weights, lora=lora)
        return grouped_experts(hidden_states, router_indices, routing_weights, base.gate_up_proj,
                               base.gate_up_proj_bias, base.down_proj, base.down_proj_bias, base.alpha,
                               base.limit, lora=lora)

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("expert adapters are never merged into the (possibly 4-bit) base; "
                                  "rl.lora.merged_state gives the merged tensors")

    def unmerge(self) -> None:
        raise NotImplementedError("expert adapters are never merged (see merge)")


def peft_config(cfg: LoraConfig):
    """PEFT's LoraConfig for `learner.lora`: attention targets by name, the experts through `ExpertsLora`."""
    import peft
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    linear = [t for t in cfg.target_modules if t not in EXPERT_TARGETS]
    experts = tuple(t for t in cfg.target_modules if t in EXPERT_TARGETS)
    out = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=linear + (["experts"] if experts else []))
    if experts:
        layer = functools.partial(ExpertsLora, projections=experts)
        out._register_custom_module({GptOssExperts: layer, FrozenMxfp4Experts: layer})
    return out


def load_lora_policy(path: str | os.PathLike, cfg: LoraConfig, dtype: torch.dtype = torch.float32):
    """(model, VocabMap): the frozen base of the HF folder `path` (MXFP4 experts kept 4-bit) with fp32
    adapters on `cfg.target_modules`, the adapters the only parameters that require grad."""
    import peft

    from rl.model import load_policy

    model, vmap = load_policy(path, dtype=dtype, packed_experts=True)
    model.requires_grad_(False)
    peft.inject_adapter_in_model(peft_config(cfg), model)
    for name, p in model.named_parameters():
        if "lora_" in name:  # PEFT puts its Linear adapters in the base's dtype; keep them fp32 masters
            p.data = p.data.float()
    return model, vmap


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every adapter off (the base: the KL reference); `requires_grad` flags are restored
    on exit exactly as they were (PEFT's toggle would re-enable adapters a `learner.lr_scale` froze)."""
    layers = _tuner_layers(model)
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def _expert_weight(base: nn.Module, proj: str, wrapper: ExpertsLora | None) -> torch.Tensor:
    """(E, in, out) merged expert weight on the CPU, built one expert at a time (4-bit experts decoded)."""
    lora = wrapper.adapters() if wrapper is not None else None
    a = b = None
    if lora is not None:
        a, b = (lora.up_a, lora.up_b) if proj == "gate_up_proj" else (lora.down_a, lora.down_b)
    if isinstance(base, FrozenMxfp4Experts):
        from kernels.mxfp4 import dequantize

        blocks, scales = getattr(base, f"{proj}_blocks"), getattr(base, f"{proj}_scales")
        expert = lambda e: dequantize(blocks[e], scales[e], base.compute_dtype).t()  # noqa: E731  (in, out)
    else:
        expert = getattr(base, proj).__getitem__
    out = None
    for e in range(base.num_experts):
        w = expert(e)
        if a is not None:
            w = (w.float() + lora.scale * (a[e] @ b[e])).to(w.dtype)
        out = out if out is not None else torch.empty((base.num_experts, *w.shape), dtype=w.dtype)
        out[e] = w.detach().cpu()
    return out


@torch.no_grad()
def merged_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the policy with its adapters merged, one parameter at a time, on the CPU:
    the plain `GptOssForCausalLM` state dict (expert weights dense), what the engines and transformers load."""
    from peft.tuners.lora import Linear as LoraLinear

    wrappers = {name: m for name, m in model.named_modules() if isinstance(m, (LoraLinear, ExpertsLora))}
    for name, t in model.state_dict().items():
        if "lora_" in name or name.endswith("_scales"):  # adapters; scales decode with their blocks
            continue
        hf = name.replace(".base_layer.", ".")
        module_name, leaf = hf.rsplit(".", 1)
        wrapper = wrappers.get(module_name)
        if leaf.endswith("_blocks") or (isinstance(wrapper, ExpertsLora) and leaf in EXPERT_TARGETS):
            proj = leaf.removesuffix("_blocks")
            base = wrapper.get_base_layer() if wrapper is not None else model.get_submodule(module_name)
            yield f"{module_name}.{proj}", _expert_weight(base, proj, wrapper)
        elif isinstance(wrapper, LoraLinear) and leaf == "weight" and not wrapper.disable_adapters:
            delta = sum(wrapper.get_delta_weight(a) for a in wrapper.active_adapters if a in wrapper.lora_A)
            yield hf, (t + delta).to(t.dtype).cpu()
        else:
            yield hf, t.detach().cpu()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor under its module name (`...q_proj.lora_A.default.weight`, ...), on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def merged_shards(model: nn.Module, max_shard_bytes: int = MAX_SHARD_BYTES) -> Iterator[dict[str, torch.Tensor]]:
    """`merged_state` in consecutive pieces of at most `max_shard_bytes` (a bigger tensor alone)."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in merged_state(model):
        n = t.numel() * t.element_size()
        if shard and size + n > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name], size = t, size + n
    if shard:
        yield shard


def write_merged(model: nn.Module, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """The merged policy as an HF folder's weights and config.json: `model.safetensors`, or shards of at
    most `max_shard_bytes` plus `model.safetensors.index.json` (kernels/mxfp4_checkpoint.py writes them:
    atomic per file, index last, stale files removed); the config has no quantization_config (dense)."""
    from kernels.mxfp4_checkpoint import write_config, write_weight_files

    write_weight_files(folder, merged_shards(model, max_shard_bytes))
    write_config(folder, model.config, "GptOssForCausalLM", dtype=None, mxfp4=False)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def save(model: nn.Module, vmap, path: str | os.PathLike, cfg: LoraConfig) -> None:
    """Checkpoint folder `path`: the merged model as an HF folder + `adapter/` (weights and config)."""
    from safetensors.torch import save_file

    from rl.model import save_checkpoint

    path = Path(path)
    save_checkpoint(model, vmap, path, write_weights=functools.partial(write_merged, model))
    (path / ADAPTER_DIR).mkdir()
    save_file(adapter_state(model), str(path / ADAPTER_DIR / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": list(cfg.target_modules),
              "scaling": cfg.alpha / cfg.rank, "layout": "rl/lora.py: names as in the adapted GptOssForCausalLM; "
              "experts: lora_A (E, in, r), lora_B (E, r, out)"}
    (path / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))


def load_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the adapters a `save` wrote at `path` into `model` (same targets and rank, else an error)."""
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not file.exists():
        raise FileNotFoundError(f"{file}: no LoRA adapters (a checkpoint of a learner.lora.rank=0 run?)")
    saved = load_file(str(file))
    own = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if saved.keys() != own.keys() or any(saved[n].shape != p.shape for n, p in own.items()):
        missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
        raise RuntimeError(f"{file} does not match learner.lora (targets or rank differ): {missing[:3]=} "
                           f"{unexpected[:3]=}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(saved[n])
