"""Cold-start SFT rows: the final-answer slip of an imperfect teacher; traces that call the python tool."""
import random

import pytest

from envs import harmony
from envs.math_tasks import MathEnv, solution
from envs.tool_episode import teacher_episode
from envs.types import ToolTrace
from rl.config import PythonToolConfig
from rl.model import VocabMap
from rl.sft import sft_examples, slip_final
from rl.tools import task_prompt


def _vmap():
    env = MathEnv(families=["digit_sum"], difficulty=1)
    return env.tasks("train", 200, seed=0), VocabMap.identity()


def _finals(rows, vmap):
    return [harmony.parse_completion(_completion(vmap.to_canonical(r["input_ids"]), r["assistant_masks"])).final
            for r in rows]


def _completion(ids, mask):
    start = mask.index(1)
    return ids[start:]


def test_slip_is_off_by_one_and_never_negative():
    rng = random.Random(0)
    assert {slip_final("13", rng) for _ in range(50)} == {"12", "14"}
    assert {slip_final("0", rng) for _ in range(10)} == {"1"}


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_slip_rate_changes_only_that_fraction_of_finals(rate):
    tasks, vmap = _vmap()
    rows = sft_examples(tasks, solution, vmap, ["low"], final_slip_rate=rate, seed=0)
    finals = _finals(rows, vmap)
    wrong = [f != str(t.metadata["answer"]) for f, t in zip(finals, tasks)]
    assert all(f is not None for f in finals)
    assert sum(wrong) / len(wrong) == pytest.approx(rate, abs=0.07)
    for f, t, w in zip(finals, tasks, wrong):
        if w:
            assert abs(int(f) - int(t.metadata["answer"])) == 1


def test_bad_slip_rate_is_rejected():
    tasks, vmap = _vmap()
    with pytest.raises(ValueError, match="final_slip_rate"):
        sft_examples(tasks, solution, vmap, ["low"], final_slip_rate=1.5)


def test_rows_without_the_tool_are_the_plain_training_render():
    tasks, vmap = _vmap()
    rows = sft_examples(tasks[:5], solution, vmap, ["low", "high"])
    want = [harmony.render_training(t.question, *solution(t, e), e) for t in tasks[:5] for e in ("low", "high")]
    assert [(r["input_ids"], r["assistant_masks"]) for r in rows] == want


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_tool_traces_render_as_the_rollouts_episode(share):
    """A task the env solves with the python tool trains on the rollout's tool prompt and episode ids:
    the tool's answer and the next header inserted, mask 0 there."""
    env = MathEnv(difficulty=2, families=("mul",), tool_traces=share)
    tasks, vmap, tool = env.tasks("train", 40), VocabMap.identity(), PythonToolConfig(enabled=True)
    rows = sft_examples(tasks, env.solution, vmap, ["medium"], tool=tool)
    used = 0
    for task, row in zip(tasks, rows):
        prompt = task_prompt(task, "medium", tool)
        ids, mask = row["input_ids"], row["assistant_masks"]
        assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt)
        trace = env.solution(task, "medium")
        if isinstance(trace, ToolTrace):
            used += 1
            assert (ids[len(prompt):], mask[len(prompt):]) == teacher_episode(trace, tool.max_output_tokens)
            inserted = harmony.decode([t for t, m in zip(ids[len(prompt):], mask[len(prompt):]) if not m])
            assert inserted == (f"<|start|>python to=assistant<|channel|>analysis<|message|>"
                                f"{task.metadata['answer']}\n<|end|><|start|>assistant")
        t = harmony.parse_completion(ids[len(prompt):])
        assert t.format_ok and t.final == task.metadata["answer"] and t.tool_calls == isinstance(trace, ToolTrace)
    assert used / len(tasks) == pytest.approx(share, abs=0.2)


def test_tool_traces_need_the_tool_enabled():
    env = MathEnv(difficulty=2, families=("mul",), tool_traces=1.0)
    with pytest.raises(ValueError, match="rollout.tools.python.enabled"):
        sft_examples(env.tasks("train", 2), env.solution, VocabMap.identity(), ["low"])
