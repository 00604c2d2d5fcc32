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


GOOD = {"question": "What is 1+1?", "answer": "2"}


@pytest.mark.parametrize("fmt,bad_row,field", [
    ("jsonl", {"question": None, "answer": "3"}, "question"),
    ("jsonl", {"question": "What is 1+2?", "answer": None}, "answer"),
    ("jsonl", {"question": "What is 1+2?", "answer": ""}, "answer"),
    ("jsonl", {"question": "  \n", "answer": "3"}, "question"),
    ("csv", {"question": "What is 1+2?", "answer": None}, "answer"),  # an empty cell
    ("parquet", {"question": "", "answer": "3"}, "question"),
])
def test_row_missing_a_field_fails_naming_row_and_field(tmp_path, fmt, bad_row, field):
    import pandas as pd

    rows = [GOOD, GOOD, bad_row, GOOD]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    with pytest.raises(ValueError, match=rf"row 2: field '{field}' is empty"):
        load_math_dataset(path, "train", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("solution", ["The answer is 5.", "6*7 = 42\n#### "])
def test_gsm8k_row_without_an_answer_fails_naming_row_and_field(tmp_path, solution):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "solution": s})
                              for i, s in enumerate(["#### 1", solution])) + "\n")
    with pytest.raises(ValueError, match=r"row 1: field 'solution' has no '#### <answer>'"):
        load_math_dataset(path, "train", answer_key="solution", answer_format="gsm8k", cache_dir=tmp_path / "c")


def test_dataset_env_checks_answer_format_at_construction(tmp_path):
    from envs.datasets_loader import DatasetEnv

    with pytest.raises(ValueError, match="answer_format='gsm9k'"):
        DatasetEnv(str(tmp_path / "x.jsonl"), "question", "answer", "gsm9k")


def test_dataset_env_passes_answer_format_on(tmp_path):
    from envs.datasets_loader import DatasetEnv

    env = DatasetEnv(str(write(tmp_path, "jsonl")), "question", "solution", "gsm8k", test_fraction=0.0)
    assert sorted(t.metadata["answer"] for t in env.tasks("train", 10)) == ["0.5", "1042", "5"]


def test_missing_local_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_math_dataset(tmp_path / "nope.jsonl", "train")


def test_dataset_env_single_file_splits_never_overlap(tmp_path):
    from envs.datasets_loader import DatasetEnv

    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i}+1?", "answer": str(i + 1)})
                              for i in range(200)))
    env = DatasetEnv(str(path), test_fraction=0.2)
    train, test = env.tasks("train", 10_000), env.tasks("test", 10_000)
    assert len(train) + len(test) == 200 and 20 < len(test) < 60
    assert not {t.question for t in train} & {t.question for t in test}
    assert env.tasks("train", 5) == train[:5]
    assert [t.question for t in env.tasks("train", 5, seed=1)] != [t.question for t in train[:5]]


def test_dataset_env_folder_uses_its_own_splits(tmp_path):
    from envs.datasets_loader import DatasetEnv

    for split, q in [("train", "What is 1+1?"), ("test", "What is 2+2?")]:
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"q": q, "a": "x"}) + "\n")
    env = DatasetEnv(str(tmp_path), question_key="q", answer_key="a")
    assert [t.question for t in env.tasks("test", 10)] == ["What is 2+2?"]
    assert [t.question for t in env.tasks("train", 10)] == ["What is 1+1?"]
