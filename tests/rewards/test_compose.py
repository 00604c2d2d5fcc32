"""CompositeReward: weighted sum of applicable rewards, parts by name, batched math-verify, and
the failure policy (a plugin that raises, hangs or returns garbage)."""
import logging
import math
import threading
import time

import pytest

import rewards.math_verify_reward as mvr
from rewards import CompositeReward
from rewards.effort import EffortLengthReward
from rewards.math_verify_reward import MathReward, VerifyPool
from rewards.types import RewardResult

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
        "judge_stub": {"weight": 0.5, "_target_": "rewards.effort.EffortLengthReward", "budgets": {"low": 4}},
    }, on_error="raise", timeout_s=7.0)
    assert comp.weights == {"math": 1.0, "effort_length": 0.2, "format": 0.1, "judge_stub": 0.5}
    assert comp.rewards["math"].timeout_s == 1.0
    assert comp.rewards["effort_length"].budgets["high"] == 128
    assert isinstance(comp.rewards["judge_stub"], EffortLengthReward)
    assert comp.rewards["judge_stub"].budgets == {"low": 4}
    assert (comp.on_error, comp.timeout_s, comp.errors) == ("raise", 7.0, {})


def test_from_config_accepts_omegaconf_terms():
    from omegaconf import OmegaConf

    terms = OmegaConf.create({"math": {"weight": 1.0, "timeout_s": 2.0},
                              "effort_length": {"weight": 0.2, "budgets": {"low": 8}}})
    comp = CompositeReward.from_config(terms)
    assert comp.weights == {"math": 1.0, "effort_length": 0.2}
    assert comp.rewards["effort_length"].budgets == {"low": 8}


@pytest.mark.parametrize("cfg,error", [
    ({"mathh": 1.0}, KeyError),
    ({}, ValueError),
    ({"math": "high"}, ValueError),
    ({"math": {"timeout_s": 1.0}}, ValueError),
])
def test_bad_config_fails_at_build(cfg, error):
    with pytest.raises(error):
        CompositeReward.from_config(cfg)


