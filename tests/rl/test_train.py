"""Two GRPO steps on Ray + vLLM end to end, and exact resume from a checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rewards.registry import register_reward
from rl.config import validate
from rewards.types import RewardResult

pytestmark = pytest.mark.slow


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
        "eval": {"every": 0},
        "reward": {"weights": {"math": 1.0, "test_completion_length": 1.0}},
    })


def _run(cfg, policy):
    from rl.train import train

    state = train(cfg, policy_path=str(policy))
    state.close()
    return [json.loads(x) for x in open(f"{cfg.run_dir}/metrics.jsonl").read().splitlines()]


def test_two_steps_train_and_checkpoint(tmp_path, policy, tiny_cfg, ray_local):
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
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "two GRPO steps did not change any weight"
    assert (tmp_path / "run" / "config.yaml").exists()


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
