"""The rollout worker pool: `cfg.num_workers` vLLM engines as Ray actors, one call away from samples.

    pool = WorkerPool(model_path, cfg.rollout, seed)
    samples = pool.rollout(tasks, efforts, group_size, seed=step_seed)   # training
    completions = pool.generate(prompts, n, temperature=0.0, seed=None)  # evaluation
    pool.update_weights(learner.state_for_sync.remote())                 # in place, every worker
    pool.close()

How requests are spread
- `rollout`: every task at every effort is one prompt (`rl.tools.task_prompt`) sampled
  `group_size` times. Prompt k goes to worker k mod W, and worker i samples with seed `seed + i`
  (each prompt's own stream is `rl.seeds.request_seed(seed + i, position, n)`). Samples come back in
  task, effort, sample order whichever worker answered first. With `rollout.budget_forcing.enabled`
  each prompt carries its effort's analysis cap (rl/forcing.py). With `rollout.tools.python.enabled`
  prompts describe the python tool and the engines answer its calls (rl/tools.py), in `rollout` and
  in `generate` alike (evaluation measures the policy with the tools it was trained with).
- `generate`: contiguous chunks, each told its offset (`first_index`), so the result is what one
  engine would give for the whole list, whatever the number of workers.

Faults
  A worker whose process dies mid-call (Ray raises `RayActorError`) is replaced: a new actor starts
  from the start checkpoint, loads the latest weights the pool was given (so it samples from the
  learner's current policy, not the initial one) and gets only the dead worker's requests again, with
  the same seeds: the samples a healthy worker would have produced, given identical weights. Each
  replacement logs a warning and counts in `restarts`; past `cfg.max_restarts` in one call the pool
  raises. The pool keeps a reference to the latest weights in Ray's object store (one copy) for this.
  An error raised inside a worker (a bad prompt, a bad weight update) is not a fault: it propagates.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from envs import harmony
from envs.types import Sample, Task
from rl import forcing, tools
from rl.config import RolloutConfig
from rl.engine import Completion, RolloutWorker

ENGINES = {"vllm": RolloutWorker}  # rollout.engine -> the Ray actor class (its choices in rl/config.py)

log = logging.getLogger(__name__)


class WorkerPool:
    """`cfg.num_workers` `RolloutWorker` actors (each `cfg.num_cpus` CPUs, `cfg.num_gpus` GPUs).

    Needs a running Ray (`rl.cluster.init_ray`). `worker_cls` is the actor class (tests pass a fake
    with the same methods)."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int, *, worker_cls=None, options=None):
        """`options(i)`: Ray actor options for worker slot i (`rl.placement.RunPlacement.worker_options`:
        resources and the placement-group bundle); default `cfg.num_cpus` / `cfg.num_gpus`, placed by Ray."""
        self.model_path, self.cfg, self.seed = str(model_path), cfg, seed
        self._options = options or (lambda i: {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus})
        if cfg.tools.python.enabled:
            tools.require_sandbox(cfg.tools.python)  # fail here, not as workers dying at their first call
        self._worker_cls = worker_cls or ENGINES[cfg.engine]
        self.restarts = 0  # workers replaced so far (all calls)
        self._latest: tuple[str, Any] | None = None  # (engine method, its argument) of the last update
        self._workers = [self._start(i) for i in range(cfg.num_workers)]

    # ---- sampling ----------------------------------------------------------------------------

    def rollout(self, tasks: Sequence[Task], efforts: Sequence[str], group_size: int,
                seed: int) -> list[Sample]:
        """Every task at every effort, `group_size` samples each (temperature, top_p, max_tokens
        from the engines' `cfg`), in task, effort, sample order."""
        jobs = [(t, e, tools.task_prompt(t, e, self.cfg.tools.python)) for t in tasks for e in efforts]
        width = len(self._workers)
        calls = {i: {"prompts": [p for _, _, p in jobs[i::width]], "n": group_size, "seed": seed + i}
                 for i in range(width) if jobs[i::width]}
        for i, call in calls.items():
            caps = forcing.analysis_caps(self.cfg.budget_forcing, [e for _, e, _ in jobs[i::width]])
            if caps is not None:  # only then: the call stays what it was without forcing
                call["analysis_caps"] = caps
            call.update(self._tool_args())
        answers = self._run("generate", calls)
        per_job: list[list[Completion]] = [[] for _ in jobs]
        for i, comps in answers.items():
            for k, c in zip(range(i, len(jobs), width), comps):  # worker i had jobs i, i+W, ...
                per_job[k] = c
        return [to_sample(task, effort, prompt, c) for (task, effort, prompt), comps in zip(jobs, per_job)
                for c in comps]

    def generate(self, prompts: list[list[int]], n: int, *, temperature: float,
                 seed: int | None) -> list[list[Completion]]:
        """`n` completions per prompt (evaluation; top_p and max_tokens from `cfg`; never budget-forced:
        evaluation measures the policy alone); result[i][j] is sample j of prompt i, the same for any
        number of workers when `seed` is given."""
        size = math.ceil(len(prompts) / len(self._workers)) if prompts else 0
        calls = {i: {"prompts": prompts[i * size:(i + 1) * size], "n": n, "temperature": temperature,
                     "seed": seed, "first_index": i * size, **self._tool_args()}
                 for i in range(len(self._workers)) if prompts[i * size:(i + 1) * size]}
        answers = self._run("generate", calls)
        return [c for i in sorted(answers) for c in answers[i]]

    def _tool_args(self) -> dict:
        """`python_tool=True` only when the tool is on: the call stays what it was without it."""
        return {"python_tool": True} if self.cfg.tools.python.enabled else {}

    # ---- weights -----------------------------------------------------------------------------

    def update_weights(self, weights) -> None:
        """Load HF-named tensors (a dict, or a Ray ObjectRef to one, e.g. the learner actor's
        `state_for_sync.remote()`) into every worker in place; remembered for replacements."""
        import ray

        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)  # stored once
        self._update("update_weights", ref)

    def update_weights_from_path(self, path: str) -> None:
        """Load an HF checkpoint folder (same vocabulary) into every worker; remembered too."""
        self._update("update_weights_from_path", str(path))

    def _update(self, method: str, arg) -> None:
        self._latest = (method, arg)  # before sending: a replacement started now loads this one
        # A worker that dies here is replaced and loads `arg` while starting: nothing to re-send.
        self._run(method, {i: {} for i in range(len(self._workers))}, args=(arg,), resend=False)

    # ---- lifecycle ---------------------------------------------------------------------------

    def health(self) -> list[dict]:
        """Each worker's `RolloutEngine.health()` (pid, weights_version, counters)."""
        import ray

        return ray.get([w.health.remote() for w in self._workers])

    def close(self) -> None:
        """Shut the engines down (removes their temporary folders) and kill the actors; idempotent."""
        import ray

        workers, self._workers = self._workers, []
        if not workers or not ray.is_initialized():
            return
        try:
            ray.get([w.shutdown.remote() for w in workers], timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # a dead or stuck engine: killing it below is all that is left to do
        for w in workers:
            ray.kill(w, no_restart=True)
        self._latest = None

    # ---- fault handling ----------------------------------------------------------------------

    def _start(self, i: int):
        """Actor for worker slot `i` (engine seed `seed + i`), loaded with the latest weights."""
        import ray

        actor = self._worker_cls.options(**self._options(i)).remote(self.model_path, self.cfg, self.seed + i)
        if self._latest is not None:
            method, arg = self._latest
            ray.get(getattr(actor, method).remote(arg))
        return actor

    def _run(self, method: str, calls: dict[int, dict], args: tuple = (),
             resend: bool = True) -> dict[int, Any]:
        """`method(*args, **calls[i])` on every worker i named in `calls`, all at once; returns worker
        index -> result. A dead worker is replaced as soon as it is noticed (the others keep working)
        and, if `resend`, its call is sent again to the replacement."""
        import ray

        def send(i: int):
            return getattr(self._workers[i], method).remote(*args, **calls[i])

        pending = {send(i): i for i in calls}
        results: dict[int, Any] = {}
        used = 0  # restarts in this call
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done)
            try:
                results[i] = ray.get(done)
            except ray.exceptions.RayActorError as exc:
                used = self._replace(i, exc, used, method)
                if resend:
                    pending[send(i)] = i
        return results

    def _replace(self, i: int, exc: Exception, used: int, method: str) -> int:
        """Start a new worker in slot `i`; returns the restarts used by this call so far."""
        import ray

        while True:
            if used >= self.cfg.max_restarts:
                raise RuntimeError(
                    f"rollout worker {i} died during {method} and this call already restarted {used} "
                    f"worker(s) (rollout.max_restarts={self.cfg.max_restarts}); giving up. Why it died "
                    f"(out of memory? a vLLM crash?) is in the worker's log under Ray's session dir "
                    f"(logs/worker-*.err). Last error: {exc}") from exc
            used += 1
            self.restarts += 1
            log.warning("rollout worker %d died during %s (%s); starting a replacement with the latest "
                        "weights (restart %d of at most %d this call, %d in all)", i, method,
                        type(exc).__name__, used, self.cfg.max_restarts, self.restarts)
            ray.kill(self._workers[i], no_restart=True)  # already dead, or half dead: make sure
            try:
                self._workers[i] = self._start(i)
                return used
            except ray.exceptions.RayActorError as again:
                exc = again


def to_sample(task: Task, effort: str, prompt: list[int], c: Completion) -> Sample:
    """One completion of `prompt` (`task` at `effort`) as a `Sample`: loss mask 1 on sampled ids and
    0 on inserted ids (budget forcing, a python tool's answers), behaviour log-probs, parsed Harmony
    transcript (all turns), the task's metadata copied."""
    return Sample(
        task_id=task.task_id, env=task.env, effort=effort, prompt_ids=prompt,
        completion_ids=list(c.ids), loss_mask=list(c.sampled), behavior_logprobs=list(c.logprobs),
        transcript=harmony.parse_completion(c.ids), metadata=dict(task.metadata),
        finish_reason=c.finish_reason, budget_forced=c.budget_forced)
