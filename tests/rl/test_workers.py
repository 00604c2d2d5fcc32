"""The rollout worker pool (rl/workers.py) on Ray: order, seeds, and a worker killed mid-call.

Two tiers of realism, both slow (they start Ray):
- a fake engine (RolloutEngine's methods, no vLLM) whose completions encode the weights it holds and
  the request seed it sampled with, which dies in the middle of a call on cue and can be made slow:
  checks the seeds, that only the dead worker's chunk is sent again and the restart limit, that a
  slow worker does not stall a rollout (the work queue), and that a weight update waits for the
  rollout in flight (each sample's `policy_version`);
- the real vLLM engines on the tiny test policy: a worker SIGKILLed while a rollout is in flight is
  replaced by one that samples from the learner's latest weights, giving the samples the healthy
  pool gave.
"""
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from envs import harmony
from envs.types import Task
from rl.config import ClusterConfig, EnvConfig, RolloutConfig
from rl.engine import Completion
from rl.seeds import request_seed
from rl.vllm_weights import TrainedWeights
from rl.workers import WorkerPool

pytestmark = pytest.mark.slow


class FakeEngine:
    """A completion's log-probs are (weights tag, request seed, sample index, analysis cap or -1); the
    process exits in the middle of `generate` if the file `<checkpoint>/die-<engine seed>` exists
    (removing it first), and every call sleeps the seconds written in `<checkpoint>/slow-<engine seed>`.
    Every generate call is logged to `<checkpoint>/calls.log` as `engine_seed pid n_prompts max_tokens
    stop` (max_tokens -1: None; stop 0/1; `_calls` reads the first three). With
    caps, the completion's first id counts as inserted (`sampled` 0, budget-forced)."""

    def __init__(self, checkpoint, cfg, seed):
        self.dir, self.seed, self.tag = Path(checkpoint), seed, -1.0

    def generate(self, prompts, n=1, temperature=None, top_p=None, max_tokens=None, seed=None, *,
                 stop=True, first_index=0, analysis_caps=None):
        with open(self.dir / "calls.log", "a") as f:
            f.write(f"{self.seed} {os.getpid()} {len(prompts)} {-1 if max_tokens is None else max_tokens} {int(stop)}\n")
        flag, slow = self.dir / f"die-{self.seed}", self.dir / f"slow-{self.seed}"
        if flag.exists():
            flag.unlink()
            os._exit(1)
        if slow.exists():
            time.sleep(float(slow.read_text()))
        ids = harmony.render_completion("fake", "0")
        caps = analysis_caps or [None] * len(prompts)
        return [[Completion(ids, [self.tag, float(request_seed(seed, first_index + i, n)), float(j),
                                  -1.0 if caps[i] is None else float(caps[i])] + [0.0] * (len(ids) - 4), "stop",
                            sampled=None if caps[i] is None else [0] + [1] * (len(ids) - 1),
                            budget_forced=caps[i] is not None) for j in range(n)]
                for i in range(len(prompts))]

    def update_weights(self, state):
        if isinstance(state, TrainedWeights):  # a trained-only update sets the fraction, over the last full one
            import ray

            part = state.tensors
            self.tag = math.floor(self.tag) + float((ray.get(part) if isinstance(part, ray.ObjectRef) else part)["w"])
        else:
            self.tag = float(state["w"])

    def update_weights_from_path(self, path):
        self.tag = float(Path(path).name)

    def health(self):
        return {"ok": True, "pid": os.getpid()}

    def shutdown(self):
        pass


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from rl.cluster import init_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FakeEngine travels by value
    init_ray(ClusterConfig(num_cpus=4))
    yield
    ray.shutdown()


def _tasks(n):
    return [Task(f"t{i}", "math", f"Compute {i}+{i}.", {"answer": str(2 * i)}) for i in range(n)]


def _calls(folder, fields=3):
    return [tuple(map(int, line.split()[:fields])) for line in (folder / "calls.log").read_text().splitlines()]


