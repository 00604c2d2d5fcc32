"""In-process stand-ins for the rollout worker pool, for the fast test tier.

`FakePool` has `WorkerPool`'s methods and answers with real Harmony completions (rendered by
openai-harmony, parsed the way the pool parses them) whose correctness is drawn from a seeded
stream: deterministic for a given (seed, task, effort, sample), whatever the batch around it. It
records what it was started from and the order of weight pushes and rollouts (`events`), and stamps
each sample with the `version` of the last weight push. `threaded=True` runs rollouts and weight
pushes in submission order on a thread of their own, as `WorkerPool` does, so `submit` returns before
the samples exist. `ThreadWorkers` stands in for Ray actors in `rl.dispatch.run_queue`.
"""
from __future__ import annotations

import random
import re
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Sequence

from envs import harmony
from envs.math_tasks import solution
from envs.types import Sample, Task


class FakePool:
    def __init__(self, model_path: str, cfg=None, seed: int = 0, p_correct: float = 0.5, threaded: bool = False):
        self.model_path, self.cfg, self.seed, self.p_correct = str(model_path), cfg, seed, p_correct
        self.restarts = 0
        self.updates = 0
        self.version: int | None = None
        self.closed = False
        self.events: list[str] = []
        self._ops = ThreadPoolExecutor(1) if threaded else None

    def submit(self, tasks: Sequence[Task], efforts: Sequence[str], group_size: int, seed: int) -> Future:
        return self._do(self.rollout, tasks, efforts, group_size, seed)

    def _do(self, fn, *args) -> Future:
        if self._ops is not None:
            return self._ops.submit(fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))
        return done

    def rollout(self, tasks: Sequence[Task], efforts: Sequence[str], group_size: int, seed: int) -> list[Sample]:
        self.events.append("rollout")
        out = []
        for task in tasks:
            for effort in efforts:
                prompt = harmony.render_prompt(task.question, effort, task.developer)
                for j in range(group_size):
                    rng = random.Random(f"{seed}:{task.task_id}:{effort}:{j}")
                    analysis, final = solution(task, effort)
                    if rng.random() > self.p_correct:
                        final = str(int(final) + 1)
                    ids = harmony.render_completion(analysis, final)
                    lps = [-rng.random() for _ in ids]
                    out.append(Sample(task.task_id, task.env, effort, prompt, ids, [1] * len(ids), lps,
                                      harmony.parse_completion(ids), dict(task.metadata),
                                      policy_version=self.version))
        return out

    def generate(self, prompts, n: int, *, temperature: float, seed: int | None):
        """Evaluation: the effort-styled solution of the "Compute <expr>." task each prompt asks."""
        from envs.math_tasks import evaluate, parse_expr
        from rl.engine import Completion

        out = []
        for i, prompt in enumerate(prompts):
            text = harmony.decode(prompt)
            expr = re.search(r"Compute (.+?)\.<\|end\|>", text).group(1)
            effort = re.search(r"Reasoning: (\w+)", text).group(1)
            task = Task(f"eval-{i}", "math", f"Compute {expr}.", {"expr": expr, "answer": str(evaluate(parse_expr(expr)))})
            comps = []
            for j in range(n):
                rng = random.Random(f"{seed}:{expr}:{effort}:{j}")
                analysis, final = solution(task, effort)
                ids = harmony.render_completion(analysis, final if rng.random() <= self.p_correct else final + "1")
                comps.append(Completion(ids, [-0.1] * len(ids), "stop"))
            out.append(comps)
        return out

    def update_weights(self, weights, version: int | None = None) -> None:
        if not weights:
            raise ValueError("FakePool.update_weights got no weights")
        self._do(self._update, version).result()

    def _update(self, version: int | None) -> None:
        self.updates += 1
        self.version = version
        self.events.append("update")

    def close(self) -> None:
        self.closed = True
        if self._ops is not None:
            self._ops.shutdown()


class ThreadWorkers:
    """`n` in-process workers for `rl.dispatch.run_queue`: each runs its calls one at a time, in the
    order sent, on a thread of its own (as a Ray actor does); `fn(worker, chunk)` answers a call.
    `calls` lists (worker, chunk) in send order."""

    def __init__(self, n: int, fn: Callable[[int, range], object]):
        self.threads = [ThreadPoolExecutor(1) for _ in range(n)]
        self.fn = fn
        self.calls: list[tuple[int, range]] = []

    def send(self, worker: int, chunk: range) -> Future:
        self.calls.append((worker, chunk))
        return self.threads[worker].submit(self.fn, worker, chunk)

    @staticmethod
    def wait(futures: list[Future]) -> Future:
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return next(f for f in futures if f in done)

    @staticmethod
    def result(future: Future):
        return future.result()

    def close(self) -> None:
        for t in self.threads:
            t.shutdown(wait=False, cancel_futures=True)
