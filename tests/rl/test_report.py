"""Held-out evaluation end to end with a fake engine (no vLLM): per-effort metrics, eval.json's schema,
the effort-scaling PNG and the Markdown report (rl/evaluate.py, rl/report.py)."""
import doctest
import json
import math
import struct

import pytest

from envs import harmony
from envs.types import EFFORTS
from rl import evaluate, report
from rl.config import validate
from rl.data import make_env
from rl.engine import Completion

THINK = {"low": 4, "medium": 20, "high": 90}  # analysis words per effort (~tokens)


class _EffortPool:
    """A fake engine whose checkpoints differ: `skill[ckpt][effort]` is the fraction of samples answered
    right (the rest answer a wrong number); CoT length grows with effort, except on every third task
    where high thinks less than medium (so monotonicity is 2/3); high effort is cut at the token limit."""

    def __init__(self, tasks, skill, ckpt):
        self.skill, self.ckpt, self.loaded = skill, ckpt, []
        self.prompts = {tuple(harmony.render_prompt(t.question, e, t.developer)): (i, t, e)
                        for i, t in enumerate(tasks) for e in EFFORTS}

    def update_weights_from_path(self, path):
        self.loaded.append(path)
        self.ckpt = path

    def generate(self, prompts, n, *, temperature, seed):
        out = []
        for p in prompts:
            i, task, effort = self.prompts[tuple(p)]
            words = THINK["medium"] - 5 if effort == "high" and i % 3 == 0 else THINK[effort]
            right = round(self.skill[self.ckpt][effort] * n)
            comps = []
            for j in range(n):
                final = str(task.metadata["answer"]) if j < right else "-987654"
                ids = harmony.render_completion(" ".join(["step"] * words), final)
                comps.append(Completion(ids, [-0.1] * len(ids), "length" if effort == "high" else "stop"))
            out.append(comps)
        return out


def _cfg(**eval_over):
    return validate({"env": {"families": ["add"]},
                     "eval": {"tasks": 6, "samples_per_task": 4, "temperature": 0.7, **eval_over},
                     "seed": 3, "logging": {"progress": False}})


SKILL = {"ckpt/sft": {"low": 0.25, "medium": 0.5, "high": 0.75}, "ckpt/rl": {"low": 0.5, "medium": 0.75, "high": 1.0}}


