"""In-process stand-ins for the rollout worker pool, for the fast test tier.

`FakePool` has `WorkerPool`'s methods and answers with real Harmony completions (rendered by
openai-harmony, parsed the way the pool parses them) whose correctness is drawn from a seeded
stream: deterministic for a given (seed, task, effort, sample), whatever the batch around it. It
records what it was started from and the order of weight pushes and rollouts (`events`).
"""
from __future__ import annotations

import random
import re
from typing import Sequence

from envs import harmony
from envs.math_tasks import solution
from envs.types import Sample, Task


class FakePool:
    def __init__(self, model_path: str, cfg=None, seed: int = 0, p_correct: float = 0.5):
        self.model_path, self.cfg, self.seed, self.p_correct = str(model_path), cfg, seed, p_correct
        self.restarts = 0
        self.updates = 0
        self.closed = False
        self.events: list[str] = []

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
                                      harmony.parse_completion(ids), dict(task.metadata)))
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

    def update_weights(self, weights) -> None:
        if not weights:
            raise ValueError("FakePool.update_weights got no weights")
        self.updates += 1
        self.events.append("update")

    def close(self) -> None:
        self.closed = True
