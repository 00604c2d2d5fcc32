"""load_math_dataset on small local jsonl / parquet / csv files (no network)."""
import json

import pytest

from envs.datasets_loader import load_math_dataset

ROWS = [
    {"question": "What is 2+3?", "answer": "5", "problem": "p1", "solution": "#### 5"},
    {"question": "What is 7*6?", "answer": "42", "problem": "p2", "solution": "6*7 = 42\n#### 1,042"},
    {"question": "Half of 1?", "answer": "\\frac{1}{2}", "problem": "p3", "solution": "#### 0.5"},
]


def write(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    else:
        import pandas as pd

        df = pd.DataFrame(ROWS)
        df.to_parquet(path) if fmt == "parquet" else df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_loads_tasks(tmp_path, fmt):
    tasks = load_math_dataset(write(tmp_path, fmt), "test", cache_dir=tmp_path / "cache")
    assert [t.question for t in tasks] == [r["question"] for r in ROWS]
    assert [t.metadata["answer"] for t in tasks] == [r["answer"] for r in ROWS]
    assert all(t.env == "math" for t in tasks)
    assert len({t.task_id for t in tasks}) == len(ROWS)


@pytest.mark.parametrize("kwargs,expected", [
    ({"question_key": "problem", "answer_key": "answer"}, ["p1", "p2", "p3"]),
    ({"limit": 2}, ["What is 2+3?", "What is 7*6?"]),
    ({"limit": 10}, [r["question"] for r in ROWS]),
])
def test_keys_and_limit(tmp_path, kwargs, expected):
    tasks = load_math_dataset(write(tmp_path, "jsonl"), "train", cache_dir=tmp_path / "c", **kwargs)
    assert [t.question for t in tasks] == expected


def test_gsm8k_answer_format(tmp_path):
    tasks = load_math_dataset(write(tmp_path, "parquet"), "train", answer_key="solution",
                              answer_format="gsm8k", cache_dir=tmp_path / "c")
    assert [t.metadata["answer"] for t in tasks] == ["5", "1042", "0.5"]


def test_missing_column_lists_available(tmp_path):
    with pytest.raises(KeyError, match=r"available columns: \['question', 'answer', 'problem', 'solution'\]"):
        load_math_dataset(write(tmp_path, "jsonl"), "train", answer_key="label", cache_dir=tmp_path / "c")


def test_missing_local_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_math_dataset(tmp_path / "nope.jsonl", "train")