@pytest.mark.parametrize("kwargs,match", [
    ({"on_error": "ignore"}, "on_error='ignore'"),
    ({"timeout_s": 0}, "timeout_s=0"),
])
def test_bad_failure_policy_fails_at_build(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompositeReward({"format": 1.0}, **kwargs)


def test_score_batch_checks_math_in_one_parallel_batch(make_sample, monkeypatch):
    calls = []
    original = MathReward.score_batch

    def spy(self, samples):
        calls.append(len(samples))
        return original(self, samples)

    limit = 1.5
    pool = VerifyPool(workers=2).start()
    monkeypatch.setattr(mvr, "default_pool", lambda: pool)
    monkeypatch.setattr(MathReward, "score_batch", spy)
    comp = CompositeReward.from_config({"math": {"weight": 1.0, "timeout_s": limit}, "format": 0.1})
    samples = [make_sample(HANG), make_sample(HANG), make_sample("The answer is 408"),
               make_sample("407"), make_sample(None)]
    try:
        t0 = time.monotonic()
        results = comp.score_batch(samples)
        wall = time.monotonic() - t0
    finally:
        pool.close()
    assert calls == [5]
    assert [r.parts["math"] for r in results] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert results[0].info["math"]["status"] == "timeout"
    assert wall < 2 * limit  # the two hangs ran side by side, not one after the other


# ---------------------------------------------------------------------------- failure policy

def _raises(sample):
    raise ZeroDivisionError("judge divided by zero")


class _TooFew:
    def score_batch(self, samples):
        return [RewardResult(1.0)] * (len(samples) - 1)

    def __call__(self, sample):
        return RewardResult(1.0)


BROKEN = {
    "raises": (_raises, "ZeroDivisionError: judge divided by zero"),
    "too_few": (_TooFew(), "returned 1 results for 2 samples"),
    "not_a_result": (lambda s: 1.0, "returned float for sample"),
    "nan_score": (lambda s: RewardResult(math.nan), "returned score nan for sample"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_plugin_scores_zero_and_is_counted(make_sample, caplog, kind):
    plugin, cause = BROKEN[kind]
    comp = CompositeReward({"format": 1.0, "judge": 0.5}, {"judge": plugin})
    samples = [make_sample("408"), make_sample(None)]
    with caplog.at_level(logging.WARNING, logger="rewards.compose"):
        first = comp.score_batch(samples)
        second = comp.score_batch(samples)
    assert [r.score for r in first] == [1.0, 0.0]  # format term only; the judge scores 0
    assert all(r.parts["judge"] == 0.0 and r.parts["judge/error"] == 1.0 for r in first + second)
    assert all(cause in r.info["judge"]["error"] for r in first)
    assert "format/error" not in first[0].parts
    assert comp.errors == {"judge": 4}  # failed samples, two per batch
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("'judge' failed on 2 of 2 samples" in w and cause in w for w in warnings)


def test_a_per_sample_failure_costs_only_its_sample(make_sample):
    def judge(sample):
        if sample.effort == "high":
            raise RuntimeError("judge unavailable")
        return RewardResult(1.0)

    comp = CompositeReward({"judge": 1.0}, {"judge": judge})
    results = comp.score_batch([make_sample("1", effort="low"), make_sample("1", effort="high")])
    assert [r.score for r in results] == [1.0, 0.0]
    assert ["judge/error" in r.parts for r in results] == [False, True]
    assert comp.errors == {"judge": 1}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_plugin_stops_the_run_under_raise(make_sample, kind):
    plugin, cause = BROKEN[kind]
    comp = CompositeReward({"format": 1.0, "judge": 0.5}, {"judge": plugin}, on_error="raise")
    with pytest.raises(RuntimeError, match=f"reward plugin 'judge' failed: .*{cause}"):
        comp.score_batch([make_sample("408"), make_sample("1")])


def test_hung_plugin_is_abandoned_at_the_deadline(make_sample):
    release = threading.Event()

    def hung(sample):
        if sample.effort == "high":
            release.wait(30)
        return RewardResult(1.0)

    samples = [make_sample("408", effort="low"), make_sample("408", effort="high")]
    comp = CompositeReward({"format": 1.0, "judge": 1.0}, {"judge": hung}, timeout_s=0.5)
    strict = CompositeReward({"format": 1.0, "judge": 1.0}, {"judge": hung}, timeout_s=0.5, on_error="raise")
    try:
        t0 = time.monotonic()
        results = comp.score_batch(samples)
        wall = time.monotonic() - t0
        with pytest.raises(RuntimeError, match="'judge' failed: TimeoutError"):
            strict.score_batch(samples)
    finally:
        release.set()  # let the abandoned threads finish
    assert wall < 0.5 + 1.0
    assert [r.score for r in results] == [2.0, 1.0]  # the sample scored before the deadline keeps its score
    assert (results[1].parts["judge/error"], comp.errors) == (1.0, {"judge": 1})
    assert "reward.timeout_s=0.5" in results[1].info["judge"]["error"]


# ---------------------------------------------------------------------------- correctness gating

SHAPES = ["ceiling", "l1_exact", "l1_max", "dapo_overlong", "group_relative", "thinkprune"]


def _words(n):
    return "carry" + " carry" * (n - 1)


def _gated_composite(shape, weight, gate=True):
    term = {"weight": weight, "shape": shape, **({"gate": "math"} if gate else {})}
    return CompositeReward.from_config({"math": {"weight": 1.0, "timeout_s": 5.0}, "effort_length": term})


@pytest.mark.parametrize("shape", SHAPES)
def test_gated_wrong_short_answer_scores_below_right_long_one(make_sample, shape):
    """Same task and effort (one GRPO group): a 1-token wrong answer vs a 100-token right one, far
    past the low budget of 16, at the default length weight 0.2."""
    wrong_short = make_sample("407", analysis=_words(1), effort="low")
    right_long = make_sample("408", analysis=_words(100), effort="low")
    wrong, right = _gated_composite(shape, 0.2).score_batch([wrong_short, right_long])
    assert wrong.score < right.score
    assert wrong.parts["effort_length"] <= 0.0  # no length bonus for a wrong answer
    assert (wrong.parts["effort_length/gated"], right.parts["effort_length/gated"]) == (1.0, 0.0)


@pytest.mark.parametrize("shape", ["ceiling", "l1_max", "thinkprune"])  # the [0, 1] bonus shapes
def test_gate_keeps_the_order_where_the_bonus_outweighs_the_task(make_sample, shape):
    """A length weight of 2 makes the ungated bonus beat correctness; the gate restores the order."""
    l1 = {"alpha": 0.0625} if shape == "l1_max" else {}
    samples = [make_sample("407", analysis=_words(1), effort="low"),
               make_sample("408", analysis=_words(100), effort="low")]
    scores = {}
    for gate in (False, True):
        term = {"weight": 2.0, "shape": shape, **l1, **({"gate": "math"} if gate else {})}
        comp = CompositeReward.from_config({"math": 1.0, "effort_length": term})
        scores[gate] = [r.score for r in comp.score_batch(samples)]
    assert scores[False][0] > scores[False][1]
    assert scores[True][0] < scores[True][1]


@pytest.mark.parametrize("shape", ["l1_exact", "dapo_overlong"])
def test_gate_keeps_penalties_for_wrong_answers(make_sample, shape):
    """Penalty shapes apply to all answers (DAPO, LCPO-Exact): a wrong overlong answer is still
    penalised, so the gate never pays for being wrong."""
    l1 = {"alpha": 0.0625} if shape == "l1_exact" else {}
    comp = CompositeReward.from_config({"math": 1.0, "effort_length": {
        "weight": 0.2, "shape": shape, "gate": "math", **l1}})
    r = comp(make_sample("407", analysis=_words(100), effort="low"))
    assert r.parts["effort_length"] == -1.0 and r.parts["effort_length/gated"] == 1.0
    assert r.score == pytest.approx(-0.2)


def test_group_relative_gate_is_kimis_rule(make_sample):
    """lambda for right answers, min(0, lambda) for wrong ones (Kimi k1.5)."""
    comp = _gated_composite("group_relative", 1.0)
    samples = [make_sample(final, analysis=_words(n), effort="low")
               for final, n in [("407", 10), ("408", 10), ("408", 20), ("407", 30), ("408", 30)]]
    assert [r.parts["effort_length"] for r in comp.score_batch(samples)] == pytest.approx(
        [0.0, 0.5, 0.0, -0.5, -0.5])


def test_without_gate_the_ceiling_is_unchanged(make_sample):
    samples = [make_sample(final, analysis=_words(n), effort="low")
               for final, n in [("407", 1), ("408", 24), ("408", 100)]]
    results = CompositeReward(CFG).score_batch(samples)
    assert [r.score for r in results] == pytest.approx([0.2 + 0.1, 1.0 + 0.1 + 0.1, 1.0 + 0.0 + 0.1])
    assert not any("effort_length/gated" in r.parts for r in results)


def test_gate_is_scored_first_whatever_the_config_order(make_sample):
    calls = []

    def judge(sample):
        calls.append("judge")
        return RewardResult(float(sample.effort == "high"))

    def bonus(sample):
        calls.append("bonus")
        return RewardResult(1.0)

    comp = CompositeReward({"bonus": 1.0, "judge": 0.0}, {"judge": judge, "bonus": bonus},
                           gates={"bonus": "judge"})
    results = comp.score_batch([make_sample("1", effort="low"), make_sample("1", effort="high")])
    assert calls == ["judge", "judge", "bonus", "bonus"]
    assert [r.score for r in results] == [0.0, 1.0]
    assert results[0].info["applicable"] == ["bonus", "judge"]  # parts and logs keep config order


def test_gate_chain_gates_on_the_gated_score(make_sample):
    one = lambda s: RewardResult(1.0)  # noqa: E731
    comp = CompositeReward({"a": 1.0, "b": 1.0, "c": 1.0},
                           {"a": one, "b": one, "c": lambda s: RewardResult(0.0)}, gates={"a": "b", "b": "c"})
    r = comp(make_sample("1"))
    assert (r.parts["a"], r.parts["b"], r.parts["a/gated"], r.parts["b/gated"]) == (0.0, 0.0, 1.0, 1.0)


def test_a_gate_that_does_not_apply_is_closed(make_sample):
    comp = CompositeReward({"bonus": 1.0, "judge": 1.0},
                           {"bonus": lambda s: RewardResult(1.0), "judge": lambda s: None},
                           gates={"bonus": "judge"})
    assert comp(make_sample("1")).parts == {"bonus": 0.0, "bonus/gated": 1.0}


@pytest.mark.parametrize("gates,match", [
    ({"effort_length": "mathh"}, "gate 'mathh' is not a reward term; valid terms: math, format"),
    ({"effort_length": "effort_length"}, "cycle: effort_length -> effort_length"),
    ({"effort_length": "format", "format": "math", "math": "effort_length"},
     "cycle: math -> effort_length -> format -> math"),
])
def test_bad_gates_fail_at_build(gates, match):
    terms = {name: {"weight": w, **({"gate": gates[name]} if name in gates else {})} for name, w in CFG.items()}
    with pytest.raises(ValueError, match=match):
        CompositeReward.from_config(terms)


def test_envs_routes_two_instances_of_one_reward_to_their_own_envs(make_sample):
    """A term with `envs` scores only its envs' samples; two budgets of one reward live side by side."""
    from omegaconf import OmegaConf

    terms = OmegaConf.create({
        "short": {"weight": 1.0, "name": "effort_length", "budgets": {"high": 4}, "envs": ["walk"]},
        "long": {"weight": 1.0, "name": "effort_length", "budgets": {"high": 64}, "envs": ["safety", "hierarchy"]},
    })
    comp = CompositeReward.from_config(terms)
    walk, safety, other = (make_sample("408", analysis="carry " * 16, effort="high") for _ in range(3))
    walk.env, safety.env = "walk", "safety"  # `other` stays "math": neither term is routed to it
    calls, inner = [], comp.rewards["short"]
    comp.rewards["short"] = lambda s: calls.append(s.env) or inner(s)
    got = comp.score_batch([walk, safety, other])
    assert calls == ["walk"]  # the plugin never sees the other envs' samples
    assert set(got[0].parts) >= {"short"} and "long" not in got[0].parts
    assert got[0].parts["short"] < 1.0  # 16 words over a 4-token budget
    assert got[1].parts["long"] == 1.0 and "short" not in got[1].parts
    assert (got[2].score, got[2].info["applicable"]) == (0.0, [])


def test_envs_and_gate_compose(make_sample):
    """A routed term's gate still closes on a wrong answer, and the gate itself may be routed."""
    comp = CompositeReward({"task": 1.0, "bonus": 1.0},
                           {"task": lambda s: RewardResult(float(s.transcript.final == "1")),
                            "bonus": lambda s: RewardResult(1.0)},
                           gates={"bonus": "task"}, envs={"bonus": ["walk"], "task": ["walk"]})
    right, wrong = make_sample("1"), make_sample("2")
    right.env = wrong.env = "walk"
    r, w = comp.score_batch([right, wrong])
    assert (r.score, w.score, w.parts["bonus/gated"]) == (2.0, 0.0, 1.0)


@pytest.mark.parametrize("envs,match", [
    ("walk", "envs must be a non-empty list of env names"),
    ([], "envs must be a non-empty list"),
    ([1], "envs must be a non-empty list"),
])
def test_bad_envs_fail_at_build(envs, match):
    with pytest.raises(ValueError, match=match):
        CompositeReward.from_config({"math": {"weight": 1.0, "envs": envs}})
    with pytest.raises(ValueError, match="envs names 'mathh', which is not a reward term"):
        CompositeReward({"math": 1.0}, envs={"mathh": ["math"]})


def test_envs_also_match_the_mixture_label(make_sample):
    """Walk tasks report env "math"; in a mixture their ids carry the label, which `envs` matches too."""
    comp = CompositeReward({"bonus": 1.0}, {"bonus": lambda s: RewardResult(1.0)}, envs={"bonus": ["walk"]})
    walk, digits = make_sample("1"), make_sample("1")
    walk.task_id, digits.task_id = "walk:walk-3RS", "digits:math-0a1b"  # both env "math"
    assert [r.parts.get("bonus") for r in comp.score_batch([walk, digits])] == [1.0, None]
