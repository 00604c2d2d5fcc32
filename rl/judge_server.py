"""LLM safety judges served by vLLM on a Ray actor: `reward.terms.safety.judge=vllm` (issue 15 §3a).

What
- `JudgeEngine(model, format, ...)`: vLLM in this process, answering judge conversations (the
  documented judge prompt, `rewards.judge.judge_messages`) greedily, a whole batch per call:
  - `format="harmony"`: a gpt-oss checkpoint (the released ones, gpt-oss-safeguard, or a tiny one):
    the judge's system text goes where gpt-oss reads instructions (the Harmony developer message;
    gpt-oss-safeguard's card puts the policy there too), the request in the user message, rendered
    by openai-harmony and sampled through `rl.engine.RolloutEngine` (canonical ids, the trimmed-vocab
    map of a tiny model); the answer is the final channel (the judge's own analysis is not read).
  - `format="chat"`: any HF chat model with a tokenizer and chat template (`vllm.LLM.chat`).
  - `format="auto"`: harmony when the checkpoint's config.json says `model_type: gpt_oss`.
  A conversation the engine cannot take (ids outside a trimmed vocabulary, a prompt longer than
  `max_model_len`) is that request's error, never the batch's.
- `VLLMJudge(model, ...)`: the judge backend (`judge(spec, requests) -> list[Verdict]`): one Ray
  actor holding a `JudgeEngine` (`num_cpus`, `num_gpus` for its placement), one remote call per
  batch, `timeout_s` per call; the engine's load gets its own `load_timeout_s`, waited for before the
  first call (a slow load is not a timed-out first batch); parsing and the failure policy are `rewards.judge.ChatJudge`'s
  (garbage, partial JSON, a judge refusing to judge, a dead actor, a timeout: failed verdicts,
  then the `safety` reward's `on_failure`).
- Importing this module registers the backend as judge "vllm" (`rewards.safety.register_judge`);
  `rl.data.make_reward` imports it, so `rewards` never imports `rl`.

Config: `reward.terms.safety: {weight: 1, judge: vllm, model: /ckpt/gpt-oss-safeguard-20b,
num_gpus: 1, max_tokens: 512}`; options: `format`, `max_tokens`, `max_model_len`, `reasoning_effort`
(harmony), `num_cpus`, `num_gpus`, `timeout_s`, `load_timeout_s`, `dtype`, `gpu_memory_utilization`, `seed`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from rewards.judge import ChatJudge, JudgeRequest, Verdict
from rewards.safety import register_judge

FORMATS = ("auto", "harmony", "chat")
log = logging.getLogger(__name__)


def checkpoint_format(model: str | os.PathLike) -> str:
    """"harmony" for a gpt-oss checkpoint folder, else "chat"."""
    config = Path(model, "config.json")
    if config.exists() and json.loads(config.read_text()).get("model_type") == "gpt_oss":
        return "harmony"
    return "chat"


class JudgeEngine:
    """vLLM for one judge model; `complete_batch(conversations)` -> one (text, error) per conversation."""

    def __init__(self, model: str, format: str = "auto", max_tokens: int = 512, max_model_len: int = 4096,
                 reasoning_effort: str = "low", dtype: str = "auto", gpu_memory_utilization: float = 0.5,
                 seed: int = 0):
        if format not in FORMATS:
            raise ValueError(f"format={format!r} is not one of {FORMATS}")
        if max_tokens < 1 or max_model_len <= max_tokens:
            raise ValueError(f"need 1 <= max_tokens < max_model_len, got {max_tokens=} {max_model_len=}")
        self.format = checkpoint_format(model) if format == "auto" else format
        self.max_tokens, self.effort, self.seed = max_tokens, reasoning_effort, seed
        if self.format == "harmony":
            from rl.config import RolloutConfig
            from rl.engine import RolloutEngine

            cfg = RolloutConfig(temperature=0.0, max_tokens=max_tokens, max_model_len=max_model_len,
                                gpu_memory_utilization=gpu_memory_utilization,
                                **({} if dtype == "auto" else {"dtype": dtype}))
            self.engine = RolloutEngine(model, cfg, seed)
        else:
            from vllm import LLM

            self.llm = LLM(model=str(model), dtype=dtype, max_model_len=max_model_len, seed=seed,
                           gpu_memory_utilization=gpu_memory_utilization, enforce_eager=True)

    def complete_batch(self, conversations: Sequence[list[dict[str, str]]]) -> list[tuple[str | None, str | None]]:
        if self.format == "harmony":
            return self._harmony(conversations)
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens, seed=self.seed)
        outs = self.llm.chat(list(conversations), params, use_tqdm=False)
        return [(o.outputs[0].text, None) for o in outs]

    def _harmony(self, conversations) -> list[tuple[str | None, str | None]]:
        from envs import harmony

        out: list[tuple[str | None, str | None]] = [(None, None)] * len(conversations)
        prompts, where = [], []
        limit = self.engine.cfg.max_model_len - 1
        for i, conv in enumerate(conversations):
            system = "\n\n".join(m["content"] for m in conv if m["role"] in ("system", "developer"))
            user = "\n\n".join(m["content"] for m in conv if m["role"] == "user")
            ids = harmony.render_prompt(user, self.effort, developer=system or None)
            if not self.engine.vocab.covers(ids):
                out[i] = (None, "the judge prompt holds tokens outside the judge model's vocabulary")
            elif len(ids) >= limit:
                out[i] = (None, f"the judge prompt has {len(ids)} tokens; the judge's max_model_len allows {limit}")
            else:
                prompts.append(ids)
                where.append(i)
        if prompts:
            completions = self.engine.generate(prompts, 1, temperature=0.0, seed=self.seed)
            for i, comps in zip(where, completions):
                t = harmony.parse_completion(comps[0].ids)
                text = t.final if t.final is not None else harmony.decode(comps[0].ids)
                out[i] = (text, None)
        return out

    def ready(self) -> bool:
        """Answers once the engine is loaded (Ray runs an actor's methods after its constructor)."""
        return True

    def close(self) -> None:
        if self.format == "harmony":
            self.engine.shutdown()


class VLLMJudge:
    """The "vllm" judge backend: a Ray actor serving `model` (see the module docstring)."""

    def __init__(self, model: str, format: str = "auto", max_tokens: int = 512, max_model_len: int = 4096,
                 reasoning_effort: str = "low", num_cpus: float = 1, num_gpus: float = 0, timeout_s: float = 600.0,
                 dtype: str = "auto", gpu_memory_utilization: float = 0.5, seed: int = 0,
                 load_timeout_s: float = 1800.0):
        import ray

        if not Path(model, "config.json").exists():
            raise FileNotFoundError(f"judge model {model!r}: not an HF checkpoint folder (no config.json)")
        if timeout_s <= 0 or load_timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} and load_timeout_s={load_timeout_s} must be > 0")
        self.timeout_s, self.load_timeout_s, self._loaded = timeout_s, load_timeout_s, False
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=1)(JudgeEngine)
        self.actor = actor.remote(str(model), format, max_tokens, max_model_len, reasoning_effort, dtype,
                                  gpu_memory_utilization, seed)
        self.chat = ChatJudge(complete_batch=self._complete_batch)

    def _complete_batch(self, conversations):
        import ray

        if self.actor is None:
            raise RuntimeError("this VLLMJudge was closed; build a new one")

        if not self._loaded:  # the engine's load time is not the first call's: it has its own limit
            ray.get(self.actor.ready.remote(), timeout=self.load_timeout_s)
            self._loaded = True
        results = ray.get(self.actor.complete_batch.remote(conversations), timeout=self.timeout_s)
        return [RuntimeError(err) if err is not None else text for text, err in results]

    def judge(self, spec, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        return self.chat.judge(spec, requests)

    def close(self, wait_s: float = 60.0) -> None:
        """Shuts the engine down (its temporary folders go with it), then kills the actor and waits (up to
        `wait_s` in all) until it is gone (`rl.cluster.kill_actors`); an engine that fails or hangs on
        shutdown is killed all the same. Idempotent."""
        import time

        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from rl.cluster import kill_actors

        actor, self.actor = self.actor, None
        if actor is None:
            return
        start = time.monotonic()
        try:
            ray.get(actor.close.remote(), timeout=wait_s / 2)
        except (RayActorError, GetTimeoutError) as exc:
            log.warning("judge engine did not shut down cleanly (%s); killing its actor", type(exc).__name__)
        kill_actors([actor], max(1.0, wait_s - (time.monotonic() - start)))


register_judge("vllm", VLLMJudge)
