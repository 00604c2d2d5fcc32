"""Math tasks: held-out split never overlaps train, answers are right, traces fit effort budgets."""
import pytest

from envs.harmony import encode
from envs.math_tasks import (
    DIFFICULTY, MathEnv, canonical_key, evaluate, parse_expr, render, solution, split_of,
    vocabulary_corpus,
)

BUDGETS = {"low": 16, "medium": 64, "high": 256}


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTY))
def test_train_and_test_never_share_a_problem(difficulty):
    train, test = set(), set()
    for seed in range(3):
        env = MathEnv(seed=seed, difficulty=difficulty)
        train |= {canonical_key(parse_expr(t.metadata["expr"])) for t in env.tasks("train", 200)}
        test |= {canonical_key(parse_expr(t.metadata["expr"])) for t in env.tasks("test", 100)}
    assert train and test and not train & test


def test_split_ignores_operand_order():
    # "86+47" is the same problem as "47+86": it must land in the same split.
    for expr, swapped in [("47+86", "86+47"), ("47*86+12", "12+86*47"), ("(3+4)*5-6", "5*(4+3)-6")]:
        assert split_of(expr) == split_of(swapped)


def test_test_fraction_is_about_ten_percent():
    exprs = [f"{a}*{b}" for a in range(10, 100) for b in range(10, 100)]
    frac = sum(split_of(e) == "test" for e in exprs) / len(exprs)
    assert 0.07 < frac < 0.13


def test_tasks_are_seeded_distinct_and_correct():
    env = MathEnv(seed=7)
    a, b = env.tasks("train", 50), env.tasks("train", 50)
    assert [t.question for t in a] == [t.question for t in b]
    assert [t.question for t in a] != [t.question for t in env.tasks("train", 50, seed=1)]
    assert len({t.task_id for t in a}) == 50
    for t in a:
        expr = t.metadata["expr"]
        assert t.question == f"Compute {expr}." and t.env == "math"
        assert t.metadata["answer"] == str(eval(expr))  # closed grammar: safe to eval here


@pytest.mark.parametrize("text", ["47+86+12", "47*86+12", "(47+18)*6-29", "86*35-81", "5*(4+3)-6", "7"])
def test_parse_render_roundtrip(text):
    assert render(parse_expr(text)) == text
    assert evaluate(parse_expr(text)) == eval(text)


@pytest.mark.parametrize("bad", ["4/2", "1+", "(1+2", "x+1", ""])
def test_parse_rejects_outside_grammar(bad):
    with pytest.raises(ValueError):
        parse_expr(bad)


def test_solution_styles_by_effort():
    task = MathEnv().tasks("train", 1)[0]
    task.metadata.update(expr="47*86+12", answer="4054")
    low, med, high = (solution(task, e) for e in ("low", "medium", "high"))
    assert low == ("47*86+12=4054.", "4054")
    assert "47*80+47*6" in med[0] and med[1] == "4054"
    assert "7*6=42, write 2 carry 4." in high[0]  # digit-level partial product
    assert "carry" in high[0] and high[0].splitlines()[-1].startswith("Check:")


@pytest.mark.parametrize("expr,expected_lines", [
    ("47+86", ["47+86: units 7+6=13, write 3 carry 1. tens 4+8+1=13. So 47+86=133."]),
    ("105-98", ["105-98: units 5-8, borrow, 15-8=7. tens 0-1-9, borrow, 10-1-9=0. hundreds 1-1=0. "
                "So 105-98=7."]),
    ("65*6", ["65*6: 5*6=30, write 0 carry 3. 6*6=36, 36+3=39. So 65*6=390."]),
])
def test_high_effort_column_arithmetic(expr, expected_lines):
    task = MathEnv().tasks("train", 1)[0]
    task.metadata.update(expr=expr, answer=str(eval(expr)))
    assert solution(task, "high")[0].splitlines()[:-1] == expected_lines


def test_every_high_trace_reaches_the_answer():
    for level in sorted(DIFFICULTY):
        for t in MathEnv(seed=3, difficulty=level).tasks("train", 100):
            analysis, final = solution(t, "high")
            assert final == t.metadata["answer"]
            last_step = analysis.splitlines()[-2]
            assert last_step.endswith(f"={final}.") or f"={final}." in last_step


