"""Atomic training checkpoints: `<run_dir>/checkpoints/step_000010/` holds the HF policy folder, the
learner's optimizer/step/RNG (`learner_state.pt`) and the trainer state (`trainer_state.json`: step,
data cursor, driver RNG). A checkpoint is written to `step_N.tmp` and renamed, and `latest` is
replaced atomically, so a crash mid-save never leaves a half checkpoint that resume would pick up.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

TRAINER_STATE = "trainer_state.json"


def ckpt_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir, step: int, write_policy: Callable[[Path], None], trainer_state: dict[str, Any],
         keep: int = 2) -> Path:
    """`write_policy(folder)` writes model + learner state; we add the trainer state and commit."""
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_policy(tmp)
    (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link_tmp = root / "latest.tmp"
    link_tmp.write_text(final.name)
    os.replace(link_tmp, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir) -> Path | None:
    """The last committed checkpoint folder, or None."""
    pointer = ckpt_root(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = ckpt_root(run_dir) / pointer.read_text().strip()
    return path if (path / TRAINER_STATE).exists() else None


def trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())
