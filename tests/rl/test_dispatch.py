"""The rollout work queue (rl/dispatch.py) on in-process workers: a slow worker holds one chunk while
the fast one serves the rest, answers come back in chunk order whoever served them, and a dead
worker's chunk is served again."""
import sys
import threading
from pathlib import Path

import pytest

from rl.dispatch import plan_chunks, run_queue
from rl.seeds import request_seed

sys.path.insert(0, str(Path(__file__).parent))
from fakes import ThreadWorkers  # noqa: E402


def _answer(chunk: range) -> list[int]:
    """What an engine call gives for prompts chunk.start.. with first_index = chunk.start: one
    seeded stream per prompt, whatever worker serves it."""
    return [request_seed(5, k, 2) for k in chunk]


def test_a_slow_worker_holds_one_chunk_while_the_fast_one_serves_the_rest():
    """Worker 1 answers its first call only once worker 0 has served every other chunk: a fixed
    split (prompt k to worker k mod 2) would have left it 4 of the 8 chunks and the step waiting
    on them; the queue gives it one."""
    chunks = plan_chunks(16, 2)  # 8 chunks of 2 prompts
    assert len(chunks) == 8
    fast_done = threading.Event()
    served_fast = []

    def engine(worker: int, chunk: range):
        if worker == 1:
            assert fast_done.wait(timeout=30), "the fast worker never got through the queue"
        else:
            served_fast.append(chunk)
            if len(served_fast) == len(chunks) - 1:
                fast_done.set()
        return _answer(chunk)

    workers = ThreadWorkers(2, engine)
    try:
        answers, served = run_queue(chunks, 2, workers.send, workers.wait, workers.result)
    finally:
        workers.close()
    assert served == [7, 1]
    assert [w for w, c in workers.calls if c == chunks[1]] == [1]  # the slow worker's only chunk
    # chunk order, and the answers one worker would give for the whole list in one call
    assert [x for a in answers for x in a] == _answer(range(16))


class Died(Exception):
    """Stands in for ray.exceptions.RayActorError."""


def test_a_dead_workers_chunk_is_served_again_and_other_errors_propagate():
    deaths = {1: 1}  # worker 1 dies on its first call
    replaced = []

    def engine(worker: int, chunk: range):
        if deaths.get(worker):
            deaths[worker] -= 1
            raise Died(f"worker {worker}")
        return _answer(chunk)

    workers = ThreadWorkers(2, engine)
    try:
        answers, served = run_queue(plan_chunks(6, 2, per_call=2), 2, workers.send, workers.wait, workers.result,
                                    faults=(Died,), replace=lambda w, exc: replaced.append(w))
    finally:
        workers.close()
    assert replaced == [1] and sum(served) == 3
    assert [x for a in answers for x in a] == _answer(range(6))
    sent = [c for _, c in workers.calls]
    assert len(sent) == 4 and sent.count(range(2, 4)) == 2  # chunk 1 twice: the death, then again

    def broken(worker: int, chunk: range):
        raise ValueError("a bad prompt")  # raised inside a worker: not a fault

    workers = ThreadWorkers(2, broken)
    try:
        with pytest.raises(ValueError, match="a bad prompt"):
            run_queue(plan_chunks(4, 2), 2, workers.send, workers.wait, workers.result, faults=(Died,),
                      replace=lambda w, exc: replaced.append(w))
    finally:
        workers.close()
    assert replaced == [1]


def test_chunk_plan():
    assert plan_chunks(3, 1) == [range(0, 3)]  # one worker: one call, as before the queue
    assert plan_chunks(9, 2) == [range(a, min(a + 2, 9)) for a in range(0, 9, 2)]  # ~4 calls per worker
    assert plan_chunks(9, 2, per_call=9) == [range(0, 9)]
