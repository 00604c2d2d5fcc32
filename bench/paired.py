"""Held-out accuracy of two evaluations side by side, the difference paired by task, with its standard error.

Each side is an eval's samples.jsonl (rl/evaluate.py) and a checkpoint name in it (`sft`, `rl`, ...):

    .venv/bin/python -m bench.paired outputs/A/eval/samples.jsonl:rl outputs/B/eval/samples.jsonl:rl --env walk

For every effort: each side's accuracy (mean of `correct` over its samples), B - A as the mean over the tasks
both sides hold of (B's task mean - A's task mean), weighted by A's samples of the task (an env drawn with
repeats, `walk_draw: iid`, holds a task id several times), and its cluster-robust SE (the task is the unit of
sampling; samples of one task are not independent). `--env LABEL` keeps the tasks of
one mixture component (ids "LABEL:..."); in a single-env run ids carry no label, and `--env` matches those as
well when LABEL is that env's name, so a mixed run and its single-env twin compare task by task.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from envs.mixture import label_of


def task_cells(path: str | Path, checkpoint: str, env: str | None = None) -> dict[str, dict[str, list[float]]]:
    """{effort: {task id (label stripped): [correct of each sample]}} of one checkpoint in a samples.jsonl."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    with open(path) as f:
        for line in f:
            s = json.loads(line)
            seen.add(s["checkpoint"])
            if s["checkpoint"] != checkpoint:
                continue
            tid, label = s["task_id"], label_of(s["task_id"])
            if env is not None and label != env and not (label == "" and tid.startswith(f"{env}-")):
                continue
            out[s["effort"]][tid[len(label) + 1:] if label else tid].append(float(s["correct"] or 0.0))
    if checkpoint not in seen:
        raise SystemExit(f"{path}: no samples of checkpoint {checkpoint!r} (it holds {sorted(seen)})")
    return out


def compare(a: dict[str, dict[str, list[float]]], b: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Per effort present on both sides: sample accuracies, the paired difference b - a and its SE."""
    rows = []
    for effort in [e for e in ("low", "medium", "high") if e in a and e in b]:
        common = sorted(set(a[effort]) & set(b[effort]))
        if not common:
            continue
        w = [len(a[effort][t]) for t in common]
        d = [statistics.fmean(b[effort][t]) - statistics.fmean(a[effort][t]) for t in common]
        mean = sum(wi * di for wi, di in zip(w, d)) / sum(w)
        n = len(common)
        se = (math.sqrt(n / (n - 1) * sum((wi * (di - mean)) ** 2 for wi, di in zip(w, d))) / sum(w)
              if n > 1 else float("nan"))
        acc = {k: statistics.fmean(x for xs in side[effort].values() for x in xs) for k, side in (("a", a), ("b", b))}
        rows.append({"effort": effort, **acc, "diff": mean, "se": se, "tasks": n})
    return rows


def _side(spec: str) -> tuple[str, str]:
    path, sep, ckpt = spec.rpartition(":")
    if not sep or not path:
        raise SystemExit(f"{spec!r}: give PATH/samples.jsonl:CHECKPOINT (e.g. outputs/x/eval/samples.jsonl:rl)")
    return path, ckpt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="PATH/samples.jsonl:CHECKPOINT")
    ap.add_argument("b", help="PATH/samples.jsonl:CHECKPOINT")
    ap.add_argument("--env", default=None, help="keep one mixture component's tasks (label, or the env's name)")
    args = ap.parse_args(argv)
    rows = compare(task_cells(*_side(args.a), args.env), task_cells(*_side(args.b), args.env))
    print(f"A = {args.a}\nB = {args.b}" + (f"\nenv {args.env}" if args.env else ""))
    print("| effort | A | B | B - A (points) | SE | tasks |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['effort']} | {r['a']:.3f} | {r['b']:.3f} | {100 * r['diff']:+.1f} | {100 * r['se']:.1f} | "
              f"{r['tasks']} |")
    if rows:
        mean = statistics.fmean(r["diff"] for r in rows)
        se = math.sqrt(sum(r["se"] ** 2 for r in rows)) / len(rows)
        print(f"mean over efforts: {100 * mean:+.1f} points (SE {100 * se:.1f}, efforts taken as independent)")


if __name__ == "__main__":
    main()
