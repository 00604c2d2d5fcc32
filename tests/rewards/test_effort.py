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


# ---------------------------------------------------------------------------- the shape family
# Hand-computed: budget B=16 at low effort, 64 at medium.

@pytest.mark.parametrize("shape,options,effort,tokens,expected", [
    ("ceiling", {}, "low", 24, 0.5),
    ("l1_exact", {}, "low", 16, 0.0),                         # on target
    ("l1_exact", {}, "low", 1016, -0.3),                      # paper's alpha=0.0003 per token
    ("l1_exact", {"alpha": 0.0625}, "low", 8, -0.5),          # short of the target costs too
    ("l1_exact", {"alpha": 0.0625}, "low", 24, -0.5),
    ("l1_exact", {"alpha": 0.0625}, "low", 100, -1.0),        # clipped at -1
    ("l1_max", {}, "low", 16, 0.5),                           # delta=0.5 at the budget
    ("l1_max", {}, "low", 1016, 0.2),                         # 0.5 - 0.0003 * 1000
    ("l1_max", {"alpha": 0.0625}, "low", 1, 1.0),             # clipped at 1
    ("l1_max", {"alpha": 0.0625}, "low", 20, 0.25),
    ("l1_max", {"alpha": 0.0625, "delta": 1.0}, "low", 24, 0.5),
    ("l1_max", {"alpha": 0.0625}, "low", 40, 0.0),            # clipped at 0
    ("dapo_overlong", {"cache": 0.25}, "medium", 48, 0.0),    # up to L_max - L_cache = 64 - 16
    ("dapo_overlong", {"cache": 0.25}, "medium", 52, -0.25),
    ("dapo_overlong", {"cache": 0.25}, "medium", 64, -1.0),   # at L_max
    ("dapo_overlong", {"cache": 0.25}, "medium", 70, -1.0),   # past L_max
    ("dapo_overlong", {}, "low", 14, -0.375),                 # default cache 0.2: L_cache 3.2 tokens
    ("thinkprune", {}, "low", 16, 1.0),
    ("thinkprune", {}, "low", 17, 0.0),
])
def test_shape_table(make_sample, shape, options, effort, tokens, expected):
    reward = build_reward({"name": "effort_length", "shape": shape, **options})
    r = reward(make_sample("4", analysis=analysis_of(tokens), effort=effort))
    assert r.score == pytest.approx(expected)
    assert r.parts["tokens"] == tokens


def test_group_relative_is_kimi_lambda_per_group(make_sample):
    reward = build_reward({"name": "effort_length", "shape": "group_relative"})
    lengths = [("t1", "low", 10), ("t1", "low", 20), ("t1", "low", 30), ("t1", "low", 15),
               ("t1", "high", 40), ("t2", "low", 5), ("t2", "low", 5)]
    samples = []
    for task, effort, n in lengths:
        s = make_sample("4", analysis=analysis_of(n), effort=effort)
        s.task_id = task
        samples.append(s)
    scores = [r.score for r in reward.score_batch(samples)]
    # t1/low: min 10, max 30 -> 0.5 - (t - 10) / 20; t1/high alone and t2/low all equal -> 0
    assert scores == pytest.approx([0.5, 0.0, -0.5, 0.25, 0.0, 0.0, 0.0])
    assert reward(samples[0]).score == 0.0  # a group of one


def test_group_relative_skips_samples_without_effort(make_sample):
    reward = build_reward({"name": "effort_length", "shape": "group_relative"})
    a, b, c = (make_sample("4", analysis=analysis_of(n), effort="low") for n in (10, 20, 30))
    b.effort = ""
    assert [r and r.score for r in reward.score_batch([a, b, c])] == [0.5, None, -0.5]


def test_only_group_shapes_are_batch_capable():
    assert not hasattr(get_reward("effort_length"), "score_batch")  # per-sample failure isolation kept
    assert hasattr(get_reward("effort_length", shape="group_relative"), "score_batch")


@pytest.mark.parametrize("shape,expected", [
    ("ceiling", 1.0),  # today's shape does not look at finish_reason
    ("l1_max", 0.5036),  # 0.5 + 0.0003 * (16 - 4): L1 does not look at it either
    ("dapo_overlong", -1.0),
    ("thinkprune", 0.0),
])
def test_truncated_trace_is_past_the_limit_for_dapo_and_thinkprune(make_sample, shape, expected):
    sample = make_sample("4", analysis=analysis_of(4), effort="low")
    sample.finish_reason = "length"
    assert get_reward("effort_length", shape=shape)(sample).score == pytest.approx(expected)


@pytest.mark.parametrize("shape,floor", [
    ("ceiling", 0.0), ("l1_exact", -1.0), ("l1_max", 0.0), ("dapo_overlong", -1.0),
    ("group_relative", -0.5), ("thinkprune", 0.0),
])
def test_malformed_output_gets_the_floor_of_every_shape(make_sample, shape, floor):
    """No length credit for garbage: its score is the shape's worst, below every well-formed score."""
    from envs.harmony import Transcript

    reward = get_reward("effort_length", shape=shape)
    good = [make_sample("4", analysis=analysis_of(n), effort="low") for n in (1, 16, 40)]
    bad = make_sample(None, analysis=analysis_of(16), effort="low")
    assert not bad.transcript.format_ok
    bad.transcript = Transcript(analysis_tokens=1, format_ok=False, error="no final-channel message")
    batch = getattr(reward, "score_batch", None)
    results = batch(good + [bad]) if batch else [reward(s) for s in good + [bad]]
    assert results[-1].score == floor
    assert all(r.score >= floor for r in results[:-1])


@pytest.mark.parametrize("spec,error,match", [
    ({"shape": "l2"}, ValueError, "valid shapes: ceiling, l1_exact"),
    ({"shape": "ceiling", "alpha": 0.1}, TypeError, "takes options none"),
    ({"shape": "l1_max", "cache": 0.1}, TypeError, r"takes options \['alpha', 'delta'\]"),
    ({"shape": "l1_exact", "alpha": 0}, ValueError, "alpha=0 must be positive"),
    ({"shape": "dapo_overlong", "cache": 1.5}, ValueError, r"cache=1.5 must be in \(0, 1\]"),
    ({"shape": "l1_max", "delta": "big"}, ValueError, "must be a finite number"),
])
def test_bad_shape_config_fails_at_build(spec, error, match):
    with pytest.raises(error, match=match):
        build_reward({"name": "effort_length", **spec})
