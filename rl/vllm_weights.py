"""HF -> vLLM weight layout, and loading it into a live vLLM engine in place (no restart, no disk).

`hf_to_vllm` (pure) maps an HF `GptOssForCausalLM` state dict to vLLM's parameter names and layout:
  `self_attn.{q,k,v}_proj.{weight,bias}` -> `attn.qkv_proj` (concatenated along the output dim);
  `self_attn.o_proj`, `self_attn.sinks` -> `attn.o_proj`, `attn.sinks`;
  `embed_tokens` -> `embedding`;
  `mlp.experts.gate_up_proj` [E, H, 2I] -> `mlp.experts.routed_experts.w13_weight` [E, 2I, H]
  (a transpose; rows keep HF's interleaved order, gate = even rows, linear = odd rows, which is
  what vLLM's `swigluoai` activation reads); `down_proj` [E, I, H] -> `w2_weight` [E, H, I];
  `gate_up_proj_bias`/`down_proj_bias` -> `w13_bias`/`w2_bias`; router, norms and lm_head keep
  their names. This is the same layout vLLM's own loader produces for unquantised checkpoints.

`load_weights(llm, named_tensors, on_cpu)` puts such a state dict into the running engine.
  Why vLLM's `model.load_weights` is not enough on CPU: after loading, vLLM turns every linear
  weight into a oneDNN (or SGL) packed handle and *deletes* the parameter (`weight` becomes a
  0-element tensor), and prepacks the MoE `w13`/`w2` into the grouped-GEMM layout. So on CPU we
  copy biases, sinks, norms and embeddings into their parameters, re-run the layer's own
  `process_weights_after_loading` for each linear (re-packing the new weight), and prepack expert
  weights with `cpu_prepack_moe_weight` before `copy_` into the existing storage
  (`load_into_vllm_cpu`). vLLM's own in-place `reload_weights` RPC is not usable on CPU: it updates
  the linears but silently keeps the old expert weights and biases (checked: `w13_weight` still
  equals the original prepacked tensor), so greedy output diverges from transformers
  (tests/rl/test_rollout.py catches this). On a GPU build we call `reload_weights` (vLLM's
  documented in-place RL path; not exercised on the CPU box).

Bucketed updates (the FSDP learner group, rl/learner_group.py): `WeightBuckets` holds Ray ObjectRefs,
each to a dict that is part of the state dict; `load_buckets` loads them one at a time (`partial`
loads), then checks that every engine tensor was given. `sync_unit` says which tensors must share a
bucket: a layer's q, k and v (vLLM fuses them into `qkv_proj`) and the tensors of one module (vLLM's
GPU `reload_weights` processes a module once its tensors are in, and keeps the old ones of a module
it got nothing for). A bucketed update that fails halfway leaves the engine with the buckets before
it loaded (a whole update is checked before anything is copied; a bucket, only itself).

Trained-only updates: `TrainedWeights` holds only the tensors that train (`trained_units`: whole sync
units), loaded as a partial update; the engine keeps every other tensor from the last full update.

Limits: unquantised (bf16/fp32) expert tensors only. MXFP4 `*_blocks`/`*_scales` are dequantised by
the sender (the learner's MXFP4 sync does; `RolloutEngine.update_weights_from_path` does for
released-style MXFP4 checkpoint folders).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

_RENAMES = {  # HF suffix -> vLLM suffix for tensors that only change name
    ".self_attn.o_proj.weight": ".attn.o_proj.weight",
    ".self_attn.o_proj.bias": ".attn.o_proj.bias",
    ".self_attn.sinks": ".attn.sinks",
    ".mlp.router.weight": ".mlp.router.weight",
    ".mlp.router.bias": ".mlp.router.bias",
    ".mlp.experts.gate_up_proj_bias": ".mlp.experts.routed_experts.w13_bias",
    ".mlp.experts.down_proj_bias": ".mlp.experts.routed_experts.w2_bias",
    ".input_layernorm.weight": ".input_layernorm.weight",
    ".post_attention_layernorm.weight": ".post_attention_layernorm.weight",
}
_TRANSPOSED = {  # experts: HF [E, in, out] -> vLLM [E, out, in]
    ".mlp.experts.gate_up_proj": ".mlp.experts.routed_experts.w13_weight",
    ".mlp.experts.down_proj": ".mlp.experts.routed_experts.w2_weight",
}
_QKV = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.")
_TOP = {
    "model.embed_tokens.weight": "model.embedding.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class WeightBuckets:
    """A weight update in pieces: Ray ObjectRefs, each to a dict of HF-named tensors, together the whole
    state dict (every `sync_unit` in one piece). What `RolloutEngine.update_weights` takes besides a dict."""

    refs: tuple


@dataclass(frozen=True)
class TrainedWeights:
    """A weight update holding only the tensors that train (HF names; with every tensor of their
    `sync_unit`), for engines that already hold the rest from an earlier full update: `tensors` is the
    dict or a Ray ObjectRef to it. What `Learner.weights()` sends after its first full sync when nothing
    else can change (rl/learner.py `syncs_trained_only`); `WorkerPool` replays the last full update
    before it to a replacement worker. `RolloutEngine.update_weights` loads it as a partial update."""

    tensors: object


def trained_units(state: Mapping[str, torch.Tensor], trained: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors of `state` that share a `sync_unit` with a name in `trained`.

    >>> st = {f"model.layers.0.self_attn.{p}_proj.weight": torch.zeros(1) for p in "qkvo"}
    >>> sorted(trained_units({**st, "model.norm.weight": torch.zeros(1)}, ["model.layers.0.self_attn.q_proj.weight"]))
    ['model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.v_proj.weight']
    """
    units = {sync_unit(n) for n in trained}
    return {n: t for n, t in state.items() if sync_unit(n) in units}


