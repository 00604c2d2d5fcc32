"""Atomic checkpoints and the resumable data cursor."""
from pathlib import Path

from rl import checkpoint
from rl.data import TaskStream
from envs.types import Task


def _write(p: Path):
    p.mkdir(parents=True)
    (p / "weights").write_text("w")


def test_checkpoint_commit_latest_and_keep(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _write, {"cursor": step * 10}, keep=2)
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step_000003"
    assert checkpoint.trainer_state(latest) == {"cursor": 30, "step": 3}
    assert sorted(p.name for p in checkpoint.ckpt_root(tmp_path).glob("step_*")) == ["step_000002", "step_000003"]


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    checkpoint.save(tmp_path, 1, _write, {"cursor": 1})

    def crash(p):
        p.mkdir(parents=True)
        raise RuntimeError("disk full")

    try:
        checkpoint.save(tmp_path, 2, crash, {"cursor": 2})
    except RuntimeError:
        pass
    assert checkpoint.latest(tmp_path).name == "step_000001"


def test_stream_resume_continues_where_it_stopped():
    pool = [Task(str(i), "math", f"q{i}") for i in range(7)]
    a = TaskStream(pool, seed=3)
    first = [t.task_id for t in a.next(5)]
    rest = [t.task_id for t in a.next(6)]
    b = TaskStream(pool, seed=3, cursor=5)
    assert [t.task_id for t in b.next(6)] == rest
    assert sorted(first + rest[:2]) == [str(i) for i in range(7)]  # one epoch = a permutation
