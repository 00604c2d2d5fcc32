"""Rollout engine: vLLM in-process behind a token-in/token-out API, and its Ray actor.

What it does
- `RolloutEngine(checkpoint, cfg, seed)` starts `vllm.LLM` on an HF folder written by `rl.model`
  with the settings of `cfg` (a `rl.config.RolloutConfig`: dtype, tensor_parallel_size,
  gpu_memory_utilization, enforce_eager, enable_prefix_caching, max_num_seqs, block_size, max_model_len; on CPU
  `kv_cache_gib` becomes `VLLM_CPU_KVCACHE_SPACE`; `num_threads`; `log_level`). No tokenizer:
  `skip_tokenizer_init=True`, prompts go in as `TokensPrompt` ids. The engine lives in this process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), which is what a Ray actor needs and what lets
  `update_weights` reach the live `nn.Module`.
- `generate(prompts, n, ...)` takes canonical o200k_harmony ids, maps them to model ids through the
  checkpoint's `VocabMap`, samples `n` completions per prompt and returns canonical ids, the
  behaviour log-prob of every sampled token and the finish reason. Harmony's `<|return|>` and
  `<|call|>` stop sampling and are the last id of a "stop" completion, so
  `envs.harmony.parse_completion` sees them. Sampling settings not given come from `cfg`.
  `analysis_caps` (one per prompt, None = uncapped) turns on budget forcing (rl/forcing.py): an
  analysis message that reaches its cap is closed and the final channel opened by inserted ids,
  which the completion marks (`sampled` 0 there, `budget_forced`); still one `Completion` per sample.
  `python_tool=True` (with `rollout.tools.python.enabled`) runs python-tool episodes instead
  (rl/tools.py, envs/tool_episode.py): a call `to=python` is answered by the sandbox, the answer is
  inserted (`sampled` 0) and sampling goes on; one `Completion` per sample, all its turns in it.
- `update_weights(state_dict)` loads an HF-named `GptOssForCausalLM.state_dict()` into the live
  engine in place (rl/vllm_weights.py): no restart, no disk. `update_weights_from_path(path)` does
  the same from a checkpoint folder. Both reset vLLM's prefix cache so no KV computed with old
  weights is reused. `update_weights(TrainedWeights(...))` loads only the tensors that train (the
  learner's syncs after its first, rl/vllm_weights.py); the engine keeps the rest.
- `RolloutWorker` is the Ray actor class around `RolloutEngine` (same methods, `.remote(...)`);
  `rl.workers.WorkerPool` runs several of them.

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

Departures / limits
- vLLM's MXFP4 MoE runs on GPUs with bf16 activations only (on CPU, vLLM 0.32 rejects fp32 and
  dies of SIGILL in bf16). Elsewhere a released-style MXFP4 checkpoint folder starts the engine
  from a temporary dense copy (experts decoded once, exactly the 4-bit values; removed at shutdown).
- One live engine per process (`shutdown()` frees it; a new one then starts in ~2 s). Starting
  vLLM turns `torch.set_num_threads` into a no-op for the whole process: the engine sets the
  thread count (`cfg.num_threads`, default 1) just before. Code sharing the process (tests, the
  benchmark's HF side) runs at that count afterwards. 1 thread is fastest on the 2-core box: tiny
  ops pay an OMP barrier each, and with other processes busy 2 threads measured 0.2-0.8k tok/s vs
  3.2k with 1.
- `seed=None` uses the engine's seeded global stream (the constructor's `seed`; reproducible per
  engine lifetime only); a given `seed` makes the call reproducible on its own, whatever else is
  batched with it: prompt i samples from `rl.seeds.request_seed(seed, first_index + i, n)`.
- Chunked prefill is off: with it, vLLM 0.32 on CPU crashes on seeded requests whose prompt is
  split across steps. Prompts are prefilled whole (up to max(max_model_len, 4096) tokens a step).
- The GPU path (tensor parallelism, `reload_weights`) is written to vLLM's documented API but has
  not run on a GPU in this project yet. GPU settings come from `rollout.*`: `dtype`,
  `tensor_parallel_size` (the worker's Ray `num_gpus` must cover it), `gpu_memory_utilization`,
  `enforce_eager` (false = CUDA graphs; on CPU a torch.compile'd graph), `quantization` (null = the checkpoint's own; `mxfp4` =
  refuse to start unless the released 4-bit experts are served as such). Weight sync into a 4-bit
  engine: `reload_weights` takes checkpoint-format tensors, i.e. packed `*_blocks`/`*_scales` for
  an MXFP4 engine, while the learner (one process, or the FSDP2 group's buckets) sends dense (QAT:
  fake-quantised) experts; unverified, and a packed sync is not built.

Run `.venv/bin/python -m bench.bench_rollout` for throughput and sync time.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import ray
import torch

from envs import harmony
from envs.harmony import STOP_TOKENS
from rl import forcing, tools
from rl.config import RolloutConfig
from rl.model import VocabMap
from rl.seeds import request_seed
from rl.vllm_weights import TrainedWeights, WeightBuckets, load_buckets, load_weights

FINISH_REASONS = ("stop", "length")
CPU_BLOCK_SIZE = 32  # rollout.block_size=null on CPU (vLLM's CPU default is 128; 32 is ~20% faster here)


@dataclass
class Completion:
    """One sampled completion: canonical ids, behaviour log-prob per id, "stop" | "length".

    `sampled[k]` is 1 where the policy sampled `ids[k]` and 0 where it was inserted (budget forcing,
    rl/forcing.py; a python tool's answer, rl/tools.py; the sample's loss mask); all 1 when not given.
    `budget_forced`: budget forcing inserted ids."""

    ids: list[int]
    logprobs: list[float]
    finish_reason: str
    sampled: list[int] | None = None
    budget_forced: bool = False

    def __post_init__(self):
        if self.sampled is None:
            self.sampled = [1] * len(self.ids)
        if not len(self.ids) == len(self.logprobs) == len(self.sampled):
            raise ValueError(f"Completion needs one log-prob and one sampled flag per id: {len(self.ids)} ids, "
                             f"{len(self.logprobs)} log-probs, {len(self.sampled)} flags")


def _prepare_environment(cfg: RolloutConfig) -> bool:
    """Set what vLLM reads when it starts the engine; returns whether it runs on CPU."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # model in this process (Ray actor, updates)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", cfg.log_level)
    if cfg.num_threads:
        # vLLM keeps torch's thread count when OMP_NUM_THREADS is set, then (at engine start)
        # patches set_num_threads into a no-op for the whole process: this is the last chance.
        os.environ["OMP_NUM_THREADS"] = str(cfg.num_threads)
        torch.set_num_threads(cfg.num_threads)
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if on_cpu:  # read at engine start; vLLM CPU takes whole GiB
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_gib)))
    return on_cpu


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


