"""Effort-length reward: 1 within budget, linear to 0 at twice the budget, None without effort."""
import pytest

from envs.math_tasks import MathEnv, solution
from rewards import build_reward, get_reward


def analysis_of(n_tokens):
    return "carry" + " carry" * (n_tokens - 1)  # one o200k token per word


@pytest.mark.parametrize("effort,tokens,expected", [
    ("low", 1, 1.0),
    ("low", 16, 1.0),
    ("low", 20, 0.75),
    ("low", 24, 0.5),
    ("low", 32, 0.0),
    ("low", 100, 0.0),
    ("medium", 64, 1.0),
    ("medium", 96, 0.5),
    ("high", 200, 1.0),
    ("high", 384, 0.5),
])
def test_budget_shape(make_sample, effort, tokens, expected):
    sample = make_sample("4", analysis=analysis_of(tokens), effort=effort)
    assert sample.transcript.analysis_tokens == tokens
    r = get_reward("effort_length")(sample)
    budget = {"low": 16, "medium": 64, "high": 256}[effort]
    assert r.score == pytest.approx(expected)
    assert (r.parts["tokens"], r.parts["budget"]) == (tokens, budget)
    assert r.parts["within_budget"] == float(tokens <= budget)


def test_no_effort_is_not_applicable(make_sample):
    sample = make_sample("4")
    sample.effort = ""
    assert get_reward("effort_length")(sample) is None


def test_configurable_budgets(make_sample):
    reward = build_reward({"name": "effort_length", "budgets": {"low": 4, "medium": 8, "high": 16}})
    assert reward(make_sample("4", analysis=analysis_of(6), effort="low")).score == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive integers"):
        build_reward({"name": "effort_length", "budgets": {"low": 0}})


def test_unknown_effort_names_the_budgets(make_sample):
    reward = build_reward({"name": "effort_length", "budgets": {"high": 16}})
    with pytest.raises(KeyError, match="no length budget for effort 'low'"):
        reward(make_sample("4", effort="low"))


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_sft_traces_earn_full_length_reward(make_sample, effort):
    reward = get_reward("effort_length")
    for task in MathEnv(seed=5).tasks("train", 20):
        analysis, final = solution(task, effort)
        assert reward(make_sample(final, analysis=analysis, effort=effort)).score == 1.0


def test_malformed_output_earns_no_length_credit():
    from envs.harmony import Transcript
    from rewards.effort import EffortLengthReward
    from envs.types import Sample

    bad = Transcript(analysis_tokens=5, format_ok=False, error="no final-channel message")
    s = Sample("t", "math", "low", [], [], [], [], bad)
    assert EffortLengthReward()(s).score == 0.0
