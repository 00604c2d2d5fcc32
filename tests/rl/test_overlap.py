"""learner.overlap_threads (rl/overlap.py): the learner computes with fewer threads while a rollout is in
flight and takes its threads back after; the tracker survives calls out of order, a dead probe never stops
training, the loop marks exactly the rollouts in flight, and the path through Ray actors works."""
import sys
import threading
from pathlib import Path

import pytest
import torch

from rl.config import ConfigError
from rl.learner import Learner
from rl.overlap import RolloutTracker, ThreadSwitch
from rl.train import train

sys.path.insert(0, str(Path(__file__).parent))
from fakes import FakePool  # noqa: E402
from test_learner import _batch4, _learner  # noqa: E402
from test_loop import _cfg, _metrics  # noqa: E402


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    """torch's own set_num_threads for the test (a vLLM engine started earlier in this process makes it a
    no-op), and the thread count back as it was after."""
    monkeypatch.setattr(torch, "set_num_threads", torch._C.set_num_threads)
    before = torch.get_num_threads()
    yield
    torch._C.set_num_threads(before)


def test_tracker_is_busy_while_a_started_key_has_not_ended_in_any_order():
    t = RolloutTracker()
    assert not t.busy()
    t.start(1)
    t.start(2)
    t.end(1)
    assert t.busy()
    t.end(2)
    assert not t.busy()
    t.end(3)  # its start arrives after its end (two driver threads): the pair cancels
    assert not t.busy()
    t.start(3)
    assert not t.busy()
    t.start(4)
    assert t.probe()()


def test_switch_follows_the_probe_and_counts_passes(caplog):
    state = {"busy": True}
    switch = ThreadSwitch(2, 1)
    switch.poll()  # nothing watched: untouched
    assert switch.metrics() == {}
    switch.watch(lambda: state["busy"])
    switch.poll()
    assert torch.get_num_threads() == 1
    state["busy"] = False
    switch.poll()
    switch.poll()
    assert torch.get_num_threads() == 2
    assert switch.metrics() == {"overlap/yielded": 1 / 3}
    state["busy"] = True
    switch.poll()
    assert torch.get_num_threads() == 1

    def gone():
        raise RuntimeError("actor died")

    switch.watch(gone)
    switch.poll()  # a failing probe: a warning, back to full threads, no more polling
    assert torch.get_num_threads() == 2 and switch.probe is None
    assert "rollout probe failed" in caplog.text
    switch.watch(lambda: True)
    switch.poll()
    switch.release()  # after a step: full threads for the sync, still watching
    assert torch.get_num_threads() == 2 and switch.probe is not None
    unset = ThreadSwitch(2, None)  # overlap_threads null: watching does nothing
    unset.watch(lambda: True)
    unset.poll()
    assert unset.probe is None and torch.get_num_threads() == 2


def test_a_process_where_set_num_threads_does_nothing_turns_the_switch_off(monkeypatch, caplog):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # what vLLM's CPU worker installs
    torch._C.set_num_threads(2)
    switch = ThreadSwitch(2, 1)
    switch.watch(lambda: True)
    switch.poll()
    assert switch.probe is None and switch.metrics() == {} and "had no effect" in caplog.text


