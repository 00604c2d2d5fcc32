"""Async training (train.max_staleness=1, rl/async_rollouts.py) with the real loop and learner and a
fake pool whose rollouts run on a thread of their own: the next step's rollout runs while the
learner trains, the weight sync waits for it, versions and staleness are recorded, stale samples
are dropped, and checkpoints save a cursor that draws the untrained tasks again."""
import sys
import threading
from pathlib import Path

import pytest

from rl import checkpoint
from rl.async_rollouts import RolloutQueue
from rl.data import TaskStream, make_env
from rl.learner import Learner
from rl.train import train

sys.path.insert(0, str(Path(__file__).parent))
from fakes import FakePool  # noqa: E402
from test_loop import _cfg, _metrics  # noqa: E402


class Recording:
    """A learner that writes "train" into the pool's event log when a step starts."""

    def __init__(self, learner, events: list, started: threading.Event):
        self.learner, self.events, self.started = learner, events, started

    def train_step(self, batch):
        self.events.append("train")
        self.started.set()
        return self.learner.train_step(batch)

    def __getattr__(self, name):
        return getattr(self.learner, name)


def test_one_step_off_trains_while_the_next_rollout_runs(tmp_path, policy, tiny_cfg):
    """Step 2's rollout cannot finish before the learner has started step 1 (a synchronous loop
    would wait on it forever); every sync finds no rollout in flight; samples are one step old."""
    started, events, pools = threading.Event(), [], []

    class GatedPool(FakePool):
        def rollout(self, tasks, efforts, group_size, seed):
            second = self.events.count("rollout") == 1
            out = super().rollout(tasks, efforts, group_size, seed)  # logs "rollout"
            if second:
                assert started.wait(30), "the learner did not train while step 2's rollout ran"
            self.events.append("done")
            return out

    def make_pool(path, cfg, seed):
        pools.append(GatedPool(path, cfg, seed, threaded=True))
        pools[-1].events = events  # one log for the pool and the learner
        return pools[-1]

    run = tmp_path / "run"
    cfg = _cfg(run, tiny_cfg, steps=3, train={"max_staleness": 1, "checkpoint_every": 1})
    result = train(cfg, str(policy), make_learner=lambda *a: Recording(Learner(*a), events, started),
                   make_pool=make_pool)
    assert result.step == 3 and pools[0].closed
    done = [i for i, e in enumerate(events) if e == "done"]
    assert events.index("train") < done[1]  # step 1 trained while step 2's rollout ran
    assert [events.count(e) for e in ("rollout", "done", "train", "update")] == [3, 3, 3, 4], events
    for i, e in enumerate(events):  # no sync while a rollout is in flight
        if e == "update":
            assert events[:i].count("rollout") == events[:i].count("done"), events
    lines = _metrics(run)
    assert [m["staleness/mean"] for m in lines] == [0.0, 1.0, 1.0]
    assert all(m["staleness/dropped"] == 0.0 and "mismatch/kl" in m for m in lines)
    # step 2's checkpoint was written with step 3's tasks drawn but not trained on: a resume redraws them
    roots = sorted(checkpoint.ckpt_root(run).glob("step_*"))
    assert [checkpoint.trainer_state(r)["cursor"] for r in roots] == [4, 6]  # steps 2, 3; 2 tasks a step


def test_stale_samples_are_dropped_and_the_step_rolled_out_again(tiny_cfg):
    """A pool that returns samples five learner steps old: all dropped, then the same tasks sampled
    again on the current weights."""
    cfg = _cfg("unused", tiny_cfg, train={"max_staleness": 1})
    stamps = [-5]  # the first rollout claims weights version -5

    class StalePool(FakePool):
        def rollout(self, tasks, efforts, group_size, seed):
            out = super().rollout(tasks, efforts, group_size, seed)
            if stamps:
                v = stamps.pop()
                for s in out:
                    s.policy_version = v
            return out

    pool = StalePool("p", cfg.rollout, 0)
    pool.update_weights({"w": 1}, version=0)
    stream = TaskStream(make_env(cfg.env, 0).tasks("train", 20), 0)
    queue = RolloutQueue(cfg, pool, stream, start_step=0)
    samples, m = queue.take(1)
    assert m["staleness/dropped"] == 1.0 and m["staleness/max"] == 5.0
    assert {s.policy_version for s in samples} == {0} and len(samples) == 2 * 2 * 4
    assert pool.events == ["update", "rollout", "rollout", "rollout"]  # steps 1 and 2, then step 1 again
    first = TaskStream(stream.pool, 0).next(2)  # step 1's tasks
    assert [s.task_id for s in samples[::8]] == [t.task_id for t in first]
    assert queue.cursor == 2  # step 2's tasks are in flight
    with pytest.raises(RuntimeError, match="oldest rollout in flight is step 2"):
        queue.take(3)
