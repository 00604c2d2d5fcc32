"""The rollout worker pool: `cfg.num_workers` vLLM engines as Ray actors, one call away from samples.

    pool = WorkerPool(model_path, cfg.rollout, seed)
    samples = pool.rollout(tasks, efforts, group_size, seed=step_seed)   # training
    future = pool.submit(tasks, efforts, group_size, seed=step_seed)     # the same, without waiting
    completions = pool.generate(prompts, n, temperature=0.0, seed=None)  # evaluation
    pool.update_weights(learner.state_for_sync.remote(), version=step)   # in place, every worker
    pool.close()

How requests are spread
- `rollout`: every task at every effort is one prompt (`rl.tools.task_prompt`) sampled
  `group_size` times. The prompts are cut into chunks (`rollout.groups_per_call`; by default all in
  one call with one worker, about four calls per worker with several) and a chunk goes to whichever
  worker is free (rl/dispatch.py), so a slow worker does not stall the step. Prompt k samples from
  `rl.seeds.request_seed(seed, k, n)` whichever worker serves it (chunk [a, b) is told
  `first_index=a`): the samples do not depend on the number of workers or on timing, and with one
  worker they are those of a single call. Samples come back in task, effort, sample order, each
  stamped with `policy_version`, the `version` of the weights the workers held. With
  `rollout.budget_forcing.enabled` each prompt carries its effort's analysis cap (rl/forcing.py).
  With `rollout.tools.python.enabled` prompts describe the python tool and the engines answer its
  calls (rl/tools.py), in `rollout` and in `generate` alike (evaluation measures the policy with the
  tools it was trained with).
- `generate`: the same queue of chunks, so the result is what one engine would give for the whole
  list, whatever the number of workers.

Ordering (what async training relies on)
  Every rollout, evaluation and weight update runs on one pool thread, in the order they were
  called: `submit` returns at once, and an `update_weights` called while rollouts are in flight waits
  for them to finish, then loads the weights into every worker; rollouts submitted after it sample
  the new weights. So a rollout never mixes two weight versions, and no weight load races with a
  generate call (a Ray actor runs its calls one at a time anyway; the FIFO makes the version of
  every sample known).

Faults
  A worker whose process dies mid-call (Ray raises `RayActorError`) is replaced: a new actor starts
  from the start checkpoint, loads the latest weights the pool was given (so it samples from the
  learner's current policy, not the initial one) and gets only the dead worker's requests again, with
  the same seeds: the samples a healthy worker would have produced, given identical weights. Each
  replacement logs a warning and counts in `restarts`; past `cfg.max_restarts` in one call the pool
  raises. The pool keeps a reference to the latest weights in Ray's object store (one copy) for this:
  the last full update, and the last trained-only update after it (`rl.vllm_weights.TrainedWeights`).
  An error raised inside a worker (a bad prompt, a bad weight update) is not a fault: it propagates.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

from envs import harmony
from envs.types import Sample, Task
from rl import forcing, tools
from rl.cluster import kill_actors
from rl.config import RolloutConfig
from rl.dispatch import plan_chunks, run_queue
from rl.engine import Completion, RolloutWorker
from rl.vllm_weights import TrainedWeights

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
        self.version: int | None = None  # `version` of the last weight update (stamped on samples)
        self.served: list[int] = []  # chunks each worker served in the last rollout / generate
        # (engine method, its argument) of the updates a new worker loads: the last full one, and the last
        # trained-only update after it (rl.vllm_weights.TrainedWeights)
        self._replay: list[tuple[str, Any]] = []
        self._closing = False
        self._ops = ThreadPoolExecutor(1, thread_name_prefix="rollout-pool")  # the FIFO of pool operations
        self._workers = [self._start(i) for i in range(cfg.num_workers)]

    # ---- sampling ----------------------------------------------------------------------------

    def rollout(self, tasks: Sequence[Task], efforts: Sequence[str], group_size: int,
                seed: int) -> list[Sample]:
        """Every task at every effort, `group_size` samples each (temperature, top_p, max_tokens
        from the engines' `cfg`), in task, effort, sample order."""
        return self.submit(tasks, efforts, group_size, seed).result()

    def submit(self, tasks: Sequence[Task], efforts: Sequence[str], group_size: int,
               seed: int) -> "Future[list[Sample]]":
        """`rollout` without waiting: a Future of its samples, run after every operation called before
        it (module docstring, "Ordering")."""
        jobs = [(t, e, tools.task_prompt(t, e, self.cfg.tools.python)) for t in tasks for e in efforts]
        return self._ops.submit(self._rollout, jobs, group_size, seed)

    def _rollout(self, jobs: list[tuple[Task, str, list[int]]], group_size: int, seed: int) -> list[Sample]:
        caps = forcing.analysis_caps(self.cfg.budget_forcing, [e for _, e, _ in jobs])
        comps = self._sample([p for _, _, p in jobs], {"n": group_size, "seed": seed, **self._tool_args()}, caps)
        return [to_sample(task, effort, prompt, c, self.version)
                for (task, effort, prompt), cs in zip(jobs, comps) for c in cs]

    def generate(self, prompts: list[list[int]], n: int, *, temperature: float, seed: int | None,
                 max_tokens: int | None = None, stop: bool = True) -> list[list[Completion]]:
        """`n` completions per prompt (evaluation; top_p from `cfg`, `max_tokens` None = `cfg`'s; never
        budget-forced: evaluation measures the policy alone); result[i][j] is sample j of prompt i, the same
        for any number of workers when `seed` is given. `stop=False`: exactly `max_tokens` each, Harmony
        stop tokens ignored (benchmarks, as `RolloutEngine.generate`)."""
        call = {"n": n, "temperature": temperature, "seed": seed, **self._tool_args()}
        if max_tokens is not None:
            call["max_tokens"] = max_tokens
        if not stop:  # only then: the call stays what it was
            call["stop"] = False
        return self._ops.submit(self._sample, list(prompts), call).result()

    def _sample(self, prompts: list[list[int]], call: dict, caps: list | None = None) -> list[list[Completion]]:
        """`generate(prompts, **call)` through the work queue: chunk [a, b) gets `first_index=a` (and
        its prompts' analysis caps); result[i] holds prompt i's completions."""
        import ray

        def send(i: int, chunk: range):
            kwargs = {**call, "prompts": prompts[chunk.start:chunk.stop], "first_index": chunk.start}
            if caps is not None:  # only then: the call stays what it was without forcing
                kwargs["analysis_caps"] = caps[chunk.start:chunk.stop]
            return self._workers[i].generate.remote(**kwargs)

        used = 0  # restarts in this call

        def replace(i: int, exc: BaseException) -> None:
            nonlocal used
            used = self._replace(i, exc, used, "generate")

        chunks = plan_chunks(len(prompts), len(self._workers), self.cfg.groups_per_call)
        answers, self.served = run_queue(chunks, len(self._workers), send, _wait_one, ray.get,
                                         faults=(ray.exceptions.RayActorError,), replace=replace)
        return [c for answer in answers for c in answer]

    def _tool_args(self) -> dict:
        """`python_tool=True` only when the tool is on: the call stays what it was without it."""
        return {"python_tool": True} if self.cfg.tools.python.enabled else {}

    # ---- weights -----------------------------------------------------------------------------

    def update_weights(self, weights, version: int | None = None) -> None:
        """Load HF-named tensors (a dict, a Ray ObjectRef to one, e.g. the learner actor's
        `state_for_sync.remote()`, the FSDP group's `rl.vllm_weights.WeightBuckets`, which each
        worker loads a bucket at a time, or `TrainedWeights`, the tensors that train, loaded over the last
        full update) into every worker in place, after the rollouts already submitted;
        remembered for replacements. `version` (the learner step of these weights) is stamped on the
        samples drawn with them. Returns when every worker holds them."""
        import ray

        if isinstance(weights, TrainedWeights):  # the tensors that train only: stored once, as a full update is
            part = weights.tensors
            ref = TrainedWeights(part if isinstance(part, ray.ObjectRef) else ray.put(part))
        else:
            ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)  # a snapshot, stored once
        self._ops.submit(self._update, "update_weights", ref, version).result()

    def update_weights_from_path(self, path: str, version: int | None = None) -> None:
        """Load an HF checkpoint folder (same vocabulary) into every worker; remembered too."""
        self._ops.submit(self._update, "update_weights_from_path", str(path), version).result()

    def _update(self, method: str, arg, version: int | None) -> None:
        # Before sending: a replacement started now loads these. A trained-only update follows the last full
        # one (the rest of the weights), which a replacement, starting from the checkpoint, needs first.
        trained_only = isinstance(arg, TrainedWeights)
        self._replay = (self._replay[:1] if trained_only else []) + [(method, arg)]
        self.version = version
        self._broadcast(method, arg)

    # ---- lifecycle ---------------------------------------------------------------------------

    def health(self) -> list[dict]:
        """Each worker's `RolloutEngine.health()` (pid, weights_version, counters)."""
        import ray

        return ray.get([w.health.remote() for w in self._workers])

    def close(self) -> None:
        """Shut the engines down (removes their temporary folders) and kill the actors; idempotent. An
        operation still in flight ends with an error (no worker is restarted after this)."""
        import ray

        self._closing = True
        self._ops.shutdown(wait=False, cancel_futures=True)
        workers, self._workers = self._workers, []
        if not workers or not ray.is_initialized():
            return
        try:
            ray.get([w.shutdown.remote() for w in workers], timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # a dead or stuck engine: killing it below is all that is left to do
        kill_actors(workers)
        self._replay = []

    # ---- fault handling ----------------------------------------------------------------------

    def _start(self, i: int):
        """Actor for worker slot `i` (engine seed `seed + i`), loaded with the latest weights."""
        import ray

        actor = self._worker_cls.options(**self._options(i)).remote(self.model_path, self.cfg, self.seed + i)
        for method, arg in self._replay:
            ray.get(getattr(actor, method).remote(arg))
        return actor

    def _broadcast(self, method: str, arg) -> None:
        """`method(arg)` on every worker at once. A worker that dies is replaced as soon as it is noticed
        (the others keep working); the replacement loads `_replay`, this very update last, while starting."""
        import ray

        pending = {getattr(w, method).remote(arg): i for i, w in enumerate(self._workers)}
        used = 0  # restarts in this call
        while pending:
            done = _wait_one(list(pending))
            i = pending.pop(done)
            try:
                ray.get(done)
            except ray.exceptions.RayActorError as exc:
                used = self._replace(i, exc, used, method)

    def _replace(self, i: int, exc: Exception, used: int, method: str) -> int:
        """Start a new worker in slot `i`; returns the restarts used by this call so far."""
        import ray

        if self._closing:
            raise RuntimeError(f"rollout worker {i} died during {method} while the pool was closing") from exc
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


def _wait_one(refs: list):
    """The first of `refs` to finish (Ray)."""
    import ray

    [done], _ = ray.wait(refs, num_returns=1)
    return done


def to_sample(task: Task, effort: str, prompt: list[int], c: Completion, version: int | None = None) -> Sample:
    """One completion of `prompt` (`task` at `effort`) as a `Sample`: loss mask 1 on sampled ids and
    0 on inserted ids (budget forcing, a python tool's answers), behaviour log-probs, parsed Harmony
    transcript (all turns), the task's metadata copied, the weights `version` that sampled it."""
    return Sample(
        task_id=task.task_id, env=task.env, effort=effort, prompt_ids=prompt,
        completion_ids=list(c.ids), loss_mask=list(c.sampled), behavior_logprobs=list(c.logprobs),
        transcript=harmony.parse_completion(c.ids), metadata=dict(task.metadata),
        finish_reason=c.finish_reason, budget_forced=c.budget_forced, policy_version=version)
