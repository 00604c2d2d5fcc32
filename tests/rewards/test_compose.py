"""CompositeReward: weighted sum of applicable rewards, parts by name, batched math-verify."""
import time

import pytest

from rewards import CompositeReward
from rewards.math_verify_reward import MathReward

CFG = {"math": 1.0, "effort_length": 0.2, "format": 0.1}
HANG = r"\boxed{\dfrac{5^{(5^{(5^{(5^5)})}-4)}-5}{16}}"


@pytest.mark.parametrize("final,analysis_words,effort,expected", [
    ("408", 10, "low", 1.0 + 0.2 + 0.1),          # right, within budget, well formed
    ("The answer is 408.", 24, "low", 1.0 + 0.2 * 0.5 + 0.1),
    ("407", 10, "low", 0.0 + 0.2 + 0.1),          # wrong answer
    (None, 10, "low", 0.0 + 0.0 + 0.0),           # no final channel: math, length and format fail
    ("408", 10, "", 1.0 + 0.1),                    # no effort: length term not applicable
])
def test_weighted_sum(make_sample, final, analysis_words, effort, expected):
    sample = make_sample(final, analysis="carry" + " carry" * (analysis_words - 1), effort=effort)
    r = CompositeReward(CFG)(sample)
    assert r.score == pytest.approx(expected)
    assert ("effort_length" in r.parts) == bool(effort)
    assert r.parts["math/format"] == float(final is not None)


def test_parts_are_logged_by_name(make_sample):
    r = CompositeReward(CFG)(make_sample("408", analysis="carry", effort="high"))
    assert {"math", "math/correct", "math/format", "effort_length", "effort_length/tokens",
            "format"} <= set(r.parts)
    assert r.info["applicable"] == ["math", "effort_length", "format"]


def test_not_applicable_everywhere_scores_zero(make_sample):
    sample = make_sample("408", answer=None)
    sample.effort = ""
    r = CompositeReward({"math": 1.0, "effort_length": 1.0})(sample)
    assert (r.score, r.parts, r.info["applicable"]) == (0.0, {}, [])


def test_from_config_with_options():
    comp = CompositeReward.from_config({
        "math": {"weight": 1.0, "timeout_s": 1.0},
        "effort_length": {"weight": 0.2, "budgets": {"low": 8, "medium": 32, "high": 128}},
        "format": 0.1,
        "judge_stub": {"weight": 0.5, "_target_": "rewards.effort.EffortLengthReward"},
    })
    assert comp.weights == {"math": 1.0, "effort_length": 0.2, "format": 0.1, "judge_stub": 0.5}
    assert comp.rewards["math"].timeout_s == 1.0
    assert comp.rewards["effort_length"].budgets["high"] == 128


@pytest.mark.parametrize("cfg,error", [
    ({"mathh": 1.0}, KeyError),
    ({}, ValueError),
    ({"math": "high"}, ValueError),
])
def test_bad_config_fails_at_build(cfg, error):
    with pytest.raises(error):
        CompositeReward.from_config(cfg)


def test_score_batch_checks_math_in_one_parallel_batch(make_sample, monkeypatch):
    calls = []
    original = MathReward.score_batch

    def spy(self, samples):
        calls.append(len(samples))
        return original(self, samples)

    monkeypatch.setattr(MathReward, "score_batch", spy)
    comp = CompositeReward.from_config({"math": {"weight": 1.0, "timeout_s": 1.5}, "format": 0.1})
    samples = [make_sample(HANG), make_sample(HANG), make_sample("The answer is 408"),
               make_sample("407"), make_sample(None)]
    t0 = time.monotonic()
    results = comp.score_batch(samples)
    assert calls == [5]
    assert [r.parts["math"] for r in results] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert results[0].info["math"]["status"] == "timeout"
    assert time.monotonic() - t0 < 2 * 1.5 + 2.0  # two hangs side by side, plus a cold pool start
