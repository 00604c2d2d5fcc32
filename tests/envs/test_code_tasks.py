"""Tiny-world code tasks: disjoint seeded splits, hidden tests that tell right from wrong, traces per effort."""
import doctest
import re

import pytest

import envs.code_tasks
from envs.code_tasks import FAMILIES, CodeEnv, canonical, solution, split_of, vocabulary_corpus
from envs.harmony import encode
from envs.types import EFFORTS


def run_in_process(code: str, tests: list[str]) -> bool:
    """Our own generated code (trusted) against the tests, without the sandbox."""
    namespace: dict = {}
    try:
        exec(code, namespace)
        for t in tests:
            exec(t, namespace)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_splits_never_overlap_and_are_deterministic(seed):
    env = CodeEnv(seed=seed)
    train, test = env.tasks("train", 600), env.tasks("test", 120)
    assert {t.metadata["function"] for t in train}.isdisjoint(t.metadata["function"] for t in test)
    assert all(split_of(t.metadata["function"]) == t.metadata["split"] for t in train + test)
    assert len({t.question for t in train}) == 600 and len({t.task_id for t in train}) == 600
    assert [t.question for t in CodeEnv(seed=seed).tasks("train", 600)] == [t.question for t in train]
    assert [t.question for t in env.tasks("train", 50, seed=3)] != [t.question for t in train[:50]]


def test_split_is_a_function_of_the_function_not_the_phrasing():
    # "x*3+2", "3*x+2", "x times 3 plus 2" and two points on that line are one function, one split
    env = CodeEnv(seed=0, families=("expr", "words", "examples"))
    by_function: dict = {}
    for t in env.tasks("train", 3000) + env.tasks("test", 300):
        by_function.setdefault(t.metadata["function"], set()).add(t.metadata["split"])
    assert all(len(splits) == 1 for splits in by_function.values())
    assert canonical("linear", (3, 2)) == "linear(3,2)"
    share = sum(split_of(canonical("linear", (m, c))) == "test" for m in range(2, 13) for c in range(-50, 51)) / 1111
    assert 0.06 < share < 0.14  # about TEST_FRACTION of the functions are held out


def test_default_training_pool_is_large_enough():
    assert len(CodeEnv(seed=0).tasks("train", 20000)) == 20000  # env.train_size's default


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_tests_accept_the_reference_and_reject_near_misses(family):
    for task in CodeEnv(seed=5, families=(family,)).tasks("train", 40):
        tests, ref = task.metadata["tests"], task.metadata["reference"]
        assert len(tests) == 5 and run_in_process(ref, tests), task.question
        for wrong in (ref + "+1", ref.replace("return x", "return -x", 1), ref.replace(">", ">=")):
            if wrong != ref:
                assert not run_in_process(wrong, tests), (task.question, wrong)
        cheat = "class A:\n    def __eq__(s, o): return True\ndef f(*a): return A()"
        assert not run_in_process(cheat, tests)


def test_examples_questions_do_not_show_their_test_inputs():
    for task in CodeEnv(seed=2, families=("examples",)).tasks("train", 100):
        shown = task.question.split("with ")[1]
        for test in task.metadata["tests"]:
            call = test.split(" and ")[1].split(" ==")[0]  # "f(7)"
            assert f"{call}=" not in shown


@pytest.mark.parametrize("family", FAMILIES)
def test_every_effort_writes_the_reference_and_longer_efforts_think_longer(family):
    tasks = CodeEnv(seed=3, families=(family,)).tasks("train", 60)
    lengths = {e: 0 for e in EFFORTS}
    for task in tasks:
        for effort in EFFORTS:
            analysis, final = solution(task, effort)
            assert final == f"```python\n{task.metadata['reference']}\n```"
            assert analysis and "```" not in analysis
            lengths[effort] += len(encode(analysis))
    assert lengths["low"] < lengths["medium"] < lengths["high"], lengths


ARITHMETIC = re.compile(r"-?[\d(][\d+\-*/() ]*")


@pytest.mark.parametrize("family", FAMILIES)
def test_traces_compute_the_right_numbers(family):
    """Every chain "a = b = c" of plain integer arithmetic in a medium/high trace is true."""
    for task in CodeEnv(seed=4, families=(family,)).tasks("train", 30):
        for effort in ("medium", "high"):
            analysis, _ = solution(task, effort)
            checked = 0
            for clause in re.split(r"[,\n:]| so | and ", analysis):
                sides = [p.strip(" .") for p in clause.split("=")]
                sides[0] = sides[0].split(" ")[-1]  # "slope (76-48)/(5-1)" -> its formula
                numbers = [p for p in sides if ARITHMETIC.fullmatch(p)]
                if len(numbers) >= 2:
                    assert len({eval(p) for p in numbers}) == 1, (task.question, clause)
                    checked += 1
            assert checked or (family, effort) in {("piecewise", "medium"), ("words", "medium")}, analysis


@pytest.mark.bwrap
def test_reference_solutions_pass_in_the_sandbox():
    from rewards.code_reward import extract_code, score_code
    from rewards.sandbox import SandboxPool

    tasks = [t for f in FAMILIES for t in CodeEnv(seed=11, families=(f,)).tasks("test", 2)]
    with SandboxPool(max_workers=2) as pool:
        assert [score_code(extract_code(solution(t, "low")[1]), t.metadata["tests"], mode="all_pass", pool=pool)
                for t in tasks] == [1.0] * len(tasks)


def test_vocabulary_corpus_covers_task_tokens():
    corpus = vocabulary_corpus(20)
    vocab = {i for s in corpus for i in encode(s)}
    for task in CodeEnv(seed=99).tasks("test", 40) + CodeEnv(seed=98).tasks("train", 40):
        texts = [task.question] + task.metadata["tests"] + [x for e in EFFORTS for x in solution(task, e)]
        missing = {i for s in texts for i in encode(s)} - vocab
        assert not missing, texts
    assert len(vocab) < 1600  # small and regular: digit chunks plus a few words, symbols and code


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="families"):
        CodeEnv(families=("sorting",))
    with pytest.raises(ValueError, match="split"):
        CodeEnv().tasks("validation", 3)
    with pytest.raises(ValueError, match="distinct"):
        CodeEnv(families=("words",)).tasks("test", 200)  # about 110 of the 1111 lines are held out
    task = CodeEnv().tasks("train", 1)[0]
    with pytest.raises(ValueError, match="effort"):
        solution(task, "extreme")
    task.metadata.pop("family")
    with pytest.raises(ValueError, match="CodeEnv task"):
        solution(task, "low")


def test_docstring_examples():
    result = doctest.testmod(envs.code_tasks)
    assert result.failed == 0 and result.attempted > 0
