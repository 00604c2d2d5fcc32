"""GRPO steps on Ray + vLLM end to end (slow tier): two steps change the weights, resume equals an
uninterrupted run, every actor is released when `train` returns, and a Hydra multirun of two jobs
works from the command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rewards.registry import register_reward
from rewards.types import RewardResult
from rl.config import validate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@register_reward("test_completion_length")
def completion_length(sample):
    """An untrained model gets every math answer wrong; a length reward gives the groups variance."""
    return RewardResult(len(sample.completion_ids) / 48.0)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from rl.cluster import init_ray

    init_ray(validate({}).cluster)
    yield
    ray.shutdown()


def _cfg(run_dir, steps, model, resume=False):
    return validate({
        "run_dir": str(run_dir), "resume": resume, "model": model,
        "env": {"efforts": ["low", "high"], "train_size": 50},
        "algo": {"group_size": 2},
        "rollout": {"max_tokens": 48, "max_model_len": 256, "kv_cache_gib": 0.5},
        "learner": {"lr": 1e-3, "micro_batch_size": 4},
        "train": {"steps": steps, "tasks_per_step": 2, "checkpoint_every": 1},
        "reward": {"terms": {"math": {"weight": 1.0}, "test_completion_length": {"weight": 1.0}}},
    })


def _run(cfg, policy):
    from rl.train import train

    train(cfg, policy_path=str(policy))
    return [json.loads(x) for x in open(f"{cfg.run_dir}/metrics.jsonl").read().splitlines()]


def _alive_actors() -> list:
    from ray._private.state import actors  # the state API without the dashboard

    return [a for a in actors().values() if a["State"] == "ALIVE"]


def test_two_steps_train_checkpoint_and_release_the_actors(tmp_path, policy, tiny_cfg, ray_local):
    cfg = _cfg(tmp_path / "run", 2, tiny_cfg)
    lines = _run(cfg, policy)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("time/rollout", "time/reward", "time/learner", "time/sync", "reward", "loss",
                    "cot_tokens/low", "cot_tokens/high", "grad_norm"):
            assert key in m, key
        assert m["tokens"] > 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    after = load_file(str(ckpt / "model.safetensors"))
    before = load_file(str(policy / "model.safetensors"))
    assert [k for k in before if not torch.equal(before[k], after[k])], "two GRPO steps changed no weight"
    assert (tmp_path / "run" / "config.yaml").exists()
    assert _alive_actors() == []  # learner and rollout workers are gone


def test_resume_gives_the_same_next_step(tmp_path, policy, tiny_cfg, ray_local):
    straight = _run(_cfg(tmp_path / "a", 2, tiny_cfg), policy)
    _run(_cfg(tmp_path / "b", 1, tiny_cfg), policy)
    resumed = _run(_cfg(tmp_path / "b", 2, tiny_cfg, resume=True), policy)
    a, b = straight[1], resumed[-1]
    assert b["step"] == 2
    for key in ("reward", "loss", "grad_norm", "completion_tokens", "cot_tokens/high"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "step_000002" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "step_000002" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(900)
def test_hydra_multirun_of_two_jobs(tmp_path, policy):
    """`python -m rl.train -m ... seed=0,1`: two jobs in one process, each releasing its actors and
    Ray, each writing its own run folder."""
    args = [sys.executable, "-m", "rl.train", "-m", f"model.path={policy}", f"run_dir={tmp_path}/sweep",
            "seed=0,1", "train.steps=1", "train.tasks_per_step=1", "algo.group_size=2",
            "env.efforts=[low]", "env.train_size=20", "rollout.max_tokens=32", "rollout.max_model_len=256",
            "rollout.kv_cache_gib=0.5", "learner.micro_batch_size=4", "logging.tensorboard=false"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        lines = (tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1], job
        assert "seed: " + job in (tmp_path / "sweep" / job / "config.yaml").read_text()
