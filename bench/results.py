"""bench/RESULTS.md: each benchmark owns one `## ...` section and replaces only that section."""
from __future__ import annotations

from pathlib import Path


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
