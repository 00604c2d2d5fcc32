"""Load question/answer math datasets into `Task`s with Hugging Face `datasets`.

What: `load_math_dataset(path_or_name, split, question_key, answer_key, limit)` -> list[Task] with
`env="math"`, `metadata["answer"]` the gold answer as a string (what the "math" reward checks) and
`metadata["source"]`. Works for local `.jsonl`/`.json`/`.parquet`/`.csv` files, a local folder of such
files, or a Hub dataset name when online (offline, the `datasets` error is re-raised with a hint).

How: a local file is read with the matching `datasets` builder ("json", "parquet", "csv") and the
file becomes the requested split, so `load_math_dataset("test.jsonl", "test")` works; a folder or
Hub name is loaded with `load_dataset(path, split=split)`. A missing column fails naming the
available columns.

`DatasetEnv` wraps it as a task environment (`tasks(split, n, seed)`, like `MathEnv`). A folder or
Hub dataset uses its own splits; a *single file* has none, so its rows are partitioned by a hash of
the question (about `test_fraction` of them are "test") and train/test never share a question.

Departure: GSM8K stores the worked solution and the answer in one field ("... #### 72");
`answer_format="gsm8k"` keeps only what follows "####" (commas removed). The default ("raw") keeps
the field as is (stripped).

Every row is checked at load: a question or answer that is missing, NaN or blank, or a gsm8k answer
without "#### <answer>", fails with an error naming the row index (0-based) and the field, rather
than becoming a task that can never be scored.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from envs.draw import unit_hash
from envs.types import Task

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ANSWER_FORMATS = ("raw", "gsm8k")


def load_math_dataset(
    path_or_name: str | Path,
    split: str,
    question_key: str = "question",
    answer_key: str = "answer",
    limit: int | None = None,
    answer_format: str = "raw",
    cache_dir: str | Path | None = None,
) -> list[Task]:
    """Tasks from a local file/folder or a Hub dataset; `limit` keeps the first rows.
    `cache_dir` overrides where `datasets` writes its Arrow cache."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r} is not one of {ANSWER_FORMATS}")
    ds = load_hf_split(path_or_name, split, None if cache_dir is None else str(cache_dir), BUILDERS,
                       offline_hint="Offline? Download it once, or point to a local jsonl/parquet/csv file")
    missing = [k for k in (question_key, answer_key) if k not in ds.column_names]
    if missing:
        raise KeyError(
            f"{path_or_name} (split {split!r}) has no column {', '.join(map(repr, missing))}; "
            f"available columns: {ds.column_names}. Pass question_key=/answer_key= to choose others"
        )
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    source = Path(str(path_or_name)).name or str(path_or_name)
    tasks = []
    for i, row in enumerate(ds):
        where = f"{path_or_name} (split {split!r}) row {i}"
        question = _required(row[question_key], question_key, where)
        answer = _required(row[answer_key], answer_key, where).strip()
        if answer_format == "gsm8k":
            answer = _gsm8k_answer(answer, answer_key, where)
        digest = hashlib.sha256(question.encode()).hexdigest()[:10]
        tasks.append(Task(
            task_id=f"{source}/{split}/{i}-{digest}",
            env="math",
            question=question,
            metadata={"answer": answer, "source": str(path_or_name), "row": i},
        ))
    return tasks


def _required(value, key: str, where: str) -> str:
    """The field as text (as is); a missing, NaN or blank value fails naming the row and the field."""
    missing = value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()
    if missing:
        raise ValueError(f"{where}: field {key!r} is empty ({value!r}); fill it in or drop the row")
    return str(value)


COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def load_hf_split(path_or_name: str | Path, split: str, cache_dir: str | None, builders: dict[str, str], *,
                  offline_hint: str, compressed: bool = False):
    """One split through `datasets`: a local file (its builder chosen from `builders` by suffix; with
    `compressed`, a trailing .gz/.bz2/.xz/.zst is looked through), a local folder, or a Hub name. A
    missing local path and an unreachable Hub fail with a clear message (`offline_hint` ends the latter).
    Shared by the math and code dataset envs."""
    from datasets import load_dataset

    path = Path(path_or_name)
    if path.is_file():
        if compressed:
            suffixes = [s.lower() for s in path.suffixes if s.lower() not in COMPRESSED]
            builder = builders.get(suffixes[-1] if suffixes else "")
        else:
            builder = builders.get("".join(path.suffixes[-1:]).lower())
        if builder is None:
            raise ValueError(f"{path}: unsupported file type; use one of {sorted(builders)}"
                             + (" (optionally .gz)" if compressed else ""))
        return load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
    if path.is_dir():
        return load_dataset(str(path), split=split, cache_dir=cache_dir)
    if str(path_or_name).startswith((".", "/")) or path.suffix.lower() in builders:
        raise FileNotFoundError(f"{path_or_name} does not exist (expected a local file or folder)")
    try:
        return load_dataset(str(path_or_name), split=split, cache_dir=cache_dir)
    except (ConnectionError, OSError) as exc:
        raise RuntimeError(f"could not load Hub dataset {path_or_name!r} split {split!r}: {exc}. "
                           + offline_hint) from exc


def _gsm8k_answer(text: str, key: str, where: str) -> str:
    answer = text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else ""
    if not answer:
        raise ValueError(
            f"{where}: field {key!r} has no '#### <answer>' (answer_format='gsm8k'), got {text[-80:]!r}; "
            "use answer_format=raw for plain answers"
        )
    return answer


def cached_split_tasks(env, split: str, n: int, seed: int | None) -> list[Task]:
    """Up to `n` tasks of `split` from a file-backed env: `env._load(split)` once (kept in `env._cache`),
    then a seeded shuffle (tag: `env.name`) before taking `n`. Shared by the dataset envs."""
    if split not in env._cache:
        env._cache[split] = env._load(split)
    rows = list(env._cache[split])
    if seed is not None:
        random.Random(f"{env.name}:{seed}:{split}").shuffle(rows)
    return rows[:n]


@dataclass
class DatasetEnv:
    """A question/answer dataset as a task environment with disjoint train/test splits."""

    path_or_name: str
    question_key: str = "question"
    answer_key: str = "answer"
    answer_format: str = "raw"
    test_fraction: float = 0.1  # only for a single file, which has no splits of its own
    name: str = "dataset"
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format={self.answer_format!r} is not one of {ANSWER_FORMATS}")

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """Up to `n` tasks of `split` (all of them if fewer); `seed` shuffles before taking `n`."""
        return cached_split_tasks(self, split, n, seed)

    def _load(self, split: str) -> list[Task]:
        kwargs = dict(question_key=self.question_key, answer_key=self.answer_key,
                      answer_format=self.answer_format)
        if not Path(self.path_or_name).is_file():
            return load_math_dataset(self.path_or_name, split, **kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: a single file is partitioned into 'train' and 'test' only")
        everything = load_math_dataset(self.path_or_name, "train", **kwargs)
        in_test = [unit_hash(t.question) < self.test_fraction for t in everything]
        return [t for t, is_test in zip(everything, in_test) if is_test == (split == "test")]
