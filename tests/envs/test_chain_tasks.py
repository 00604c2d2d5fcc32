"""Chain world: splits never overlap, answers and traces are right, lengths vary around the budgets."""
import collections
import re

import pytest

from envs.chain_tasks import (
    BUDGET_STEPS, LABELS, STYLE, ChainEnv, apply, budgets, parse_question, question, run_chain, solution,
    split_of, step_line, trace, vocabulary_corpus,
)
from envs.harmony import encode
from envs.types import EFFORTS

STEP = re.compile(r"^([a-j]): (\d) ([-+*])(\d) = (\d)$")


def test_apply_is_last_digit_arithmetic():
    for x in range(10):
        for d in range(10):
            assert apply(x, f"+{d}") == (x + d) % 10
            assert apply(x, f"-{d}") == (x - d) % 10
            assert apply(x, f"*{d}") == (x * d) % 10
    with pytest.raises(ValueError, match="not one of"):
        apply(3, "/2")


def test_train_and_test_never_share_a_chain():
    train, test = set(), set()
    for seed in range(3):
        env = ChainEnv(seed=seed)
        train |= {t.question for t in env.tasks("train", 300)}
        test |= {t.question for t in env.tasks("test", 100)}
    assert len(test) == 300 and train.isdisjoint(test)
    assert all(split_of(*parse_question(q)) == "test" for q in test)


def test_tasks_are_seeded_distinct_and_answered_right():
    env = ChainEnv(seed=3, steps=4)
    a = env.tasks("train", 50)
    assert [t.question for t in a] == [t.question for t in env.tasks("train", 50)]
    assert [t.question for t in a] != [t.question for t in env.tasks("train", 50, seed=1)]
    assert len({t.task_id for t in a}) == 50
    for t in a:
        start, ops = parse_question(t.question)
        assert len(ops) == 4 and t.env == "math"
        x = start
        for op in ops:  # independent re-computation with Python integers
            x = eval(f"{x}{op}") % 10
        assert t.metadata["answer"] == str(x)


@pytest.mark.parametrize("bad", ["x=7\na: +3\nFinal x?", "x=7\nb: +3\nKeep the last digit. Final x?",
                                 "x=7\na: /3\nKeep the last digit. Final x?", "x=7\nKeep the last digit. Final x?",
                                 ""])
def test_parse_question_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError):
        parse_question(bad)


@pytest.mark.parametrize("effort", EFFORTS)
def test_traces_are_correct_step_by_step(effort):
    for t in ChainEnv(seed=1).tasks("train", 100):
        start, ops = parse_question(t.question)
        analysis, final = solution(t, effort)
        assert final == t.metadata["answer"]
        *steps, last = analysis.splitlines()
        assert last == f"x = {final}."
        x, i = start, 0
        for line in steps:
            if line == "Check:":  # the check re-derives the chain from the start
                x, i = start, 0
                continue
            m = STEP.match(line)
            assert m, line
            label, a, sym, d, b = m.groups()
            assert (label, int(a), sym + d) == (LABELS[i], x, ops[i]) and int(b) == apply(x, ops[i])
            x, i = int(b), i + 1


def test_effort_styles_vary_around_the_budgets():
    """SFT traces are not compliant by construction: each effort has traces over its budget, and the
    written-step counts follow `STYLE`."""
    env = ChainEnv(seed=0)
    limit = env.budgets()
    tasks = env.tasks("train", 600)
    for effort in EFFORTS:
        lengths = [len(encode(solution(t, effort)[0])) for t in tasks]
        over = sum(n > limit[effort] for n in lengths) / len(lengths)
        expected_over = sum(w for j, w in STYLE[effort] if (j == "all+check") or
                            (isinstance(j, int) and BUDGET_STEPS[effort] != "all" and j > BUDGET_STEPS[effort]))
        assert abs(over - expected_over) < 0.06, (effort, over, expected_over)
    counts = collections.Counter(len(solution(t, "low")[0].splitlines()) - 1 for t in tasks)
    assert set(counts) == {0, 1, 2}
    mean = {e: sum(len(encode(solution(t, e)[0])) for t in tasks) / len(tasks) for e in EFFORTS}
    assert mean["low"] < mean["medium"] < mean["high"]


def test_budgets_fit_the_budget_steps_exactly():
    for steps in (3, 5, 7):
        b = budgets(steps)
        start, ops = 4, ["*7"] * steps
        for effort, n in BUDGET_STEPS.items():
            written = steps if n == "all" else min(n, steps)
            fits = len(encode(trace(start, ops, written)))
            assert fits <= b[effort] < fits + 10  # one more step would not fit (10 tokens a step)
            if written < steps:
                assert len(encode(trace(start, ops, written + 1))) > b[effort]


def test_question_and_step_lines_tokenize_one_token_per_symbol():
    # one token per digit, sign, label and separator: what makes the budgets exact per step count
    assert len(encode(step_line(2, 6, "-3"))) == len(encode(step_line(0, 1, "+1"))) == 9
    assert len(encode(question(7, ["+3", "*2"]))) == len(encode(question(0, ["-1", "+2"])))
    # the op's tokens in a trace line are the tokens of the question's line for that step
    q = encode(question(7, ["+3", "*2"]))
    assert encode(" *2") == encode("b: *2\n")[2:4] and encode(step_line(1, 0, "*2"))[4:6] == encode(" *2")
    assert all(i in q for i in encode("b: *2"))


def test_vocabulary_corpus_covers_every_task_token():
    vocab = {i for s in vocabulary_corpus(5) for i in encode(s)}
    env = ChainEnv(seed=5)
    for t in env.tasks("test", 50):
        ids = set(encode(t.question))
        for effort in EFFORTS:
            ids |= {i for s in solution(t, effort) for i in encode(s)}
        assert ids <= vocab


def test_run_chain_values():
    assert run_chain(7, ["+3", "*2", "-1", "+2", "*3"]) == [0, 0, 9, 1, 3]
