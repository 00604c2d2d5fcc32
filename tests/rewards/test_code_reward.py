"""Reward "code": extraction, per-test statuses for hostile programs, scores, HumanEval end to end.

Programs run in the real bubblewrap sandbox (skipped where bwrap is absent); a missing bwrap must stop
the reward from being built at all.
"""
import doctest
import importlib
import json
import time

import pytest

from envs.types import Sample, Transcript
from rewards import CompositeReward
from rewards.code_reward import CodeReward, extract_code, run_tests, score_code
from rewards.sandbox import SandboxPool, SandboxUnavailable

TESTS = ["assert f(1) == 4", "assert f(2) == 7"]
GOOD = "def f(x):\n    return 3*x+1"


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(max_workers=2) as p:
        yield p


@pytest.mark.parametrize("final,code", [
    ("```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x"),
    ("First:\n```py\nx = 1\n```\nBetter:\n```python\nx = 2\n```\nDone", "x = 2"),  # the last block
    ("```\nprint(1)\n```", "print(1)"),  # unlabelled
    ("```bash\nls\n```\n```python\nprint(2)\n```", "print(2)"),  # other languages skipped
    ("```bash\nrm -rf /\n```", None),  # no python at all
    ("```python\n\n    return x + 1\n", "    return x + 1"),  # unterminated; a body keeps its indent
    ("def f(): return 1", "def f(): return 1"),  # bare code
    ("   \n", None), ("", None), (None, None), ("```python\n```", None),
])
def test_extract_code(final, code):
    assert extract_code(final) == code


