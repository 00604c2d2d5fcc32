"""Chain world: splits never overlap, answers and traces are right, lengths vary around the budgets."""
import collections
import re

import pytest

from envs.chain_tasks import (
    BOXES, BUDGET_STEPS, STYLE, ChainEnv, budgets, parse_question, question, run_chain, solution, split_of,
    step_line, trace, vocabulary_corpus,
)
from envs.harmony import encode
from envs.types import EFFORTS

STEP = re.compile(r"^(\d+)\|([a-j])(\d)$")
TABLE = [3, 7, 9, 0, 6, 8, 1, 4, 5, 2]


def test_box_numbers_repeat_digits():
    """Box numbers are a random function, not a permutation: a question holding every digit exactly once
    kept SFT's reads at chance (README "Effort that pays: the world study")."""
    tables = [parse_question(t.question)[0] for t in ChainEnv(seed=0).tasks("train", 200)]
    assert sum(len(set(tb)) < 10 for tb in tables) > 190


def test_row_order_and_fixed_points_are_options():
    """Default: rows a to j, a box may name itself (the measured world). `shuffle_rows` puts the rows in a
    random order per task; `fixed_points=False` keeps every box from naming itself."""
    plain = ChainEnv(seed=0).tasks("train", 200)
    assert all(t.question.splitlines()[1:11] == [f"{b}{v}" for b, v in zip(BOXES, parse_question(t.question)[0])]
               for t in plain)
    assert any(any(v == x for x, v in enumerate(parse_question(t.question)[0])) for t in plain)
    tasks = ChainEnv(seed=0, shuffle_rows=True, fixed_points=False).tasks("train", 200)
    orders = {tuple(line[0] for line in t.question.splitlines()[1:11]) for t in tasks}
    assert len(orders) > 190
    for t in tasks:
        table, start, steps = parse_question(t.question)
        assert all(v != x for x, v in enumerate(table))
        assert t.metadata["answer"] == str(run_chain(table, start, steps)[-1])


def test_question_order_must_list_every_box_once():
    with pytest.raises(ValueError, match="each of the 10 boxes once"):
        question(TABLE, 0, 5, order=[0] * 10)
    shuffled = question(TABLE, 4, 5, order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert shuffled.splitlines()[1] == "j2" and parse_question(shuffled) == (TABLE, 4, 5)


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
        table, start, steps = parse_question(t.question)
        assert steps == 4 and t.env == "math" and all(0 <= v <= 9 for v in table)
        box, number = start, None
        for _ in range(steps):  # independent re-computation: read the box, go where its number points
            number = table[box]
            box = number
        assert t.metadata["answer"] == str(number)


@pytest.mark.parametrize("bad", [
    question(TABLE, 4, 5).replace("Final number?", "number?"),       # not the grammar
    question(TABLE, 4, 5).replace("d0", "d12"),                      # not one digit
    question(TABLE, 4, 5).replace("a3\nb7", "a3\na7"),               # box a twice, no box b
    question(TABLE, 4, 5).replace("Follow 5", "Follow 11"),          # too many steps
    question(TABLE, 4, 5).replace("at e.", "at k."),                 # no such box
    "",
])
def test_parse_question_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError):
        parse_question(bad)


@pytest.mark.parametrize("effort", EFFORTS)
def test_traces_are_correct_step_by_step(effort):
    for t in ChainEnv(seed=1).tasks("train", 100):
        table, start, steps = parse_question(t.question)
        analysis, final = solution(t, effort)
        assert final == t.metadata["answer"]
        *lines, last = analysis.splitlines()
        assert last == f"Answer: {final}."
        box, i = start, 0
        for line in lines:
            if line == "Check:":  # the check re-derives the chain from the start
                box, i = start, 0
                continue
            m = STEP.match(line)
            assert m, line
            step, letter, number = m.groups()
            assert (int(step), letter, int(number)) == (i + 1, BOXES[box], table[box])
            box, i = int(number), i + 1


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
        for effort, n in BUDGET_STEPS.items():
            written = steps if n == "all" else min(n, steps)
            fits = len(encode(trace(TABLE, 4, steps, written)))
            assert fits <= b[effort] < fits + 5  # one more step would not fit (5 tokens a step)
            if written < steps:
                assert len(encode(trace(TABLE, 4, steps, written + 1))) > b[effort]


def test_a_written_step_repeats_the_questions_tokens():
    # "3|e6" ends with the very tokens of the question's line "e6": after the box letter, the number is a
    # one-token induction copy; box letters are tokens no number uses
    q = encode(question(TABLE, 4, 5))
    line = encode(step_line(2, 4, TABLE))
    assert line[2:] == encode("e6") and len(line) == 4
    assert any(q[i:i + 2] == line[2:] for i in range(len(q)))
    letters = {encode(b)[0] for b in BOXES}
    assert len(letters) == 10 and not letters & {encode(str(d))[0] for d in range(10)}
    assert len(encode(question(TABLE, 4, 5))) == len(encode(question(list(range(10)), 0, 5)))


def test_vocabulary_corpus_covers_every_task_token():
    vocab = {i for s in vocabulary_corpus(5) for i in encode(s)}
    for t in ChainEnv(seed=5).tasks("test", 50):
        ids = set(encode(t.question))
        for effort in EFFORTS:
            ids |= {i for s in solution(t, effort) for i in encode(s)}
        assert ids <= vocab


def test_run_chain_values():
    assert run_chain(TABLE, 4, 5) == [6, 1, 7, 4, 6]
    assert step_line(0, 4, TABLE) == "1|e6"
    with pytest.raises(ValueError, match="written"):
        trace(TABLE, 4, 5, 6)