def _check_mxfp4_serving(checkpoint: str, cfg: RolloutConfig, on_cpu: bool) -> None:
    """`rollout.quantization=mxfp4` promises 4-bit experts in the engine: refuse what would decode them."""
    from rl.model import is_mxfp4_checkpoint

    if not is_mxfp4_checkpoint(checkpoint):
        raise ValueError(f"rollout.quantization=mxfp4 but {checkpoint} is not a released-style MXFP4 folder "
                         "(config.json has no quantization_config with quant_method mxfp4); set "
                         "rollout.quantization=null to serve its weights as stored")
    if on_cpu or cfg.dtype != "bfloat16":
        raise ValueError(f"rollout.quantization=mxfp4 needs a GPU and rollout.dtype=bfloat16 (vLLM's MXFP4 MoE); "
                         f"here on_cpu={on_cpu}, rollout.dtype={cfg.dtype}. rollout.quantization=null decodes the "
                         "experts to a dense copy instead")


class RolloutEngine:
    """vLLM in this process; canonical ids in and out. See the module docstring."""

    def __init__(self, checkpoint: str | os.PathLike, cfg: RolloutConfig, seed: int):
        self.cfg, self.seed = cfg, seed
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
        if cfg.budget_forcing.enabled:
            self._check_forcing_ids()  # fail at start, not at the first capped rollout
        self._python = None  # the sandbox the python tool runs in (rl/tools.py), started with the engine
        if cfg.tools.python.enabled:
            self._check_ids(tools.header_ids(), "the python tool's answers insert the headers")
            self._python = tools.SandboxExecutor(cfg.tools.python)  # no bubblewrap: fails here, at start
        self.weights_version = 0
        self.stats = {"generate_calls": 0, "tokens": 0, "generate_s": 0.0, "last_update_s": None,
                      "budget_forced": 0, "tool_calls": 0}

        t0 = time.perf_counter()
        self._on_cpu = _prepare_environment(cfg)
        self._dense_folder = None  # decoded copy of an MXFP4 checkpoint, removed at shutdown
        from rl.model import is_mxfp4_checkpoint

        if cfg.quantization == "mxfp4":
            _check_mxfp4_serving(self.checkpoint, cfg, self._on_cpu)
        if is_mxfp4_checkpoint(self.checkpoint) and (self._on_cpu or cfg.dtype != "bfloat16"):
            # vLLM's MXFP4 MoE needs bf16 activations and a GPU: on CPU it rejects fp32 and dies of
            # SIGILL in bf16. Decode the experts once; the engine then samples from the same values.
            self._dense_folder = dense_copy_of_mxfp4(self.checkpoint)
        # Warmup renders a chat template through the tokenizer we do not have: harmless, but it
        # logs a traceback at WARNING. A filter, not a level: vLLM's dictConfig resets levels.
        logging.getLogger("vllm.renderers.base").addFilter(_drop_chat_template_warmup)
        try:
            self.llm = self._start_llm(str(self._dense_folder or self.checkpoint))
        except BaseException:
            self._remove_dense_folder()
            raise
        self.start_time_s = time.perf_counter() - t0

    def _start_llm(self, model: str):
        from vllm import LLM

        cfg = self.cfg
        return LLM(
            model=model,
            skip_tokenizer_init=True,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,  # CPU: kv_cache_gib decides instead
            max_model_len=cfg.max_model_len,
            seed=self.seed,
            enforce_eager=cfg.enforce_eager,  # False: CUDA graphs for decode (GPU; minutes of capture at start)
            quantization=cfg.quantization,  # None: the checkpoint's quantization_config decides
            max_num_seqs=cfg.max_num_seqs,
            block_size=cfg.block_size or (CPU_BLOCK_SIZE if self._on_cpu else None),  # GPU None: vLLM picks
            enable_prefix_caching=cfg.enable_prefix_caching,
            # vLLM 0.32 CPU bug: a seeded request whose prefill is split across steps crashes the
            # engine ("CPU Generator does not use offset"); whole-prompt prefill avoids the split.
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(cfg.max_model_len, 4096),
            logprobs_mode="processed_logprobs",
            use_tqdm_on_load=False,  # no "Loading safetensors checkpoint shards" bar per engine start
        )

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
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        *,
        stop: bool = True,
        first_index: int = 0,
        analysis_caps: Sequence[int | None] | None = None,
        python_tool: bool = False,
    ) -> list[list[Completion]]:
        """`n` completions for each prompt (canonical ids); result[i][j] is sample j of prompt i.

        `temperature`, `top_p`, `max_tokens`: None = the engine's `cfg`. `seed`: prompt i samples
        from `rl.seeds.request_seed(seed, first_index + i, n)`, so callers that give workers
        seed, seed+1, ... never share a stream, and a caller that splits one prompt list into
        chunks (giving each its offset as `first_index`) gets what one call would have given.
        `stop=False` ignores the Harmony stop tokens and samples exactly `max_tokens` (benchmarks).
        `analysis_caps[i]`: at most this many analysis tokens for prompt i, by budget forcing
        (rl/forcing.py; None = no cap); None = no forcing at all. `python_tool`: calls `to=python`
        are answered by the sandbox and sampling goes on (rl/tools.py; needs
        `rollout.tools.python.enabled`); `max_tokens` then bounds each whole episode.
        """
        temperature = self.cfg.temperature if temperature is None else temperature
        top_p = self.cfg.top_p if top_p is None else top_p
        max_tokens = self.cfg.max_tokens if max_tokens is None else max_tokens
        if n < 1 or max_tokens < 1:
            raise ValueError(f"generate needs n >= 1 and max_tokens >= 1, got {n=} {max_tokens=}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate needs temperature >= 0, 0 < top_p <= 1; got {temperature=} {top_p=}")
        if self.llm is None:
            raise RuntimeError("generate on a shut-down RolloutEngine; start a new one")
        if not prompts:
            return []
        limit = self.cfg.max_model_len
        for i, p in enumerate(prompts):
            if not 0 < len(p) < limit:
                raise ValueError(f"prompt {i} has {len(p)} ids; need 1 .. {limit - 1} ({limit=})")
        seeds = [None if seed is None else request_seed(seed, first_index + i, n) for i in range(len(prompts))]
        sample = functools.partial(self._sample, sampling=(temperature, top_p, stop))
        budgets = [min(max_tokens, limit - len(p)) for p in prompts]  # vLLM stops at the model length
        if python_tool:
            return self._tool_episodes(sample, prompts, n, budgets, seeds, analysis_caps)
        if analysis_caps is None:
            return sample([forcing.Request(list(p), n, max_tokens, s) for p, s in zip(prompts, seeds)])
        if len(analysis_caps) != len(prompts):
            raise ValueError(f"{len(analysis_caps)} analysis caps for {len(prompts)} prompts")
        self._check_forcing_ids()
        result = forcing.generate(sample, prompts, n, analysis_caps, budgets, seeds)
        self.stats["budget_forced"] += sum(c.budget_forced for comps in result for c in comps)
        return result

    def _sample(self, requests: Sequence[forcing.Request], sampling: tuple) -> list[list[Completion]]:
        """One vLLM call: `r.n` completions of each request's prompt; `sampling` = (temperature,
        top_p, stop)."""
        from vllm.inputs import TokensPrompt

        temperature, top_p, stop = sampling
        batch = [TokensPrompt(prompt_token_ids=self.vocab.to_model(r.prompt)) for r in requests]
        params = [self._sampling_params(r.n, temperature, top_p, r.max_tokens, r.seed, stop) for r in requests]
        t0 = time.perf_counter()
        outputs = self.llm.generate(batch, params, use_tqdm=False)
        self.stats["generate_s"] += time.perf_counter() - t0
        self.stats["generate_calls"] += 1
        result = []
        for i, (r, out) in enumerate(zip(requests, outputs)):
            if len(out.outputs) != r.n:
                raise RuntimeError(f"prompt {i}: vLLM returned {len(out.outputs)} samples, asked for {r.n}")
            result.append([self._completion(c) for c in sorted(out.outputs, key=lambda c: c.index)])
        return result

    def _tool_episodes(self, sample, prompts, n, budgets, seeds, analysis_caps) -> list[list[Completion]]:
        if self._python is None:
            raise ValueError("generate(python_tool=True) needs rollout.tools.python.enabled: the engine starts "
                             "the tool's sandbox pool with it")
        if analysis_caps is not None:
            raise ValueError("budget forcing and the python tool are not combined; pass one of them")
        vocab = self.vocab
        keep = None if vocab.canonical is None else (lambda t: vocab.covers((t,)))
        episodes = tools.episodes(sample, prompts, n, budgets, seeds, self.cfg.tools.python, self._python, keep)
        self.stats["tool_calls"] += sum(e.calls for eps in episodes for e in eps)
        return [[Completion(e.ids, e.logprobs, e.finish_reason, e.sampled) for e in eps] for eps in episodes]

    def _check_forcing_ids(self) -> None:
        self._check_ids(harmony.forced_final_header(), "budget forcing inserts Harmony's final-channel header")

    def _check_ids(self, ids, what: str) -> None:
        if not self.vocab.covers(ids):
            raise ValueError(f"{self.checkpoint}: {what} {list(ids)}, which the model's vocabulary map lacks; "
                             "rebuild it with them")

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
        self,
        named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | WeightBuckets | TrainedWeights,
    ) -> dict:
        """Load an HF-named gpt-oss state dict into the live engine; returns timing and counts.

        A state dict with wrong names or shapes is rejected before anything is copied (CPU).
        `WeightBuckets` (the FSDP learner group's update) are fetched from Ray's object store and
        loaded one at a time, so the worker holds one bucket besides its engine (rl/vllm_weights.py).
        `TrainedWeights` (the tensors that train; its dict or an ObjectRef to it) is a partial update:
        every other tensor stays as the last full update left it."""
        t0 = time.perf_counter()
        if isinstance(named_tensors, WeightBuckets):
            n = load_buckets(self.llm, (ray.get(ref) for ref in named_tensors.refs), self._on_cpu)
        elif isinstance(named_tensors, TrainedWeights):
            part = named_tensors.tensors
            n = load_weights(self.llm, ray.get(part) if isinstance(part, ray.ObjectRef) else part, self._on_cpu,
                             partial=True)
        else:
            n = load_weights(self.llm, named_tensors, self._on_cpu)
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
        """Liveness probe: one greedy token through the engine, plus counters and the pid."""
        if self.llm is None:
            return {"ok": False, "error": "engine shut down", "pid": os.getpid(),
                    "checkpoint": self.checkpoint}
        t0 = time.perf_counter()
        probe = self.generate([self.vocab.to_canonical([0])], max_tokens=1, temperature=0.0)
        return {
            "ok": len(probe[0][0].ids) == 1,
            "probe_ms": 1000 * (time.perf_counter() - t0),
            "pid": os.getpid(),
            "checkpoint": self.checkpoint,
            "weights_version": self.weights_version,
            "start_time_s": self.start_time_s,
            "max_model_len": self.cfg.max_model_len,
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
        if getattr(self, "_python", None) is not None:
            self._python.close()
            self._python = None
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


# The Ray actor: same methods, called as `worker.generate.remote(...)`. Give it resources with
# `RolloutWorker.options(num_cpus=..., num_gpus=...)`; the engine runs in the actor process itself.
RolloutWorker = ray.remote(RolloutEngine)
