"""bench/RESULTS.md: each benchmark owns one `## ...` section and replaces only that section."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line a section records, quoted so it can be pasted back into a shell.

    >>> command("bench.bench_vs_trl", ["--ours", "rollout.num_threads=2 learner.micro_batch_size=128"])
    ".venv/bin/python -m bench.bench_vs_trl --ours 'rollout.num_threads=2 learner.micro_batch_size=128'"
    """
    return shlex.join([".venv/bin/python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def write_section(results_md: Path, title: str, body: list[str]) -> None:
    """Replace (or append) the section headed `title` with `[title, *body]`, leaving others alone."""
    section = [title, *body]
    results_md = Path(results_md)
    lines = results_md.read_text().splitlines() if results_md.exists() else ["# Benchmark results", ""]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        lines += ["", *section] if lines and lines[-1] else section
    results_md.write_text("\n".join(lines).rstrip("\n") + "\n")
