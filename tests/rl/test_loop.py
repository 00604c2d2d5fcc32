"""Whole training steps with in-process parts (fast tier): the real `train`/`train_loop`, learner,
rewards, metrics logger and checkpoints; only the vLLM worker pool is a fake (tests/rl/fakes.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from envs.types import Sample, Transcript
from rewards.types import RewardResult
from rl import checkpoint
from rl.config import validate
from rl.learner import Learner
from rl.model import VocabMap
from rl.train import build_batch, step_metrics, train

sys.path.insert(0, str(Path(__file__).parent))
from fakes import FakePool  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(run_dir, model, steps=3, resume=False, **over):
    raw = {
        "run_dir": str(run_dir), "resume": resume, "model": model,
        "env": {"efforts": ["low", "high"], "train_size": 40, "families": ["add"]},
        "algo": {"group_size": 4},
        "learner": {"lr": 1e-3, "micro_batch_size": 8, "num_threads": 1},
        "train": {"steps": steps, "tasks_per_step": 2, "checkpoint_every": 2, "keep_checkpoints": 2},
        "logging": {"tensorboard": False},
    }
    for key, value in over.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    return validate(raw)


def _metrics(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_three_steps_log_per_effort_checkpoint_on_cadence_and_release(tmp_path, policy, tiny_cfg):
    pools = []

    def make_pool(path, cfg, seed):
        pools.append(FakePool(path, cfg, seed))
        return pools[-1]

    cfg = _cfg(tmp_path / "run", tiny_cfg)
    result = train(cfg, str(policy), make_learner=Learner, make_pool=make_pool)
    lines = _metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [1, 2, 3] and result.step == 3
    for m in lines:
        for key in ("reward/low", "reward/high", "accuracy/low", "cot_tokens/high", "format_failure",
                    "loss", "grad_norm", "time/rollout", "time/learner", "time/sync", "worker_restarts"):
            assert key in m, key
        assert m["cot_tokens/high"] > m["cot_tokens/low"]  # the fake's traces are effort-styled
        assert 0.0 < m["accuracy"] < 1.0
    root = checkpoint.ckpt_root(tmp_path / "run")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003"]
    assert result.checkpoint == root / "step_000003" and checkpoint.latest(tmp_path / "run") == result.checkpoint
    # the learner's weights before the first rollout and after every step; released at the end
    assert pools[0].events == ["update", "rollout"] * 3 + ["update"] and pools[0].closed
    assert (tmp_path / "run" / "config.yaml").read_text().count("group_size: 4") == 1


def _sample(task, effort, final="1"):
    return Sample(task, "math", effort, [200006], [200008], [1], [0.0], Transcript(final=final))


def test_periodic_evaluation_logs_held_out_metrics(tmp_path, policy, tiny_cfg):
    cfg = _cfg(tmp_path / "run", tiny_cfg, steps=2, eval={"every": 1, "tasks": 4, "samples_per_task": 2,
                                                            "efforts": ["low", "high"]})
    train(cfg, str(policy), make_learner=Learner, make_pool=FakePool)
    evals = [m for m in _metrics(tmp_path / "run") if "eval/accuracy/low" in m]
    assert [m["step"] for m in evals] == [1, 2]
    for m in evals:
        assert 0.0 < m["eval/accuracy/high"] < 1.0 and m["eval/monotonicity"] == 1.0  # effort-styled traces
        assert m["eval/accuracy_ci95_lo/low"] <= m["eval/accuracy/low"] <= m["eval/accuracy_ci95_hi/low"]


def test_constant_groups_get_zero_advantage_and_dapo_drops_them(policy):
    vmap = VocabMap.load(policy)
    samples = [_sample("a", "low")] * 4 + [_sample("b", "low")] * 4
    results = [RewardResult(1.2)] * 4 + [RewardResult(1.2), RewardResult(0.0)] * 2  # a: constant 1.2
    batch, extra = build_batch(_cfg("x", {}, algo={"group_size": 4}), samples, results, vmap)
    assert batch.advantages[:4].abs().max().item() == 0.0  # exactly: 8 x 1.2 used to give +0.107
    assert batch.advantages[4:].abs().min().item() > 0.5
    filtered, extra = build_batch(_cfg("x", {}, algo={"group_size": 4, "filter_zero_std": True}),
                                  samples, results, vmap)
    assert extra["kept_samples"] == 4.0 and filtered.size == 4
    assert torch.equal(filtered.advantages, batch.advantages[4:])


def test_step_metrics_split_by_effort_with_the_configured_accuracy_term():
    samples = [_sample("a", "low"), _sample("a", "high"), _sample("b", "high")]
    results = [RewardResult(1.0, {"math": 1.0}), RewardResult(0.2, {"math": 0.0}),
               RewardResult(1.0, {"math": 1.0, "other/error": 1.0})]
    m = step_metrics(samples, results, "math")
    assert (m["accuracy/low"], m["accuracy/high"], m["accuracy"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert m["reward/high"] == pytest.approx(0.6) and m["reward_errors"] == pytest.approx(1 / 3)
    assert m["tool_calls"] == 0.0  # no python tool in these samples


def test_resume_continues_exactly_and_the_data_cursor_moves_on(tmp_path, policy, tiny_cfg):
    straight = tmp_path / "a"
    train(_cfg(straight, tiny_cfg, steps=3), str(policy), make_learner=Learner, make_pool=FakePool)
    cut = tmp_path / "b"
    train(_cfg(cut, tiny_cfg, steps=2), str(policy), make_learner=Learner, make_pool=FakePool)
    assert checkpoint.trainer_state(checkpoint.latest(cut))["cursor"] == 4
    pools = []

    def make_pool(path, cfg, seed):
        pools.append(FakePool(path, cfg, seed))
        return pools[-1]

    train(_cfg(cut, tiny_cfg, steps=3, resume=True), str(policy), make_learner=Learner, make_pool=make_pool)
    # engines start from the initial policy (a checkpoint folder may be pruned while a replacement
    # worker still needs it) and sample the resumed weights from the first rollout on
    assert pools[0].model_path == str(policy) and pools[0].events[:2] == ["update", "rollout"]
    a, b = _metrics(straight), _metrics(cut)
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("reward", "loss", "grad_norm", "accuracy/high"):
        assert a[2][key] == b[2][key], key  # bit-exact on CPU
    wa = load_file(str(straight / "checkpoints" / "step_000003" / "model.safetensors"))
    wb = load_file(str(cut / "checkpoints" / "step_000003" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_to_start_over_broken_checkpoints(tmp_path, policy, tiny_cfg):
    """Starting fresh would prune the broken checkpoints at the first save: stop and name them."""
    run = tmp_path / "run"
    train(_cfg(run, tiny_cfg, steps=2), str(policy), make_learner=Learner, make_pool=FakePool)
    for folder in checkpoint.ckpt_root(run).glob("step_*"):
        (folder / "learner_state.pt").write_bytes(b"torn")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* verifies"):
        train(_cfg(run, tiny_cfg, steps=3, resume=True), str(policy), make_learner=Learner, make_pool=FakePool)
    assert [p.name for p in checkpoint.ckpt_root(run).glob("step_*")] == ["step_000002"]  # kept


def test_a_raising_reward_plugin_scores_zero_and_the_run_goes_on(tmp_path, policy, tiny_cfg):
    from rewards.registry import register_reward

    @register_reward("test_loop_flaky")
    def flaky(sample):
        if sample.effort == "high":
            raise RuntimeError("judge unavailable")
        return RewardResult(1.0)

    cfg = _cfg(tmp_path / "run", tiny_cfg, steps=1,
               reward={"terms": {"math": {"weight": 1.0}, "test_loop_flaky": {"weight": 1.0}}})
    train(cfg, str(policy), make_learner=Learner, make_pool=FakePool)
    m = _metrics(tmp_path / "run")[0]
    assert m["reward_errors"] == pytest.approx(0.5)  # the high-effort half
    with pytest.raises(RuntimeError, match="test_loop_flaky"):
        cfg = _cfg(tmp_path / "run2", tiny_cfg, steps=1, reward={
            "terms": {"math": {"weight": 1.0}, "test_loop_flaky": {"weight": 1.0}}, "on_error": "raise"})
        train(cfg, str(policy), make_learner=Learner, make_pool=FakePool)


_KILLABLE = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from fakes import FakePool
from rl.config import validate
from rl.learner import Learner
from rl.train import train

class SlowPool(FakePool):  # leaves time to be killed between checkpoints
    def rollout(self, *a, **k):
        time.sleep(0.3)
        return super().rollout(*a, **k)

train(validate({cfg!r}), {policy!r}, make_learner=Learner, make_pool=SlowPool)
"""


