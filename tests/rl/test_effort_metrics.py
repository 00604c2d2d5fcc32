"""Effort metrics (rl/effort_metrics.py) on hand-computed tables of toy samples."""
import doctest
import math

import pytest

from envs.types import Sample, Transcript
from rewards.types import RewardResult
from rl import effort_metrics as em


def _s(task="t", effort="low", tokens=0, finish="stop", ok=True):
    return Sample(task, "math", effort, [], [], [], [], Transcript(analysis_tokens=tokens, format_ok=ok),
                  finish_reason=finish)


def test_docstring_examples_hold():
    assert doctest.testmod(em).failed == 0


@pytest.mark.parametrize("successes, n, lo, hi", [
    (0, 10, 0.0, 0.2775),  # the normal approximation would claim [0, 0]
    (10, 10, 0.7225, 1.0),
    (5, 10, 0.2366, 0.7634),
    (1, 4, 0.0456, 0.6994),
    (60, 100, 0.5020, 0.6906),
])
def test_wilson_interval_matches_hand_computed_bounds(successes, n, lo, hi):
    got = em.wilson_interval(successes, n)
    assert got == (pytest.approx(lo, abs=1e-4), pytest.approx(hi, abs=1e-4))


def test_wilson_interval_with_no_samples_says_nothing_is_known():
    assert em.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 1, 1, 0.25),
    (4, 1, 4, 1.0),
    (4, 0, 4, 0.0),
    (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2)
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (8, 1, 4, 0.5),
    (200, 3, 1, 0.015),
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert em.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_k_beyond_the_samples():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        em.pass_at_k(2, 1, 4)


@pytest.mark.parametrize("n, ks", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12])])
def test_pass_k_values_are_one_powers_of_two_and_n(n, ks):
    assert em.pass_k_values(n) == ks


def test_mean_pass_at_k_averages_over_tasks_and_counts_only_solved_samples():
    samples = [_s("a") for _ in range(4)] + [_s("b") for _ in range(4)]
    scores = [1, 0, 0, 0, 0.2, 0, 0, 0]  # b's 0.2 is partial credit below SOLVED_AT: not solved
    results = [RewardResult(x, {"math": x}) for x in scores]
    assert em.mean_pass_at_k(samples, results, "math") == {
        "pass@1": pytest.approx(0.125), "pass@2": pytest.approx(0.25), "pass@4": pytest.approx(0.5)}


@pytest.mark.parametrize("tokens, mean, p50, p90", [
    ([4], 4.0, 4.0, 4.0),
    ([1, 3], 2.0, 2.0, 2.8),
    ([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 1000], 1550 / 11, 60.0, 100.0),
])
def test_cot_token_stats(tokens, mean, p50, p90):
    got = em.cot_token_stats([_s(tokens=t) for t in tokens])
    assert got == {"cot_tokens": pytest.approx(mean), "cot_tokens_p50": pytest.approx(p50),
                   "cot_tokens_p90": pytest.approx(p90)}


def test_budget_compliance_reads_the_effort_length_parts_and_is_none_without_them():
    within = [RewardResult(1.0, {"effort_length": 1.0, em.BUDGET_PART: w}) for w in (1.0, 1.0, 0.0, 1.0)]
    assert em.budget_compliance(within) == 0.75
    assert em.budget_compliance([RewardResult(1.0, {"math": 1.0})]) is None
    errored = RewardResult(0.0, {"effort_length": 0.0, "effort_length/error": 1.0})
    assert em.budget_compliance(within[:2] + [errored]) == 1.0  # a failed plugin call is not evidence


def test_truncation_and_format_failure_rates():
    samples = [_s(finish="length"), _s(ok=False), _s(), _s(finish="length", ok=False)]
    assert (em.truncation_rate(samples), em.format_failure_rate(samples)) == (0.5, 0.5)


def _ladder(task, *tokens, efforts=("low", "medium", "high")):
    return [_s(task, e, t) for e, t in zip(efforts, tokens)]