def sync_unit(name: str) -> str:
    """The tensors an HF tensor `name` must share a bucket with (module docstring).

    >>> sync_unit("model.layers.3.self_attn.k_proj.bias")
    'model.layers.3.self_attn.qkv'
    >>> sync_unit("model.layers.3.mlp.experts.down_proj_bias")
    'model.layers.3.mlp.experts'
    """
    part = next((p for p in _QKV if p in name), None)
    return name.split(part)[0] + ".self_attn.qkv" if part else name.rsplit(".", 1)[0]


def hf_to_vllm(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
    """HF `GptOssForCausalLM` state dict -> {vLLM parameter name: tensor in vLLM's loaded layout}.

    Shapes: `gate_up_proj` [E, H, 2I] -> `w13_weight` [E, 2I, H]; `down_proj` [E, I, H] ->
    `w2_weight` [E, H, I]; q [nH*D, H], k/v [nKV*D, H] -> `qkv_proj.weight` [(nH+2nKV)*D, H].
    """
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer prefix, weight|bias) -> q/k/v
    for name, t in items:
        t = t.detach()
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        if name.endswith(("_blocks", "_scales")):
            raise NotImplementedError(
                f"{name}: MXFP4-packed experts are not accepted by the rollout engine; "
                "send dequantised expert tensors (gate_up_proj / down_proj)"
            )
        for hf, vl in _TRANSPOSED.items():
            if name.endswith(hf):
                out[name[: -len(hf)] + vl] = t.transpose(1, 2)  # (E, in, out) -> (E, out, in)
                break
        else:
            for hf, vl in _RENAMES.items():
                if name.endswith(hf):
                    out[name[: -len(hf)] + vl] = t
                    break
            else:
                part = next((p for p in _QKV if p in name), None)
                if part is None:
                    raise KeyError(f"unknown gpt-oss tensor {name!r}: no vLLM counterpart")
                prefix, kind = name.split(part)
                qkv.setdefault((prefix, kind), {})[part[11]] = t  # 'q' | 'k' | 'v'
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{prefix}.self_attn: got {sorted(parts)} {kind}s, need q, k and v together")
        out[f"{prefix}.attn.qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


_VOCAB_ROWS = ("model.embedding.weight", "lm_head.weight")


def _is_packed_linear(module, leaf: str) -> bool:
    """A linear/embedding weight that vLLM's CPU backend packed into `module.cpu_linear`."""
    return leaf == "weight" and hasattr(module, "cpu_linear")


def _target_shape(module, leaf: str, param: torch.Tensor) -> tuple[int, ...]:
    if _is_packed_linear(module, leaf) and param.numel() == 0:  # deleted after packing
        # (out, in) of this rank; ReplicatedLinear (the MoE router) has no per-partition sizes.
        out = getattr(module, "output_size_per_partition", None) or module.output_size
        inp = getattr(module, "input_size_per_partition", None) or module.input_size
        return (out, inp)
    return tuple(param.shape)


def _check_update(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], partial: bool = False) -> None:
    """Names and shapes, all before anything is copied (a failed update leaves the engine as it was);
    `partial`: a bucket, not every tensor."""
    params = dict(model.named_parameters())
    missing = [] if partial else sorted(set(params) - set(tensors))
    unknown = sorted(set(tensors) - set(params))
    if missing or unknown:
        raise KeyError(f"weight update does not match the engine: missing {missing[:5]}, "
                       f"unknown {unknown[:5]}")
    for name, t in tensors.items():
        module_name, leaf = name.rsplit(".", 1)
        want = _target_shape(model.get_submodule(module_name), leaf, params[name])
        vocab_rows = name in _VOCAB_ROWS and t.shape[1:] == want[1:] and t.shape[0] <= want[0]
        if tuple(t.shape) != want and not vocab_rows:  # vLLM may pad vocab rows past the checkpoint's
            raise ValueError(f"{name}: got shape {tuple(t.shape)}, the engine expects {want}")