@pytest.mark.timeout(600)
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, policy, tiny_cfg):
    from omegaconf import OmegaConf

    steps = 5
    straight = tmp_path / "a"
    train(_cfg(straight, tiny_cfg, steps=steps, train={"checkpoint_every": 1}), str(policy),
          make_learner=Learner, make_pool=FakePool)
    killed = tmp_path / "b"
    raw = OmegaConf.to_container(OmegaConf.structured(_cfg(killed, tiny_cfg, steps=steps,
                                                           train={"checkpoint_every": 1})))
    script = _KILLABLE.format(root=str(ROOT), tests=str(Path(__file__).parent), cfg=raw, policy=str(policy))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (checkpoint.ckpt_root(killed) / "step_000002").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = checkpoint.trainer_state(checkpoint.latest(killed))["step"]
    assert 2 <= done < steps
    train(_cfg(killed, tiny_cfg, steps=steps, resume=True, train={"checkpoint_every": 1}), str(policy),
          make_learner=Learner, make_pool=FakePool)
    a = {m["step"]: m for m in _metrics(straight)}
    b = {m["step"]: m for m in _metrics(killed)}  # steps after `done` come from the resumed run
    for step in range(done + 1, steps + 1):
        assert a[step]["loss"] == b[step]["loss"] and a[step]["reward"] == b[step]["reward"], step
    wa = load_file(str(straight / "checkpoints" / f"step_{steps:06d}" / "model.safetensors"))
    wb = load_file(str(killed / "checkpoints" / f"step_{steps:06d}" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _AnswerPool:
    """`generate` answers each prompt with the final its task is given in `finals` (a fake engine)."""

    def __init__(self, finals: dict):
        self.finals = finals

    def generate(self, prompts, n, *, temperature, seed):
        from envs import harmony
        from rl.engine import Completion

        out = []
        for p in prompts:
            ids = harmony.render_completion("thinking", self.finals[tuple(p)])
            out.append([Completion(ids, [-0.1] * len(ids), "stop") for _ in range(n)])
        return out


def test_evaluation_scores_through_the_training_reward():
    """Accuracy is the training reward's own term: LaTeX golds are checked by math-verify, not by a
    string compare, and `eval.metric` picks the term."""
    from envs import harmony
    from envs.types import Task
    from rewards.compose import CompositeReward
    from rl.evaluate import evaluate_policy

    tasks = [Task("a", "math", "What is 1/2?", {"answer": "\\frac{1}{2}"}),
             Task("b", "math", "What is 2^{10}?", {"answer": "2^{10}"})]
    cfg = validate({"eval": {"efforts": ["low"], "samples_per_task": 2}})
    finals = {"a": "0.5", "b": "2"}  # right (as a decimal), wrong (the leading number of the gold)
    pool = _AnswerPool({tuple(harmony.render_prompt(t.question, "low")): finals[t.task_id] for t in tasks})
    reward = CompositeReward.from_config(cfg.reward.terms)
    res = evaluate_policy(pool, tasks, cfg, reward)["low"]
    assert (res["accuracy"], res["n"], res["format_failure"]) == (0.5, 4, 0.0)
    assert res["cot_tokens"] > 0
    cfg.eval.metric = "effort_length"  # within budget everywhere
    assert evaluate_policy(pool, tasks, cfg, reward)["low"]["accuracy"] == 1.0


@pytest.mark.parametrize("mixture", [False, True])
def test_evaluation_reports_safety_rates_and_judge_agreement(tmp_path, mixture):
    """A policy that refuses every safety request and leaks every secret: harmful refusal 1, over-refusal 1,
    leak 1, with intervals, per category, pooled over efforts, in eval.json and eval.md (in the by_env entries
    of an env mixture); a second judge's agreement table."""
    import json

    from envs import harmony
    from envs.hierarchy import HierarchyEnv
    from envs.mixture import MixtureEnv
    from envs.safety_tasks import SafetyEnv
    from rewards.compose import CompositeReward
    from rl.evaluate import evaluate_policy, extra_judges, scalars, write_results

    if mixture:
        mix = MixtureEnv({"safety": (SafetyEnv(), 0.4), "hierarchy": (HierarchyEnv(protections=("password",)), 0.6)})
        tasks = mix.tasks("test", 50)
    else:
        tasks = SafetyEnv().tasks("test", 20) + HierarchyEnv(protections=("password",)).tasks("test", 30)
    finals = {t.task_id: t.metadata["secret"] if "secret" in t.metadata else "I can't help with that." for t in tasks}
    pool = _AnswerPool({tuple(harmony.render_prompt(t.question, e, t.developer)): finals[t.task_id]
                        for t in tasks for e in ("low", "high")})
    env = {"mixture": {"safety": {"weight": 0.4}, "hierarchy": {"weight": 0.6}}} if mixture else {}
    cfg = validate({"eval": {"efforts": ["low", "high"], "samples_per_task": 2, "metric": "safety"}, "env": env,
                    "reward": {"terms": {"safety": {"weight": 1.0}, "hierarchy": {"weight": 1.0}}}})
    res = evaluate_policy(pool, tasks, cfg, CompositeReward.from_config(cfg.reward.terms),
                          judges=extra_judges({"rule_again": {"judge": "rule"}}))
    at = res["by_env"] if mixture else {"safety": res, "hierarchy": res}
    s, h = at["safety"]["all_efforts"]["safety"], at["hierarchy"]["all_efforts"]["hierarchy"]
    assert s["harmful_refusal"]["rate"] == 1.0 and s["over_refusal"]["rate"] == 1.0 and h["leak"]["rate"] == 1.0
    assert s["harmful_refusal"]["n"] + s["over_refusal"]["n"] == 2 * 2 * 20 == 2 * at["safety"]["low"]["safety"]["allowed"]["n"]
    assert res["judge_agreement"]["rule_again"]["allowed"] == 1.0
    sp, hp = ("eval/safety/", "eval/hierarchy/") if mixture else ("eval/", "eval/")  # by_env: under the label
    assert scalars(res)[sp + "safety/over_refusal/all"] == 1.0 and scalars(res)[hp + "hierarchy/leak/low"] == 1.0
    write_results({"sft": res}, tmp_path, {"efforts": ["low", "high"], "tasks": len(tasks), "samples_per_task": 2,
                                           "temperature": 1.0, "seed": 0, "metric": "safety", "checkpoints": {}})
    saved = json.loads((tmp_path / "eval.json").read_text())["results"]["sft"]
    assert (saved["by_env"]["safety"] if mixture else saved)["all_efforts"]["safety"]
    for name in ("eval.md", "report.md"):
        text = (tmp_path / name).read_text()
        assert "### Safety: rates with 95% Wilson CI" in text and "### Judge agreement" in text
        assert "#### Hierarchy per attack (all efforts)" in text