def test_evaluation_writes_eval_json_report_and_figure_for_every_checkpoint(tmp_path):
    cfg = _cfg()
    tasks = make_env(cfg.env, cfg.seed).tasks("test", cfg.eval.tasks)
    pool = _EffortPool(tasks, SKILL, "ckpt/sft")
    results = evaluate.evaluate_checkpoints({"sft": "ckpt/sft", "rl": "ckpt/rl"}, cfg, tmp_path, pool=pool)
    assert pool.loaded == ["ckpt/sft", "ckpt/rl"]

    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["results"] == json.loads(json.dumps(results))
    assert (data["efforts"], data["tasks"], data["samples_per_task"], data["temperature"], data["seed"],
            data["metric"]) == (list(EFFORTS), 6, 4, 0.7, 3, "math")
    for name, skill in (("sft", SKILL["ckpt/sft"]), ("rl", SKILL["ckpt/rl"])):
        per = data["results"][name]
        assert per["monotonicity"] == pytest.approx(2 / 3)  # every third task: high thinks less than medium
        for effort in EFFORTS:
            m = per[effort]
            assert m["accuracy"] == skill[effort] and m["n"] == 24
            lo, hi = m["accuracy_ci95"]
            assert lo <= m["accuracy"] <= hi and hi - lo > 0.1
            assert {"pass@1", "pass@2", "pass@4"} <= set(m) and m["pass@1"] == pytest.approx(skill[effort])
            assert m["pass@4"] == (1.0 if skill[effort] > 0 else 0.0)
            assert m["cot_tokens_p50"] <= m["cot_tokens_p90"] and m["cot_tokens"] > 0
            assert m["truncation"] == (1.0 if effort == "high" else 0.0) and m["format_failure"] == 0.0
        # budgets 16/64/256 (the default effort_length term): all thinking fits them
        assert [per[e]["budget_compliance"] for e in EFFORTS] == [1.0, 1.0, 1.0]
        assert per["low"]["cot_tokens"] < per["medium"]["cot_tokens"]

    png = (tmp_path / "effort_scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert width >= 600 and height >= 400

    text = (tmp_path / "report.md").read_text()
    assert "](effort_scaling.png)" in text
    for word in ("sft", "rl", "ckpt/sft", "ckpt/rl", *[f"Reasoning: {e}" for e in EFFORTS], "Monotonicity",
                 "| 6 | 4 | 0.7 | 3 | math |", "0.667"):
        assert word in text, word
    assert "| rl | 1.000 [" in text  # accuracy with its interval, high effort
    assert (tmp_path / "eval.md").read_text().count("### Reasoning:") == 3


def test_without_an_effort_length_term_budget_compliance_is_null_and_one_effort_has_no_monotonicity(tmp_path):
    cfg = _cfg(efforts=["medium"], samples_per_task=1)
    cfg.reward.terms = {"math": {"weight": 1.0}}
    tasks = make_env(cfg.env, cfg.seed).tasks("test", cfg.eval.tasks)
    results = evaluate.evaluate_checkpoints({"only": "ckpt/rl"}, cfg, tmp_path, pool=_EffortPool(tasks, SKILL, "x"))
    assert results["only"]["medium"]["budget_compliance"] is None and results["only"]["monotonicity"] is None
    assert [k for k in results["only"]["medium"] if k.startswith("pass@")] == ["pass@1"]
    text = (tmp_path / "report.md").read_text()
    assert "| only | n/a |" in text and "Reasoning: low" not in text
    assert (tmp_path / "effort_scaling.png").stat().st_size > 10_000
    flat = evaluate.scalars(results["only"])
    assert "eval/budget_compliance/medium" not in flat and "eval/monotonicity" not in flat
    assert all(isinstance(v, float) and not math.isnan(v) for v in flat.values())


def test_docstring_examples_hold():
    assert doctest.testmod(evaluate).failed == 0 and doctest.testmod(report).failed == 0


def test_an_evaluation_with_its_own_out_dir_removes_hydras_empty_run_folder_only(tmp_path):
    from rl.evaluate import remove_hydra_only_dir

    run = tmp_path / "run"
    (run / "hydra").mkdir(parents=True)
    (run / "hydra" / "config.yaml").write_text("a: 1")
    (run / "config.log").write_text("")
    assert remove_hydra_only_dir(run) and not run.exists()
    kept = tmp_path / "kept"
    (kept / "hydra").mkdir(parents=True)
    (kept / "eval.json").write_text("{}")  # anything of ours keeps the folder
    assert not remove_hydra_only_dir(kept) and (kept / "eval.json").exists()
    (kept / "eval.json").unlink()
    (kept / "config.log").write_text("an error was logged")  # a log with something in it is kept too
    assert not remove_hydra_only_dir(kept) and kept.exists()
    assert not remove_hydra_only_dir(tmp_path / "missing")


def test_the_effort_figure_draws_a_checkpoint_that_got_nothing_right(tmp_path):
    """0/600 right at every effort: the Wilson bound must not sit a rounding error above 0 (matplotlib
    refuses negative error bars, and the crash came after every sample had been drawn)."""
    from rl.effort_metrics import wilson_interval
    from rl.report import effort_scaling_figure

    per = {e: {"cot_tokens": c, "accuracy": 0.0, "accuracy_ci95": list(wilson_interval(0, 600))}
           for e, c in (("low", 5.0), ("medium", 9.0), ("high", 20.0))}
    per["high"]["accuracy_ci95"][0] = 1e-18  # an interval from an older eval.json, a hair above its point
    out = effort_scaling_figure({"sft": per}, ("low", "medium", "high"), tmp_path / "fig.png")
    assert out.stat().st_size > 0
