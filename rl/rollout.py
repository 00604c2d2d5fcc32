"""Rollout engine: vLLM in-process behind a token-in/token-out API, and its Ray actor.

What it does
- `RolloutEngine(checkpoint, config)` starts `vllm.LLM` on an HF folder written by `rl.model`
  (no tokenizer: `skip_tokenizer_init=True`, prompts go in as `TokensPrompt` ids). The engine
  lives in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), which is what a Ray actor needs and
  what lets `update_weights` reach the live `nn.Module`.
- `generate(prompts, n, ...)` takes canonical o200k_harmony ids, maps them to model ids through the
  checkpoint's `VocabMap`, samples `n` completions per prompt and returns canonical ids, the
  behaviour log-prob of every sampled token and the finish reason. Harmony's `<|return|>` and
  `<|call|>` stop sampling and are the last id of a "stop" completion, so
  `envs.harmony.parse_completion` sees them.
- `update_weights(state_dict)` loads an HF-named `GptOssForCausalLM.state_dict()` into the live
  engine in place: no restart, no disk. `update_weights_from_path(path)` does the same from a
  checkpoint folder. Both reset vLLM's prefix cache so no KV computed with old weights is reused.
- `RolloutWorker` is the Ray actor class around `RolloutEngine` (same methods, `.remote(...)`).

Behaviour log-probs (what the learner must recompute)
  vLLM 0.32 returns *raw* log-probs by default (`logprobs_mode="raw_logprobs"`:
  log_softmax of the model's logits before temperature and top-p). We start vLLM with
  `logprobs_mode="processed_logprobs"`: log_softmax of the logits the sampler actually draws from,
  i.e. `log_softmax(top_p_mask(logits / temperature))`. That is the true behaviour policy
  probability of each sampled token. With top_p = 1 (our RL default) the learner recomputes the
  same number as `log_softmax(logits / temperature).gather(sampled_id)`; at temperature 1 it equals
  the raw log-prob. Greedy requests (temperature 0) report `log_softmax(logits)`.
  Everything runs in float32 on CPU: logits, temperature scaling and sampling.
  Padded vocabulary rows (the tiny model rounds its embedding up to a multiple of 64; those rows
  have no canonical id) are masked to -inf before sampling (`allowed_token_ids`), so the
  behaviour distribution is the softmax over the first `len(VocabMap)` rows only: the learner
  must use `logits[..., :len(vocab_map)]` too. An unmasked padded sample would come back as
  `<|endoftext|>` and its log-prob would not match the id the learner sees.

Weight sync: HF layout -> vLLM layout (`hf_to_vllm`, a pure function)
  `self_attn.{q,k,v}_proj.{weight,bias}` -> `attn.qkv_proj` (concatenated along the output dim);
  `self_attn.o_proj`, `self_attn.sinks` -> `attn.o_proj`, `attn.sinks`;
  `embed_tokens` -> `embedding`;
  `mlp.experts.gate_up_proj` [E, H, 2I] -> `mlp.experts.routed_experts.w13_weight` [E, 2I, H]
  (a transpose; rows keep HF's interleaved order, gate = even rows, linear = odd rows, which is
  what vLLM's `swigluoai` activation reads); `down_proj` [E, I, H] -> `w2_weight` [E, H, I];
  `gate_up_proj_bias`/`down_proj_bias` -> `w13_bias`/`w2_bias`; router, norms and lm_head keep
  their names. This is the same layout vLLM's own loader produces for unquantised checkpoints.
  Why vLLM's `model.load_weights` is not enough on CPU: after loading, vLLM turns every linear
  weight into a oneDNN (or SGL) packed handle and *deletes* the parameter (`weight` becomes a
  0-element tensor), and prepacks the MoE `w13`/`w2` into the grouped-GEMM layout. So we copy
  biases, sinks, norms and embeddings into their parameters, re-run the layer's own
  `process_weights_after_loading` for each linear (re-packing the new weight), and prepack expert
  weights with `cpu_prepack_moe_weight` before `copy_` into the existing storage. vLLM's own
  in-place `reload_weights` RPC is not usable on CPU: it updates the linears but silently keeps
  the old expert weights and biases (checked: `w13_weight` still equals the original prepacked
  tensor), so greedy output diverges from transformers (the test catches this). On a GPU build we
  call `reload_weights` (vLLM's documented in-place RL path; not exercised on this CPU box).

Departures / limits
- `update_weights` takes unquantised (bf16/fp32) expert tensors only: MXFP4 `*_blocks`/`*_scales`
  are dequantised by the sender (the learner's MXFP4 sync does; `update_weights_from_path` does for
  released-style MXFP4 checkpoint folders).
- vLLM's MXFP4 MoE runs on GPUs with bf16 activations only (on CPU, vLLM 0.32 rejects fp32 and
  dies of SIGILL in bf16). Elsewhere a released-style MXFP4 checkpoint folder starts the engine
  from a temporary dense copy (experts decoded once, exactly the 4-bit values; removed at shutdown).
- One live engine per process (`shutdown()` frees it; a new one then starts in ~2 s). Starting
  vLLM turns `torch.set_num_threads` into a no-op for the whole process: the engine sets the
  thread count (`num_threads`, default 1) just before. Code sharing the process (tests, the
  benchmark's HF side) runs at that count afterwards.
- `seed=None` uses the engine's seeded global stream (reproducible per engine lifetime only); a
  given `seed` makes the call reproducible on its own, whatever else is batched with it.
- Chunked prefill is off: with it, vLLM 0.32 on CPU crashes on seeded requests whose prompt is
  split across steps. Prompts are prefilled whole (up to max(max_model_len, 4096) tokens a step).

Run `.venv/bin/python -m bench.bench_rollout` for throughput and sync time.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import ray
import torch

from envs.harmony import STOP_TOKENS
from rl.model import VocabMap
from rl.seeds import request_seed

FINISH_REASONS = ("stop", "length")


@dataclass
class EngineConfig:
    """vLLM engine settings. The `rollout` Hydra node (rl/config.py) carries these and more
    (sampling, worker count); `from_dict` reads only these."""

    dtype: str = "float32"  # float32 on CPU: sampling and logprobs match the fp32 learner
    max_model_len: int = 2048  # prompt + completion tokens per sequence
    seed: int = 0  # engine-wide sampling seed (used when generate(seed=None))
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE; vLLM CPU takes whole GiB (rounded up)
    enforce_eager: bool = True  # no torch.compile: start-up in seconds, not minutes
    max_num_seqs: int = 256  # sequences batched per engine step
    # torch/OMP threads for the engine process. 1 is fastest on the 2-core box: tiny ops pay an OMP
    # barrier each, and with other processes busy 2 threads measured 0.2-0.8k tok/s vs 3.2k with 1.
    num_threads: int | None = 1
    enable_prefix_caching: bool = True  # n samples of one prompt share its KV blocks
    log_level: str = "WARNING"  # VLLM_LOGGING_LEVEL unless already set in the environment

    def __post_init__(self):
        if self.max_model_len < 2 or self.kv_cache_gib <= 0 or self.max_num_seqs < 1:
            raise ValueError(
                f"engine config: need max_model_len >= 2, kv_cache_gib > 0, max_num_seqs >= 1; got "
                f"{self.max_model_len=}, {self.kv_cache_gib=}, {self.max_num_seqs=}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"engine config: num_threads must be >= 1 or None, got {self.num_threads}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> "EngineConfig":
        """Pick the engine fields out of a config mapping (other keys belong to the caller)."""
        if cfg is None:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names})


@dataclass
class Completion:
    """One sampled completion: canonical ids, behaviour log-prob per id, "stop" | "length"."""

    ids: list[int]
    logprobs: list[float]
    finish_reason: str


# --------------------------------------------------------------------------------------------
# HF -> vLLM weight conversion (pure)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Loading converted tensors into the live vLLM model (runs where the model lives)
# --------------------------------------------------------------------------------------------


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


def _check_update(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Names and shapes, all before anything is copied (a failed update leaves the engine as it was)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
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


def load_into_vllm_cpu(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
    """Copy converted tensors (names/layout from `hf_to_vllm`) into vLLM's CPU model in place.

    Every vLLM parameter must be present (a partial update is a bug in the sender). Returns the
    number of tensors loaded.
    """
    _check_update(model, tensors)
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


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


def _prepare_environment(cfg: EngineConfig) -> None:
    """vLLM reads these when it starts the engine: set them before importing/initialising it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # model in this process (Ray actor, updates)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_gib)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", cfg.log_level)
    if cfg.num_threads:
        # vLLM keeps torch's thread count when OMP_NUM_THREADS is set, then patches set_num_threads
        # into a no-op for the whole process: this is the last chance to choose.
        os.environ["OMP_NUM_THREADS"] = str(cfg.num_threads)
        torch.set_num_threads(cfg.num_threads)


