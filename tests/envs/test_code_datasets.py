"""Code datasets (HumanEval from its wheel; MBPP, LiveCodeBench and plain layouts from small local files)."""
import base64
import json
import pickle
import zlib

import pytest

from envs.code_datasets import CodeDatasetEnv, detect_layout, humaneval_path, load_code_dataset

MBPP = [
    {"task_id": 2, "text": "Write a function to find the shared elements of two lists.",
     "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
     "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == set((4,))",
                   "assert set(similar_elements((1, 2), (2, 1))) == set((1, 2))"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "def is_not_prime(n):\n    return n < 2 or any(n % i == 0 for i in range(2, n))",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True"],
     "test_setup_code": "import math", "challenge_test_list": ["assert is_not_prime(35) == True"]},
]
LCB = [
    {"question_title": "double", "question_content": "Read n and print 2n.", "starter_code": "",
     "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}]),
     "private_test_cases": json.dumps([{"input": "5\n", "output": "10\n", "testtype": "stdin"}]),
     "metadata": "{}"},
    {"question_title": "add", "question_content": "Return a+b.",
     "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
     "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
     "private_test_cases": "", "metadata": json.dumps({"func_name": "add"})},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_ships_offline_and_loads_as_an_eval_set(tmp_path):
    assert humaneval_path().name == "HumanEval.jsonl.gz"
    tasks = load_code_dataset("humaneval", "test", cache_dir=tmp_path)
    assert len(tasks) == 164 and tasks[0].task_id == "HumanEval/0" and tasks[0].env == "code"
    t = tasks[0]
    assert t.metadata["entry_point"] == "has_close_elements" and t.metadata["setup"].startswith("from typing")
    assert t.metadata["tests"][0].rstrip().endswith("check(has_close_elements)")
    assert "def has_close_elements" in t.question and "```python" in t.question and t.developer
    env = CodeDatasetEnv("humaneval", test_fraction=1.0)
    assert len(env.tasks("test", 500)) == 164 and env.tasks("train", 10) == []


def test_mbpp_layout(tmp_path):
    tasks = load_code_dataset(write_jsonl(tmp_path / "mbpp.jsonl", MBPP), "test", cache_dir=tmp_path / "c")
    assert [t.metadata["entry_point"] for t in tasks] == ["similar_elements", "is_not_prime"]
    assert tasks[1].metadata["tests"][-1] == "assert is_not_prime(35) == True"  # challenge tests too
    assert tasks[1].metadata["setup"] == "import math"
    assert tasks[0].question.endswith(MBPP[0]["test_list"][1])  # MBPP prompts show the asserts
    assert tasks[0].metadata["reference"] == MBPP[0]["code"]


def test_livecodebench_layout(tmp_path):
    tasks = load_code_dataset(write_jsonl(tmp_path / "lcb.jsonl", LCB), "test", cache_dir=tmp_path / "c")
    assert tasks[0].metadata["tests"] == [{"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10\n"}]
    assert "stdin" in tasks[0].question
    assert tasks[1].metadata["tests"] == [{"args": [1, 2], "expected": 3}]
    assert tasks[1].metadata["entry_point"] == "add" and "class Solution" in tasks[1].question


def test_livecodebench_pickled_private_tests_are_refused(tmp_path):
    blob = base64.b64encode(zlib.compress(pickle.dumps(json.dumps([{"input": "1", "output": "2"}])))).decode()
    path = write_jsonl(tmp_path / "lcb.jsonl", [{**LCB[0], "private_test_cases": blob}])
    with pytest.raises(ValueError, match="never unpickle"):
        load_code_dataset(path, "test", cache_dir=tmp_path / "c")


def test_plain_layout_in_parquet_with_json_string_tests(tmp_path):
    import pandas as pd

    rows = [{"prompt": "Write add(a, b).", "tests": json.dumps(["assert add(1, 2) == 3"]), "entry_point": "add"},
            {"prompt": "Echo stdin.", "tests": json.dumps([{"input": "x", "output": "x"}]), "entry_point": None},
            {"prompt": "Write g().", "tests": "def check(c):\n    assert c() == 1\ncheck(g)", "entry_point": "g"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "plain.parquet")
    tasks = load_code_dataset(tmp_path / "plain.parquet", "train", cache_dir=tmp_path / "c")
    assert [t.metadata["tests"] for t in tasks] == [["assert add(1, 2) == 3"], [{"input": "x", "output": "x"}],
                                                   [rows[2]["tests"]]]


@pytest.mark.parametrize("row,match", [
    ({"prompt": "", "tests": ["assert True"]}, r"row 0: column 'prompt' is empty"),
    ({"prompt": "p", "tests": []}, r"row 0: no tests"),
    ({"prompt": "p", "tests": [{"stdin": "1"}]}, r"row 0: tests\[0\]"),
])
def test_bad_rows_fail_naming_row_and_column(tmp_path, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ValueError, match=match):
        load_code_dataset(path, "test", layout="plain", cache_dir=tmp_path / "c")


def test_layout_detection_and_unknown_columns():
    assert detect_layout(["prompt", "test", "entry_point", "canonical_solution"]) == "humaneval"
    assert detect_layout(["text", "code", "test_list"]) == "mbpp"
    assert detect_layout(["question_content", "public_test_cases"]) == "livecodebench"
    assert detect_layout(["prompt", "tests"]) == "plain"
    with pytest.raises(KeyError, match="no known code layout"):
        detect_layout(["question", "answer"])


def test_single_file_splits_are_disjoint(tmp_path):
    rows = [{"prompt": f"Write f{i}().", "tests": [f"assert f{i}() == {i}"]} for i in range(40)]
    env = CodeDatasetEnv(str(write_jsonl(tmp_path / "many.jsonl", rows)), test_fraction=0.5)
    train, test = env.tasks("train", 100), env.tasks("test", 100)
    assert len(train) + len(test) == 40 and 5 < len(test) < 35
    assert not {t.question for t in train} & {t.question for t in test}
    with pytest.raises(ValueError, match="test_fraction"):
        CodeDatasetEnv("humaneval", test_fraction=1.5)