@pytest.mark.parametrize("samples, expected", [
    (_ladder("a", 1, 2, 3) + _ladder("b", 1, 3, 2), 0.5),  # b: high below medium
    (_ladder("a", 1, 2, 3) + _ladder("b", 2, 2, 3), 0.5),  # ties are not increases
    (_ladder("a", 1, 2, 3) + _ladder("b", 1, 9, 10), 1.0),
    (_ladder("a", 5, 9, efforts=("low", "high")) + _ladder("b", 9, 5, efforts=("low", "high")), 0.5),
    (_ladder("a", 5, 9, efforts=("high", "medium")), 0.0),  # ordered by EFFORTS, not by input order
    (_ladder("a", 1, efforts=("high",)), None),
    ([], None),
])
def test_monotonicity_over_ordered_efforts(samples, expected):
    assert em.monotonicity(samples) == expected


def test_monotonicity_uses_the_mean_per_task_and_effort_and_skips_tasks_missing_an_effort():
    samples = [_s("a", "low", 2), _s("a", "low", 10), _s("a", "high", 7),  # mean low 6 < 7
               _s("b", "low", 3), _s("b", "high", 0), _s("b", "high", 4),  # mean high 2 < 3
               _s("c", "low", 1)]  # never sampled at high: not counted
    assert em.monotonicity(samples) == 0.5


def test_effort_summary_has_every_plainly_named_key():
    samples = [_s("a", "low", 3, finish="length"), _s("a", "low", 5), _s("b", "low", 7), _s("b", "low", 9, ok=False)]
    results = [RewardResult(x + 0.1, {"math": x, em.BUDGET_PART: 1.0}) for x in (1.0, 0.0, 1.0, 1.0)]
    m = em.effort_summary(samples, results, "math")
    assert m["accuracy"] == 0.75 and m["n"] == 4 and m["reward"] == pytest.approx(0.85)
    lo, hi = m["accuracy_ci95"]
    assert lo < 0.75 < hi and (lo, hi) == tuple(em.wilson_interval(3, 4))
    assert (m["pass@1"], m["pass@2"]) == (0.75, 1.0) and "pass@4" not in m
    assert (m["cot_tokens"], m["cot_tokens_p50"]) == (6.0, 6.0) and math.isclose(m["cot_tokens_p90"], 8.4)
    assert (m["budget_compliance"], m["truncation"], m["format_failure"]) == (1.0, 0.25, 0.25)
    no_term = em.effort_summary(samples, [RewardResult(1.0, {"math": 1.0})] * 4, "math")
    assert no_term["budget_compliance"] is None


def test_training_step_logs_budget_compliance_per_effort_and_monotonicity():
    from rl.train import step_metrics

    samples = [_s("a", "low", 10), _s("a", "high", 90), _s("b", "low", 30), _s("b", "high", 20)]
    results = [RewardResult(1.0, {"math": 1.0, "effort_length": 1.0, em.BUDGET_PART: w}) for w in (1, 1, 0, 1)]
    m = step_metrics(samples, results, "math")
    assert (m["budget_compliance/low"], m["budget_compliance/high"], m["budget_compliance"]) == (0.5, 1.0, 0.75)
    assert m["monotonicity"] == 0.5  # a: 10 < 90; b: 30 > 20
    plain = step_metrics(samples[::2], [RewardResult(1.0, {"math": 1.0})] * 2, "math")  # one effort, no term
    assert not any(k.startswith(("budget_compliance", "monotonicity")) for k in plain)
    assert plain["accuracy/low"] == 1.0


def test_training_step_logs_the_budget_forced_rate_per_effort():
    from rl.train import step_metrics

    samples = [_s("a", "low"), _s("b", "low"), _s("a", "high"), _s("b", "high")]
    samples[0].budget_forced = samples[1].budget_forced = samples[2].budget_forced = True
    m = step_metrics(samples, [RewardResult(1.0, {"math": 1.0})] * 4, "math")
    assert (m["budget_forced/low"], m["budget_forced/high"], m["budget_forced"]) == (1.0, 0.5, 0.75)
