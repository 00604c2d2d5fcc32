"""A work queue for the rollout workers: chunks of prompts go to whichever worker is free.

What it does
  `plan_chunks(n, workers, per_call)` cuts a step's n prompts ((task, effort) groups) into
  contiguous chunks; `run_queue(chunks, workers, send, wait, result)` hands them out one at a time:
  every worker starts with one chunk and gets the next as soon as it answers, so a slow worker (a
  busier node, longer completions, a GPU shared with another job) holds one chunk, not 1/W of the
  step. It knows nothing of Ray: `send(worker, chunk)` returns a handle (a Ray ObjectRef, a
  concurrent Future), `wait(handles)` returns one finished handle, `result(handle)` its value. The
  pool (rl/workers.py) binds them to Ray; the fast tests to threads.

Guarantees and limits
- Results come back in chunk order whoever served them; the caller makes each chunk's answer
  independent of the worker (the pool seeds prompt k with `request_seed(seed, k, n)`: chunk [a, b)
  is told `first_index=a`), so samples do not depend on timing or on the number of workers.
- A `faults` exception from `result` (a dead Ray actor) calls `replace(worker, exc)` (which may
  raise, e.g. past `rollout.max_restarts`) and puts the chunk back at the head of the queue, for the
  next free worker; any other exception propagates at once.
- One call in flight per worker: a worker idles for one round trip between chunks. Chunks are
  whole prompts, so a group's samples share a worker and a weights version.
- Smaller chunks balance better but batch less, and each call waits for its longest completion;
  `rollout.groups_per_call` trades one for the other (one worker: one call, as before the queue).
Departures: verl and prime-rl split a batch evenly across engines (a slow one stalls the step);
AReaL/slime stream single requests to a router. Chunks sit between: vLLM still batches within a
chunk, and the queue absorbs uneven workers.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Hashable, Sequence, TypeVar

H = TypeVar("H", bound=Hashable)

CHUNKS_PER_WORKER = 4  # with several workers and rollout.groups_per_call unset: ~this many calls each


def plan_chunks(n: int, workers: int, per_call: int | None = None) -> list[range]:
    """Contiguous chunks of `n` prompts: `per_call` each, or (None) all of them for one worker and
    about `CHUNKS_PER_WORKER` per worker otherwise.

    >>> plan_chunks(10, 2)
    [range(0, 2), range(2, 4), range(4, 6), range(6, 8), range(8, 10)]
    >>> plan_chunks(10, 1), plan_chunks(5, 3, per_call=4), plan_chunks(0, 2)
    ([range(0, 10)], [range(0, 4), range(4, 5)], [])
    """
    if n == 0:
        return []
    size = per_call or (n if workers == 1 else math.ceil(n / (CHUNKS_PER_WORKER * workers)))
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def run_queue(chunks: Sequence[range], workers: int, send: Callable[[int, range], H],
              wait: Callable[[list[H]], H], result: Callable[[H], Any], *,
              faults: tuple[type[BaseException], ...] = (),
              replace: Callable[[int, BaseException], None] | None = None) -> tuple[list[Any], list[int]]:
    """Serve every chunk on `workers` workers, one chunk in flight per worker; returns (the results
    in chunk order, the number of chunks each worker served)."""
    queue = deque(range(len(chunks)))  # chunk indices still to send
    free = deque(range(workers))
    pending: dict[H, tuple[int, int]] = {}  # handle -> (worker, chunk index)
    results: dict[int, Any] = {}
    served = [0] * workers
    while queue or pending:
        while queue and free:
            w, k = free.popleft(), queue.popleft()
            pending[send(w, chunks[k])] = (w, k)
        done = wait(list(pending))
        w, k = pending.pop(done)
        try:
            results[k] = result(done)
            served[w] += 1
        except faults as exc:
            if replace is None:
                raise
            replace(w, exc)  # a new worker in slot w, or raise
            queue.appendleft(k)
        free.append(w)
    return [results[k] for k in range(len(chunks))], served
