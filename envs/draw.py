"""Distinct procedural tasks of one split: the draw loop every generated env shares.

A generated env draws candidates from its seeded `random.Random`, each with a key (what makes two
tasks the same) and the split the key falls in (a pure hash, so train and test never overlap);
`draw_distinct` keeps the first `n` distinct candidates of the asked split and builds only those.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")
SPLITS = ("train", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")


def unit_hash(key: str) -> float:
    """`key`'s place in [0, 1), a pure function of it (sha256): which share of keys a fraction picks.

    >>> 0.0 <= unit_hash("q") < 1.0, unit_hash("q") == unit_hash("q")
    (True, True)
    """
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def hashed_split(key: str, test_fraction: float) -> str:
    """"test" for about `test_fraction` of all keys, else "train": a pure function of `key` (sha256, 10,000
    buckets), so a task's split never depends on the seed that drew it.

    >>> hashed_split("walk|3|LRS", 0.1), hashed_split("walk|3|LRS", 1.0), hashed_split("walk|3|LRS", 0.0)
    ('train', 'test', 'train')
    """
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10_000
    return "test" if bucket < test_fraction * 10_000 else "train"


def draw_distinct(split: str, n: int, draw: Callable[[], tuple[Hashable, str, Callable[[], T]]],
                  attempts: int, what: str, distinct: bool = True) -> list[T]:
    """The first `n` distinct candidates of `split` among at most `attempts` draws. `draw()` returns
    (key, the key's split, a thunk building the task); a short supply is a ValueError naming `what`.
    `distinct=False` keeps repeats: `n` independent draws from `split`'s distribution.

    >>> import random
    >>> rng = random.Random(0)
    >>> def draw():
    ...     x = rng.randint(0, 9)
    ...     return x, "test" if x % 2 else "train", lambda: f"task {x}"
    >>> sorted(draw_distinct("test", 3, draw, attempts=100, what="digits"))
    ['task 5', 'task 7', 'task 9']
    >>> draw_distinct("test", 6, draw, attempts=100, what="odd digits")
    Traceback (most recent call last):
    ...
    ValueError: only 5 distinct test odd digits found in 100 draws; ask for fewer than n=6
    >>> len(draw_distinct("test", 6, draw, attempts=100, what="odd digits", distinct=False))
    6
    """
    check_split(split)
    out: list[T] = []
    seen: set = set()
    for _ in range(attempts):
        if len(out) == n:
            break
        key, key_split, build = draw()
        if (distinct and key in seen) or key_split != split:
            continue
        seen.add(key)
        out.append(build())
    if len(out) < n:
        kind = "distinct " if distinct else ""
        raise ValueError(f"only {len(out)} {kind}{split} {what} found in {attempts} draws; ask for fewer than n={n}")
    return out


def pick_weighted(rng, weighted):
    """A value from `weighted`, a sequence of (value, weight) pairs whose weights sum to 1.

    >>> import random
    >>> pick_weighted(random.Random(0), ((0, 0.5), (1, 0.5)))  # random() = 0.844...
    1
    """
    r, acc = rng.random(), 0.0
    for value, w in weighted:
        acc += w
        if r < acc:
            return value
    return weighted[-1][0]


def written_steps(style, steps: int) -> int:
    """Steps an effort style writes out of `steps`: "all" or "all+check" = every one, an int n = the first
    n (at most `steps`).

    >>> written_steps("all+check", 5), written_steps(2, 5), written_steps(7, 5)
    (5, 2, 5)
    """
    return steps if style in ("all", "all+check") else min(int(style), steps)


def show_world(env, efforts) -> None:
    """Print one task with its trace at each effort, the env's CoT budgets and trace lengths per effort
    over 300 training tasks (the `python -m envs.<world>_tasks` view of a procedural effort world)."""
    from envs.harmony import encode

    task = env.tasks("train", 1)[0]
    print(task.question, "->", task.metadata["answer"])
    for effort in efforts:
        print(f"--- {effort}\n{env.solution(task, effort)[0]}")
    sample = env.tasks("train", 300)
    print("budgets:", env.budgets())
    for effort in efforts:
        counts = [len(encode(env.solution(t, effort)[0])) for t in sample]
        print(f"{effort}: mean {sum(counts) / len(counts):.1f} min {min(counts)} max {max(counts)}")
