"""env.name=code in the schema and in make_env; the env presets `code` and `humaneval` compose and build."""

import pytest

from envs.code_datasets import CodeDatasetEnv
from envs.code_tasks import CodeEnv
from rl.config import ConfigError, compose, validate
from rl.data import make_env, make_reward


def test_env_code_builds_the_tiny_world_env_with_its_reward_and_metric():
    c = compose(["env=code", "env.code_families=[examples,piecewise]"])
    assert (c.env.name, c.eval.metric, c.reward.terms["code"]) == ("code", "code", {"weight": 1.0})
    env = make_env(c.env, seed=3)
    assert isinstance(env, CodeEnv) and env.families == ("examples", "piecewise")
    assert {t.metadata["family"] for t in env.tasks("train", 50)} == {"examples", "piecewise"}


def test_env_humaneval_is_an_evaluation_preset():
    c = compose(["env=humaneval"])
    assert (c.env.dataset, c.env.test_fraction, c.eval.metric) == ("humaneval", 1.0, "code")
    assert c.reward.terms["code"]["mode"] == "all_pass"
    env = make_env(c.env, seed=0)
    assert isinstance(env, CodeDatasetEnv) and len(env.tasks("test", c.eval.tasks)) == 164


@pytest.mark.bwrap
def test_the_presets_reward_scores_code_samples():
    from envs.types import Sample, Transcript

    reward = make_reward(compose(["env=code"]).reward)
    task = CodeEnv(seed=0).tasks("test", 1)[0]
    final = f"```python\n{task.metadata['reference']}\n```"
    r = reward(Sample(task.task_id, "code", "low", [], [], [], [], Transcript(final=final, analysis_tokens=5),
                      task.metadata))
    assert r.parts["code"] == 1.0 and "math" not in r.parts  # the math term does not apply to code tasks


@pytest.mark.parametrize("raw, key", [
    ({"env": {"name": "python"}}, "env.name"),
    ({"env": {"code_families": ["expr", "sorting"]}}, "env.code_families"),
    ({"env": {"code_layout": "apps"}}, "env.code_layout"),
    ({"env": {"test_fraction": 1.5}}, "env.test_fraction"),
])
def test_bad_code_env_values_fail_naming_the_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(raw)
