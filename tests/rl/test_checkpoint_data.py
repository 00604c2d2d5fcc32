"""The resumable data cursor (checkpoint tests live in test_checkpoint.py)."""
from rl.data import TaskStream
from envs.types import Task


def test_stream_resume_continues_where_it_stopped():
    pool = [Task(str(i), "math", f"q{i}") for i in range(7)]
    a = TaskStream(pool, seed=3)
    first = [t.task_id for t in a.next(5)]
    rest = [t.task_id for t in a.next(6)]
    b = TaskStream(pool, seed=3, cursor=5)
    assert [t.task_id for t in b.next(6)] == rest
    assert sorted(first + rest[:2]) == [str(i) for i in range(7)]  # one epoch = a permutation