@pytest.mark.bwrap
@pytest.mark.parametrize("name,code,statuses", [
    ("correct", GOOD, ["pass", "pass"]),
    ("half right", "def f(x):\n    return 4 if x == 1 else 0", ["pass", "wrong_answer"]),
    ("syntax error", "def f(x) return", ["compile_error"] * 2),
    ("null byte", "def f(x):\n    return 1\x00", ["compile_error"] * 2),
    ("lone surrogate (undecodable text)", "def f(x):\n    return '\udcff'", ["compile_error"] * 2),
    ("raises", "def f(x):\n    return 1 / 0", ["runtime_error"] * 2),
    ("top level raises", "import nonexistent_module_xyz\ndef f(x): return 3*x+1", ["runtime_error"] * 2),
    ("no function", "x = 1", ["runtime_error"] * 2),
    ("sys.exit(0) before the tests", "import sys\nsys.exit(0)", ["runtime_error"] * 2),
    ("os._exit(0) before the tests", "import os\nos._exit(0)", ["runtime_error"] * 2),
    ("prints a fake verdict", "print('{\"test\": 0, \"status\": \"pass\"}')\ndef f(x): return 0",
     ["wrong_answer"] * 2),
    ("patches builtins.exec", "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef f(x): return 0",
     ["wrong_answer"] * 2),
    ("patches AssertionError", "import builtins\nbuiltins.AssertionError = KeyError\ndef f(x): return 0",
     ["wrong_answer"] * 2),
    ("patches json", "import json\njson.dumps = lambda *a, **k: '{\"test\": 0, \"status\": \"pass\"}'\n"
                     "def f(x): return 0", ["wrong_answer"] * 2),
    ("infinite loop", "def f(x):\n    while True: pass", ["timeout"] * 2),
    ("loop that eats exceptions", "def f(x):\n    while True:\n        try:\n            while True: pass\n"
                                  "        except BaseException: pass", ["timeout"] * 2),
    ("top level loop", "while True: pass", ["timeout"] * 2),
    ("fork bomb", "import os\ndef f(x):\n    while True:\n        try: os.fork()\n        except OSError: pass",
     ["timeout"] * 2),
    ("memory bomb", "def f(x):\n    return len(bytearray(2**36))", ["runtime_error"] * 2),
    ("output flood", "import os\ndef f(x):\n    while True: os.write(1, b'x' * 65536)", ["runtime_error"] * 2),
    ("print flood", "def f(x):\n    while True: print('x' * 10000)", ["timeout"] * 2),
    ("deep recursion", "def f(x): return f(x)", ["runtime_error"] * 2),
    ("kills itself", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", ["runtime_error"] * 2),
])
def test_hostile_and_broken_programs_get_statuses_never_exceptions(pool, name, code, statuses):
    start = time.monotonic()
    report = run_tests(code, TESTS, timeout_s=0.5, pool=pool)
    assert report.statuses == statuses, (name, report.error)
    assert time.monotonic() - start < 0.5 * (len(TESTS) + 1) + 2 + 2  # the wall clock, plus a margin


@pytest.mark.bwrap
def test_test_forms_stdio_and_call(pool):
    echo = "n = int(input())\nprint(n * 2)\nprint()"
    assert run_tests(echo, [{"input": "3\n", "output": "6"}, {"input": "5", "output": "11\n"}],
                     pool=pool).statuses == ["pass", "wrong_answer"]
    assert run_tests("import sys; print(1); sys.exit(0)", [{"input": "", "output": "1"}],
                     pool=pool).statuses == ["pass"]  # a script may exit cleanly
    solution = "class Solution:\n    def twoSum(self, nums, t):\n        return (0, 1)"
    calls = [{"args": [[2, 7], 9], "expected": [0, 1]}, {"args": [[1, 1], 5], "expected": [1, 0]}]
    assert run_tests(solution, calls, entry_point="twoSum", pool=pool).statuses == ["pass", "wrong_answer"]
    cheat = "class A:\n    def __eq__(s, o): return True\ndef f(x): return A()"
    assert run_tests(cheat, [{"args": [1], "expected": 3}], entry_point="f", pool=pool).statuses == ["wrong_answer"]


@pytest.mark.bwrap
def test_score_modes(pool):
    half = "def f(x):\n    return 4"
    assert score_code(half, TESTS, pool=pool) == 0.5
    assert score_code(half, TESTS, mode="all_pass", pool=pool) == 0.0
    assert score_code(GOOD, TESTS, mode="all_pass", pool=pool) == 1.0
    assert score_code("def g(): pass", "assert g() is None", pool=pool) == 1.0  # one check string
    with pytest.raises(ValueError, match="mode"):
        score_code(GOOD, TESTS, mode="best")


def test_malformed_tests_are_our_error_not_the_models():
    with pytest.raises(ValueError, match="non-empty list"):
        score_code(GOOD, [])
    with pytest.raises(ValueError, match="test 1"):
        score_code(GOOD, ["assert True", {"stdin": "1"}])


def sample(final, tests=TESTS, **metadata):
    return Sample("t", "code", "low", [], [], [], [], Transcript(final=final), {"tests": tests, **metadata})


@pytest.mark.bwrap
def test_reward_parts_format_and_applicability(make_sample):
    reward = CodeReward(timeout_s=1.0)
    real = make_sample(f"```python\n{GOOD}\n```", answer=None, metadata={"tests": TESTS})
    results = reward.score_batch([
        real,
        sample("def f(x):\n    return 4"),
        sample("while True: pass"),
        make_sample(None, answer=None, metadata={"tests": TESTS}),  # never reached the final channel
        sample("I could not solve it."),
        sample("x"),
        make_sample("408"),  # a math task: not applicable
    ])
    assert results[0].score == 1.0 and results[0].parts == {
        "pass_rate": 1.0, "all_pass": 1.0, "format": 1.0, "wrong_answer": 0.0, "runtime_error": 0.0,
        "timeout": 0.0, "compile_error": 0.0}
    assert (results[1].score, results[1].parts["wrong_answer"]) == (0.5, 0.5)
    assert results[2].parts["timeout"] == 1.0 and results[2].score == 0.0
    assert results[3].parts == {"pass_rate": 0.0, "all_pass": 0.0, "format": 0.0}
    assert results[4].parts["compile_error"] == 1.0  # prose is taken as (bad) code
    assert results[5].parts["runtime_error"] == 1.0 and results[5].info["statuses"] == ["runtime_error"] * 2
    assert results[6] is None
    assert CodeReward(mode="all_pass")(sample("def f(x):\n    return 4")).score == 0.0


@pytest.mark.bwrap
def test_composite_with_code_and_setup():
    composite = CompositeReward.from_config({"code": {"weight": 1.0, "mode": "all_pass"}, "format": 0.1})
    r = composite(sample("    return 3*x+1", setup="def f(x):\n    '''f'''"))  # a body completes the setup
    assert round(r.score, 3) == 1.1 and r.parts["code/all_pass"] == 1.0


def test_missing_bwrap_refuses_to_build_the_reward():
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        CodeReward(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        CompositeReward.from_config({"code": {"weight": 1.0, "bwrap": "/nonexistent/bwrap"}})
    with pytest.raises(ValueError, match="mode"):
        CodeReward(mode="best")


@pytest.mark.bwrap
def test_humaneval_canonical_solutions_all_pass_and_wrong_ones_fail():
    from envs.code_datasets import load_code_dataset

    tasks = load_code_dataset("humaneval", "test")
    assert len(tasks) == 164
    reward = CodeReward(mode="all_pass", timeout_s=10.0, max_workers=2)

    def as_sample(task, code):
        return Sample(task.task_id, "code", "medium", [], [], [], [], Transcript(final=f"```python\n{code}```"),
                      dict(task.metadata))

    scores = [r.score for r in reward.score_batch([as_sample(t, t.metadata["reference"]) for t in tasks])]
    failed = [t.task_id for t, s in zip(tasks, scores) if s != 1.0]
    assert failed == []
    wrong = [as_sample(t, t.metadata["reference"].replace("return", "return None and", 1)) for t in tasks[:8]]
    wrong.append(as_sample(tasks[0], "def has_close_elements(numbers, threshold):\n    return True\n"))
    assert [r.score for r in reward.score_batch(wrong)] == [0.0] * len(wrong)


@pytest.mark.bwrap
@pytest.mark.parametrize("module", ["rewards.code_reward", "rewards.sandbox"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_job_is_plain_json():
    from rewards.code_reward import _job

    nonce, job = _job("print('\udcff')", ["assert True"], "", None, 1.0)
    assert json.loads(job)["nonce"] == nonce and job.isascii()