def test_learner_runs_yielded_passes_while_busy_and_trains_the_same(policy):
    """Every pass of a step (the old-log-prob pass and each micro-batch) checks the probe; the weights
    after a step with yielded threads equal those of a step without (thread count changes only the
    float summation order)."""
    algo = {"mini_batches": 1, "ppo_epochs": 2}  # no shuffling: both learners see the same passes
    # share_prompts off: one forward per pass (a shared old-log-prob pass runs prompts and completions apart)
    yielded = _learner(policy, algo, lr=1e-3, micro_batch_size=1, num_threads=2, overlap_threads=1, share_prompts=False)
    plain = _learner(policy, algo, lr=1e-3, micro_batch_size=1, num_threads=2, share_prompts=False)
    seen = []
    yielded.model.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    state = {"busy": True}
    yielded.watch_rollouts(lambda: state["busy"])
    batch = _batch4(policy)
    m = yielded.train_step(batch)
    assert m["overlap/yielded"] == 1.0 and set(seen) == {1}
    assert torch.get_num_threads() == 2  # released after the step: the plain learner runs with 2
    assert len(seen) == 1 + 2 * 4  # the old log-probs pass, then 2 epochs of 4 micro-batches of one row
    mp = plain.train_step(batch)
    assert "overlap/yielded" not in mp
    assert m["loss"] == pytest.approx(mp["loss"], rel=1e-5, abs=1e-7)
    for a, b in zip(yielded.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    state["busy"] = False
    seen.clear()
    assert yielded.train_step(batch)["overlap/yielded"] == 0.0 and set(seen) == {2}


def test_overlap_threads_bounds_are_checked(tmp_path, tiny_cfg):
    with pytest.raises(ConfigError, match="learner.overlap_threads"):
        _cfg(tmp_path, tiny_cfg, learner={"num_threads": 2, "overlap_threads": 3})
    with pytest.raises(ConfigError, match="learner.overlap_threads"):
        _cfg(tmp_path, tiny_cfg, learner={"num_threads": 2, "overlap_threads": 0})


def test_async_loop_yields_while_the_next_rollout_runs(tmp_path, policy, tiny_cfg):
    """One-step-off with overlap_threads=1: the rollout of step k+1 is held until step k's update has
    ended, so every pass of steps 1..n-1 runs yielded and the last step (nothing in flight) runs full."""
    trained = {k: threading.Event() for k in range(1, 4)}

    class HeldPool(FakePool):
        def rollout(self, tasks, efforts, group_size, seed):
            n = self.events.count("rollout")  # rollouts before this one: this is step n + 1's
            if n >= 1:
                assert trained[n].wait(60), f"step {n} never finished"
            return super().rollout(tasks, efforts, group_size, seed)

    class Marking(Learner):
        def train_step(self, batch, **kw):
            out = super().train_step(batch, **kw)
            trained[self.step].set()
            return out

    run = tmp_path / "run"
    cfg = _cfg(run, tiny_cfg, steps=3, train={"max_staleness": 1},
               learner={"num_threads": 2, "overlap_threads": 1})
    result = train(cfg, str(policy), make_learner=Marking,
                   make_pool=lambda path, c, seed: HeldPool(path, c, seed, threaded=True))
    assert result.step == 3
    assert [m["overlap/yielded"] for m in _metrics(run)] == [1.0, 1.0, 0.0]
    sync = _cfg(tmp_path / "sync", tiny_cfg, steps=1, learner={"num_threads": 2, "overlap_threads": 1})
    train(sync, str(policy), make_learner=Learner, make_pool=FakePool)  # max_staleness 0: never tracked
    assert "overlap/yielded" not in _metrics(tmp_path / "sync")[0]


@pytest.mark.slow
def test_remote_learner_polls_a_tracker_in_a_ray_actor(policy):
    """The path a real run takes: the tracker's state in a Ray actor, the learner in another actor."""
    import ray

    from rl.cluster import init_ray
    from rl.config import AlgoConfig, LearnerConfig, validate
    from rl.learner import RemoteLearner

    init_ray(validate({}).cluster)
    try:
        learner = RemoteLearner(str(policy), LearnerConfig(device="cpu", num_threads=2, overlap_threads=1,
                                                           micro_batch_size=2), AlgoConfig(), 0)
        tracker = learner.rollout_tracker()
        batch = _batch4(policy)
        tracker.start("a")
        assert learner.train_step(batch)["overlap/yielded"] == 1.0
        ray.get(tracker.end("a"))  # the learner's next poll comes from another process: wait for it
        assert learner.train_step(batch)["overlap/yielded"] == 0.0
        tracker.close()  # the probe's actor gone: training goes on with full threads, unwatched
        assert "overlap/yielded" not in learner.train_step(batch)
        learner.close()
    finally:
        ray.shutdown()
