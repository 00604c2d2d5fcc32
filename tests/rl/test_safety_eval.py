"""Safety / hierarchy evaluation rates: denominators, Wilson intervals, per category; judge agreement; tables."""
import doctest

import pytest

import rl.safety_eval as se
from envs.hierarchy import HierarchyEnv
from envs.safety_tasks import SafetyEnv, solution
from envs.types import Sample, Transcript
from rewards.compose import CompositeReward
from rewards.judge import Verdict


def _score(tasks, finals, terms=("safety", "hierarchy", "math")):
    samples = [Sample(t.task_id, t.env, "low", [], [], [], [], Transcript(final=f, format_ok=f is not None), t.metadata)
               for t, f in zip(tasks, finals)]
    reward = CompositeReward.from_config({k: 1.0 for k in terms})
    return samples, reward.score_batch(samples)


REFUSAL = "I can't help with that."


@pytest.mark.parametrize("policy,harmful_refusal,over_refusal", [
    ("spec", 1.0, 0.0),  # the spec's own answers
    ("refuse_all", 1.0, 1.0),
    ("comply_all", 0.0, 0.0),
])
def test_refusal_rates_follow_the_spec(policy, harmful_refusal, over_refusal):
    tasks = SafetyEnv().tasks("test", 60)
    finals = {"spec": [solution(t, "low")[1] for t in tasks], "refuse_all": [REFUSAL] * len(tasks),
              "comply_all": ["Sure, here is how."] * len(tasks)}[policy]
    m = se.safety_rates(*_score(tasks, finals))
    assert m["harmful_refusal"]["rate"] == harmful_refusal and m["over_refusal"]["rate"] == over_refusal
    harmful = sum(t.metadata["expected"] != "comply" for t in tasks)
    assert m["harmful_refusal"]["n"] == harmful and m["over_refusal"]["n"] == len(tasks) - harmful
    lo, hi = m["harmful_refusal"]["ci95"]
    assert lo <= harmful_refusal <= hi and 0 < hi - lo < 0.3  # a real interval, even at 0 or 1
    assert set(m["by_category"]) == {t.metadata["category"] for t in tasks}
    for cat, row in m["by_category"].items():
        assert row["refusal"]["rate"] == (float(row["expected"] != "comply") if policy == "spec" else
                                          float(policy == "refuse_all"))


def test_format_failures_count_as_not_refusing_and_are_reported():
    tasks = [t for t in SafetyEnv().tasks("test", 40) if t.metadata["expected"] == "refuse"][:10]
    m = se.safety_rates(*_score(tasks, [None] * 5 + [REFUSAL] * 5))
    assert m["harmful_refusal"]["rate"] == 0.5 and m["format_failure"]["rate"] == 0.5
    assert m["harmful_compliance"]["n"] == 5  # a missing answer is not counted as compliance either


def test_hierarchy_rates_per_protection_and_attack():
    env = HierarchyEnv()
    tasks = env.tasks("test", 80)
    leaky = [f"{t.metadata['secret']}. {env.solution(t, 'low')[1]}" if "secret" in t.metadata
             else env.solution(t, "low")[1] for t in tasks]
    m = se.hierarchy_rates(*_score(tasks, leaky))
    assert m["leak"]["rate"] == 1.0 and m["rule_break"]["rate"] == 0.0 and m["answered"]["rate"] == 1.0
    assert set(m["by_protection"]) == {t.metadata["protection"] for t in tasks}
    assert set(m["by_attack"]) == {t.metadata["attack"] for t in tasks}
    assert "leak" not in m["by_protection"]["uppercase"] and "rule_break" in m["by_protection"]["uppercase"]


def test_rates_ignore_other_envs():
    from envs.math_tasks import MathEnv

    math = MathEnv(families=["digit_sum"], difficulty=1).tasks("test", 5)
    samples, results = _score(math, [t.metadata["answer"] for t in math])
    assert se.guard_rates(samples, results) == {}


def test_judge_agreement_leaves_out_failures():
    a = [Verdict("refuse", allowed=True), Verdict(error="down"), Verdict("comply", allowed=False)]
    b = [Verdict("refuse", allowed=True), Verdict("refuse", allowed=True), Verdict("comply", allowed=False)]
    g = se.judge_agreement(a, b)
    assert g == {"allowed": 1.0, "response_type": 1.0, "kappa_allowed": 1.0, "n": 2, "failed": 1}


def test_markdown_tables():
    tasks = SafetyEnv().tasks("test", 30) + HierarchyEnv().tasks("test", 30)
    samples, results = _score(tasks, [REFUSAL] * len(tasks))
    g = se.guard_rates(samples, results)
    text = se.markdown({"sft": {"low": g, "all": g}, "rl": {"all": g}}, ["low"])
    assert "### Safety: rates with 95% Wilson CI" in text and "#### Safety per category" in text
    assert "| crafts | comply | 1.000 [" in text and "#### Hierarchy per attack" in text
    assert se.markdown({"sft": {"all": {}}}, ["low"]) == ""


def test_docstring_examples():
    result = doctest.testmod(se)
    assert result.failed == 0 and result.attempted > 0


def test_judge_agreements_against_the_rewards_own_verdicts():
    from rewards.judge import RuleJudge

    tasks = SafetyEnv().tasks("test", 40)
    finals = [solution(t, "low")[1] if i % 2 else REFUSAL for i, t in enumerate(tasks)]
    samples, results = _score(tasks, finals, terms=("safety",))

    class Contrarian:  # says the opposite of the spec on allowed
        def judge(self, spec, requests):
            return [Verdict(v.response_type, allowed=not v.allowed) for v in RuleJudge().judge(spec, requests)]

    g = se.judge_agreements({"rule": RuleJudge(), "contrarian": Contrarian()}, samples, results)
    assert g["rule"]["allowed"] == 1.0 and g["rule"]["kappa_allowed"] == 1.0 and g["rule"]["n"] == 40
    assert g["contrarian"]["allowed"] == 0.0 and g["contrarian"]["response_type"] == 1.0
    assert "| sft | rule | 1.000 | 1.000 | 1.000 | 40 | 0 |" in se.agreement_markdown({"sft": g})


def test_rescore_a_finished_eval_from_its_samples(tmp_path):
    import json

    from omegaconf import OmegaConf

    from rl.config import compose

    cfg = compose(["env=safety", "eval.tasks=12", "seed=3"])
    (tmp_path / "eval").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), tmp_path / "config.yaml")
    tasks = SafetyEnv(seed=3).tasks("test", 12)
    rows = [{"checkpoint": "sft", "task_id": t.task_id, "effort": "low", "analysis": "x", "cot_tokens": 1,
             "format_ok": True, "final": REFUSAL} for t in tasks]
    (tmp_path / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from rewards.judge import RuleJudge

    res = se.rescore(str(tmp_path), {"rule": RuleJudge()})
    s = res["sft"][se.ALL]["safety"]
    assert s["harmful_refusal"]["rate"] == 1.0 and s["over_refusal"]["rate"] == 1.0
    assert s["harmful_refusal"]["n"] + s["over_refusal"]["n"] == 12 and res["sft"]["judge_agreement"]["rule"]["n"] == 12
