"""Distinct procedural tasks of one split: the draw loop every generated env shares.

A generated env draws candidates from its seeded `random.Random`, each with a key (what makes two
tasks the same) and the split the key falls in (a pure hash, so train and test never overlap);
`draw_distinct` keeps the first `n` distinct candidates of the asked split and builds only those.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")
SPLITS = ("train", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")


def draw_distinct(split: str, n: int, draw: Callable[[], tuple[Hashable, str, Callable[[], T]]],
                  attempts: int, what: str) -> list[T]:
    """The first `n` distinct candidates of `split` among at most `attempts` draws. `draw()` returns
    (key, the key's split, a thunk building the task); a short supply is a ValueError naming `what`.

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
    ValueError: only 5 distinct test odd digits found; ask for fewer than n=6
    """
    check_split(split)
    out: list[T] = []
    seen: set = set()
    for _ in range(attempts):
        if len(out) == n:
            break
        key, key_split, build = draw()
        if key in seen or key_split != split:
            continue
        seen.add(key)
        out.append(build())
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {split} {what} found; ask for fewer than n={n}")
    return out