def _load_packed_linear(module, weight: torch.Tensor) -> None:
    """Set the weight of a CPU linear whose weight vLLM packed, then re-run vLLM's packing."""
    param = module.weight
    if param.numel() == 0:  # linear: the packed handle is all that was left
        module.weight = torch.nn.Parameter(weight.to(param.dtype).contiguous(), requires_grad=False)
    else:  # embedding / lm_head keep their weight; rows past the vocab (padding) are zero
        param.data[: weight.shape[0]].copy_(weight)
        param.data[weight.shape[0] :].zero_()
    module.quant_method.process_weights_after_loading(module)  # rebuilds module.cpu_linear


def _load_moe_weight(module, name: str, weight: torch.Tensor) -> None:
    """Expert w13/w2 (E, out, in): prepack into the CPU grouped-GEMM layout, copy in place."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    experts = getattr(getattr(module.quant_method, "moe_kernel", None), "fused_experts", None)
    if not isinstance(experts, CPUUnquantizedExperts) or experts._use_zentorch:
        raise NotImplementedError(
            f"{name}: in-place expert update supports vLLM's CPUUnquantizedExperts backend only, "
            f"this engine uses {type(experts).__name__}"
        )
    param = getattr(module, name.rsplit(".", 1)[1])
    param.data.copy_(cpu_prepack_moe_weight(weight.to(param.dtype).contiguous(), experts.isa))


def load_into_vllm_cpu(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], partial: bool = False) -> int:
    """Copy converted tensors (names/layout from `hf_to_vllm`) into vLLM's CPU model in place.

    Every vLLM parameter must be present (a partial update is a bug in the sender) unless `partial`
    (one bucket of a `WeightBuckets` update). Returns the number of tensors loaded.
    """
    _check_update(model, tensors, partial)
    params = dict(model.named_parameters())
    with torch.no_grad():
        packed = []
        for name, t in tensors.items():
            module_name, leaf = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            if _is_packed_linear(module, leaf):
                packed.append((module, t))  # after its bias: the packing may read the bias
            elif leaf in ("w13_weight", "w2_weight"):
                _load_moe_weight(module, name, t)
            else:  # biases (w13_bias is referenced by the MoE kernel: copy, never rebind), sinks, norms
                params[name].data.copy_(t)
        for module, t in packed:
            _load_packed_linear(module, t)
        # Attention impls hold the sinks tensor; a dtype cast at init would have made a copy.
        for module in model.modules():
            impl = getattr(getattr(module, "attn", None), "impl", None)
            sinks, own = getattr(impl, "sinks", None), getattr(module, "sinks", None)
            if sinks is not None and own is not None and sinks.data_ptr() != own.data_ptr():
                sinks.copy_(own.to(sinks.dtype))
    return len(tensors)


def load_weights(llm, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 on_cpu: bool, partial: bool = False) -> int | None:
    """Load an HF-named gpt-oss state dict (`partial`: part of one) into the running `vllm.LLM`, in
    place; on CPU returns the number of tensors loaded (GPU: vLLM does not say)."""
    if on_cpu:
        converted = hf_to_vllm(named_tensors)
        return llm.apply_model(lambda model: load_into_vllm_cpu(model, converted, partial))[0]
    # GPU build: vLLM's own in-place reload (it runs process_weights_after_loading per module; a
    # module it gets nothing for keeps its weights, so a bucket at a time works)
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(items)),
                                                 "is_checkpoint_format": True})
    return None


def load_buckets(llm, buckets: Iterable[Mapping[str, torch.Tensor]], on_cpu: bool) -> int | None:
    """Load the buckets of a `WeightBuckets` update (the dicts, fetched one at a time by the caller) in
    place; on CPU, check that together they gave every engine tensor and return how many."""
    if not on_cpu:
        for bucket in buckets:
            load_weights(llm, bucket, on_cpu, partial=True)
        return None
    loaded: set[str] = set()
    for bucket in buckets:
        converted = hf_to_vllm(bucket)
        llm.apply_model(lambda model: load_into_vllm_cpu(model, converted, partial=True))
        loaded.update(converted)
    missing = llm.apply_model(lambda model: sorted(set(dict(model.named_parameters())) - loaded))[0]
    if missing:
        raise KeyError(f"bucketed weight update gave no tensor for {len(missing)} engine parameter(s), "
                       f"e.g. {missing[:5]}")
    return len(loaded)