def _drop_chat_template_warmup(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Chat template warmup failed")


def dense_copy_of_mxfp4(checkpoint: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """A temporary HF folder holding `checkpoint`'s released-style MXFP4 experts decoded to `dtype`
    (exactly the 4-bit values), its other weights (same values, in `dtype`) and its other files
    (vocabulary map, tokenizer, generation config). The caller removes it."""
    import shutil
    import tempfile

    from kernels.mxfp4_checkpoint import CONFIG_NAME, INDEX_NAME, load_mxfp4_checkpoint

    src = Path(checkpoint)
    out = Path(tempfile.mkdtemp(prefix="deliberate-dense-"))
    try:
        load_mxfp4_checkpoint(src, dtype=dtype).save_pretrained(out)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (CONFIG_NAME, INDEX_NAME):
                shutil.copy2(f, out / f.name)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


class RolloutEngine:
    """vLLM in this process; canonical ids in and out. See the module docstring."""

    def __init__(self, checkpoint: str | os.PathLike, config: EngineConfig | Mapping | None = None):
        self.config = config if isinstance(config, EngineConfig) else EngineConfig.from_dict(config)
        self.checkpoint = str(checkpoint)
        if not Path(self.checkpoint, "config.json").exists():
            raise FileNotFoundError(f"{self.checkpoint}: not an HF checkpoint folder (no config.json)")
        self.vocab = VocabMap.load(self.checkpoint)
        present = [t for t in STOP_TOKENS if self.vocab.covers([t])]
        if not present:
            raise ValueError(f"{self.checkpoint}: vocab map holds no Harmony stop token {STOP_TOKENS}")
        self._stop_ids = self.vocab.to_model(present)
        # The tiny model pads its embedding rows past the vocab map (to a multiple of 64). A padded
        # row has no canonical id, so it must never be sampled: mask it out of the distribution.
        vocab_size = json.loads(Path(self.checkpoint, "config.json").read_text())["vocab_size"]
        n_real = vocab_size if self.vocab.canonical is None else len(self.vocab)
        self._allowed = list(range(n_real)) if n_real < vocab_size else None
        self.weights_version = 0
        self.stats = {"generate_calls": 0, "tokens": 0, "generate_s": 0.0, "last_update_s": None}

        t0 = time.perf_counter()
        _prepare_environment(self.config)
        from vllm import LLM
        from vllm.platforms import current_platform

        self._on_cpu = current_platform.is_cpu()
        self._dense_folder = None  # decoded copy of an MXFP4 checkpoint, removed at shutdown
        from rl.model import is_mxfp4_checkpoint

        if is_mxfp4_checkpoint(self.checkpoint) and (self._on_cpu or self.config.dtype != "bfloat16"):
            # vLLM's MXFP4 MoE needs bf16 activations and a GPU: on CPU it rejects fp32 and dies of
            # SIGILL in bf16. Decode the experts once; the engine then samples from the same values.
            self._dense_folder = dense_copy_of_mxfp4(self.checkpoint)

        # Warmup renders a chat template through the tokenizer we do not have: harmless, but it
        # logs a traceback at WARNING. A filter, not a level: vLLM's dictConfig resets levels.
        logging.getLogger("vllm.renderers.base").addFilter(_drop_chat_template_warmup)
        cfg = self.config
        try:
            self.llm = LLM(
                model=str(self._dense_folder or self.checkpoint),
                skip_tokenizer_init=True,
                dtype=cfg.dtype,
                max_model_len=cfg.max_model_len,
                seed=cfg.seed,
                enforce_eager=cfg.enforce_eager,
                max_num_seqs=cfg.max_num_seqs,
                enable_prefix_caching=cfg.enable_prefix_caching,
                # vLLM 0.32 CPU bug: a seeded request whose prefill is split across steps crashes the
                # engine ("CPU Generator does not use offset"); whole-prompt prefill avoids the split.
                enable_chunked_prefill=False,
                max_num_batched_tokens=max(cfg.max_model_len, 4096),
                logprobs_mode="processed_logprobs",
            )
        except BaseException:
            self._remove_dense_folder()
            raise
        self.start_time_s = time.perf_counter() - t0

    # ---- sampling ------------------------------------------------------------------------

    def _sampling_params(self, n, temperature, top_p, max_tokens, seed, stop):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,  # primitive lists instead of a dict per token
            stop_token_ids=self._stop_ids if stop else [],
            ignore_eos=not stop,  # the checkpoint's generation_config lists the same stop ids as EOS
            allowed_token_ids=self._allowed,  # padded vocab rows are masked (-inf) before sampling
            detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
        *,
        stop: bool = True,
    ) -> list[list[Completion]]:
        """`n` completions for each prompt (canonical ids); result[i][j] is sample j of prompt i.

        `seed`: prompt i samples from `rl.seeds.request_seed(seed, i, n)`, so callers that
        give workers seed, seed+1, ... never share a stream. `stop=False` ignores the Harmony stop
        tokens and samples exactly `max_tokens` (benchmarks).
        """
        if n < 1 or max_tokens < 1:
            raise ValueError(f"generate needs n >= 1 and max_tokens >= 1, got {n=} {max_tokens=}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate needs temperature >= 0, 0 < top_p <= 1; got {temperature=} {top_p=}")
        if self.llm is None:
            raise RuntimeError("generate on a shut-down RolloutEngine; start a new one")
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        limit = self.config.max_model_len
        batch = []
        for i, p in enumerate(prompts):
            if not 0 < len(p) < limit:
                raise ValueError(f"prompt {i} has {len(p)} ids; need 1 .. {limit - 1} ({limit=})")
            batch.append(TokensPrompt(prompt_token_ids=self.vocab.to_model(p)))
        seeds = [None if seed is None else request_seed(seed, i, n) for i in range(len(batch))]
        params = [self._sampling_params(n, temperature, top_p, max_tokens, s, stop) for s in seeds]
        t0 = time.perf_counter()
        outputs = self.llm.generate(batch, params, use_tqdm=False)
        self.stats["generate_s"] += time.perf_counter() - t0
        self.stats["generate_calls"] += 1
        result = []
        for i, out in enumerate(outputs):
            if len(out.outputs) != n:
                raise RuntimeError(f"prompt {i}: vLLM returned {len(out.outputs)} samples, asked for {n}")
            result.append([self._completion(c) for c in sorted(out.outputs, key=lambda c: c.index)])
        return result

    def _completion(self, c) -> Completion:
        ids = list(c.token_ids)
        flat = c.logprobs  # FlatLogprobs: the sampled token comes first at every position
        got = 0 if flat is None else len(flat.start_indices)
        if got != len(ids):
            raise RuntimeError(f"vLLM returned {got} log-probs for {len(ids)} tokens")
        logprobs = [flat.logprobs[s] for s in flat.start_indices]
        if c.finish_reason not in FINISH_REASONS:
            raise RuntimeError(f"unexpected finish_reason {c.finish_reason!r} ({c.stop_reason=})")
        self.stats["tokens"] += len(ids)
        return Completion(self.vocab.to_canonical(ids), logprobs, c.finish_reason)

    # ---- weights ---------------------------------------------------------------------------

    def update_weights(
        self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> dict:
        """Load an HF-named gpt-oss state dict into the live engine; returns timing and counts."""
        t0 = time.perf_counter()
        if self._on_cpu:
            converted = hf_to_vllm(named_tensors)
            n = self.llm.apply_model(lambda model: load_into_vllm_cpu(model, converted))[0]
        else:  # GPU build: vLLM's own in-place reload (it runs process_weights_after_loading)
            items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
            kwargs = {"weights_iterator": iter(list(items)), "is_checkpoint_format": True}
            self.llm.collective_rpc("reload_weights", kwargs=kwargs)
            n = None
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("weights updated, but vLLM refused to reset its prefix cache (busy?)")
        self.weights_version += 1
        seconds = time.perf_counter() - t0
        self.stats["last_update_s"] = seconds
        return {"tensors": n, "seconds": seconds, "weights_version": self.weights_version}

    def update_weights_from_path(self, path: str | os.PathLike) -> dict:
        """Full reload from an HF checkpoint folder (same vocabulary map), in place.

        Reads what transformers reads: the shards `model.safetensors.index.json` names, else
        `model.safetensors` (other *.safetensors in the folder, e.g. stale shards or a PEFT
        adapter, are not weights of this model). Released-style MXFP4 experts (`*_blocks` /
        `*_scales`, e.g. from `rl.model.export_mxfp4`) are decoded to fp32 first: the engine
        then computes with exactly the 4-bit values, as after a QAT sync."""
        from kernels.mxfp4_checkpoint import read_state_dict, require_checkpoint, unpack_state_dict

        require_checkpoint(path)  # cheap checks before reading gigabytes
        if VocabMap.load(path) != self.vocab:
            raise ValueError(f"{path}: vocabulary map differs from the engine's; start a new engine")
        state = unpack_state_dict(read_state_dict(path), torch.float32)  # other tensors pass through as read
        info = self.update_weights(state)
        self.checkpoint = str(path)
        return info

    # ---- lifecycle -------------------------------------------------------------------------

    def health(self) -> dict:
        """Liveness probe: one greedy token through the engine, plus counters."""
        if self.llm is None:
            return {"ok": False, "error": "engine shut down", "pid": os.getpid(), "checkpoint": self.checkpoint}
        t0 = time.perf_counter()
        probe = self.generate([self.vocab.to_canonical([0])], max_tokens=1, temperature=0.0)
        return {
            "ok": len(probe[0][0].ids) == 1,
            "probe_ms": 1000 * (time.perf_counter() - t0),
            "pid": os.getpid(),
            "checkpoint": self.checkpoint,
            "weights_version": self.weights_version,
            "start_time_s": self.start_time_s,
            "max_model_len": self.config.max_model_len,
            **self.stats,
        }

    def _remove_dense_folder(self) -> None:
        import shutil

        if getattr(self, "_dense_folder", None) is not None:
            shutil.rmtree(self._dense_folder, ignore_errors=True)
            self._dense_folder = None

    def shutdown(self) -> None:
        """Free the engine (and vLLM's process-group state, so another engine can start here)."""
        self._remove_dense_folder()
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()


# The Ray actor: same methods, called as `worker.generate.remote(...)`. Give it CPUs with
# `RolloutWorker.options(num_cpus=...)`; the engine runs in the actor process itself.
RolloutWorker = ray.remote(RolloutEngine)
