"""A weighted mixture of task environments: one run trains on several task families at once.

`MixtureEnv({label: (env, weight)})` is itself an environment (`tasks`, `solution`,
`vocabulary_corpus`), so the pipeline, SFT, training stream and evaluation take it where they take
one env (config: `env.mixture`, rl/config.py; built by `rl.data.make_env`).

- `tasks(split, n, seed)` asks each component for its share of `n`, by weight with the largest
  remainder rule (shares sum to `n` exactly; a component with a positive weight gets at least one
  task once `n` >= the number of components), and interleaves them in a seeded order. Splits stay
  disjoint because every component keeps its own train/test rule.
- Task ids become "LABEL:ID": two components built from the same environment (say easy and hard
  math) can never merge GRPO groups or shadow each other's task. `Task.env` is left alone, so
  rewards keep routing by `sample.env` (a reward returns None on samples that are not its env:
  a safety request is never scored by math-verify).
- `solution(task, effort)` hands the task back to its component with the original id.
- `label_of(task_id)` names the component of any task or sample id from a mixture.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any

from envs.types import Task

SEP = ":"


def label_of(task_id: str) -> str:
    """The mixture component of a task id "LABEL:ID" ("" for an id from a single env).

    >>> label_of("hard:math-0a1b"), label_of("math-0a1b")
    ('hard', '')
    """
    head, sep, _ = task_id.partition(SEP)
    return head if sep else ""


def shares(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """`n` split by `weights` with the largest remainder rule (ties: the order given); with
    n >= len(weights), every component gets at least one.

    >>> shares({"math": 0.7, "safety": 0.15, "hierarchy": 0.15}, 10)
    {'math': 7, 'safety': 2, 'hierarchy': 1}
    >>> shares({"a": 0.98, "b": 0.01, "c": 0.01}, 5)
    {'a': 3, 'b': 1, 'c': 1}
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    total = float(sum(weights.values()))
    exact = {k: n * w / total for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: -(exact[k] - out[k]))  # stable: ties keep the given order
    for k in order[: n - sum(out.values())]:
        out[k] += 1
    if n >= len(weights):  # a component never vanishes from a pool big enough to hold it
        for k in [k for k in weights if out[k] == 0]:
            donor = max(out, key=lambda d: out[d])
            out[donor] -= 1
            out[k] = 1
    return out


class MixtureEnv:
    """Several environments drawn by weight. `components`: {label: (env, weight)}, labels without ':'.

    >>> from envs.math_tasks import MathEnv
    >>> mix = MixtureEnv({"easy": (MathEnv(seed=0, difficulty=1), 3), "hard": (MathEnv(seed=0, difficulty=3), 1)})
    >>> ts = mix.tasks("test", 8)
    >>> sorted(label_of(t.task_id) for t in ts), ts[0].env
    (['easy', 'easy', 'easy', 'easy', 'easy', 'easy', 'hard', 'hard'], 'math')
    >>> mix.solution(ts[0], "low") == mix.components["easy" if ts[0].task_id.startswith("easy") else "hard"][0].solution(
    ...     mix.unwrap(ts[0]), "low")
    True
    """

    name = "mixture"

    def __init__(self, components: Mapping[str, tuple[Any, float]], seed: int = 0):
        if not components:
            raise ValueError("a mixture needs at least one component {label: (env, weight)}")
        for label, (_, weight) in components.items():
            if not label or SEP in label:
                raise ValueError(f"mixture label {label!r} must be non-empty and free of {SEP!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"mixture component {label!r}: weight must be a number > 0, got {weight!r}")
        self.components = dict(components)
        self.seed = seed

    @property
    def weights(self) -> dict[str, float]:
        return {label: float(w) for label, (_, w) in self.components.items()}

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """`n` tasks of `split`: each component's share (`shares`), ids "LABEL:ID", in a seeded order."""
        out: list[Task] = []
        for label, k in shares(self.weights, n).items():
            if k == 0:
                continue
            env = self.components[label][0]
            try:
                got = env.tasks(split, k, seed=seed)
            except ValueError as exc:
                raise ValueError(f"mixture component {label!r}: {exc}") from exc
            out += [dataclasses.replace(t, task_id=f"{label}{SEP}{t.task_id}") for t in got]
        random.Random(f"mixture:{self.seed}:{seed}:{split}:{n}").shuffle(out)
        return out

    def unwrap(self, task: Task) -> Task:
        """The component's own task (its original id) behind a mixture task."""
        label = label_of(task.task_id)
        if label not in self.components:
            raise ValueError(f"task {task.task_id!r} is not from this mixture (labels {sorted(self.components)})")
        return dataclasses.replace(task, task_id=task.task_id[len(label) + 1:])

    def solution(self, task: Task, effort: str):
        own = self.unwrap(task)
        return self.components[label_of(task.task_id)][0].solution(own, effort)

    def vocabulary_corpus(self) -> list[str]:
        out: list[str] = []
        for env, _ in self.components.values():
            out += env.vocabulary_corpus()
        return out