def test_pool_order_seeds_and_replacement_of_a_dead_worker(tmp_path, ray_local):
    import ray

    cfg = RolloutConfig(num_workers=2, max_restarts=1)
    pool = WorkerPool(str(tmp_path), cfg, seed=100, worker_cls=ray.remote(FakeEngine))
    pool.update_weights({"w": torch.tensor(7.0)})
    tasks, efforts, n, seed = _tasks(3), ["low", "high"], 2, 5
    healthy = pool.rollout(tasks, efforts, n, seed)
    # Task, effort, sample order; prompt k samples from request_seed(5, k, n), whichever worker served it.
    order = [(t.task_id, e) for t in tasks for e in efforts for _ in range(n)]
    assert [(s.task_id, s.effort) for s in healthy] == order
    for k in range(len(tasks) * len(efforts)):
        for j, s in enumerate(healthy[k * n:(k + 1) * n]):
            assert s.behavior_logprobs[:3] == [7.0, request_seed(seed, k, n), j]
            assert s.prompt_ids == harmony.render_prompt(tasks[k // 2].question, efforts[k % 2])
            assert s.loss_mask == [1] * len(s.completion_ids) and s.metadata == {"answer": str(2 * (k // 2))}
    assert all(s.transcript.final == "0" for s in healthy)

    (tmp_path / "calls.log").unlink()
    pid = pool.health()[1]["pid"]
    (tmp_path / "die-101").touch()  # worker 1 dies in the middle of its next call
    again = pool.rollout(tasks, efforts, n, seed)
    assert pool.restarts == 1 and pool.health()[1]["pid"] != pid
    # The replacement holds the latest weights (tag 7); every chunk keeps its seeds.
    assert [s.behavior_logprobs for s in again] == [s.behavior_logprobs for s in healthy]
    calls = _calls(tmp_path)
    assert sum(p for _, _, p in calls) == 6 + 1, calls  # 6 one-prompt chunks, the dead worker's sent again

    # Evaluation chunks are seeded as one call over the whole list, whatever the number of workers.
    prompts = [harmony.render_prompt(f"Compute {i}+1.", "low") for i in range(5)]
    pool.update_weights_from_path(str(tmp_path / "3"))
    out = pool.generate(prompts, 2, temperature=0.0, seed=9)
    assert [[c.logprobs[:3] for c in cs] for cs in out] == [
        [[3.0, request_seed(9, i, 2), j] for j in range(2)] for i in range(5)]

    (tmp_path / "die-100").touch()
    (tmp_path / "die-101").touch()  # two deaths in one call, one restart allowed
    with pytest.raises(RuntimeError, match=r"rollout.max_restarts=1"):
        pool.generate(prompts, 1, temperature=0.0, seed=9)
    pool.close()
    pool.close()  # idempotent


def test_a_replacement_loads_the_last_full_update_then_the_last_trained_only_one(tmp_path, ray_local):
    import ray

    pool = WorkerPool(str(tmp_path), RolloutConfig(num_workers=2, max_restarts=1), seed=100,
                      worker_cls=ray.remote(FakeEngine))
    pool.update_weights({"w": torch.tensor(7.0)})
    pool.update_weights(TrainedWeights({"w": torch.tensor(0.5)}))
    pool.update_weights(TrainedWeights({"w": torch.tensor(0.25)}))
    tasks, efforts = _tasks(3), ["low", "high"]  # six one-prompt chunks: both workers get some
    assert {s.behavior_logprobs[0] for s in pool.rollout(tasks, efforts, 1, seed=0)} == {7.25}
    (tmp_path / "die-101").touch()
    again = pool.rollout(tasks, efforts, 1, seed=0)
    assert pool.restarts == 1 and {s.behavior_logprobs[0] for s in again} == {7.25}
    pool.close()


def test_a_slow_worker_does_not_stall_a_rollout_and_updates_wait_for_it(tmp_path, ray_local):
    import ray

    pool = WorkerPool(str(tmp_path), RolloutConfig(num_workers=2), seed=0, worker_cls=ray.remote(FakeEngine))
    try:
        pool.update_weights({"w": torch.tensor(1.0)}, version=3)
        (tmp_path / "slow-1").write_text("1.0")  # worker 1 takes a second a call, worker 0 none
        future = pool.submit(_tasks(8), ["low"], 2, seed=5)  # 8 one-prompt chunks
        pool.update_weights({"w": torch.tensor(2.0)}, version=4)  # queued behind the rollout
        assert future.done()
        first = future.result()
        assert pool.served[0] >= 6 and pool.served[1] <= 2, pool.served  # a fixed split: 4 and 4
        assert [s.behavior_logprobs[:2] for s in first[::2]] == [[1.0, request_seed(5, k, 2)] for k in range(8)]
        assert {s.policy_version for s in first} == {3}  # sampled before the update, and stamped so
        after = pool.rollout(_tasks(2), ["low"], 2, seed=5)
        assert {s.behavior_logprobs[0] for s in after} == {2.0} and {s.policy_version for s in after} == {4}
    finally:
        pool.close()


def test_budget_forcing_sends_every_prompt_its_efforts_cap(tmp_path, ray_local):
    import ray

    from rl.config import BudgetForcingConfig

    caps = {"low": 4, "medium": 9, "high": 16}
    cfg = RolloutConfig(num_workers=2, budget_forcing=BudgetForcingConfig(enabled=True, caps=caps))
    pool = WorkerPool(str(tmp_path), cfg, seed=0, worker_cls=ray.remote(FakeEngine))
    try:
        efforts = ["low", "medium", "high"]
        samples = pool.rollout(_tasks(2), efforts, 2, seed=3)  # 6 prompts over 2 workers
        assert [s.behavior_logprobs[3] for s in samples] == [caps[e] for _ in range(2) for e in efforts for _ in "ab"]
        assert all(s.budget_forced and s.loss_mask == [0] + [1] * (len(s.completion_ids) - 1) for s in samples)
        # Evaluation never forces.
        out = pool.generate([harmony.render_prompt("Compute 1+1.", "low")], 1, temperature=0.0, seed=1)
        assert out[0][0].logprobs[3] == -1.0 and not out[0][0].budget_forced
        # generate's max_tokens / stop reach the engines only when given (benchmarks: exactly max_tokens each)
        pool.generate([harmony.render_prompt("Compute 1+1.", "low")], 1, temperature=1.0, seed=1, max_tokens=7,
                      stop=False)
        assert [c[3:] for c in _calls(tmp_path, 5)[-2:]] == [(-1, 1), (7, 0)]
    finally:
        pool.close()


@torch.no_grad()
def _perturbed_state(policy):
    from rl.model import load_policy

    model, _ = load_policy(policy)
    state = model.state_dict()
    head = state["lm_head.weight"]
    noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
    state["lm_head.weight"] = head + noise * head.std() * 3
    return state


def test_a_killed_worker_is_replaced_with_the_latest_weights(policy, ray_local):
    from rl.data import make_env

    cfg = RolloutConfig(num_workers=2, max_tokens=96, max_model_len=256, max_restarts=1)
    pool = WorkerPool(str(policy), cfg, seed=0)
    try:
        tasks, efforts, n = make_env(EnvConfig(), 0).tasks("train", 4), ["low", "high"], 4
        prompts = [harmony.render_prompt(tasks[0].question, e) for e in harmony.EFFORTS]
        greedy = lambda: [c[0].ids for c in pool.generate(prompts, 1, temperature=0.0, seed=None)]  # noqa: E731
        base = greedy()
        pool.update_weights(_perturbed_state(policy))
        target = greedy()  # the healthy workers on the perturbed weights
        assert all(t != b for t, b in zip(target, base)), "the perturbation should change every greedy output"

        t0 = time.perf_counter()
        reference = pool.rollout(tasks, efforts, n, seed=11)
        healthy_s = time.perf_counter() - t0
        pid = pool.health()[1]["pid"]
        killer = threading.Timer(healthy_s / 4, os.kill, (pid, signal.SIGKILL))  # while the rollout is in flight
        t0 = time.perf_counter()
        killer.start()
        samples = pool.rollout(tasks, efforts, n, seed=11)
        killer.join()
        print(f"rollout: {healthy_s:.1f} s healthy, {time.perf_counter() - t0:.1f} s with a replaced worker")
        assert pool.restarts == 1
        assert len(samples) == len(tasks) * len(efforts) * n
        for s in samples:
            assert s.completion_ids and len(s.behavior_logprobs) == len(s.completion_ids) == len(s.loss_mask)
            assert s.finish_reason in ("stop", "length") and s.metadata
        assert [s.completion_ids for s in samples] == [s.completion_ids for s in reference]
        assert pool.health()[1]["pid"] != pid
        assert greedy() == target  # prompt 2 is worker 1's: the replacement holds the perturbed weights
    finally:
        pool.close()