def test_default_difficulty_traces_fit_tiny_budgets():
    tasks = MathEnv(seed=0).tasks("train", 150)
    means = {}
    for effort, budget in BUDGETS.items():
        counts = [len(encode(solution(t, effort)[0])) for t in tasks]
        means[effort] = sum(counts) / len(counts)
        assert max(counts) <= budget, (effort, max(counts))
    assert means["low"] < means["medium"] < means["high"]


def test_solution_rejects_wrong_metadata():
    task = MathEnv().tasks("train", 1)[0]
    task.metadata["answer"] = "-1"
    with pytest.raises(ValueError, match="metadata says"):
        solution(task, "high")
    with pytest.raises(ValueError, match="effort"):
        solution(task, "extreme")


def test_vocabulary_corpus_covers_task_tokens():
    corpus = vocabulary_corpus(60)
    vocab = {i for s in corpus for i in encode(s)}
    for t in MathEnv(seed=99, difficulty=2).tasks("test", 30):
        texts = [t.question] + [x for e in BUDGETS for x in solution(t, e)]
        missing = {i for s in texts for i in encode(s)} - vocab
        assert not missing, texts
    assert len(vocab) < 1500  # small and regular: digits chunks + a few words and symbols


def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match="difficulty"):
        MathEnv(difficulty=9)
    with pytest.raises(ValueError, match="families"):
        MathEnv(families=("division",))
    with pytest.raises(ValueError, match="split"):
        MathEnv().tasks("validation", 3)


def test_rewrite_digit_sum_traces_keep_the_sum_and_one_width():
    """env.digit_sum_trace=rewrite: every line sums to the answer, every line has the same number of
    tokens (so copies sit at one distance), low/medium/high write 1/3/all lines; other families and
    the default stay as they were."""
    from envs import harmony
    from envs.math_tasks import MathEnv

    env = MathEnv(seed=0, difficulty=1, families=("digit_sum", "add"), digit_sum_trace="rewrite")
    plain = MathEnv(seed=0, difficulty=1, families=("digit_sum", "add"))
    for t, p in zip(env.tasks("train", 60), plain.tasks("train", 60)):
        assert t.task_id == p.task_id
        if "+" not in t.metadata["expr"] or len(t.metadata["expr"].split("+")) < 3:  # not a digit sum
            assert env.solution(t, "high") == plain.solution(p, "high")
            continue
        lines = {e: env.solution(t, e)[0].split("\n") for e in ("low", "medium", "high")}
        assert (len(lines["low"]), len(lines["medium"])) == (1, 3) and lines["medium"] == lines["high"][:3]
        assert all(sum(map(int, ln.split("+"))) == int(t.metadata["answer"]) for ln in lines["high"])
        assert len({len(harmony.encode(ln)) for ln in lines["high"]}) == 1
    with pytest.raises(ValueError, match="digit_sum_trace"):
        MathEnv(digit_sum_trace="nope")


@pytest.mark.parametrize("difficulty", [1, 2])
def test_muldiff_answers_are_two_digit_chunks_and_traces_solve_them(difficulty):
    """a*b-c*d with a two-digit answer: every operand and the answer are single o200k tokens of 1-2 digits,
    the traces end at the answer, the tool trace prints the expression, and the splits stay disjoint."""
    from envs.math_tasks import tool_solution

    env = MathEnv(seed=3, difficulty=difficulty, families=("muldiff",))
    train, test = env.tasks("train", 200), env.tasks("test", 40)
    assert not {t.metadata["expr"] for t in train} & {t.metadata["expr"] for t in test}
    for t in train[:50] + test:
        expr, answer = t.metadata["expr"], t.metadata["answer"]
        assert 10 <= int(answer) <= 99 and len(encode(answer)) == 1
        (a, b), (c, d) = (map(int, p.split("*")) for p in expr.split("-"))
        assert a * b - c * d == int(answer) and max(len(encode(str(x))) for x in (a, b, c, d)) == 1
        for effort in BUDGETS:
            analysis, final = solution(t, effort)
            assert final == answer
            last = analysis.splitlines()[-1]
            assert last.rstrip(".").endswith(f"={answer}") or last.startswith(f"Check: {answer}+")
        assert tool_solution(t, "low").steps[0].code == f"print({expr})"
