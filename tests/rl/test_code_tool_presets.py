"""The tiny world's code and tool presets (conf/experiment/code.yaml, tool.yaml): they compose, their
mixtures and reward terms are what the README says, their token budgets hold every SFT trace, and the
python tool's vocabulary covers its prompts. The learning results: README "Code and the python tool"."""
import pytest

from envs import harmony
from envs.types import ToolTrace
from rl.config import ConfigError, compose, validate
from rl.data import make_env
from rl.evaluate import env_metrics
from rl.model import collect_vocab
from rl.tools import header_ids, task_prompt, vocabulary_ids

TOOL_OFF = ["experiment=tool", "rollout.tools.python.enabled=false", "env.tool_traces=0"]


def completion_len(trace) -> int:
    from envs.tool_episode import teacher_episode

    if isinstance(trace, ToolTrace):
        return len(teacher_episode(trace, 256)[0])
    return len(harmony.render_completion(*trace))


def budgets_hold(c, n=60):
    """Every trace of `n` train tasks fits rollout.max_tokens, and prompt + completion fits the context."""
    env = make_env(c.env, c.seed)
    for task in env.tasks("train", n):
        for effort in c.env.efforts:
            used = completion_len(env.solution(task, effort))
            assert used <= c.rollout.max_tokens, (task.question, effort, used)
            assert len(task_prompt(task, effort, c.rollout.tools.python)) + c.rollout.max_tokens \
                <= c.rollout.max_model_len


def test_code_preset_mixes_math_and_code_with_each_envs_reward():
    c = compose(["experiment=code"])
    assert {k: v["weight"] for k, v in c.env.mixture.items()} == {"math": 0.5, "code": 0.5}
    assert set(c.reward.terms) == {"math", "code", "effort_length"}
    assert env_metrics(c) == {"math": "math", "code": "code"}  # eval.json by_env: accuracy and pass rate
    tasks = make_env(c.env, c.seed).tasks("test", c.eval.tasks)
    assert sorted({t.env for t in tasks}) == ["code", "math"]
    assert sum(t.env == "code" for t in tasks) == c.eval.tasks // 2
    corpus = make_env(c.env, c.seed).vocabulary_corpus()  # the tiny build's (every code family's questions)
    assert any("def f(x, y):" in text for text in corpus) and any(text.startswith("Compute ") for text in corpus)
    budgets_hold(c)


@pytest.mark.parametrize("overrides", [["experiment=tool"], TOOL_OFF])
def test_tool_preset_and_its_tool_free_twin_differ_only_in_the_tool(overrides):
    c = compose(overrides)
    on = c.rollout.tools.python.enabled
    traces = [make_env(c.env, c.seed).solution(t, "high") for t in make_env(c.env, c.seed).tasks("train", 20)]
    assert all(isinstance(t, ToolTrace) == on for t in traces)
    budgets_hold(c)
    base = compose(["experiment=tool"])
    for key in ("seed", "sft", "train", "algo", "learner", "eval", "reward"):
        assert getattr(c, key) == getattr(base, key), key  # same seeds and budgets
    assert (c.rollout.max_tokens, c.env.families, c.env.difficulty) == (192, ["muldiff"], 1)


def test_the_tool_vocabulary_covers_its_prompts_and_answers_headers():
    c = compose(["experiment=tool"])
    task = make_env(c.env, c.seed).tasks("test", 1)[0]
    vmap = collect_vocab([task.question, "print(1)"], vocabulary_ids(c.rollout.tools.python))
    for effort in c.env.efforts:
        assert vmap.covers(task_prompt(task, effort, c.rollout.tools.python))
    assert vmap.covers(header_ids())  # the tool's answers
    assert vmap.covers(harmony.render_assistant("print(1)", "analysis", "python"))  # a call, <|call|> included
    assert vmap.covers(harmony.encode_text("NameError: name 'x' is not defined\n"))


@pytest.mark.parametrize("raw", [
    {"env": {"tool_traces": 0.5}},
    {"env": {"mixture": {"math": {"weight": 1.0, "tool_traces": 1.0}}}},
])
def test_tool_traces_without_the_tool_fail_naming_the_key(raw):
    with pytest.raises(ConfigError, match="'env.tool_traces'"):
        validate(raw)


def test_tool_traces_out_of_range_fail_naming_the_key():
    with pytest.raises(ConfigError, match="tool_traces"):
        validate({"env": {"tool_traces": 1.5}, "rollout": {"tools": {"python": {"enabled": True}}}})
