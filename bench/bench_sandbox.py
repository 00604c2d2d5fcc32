"""Sandbox cost per execution: `run_python("print(1)")` end to end vs a bare interpreter start.

Run:  .venv/bin/python -m bench.bench_sandbox [--runs 200] [--write bench/RESULTS.md]

Interleaved, one after another in this process: the sandboxed run (bubblewrap namespaces and mounts,
the uid switch, the launcher's rlimits, the program) and `python3 -I -c 'print(1)'` started the same
way without the sandbox (`subprocess.run`), so both see the same load. Reports medians and p90 of
wall time per execution and their difference (the sandbox's own overhead); issue 16's bar is a
median of at most 50 ms per execution. Load average is printed: on a busy box both numbers grow.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import results

SECTION = "## Sandbox cost per execution (bubblewrap)"


def measure(runs: int) -> dict[str, list[float]]:
    from rewards.sandbox import SandboxConfig, run_python

    config = SandboxConfig()
    run_python("print(1)", config=config)  # warm: the probe of bwrap and the interpreter, cached
    times: dict[str, list[float]] = {"sandbox": [], "bare": []}
    for _ in range(runs):
        t = time.perf_counter()
        r = run_python("print(1)", config=config)
        times["sandbox"].append(time.perf_counter() - t)
        if r.returncode != 0 or r.stdout != "1\n":
            raise RuntimeError(f"sandboxed print(1) failed: {r}")
        t = time.perf_counter()
        subprocess.run([config.python, "-I", "-c", "print(1)"], capture_output=True, check=True)
        times["bare"].append(time.perf_counter() - t)
    return times


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    load0 = os.getloadavg()
    times = measure(args.runs)
    load1 = os.getloadavg()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = [f"| {k} | {med[k]:.1f} | {p90(v) * 1e3:.1f} |" for k, v in times.items()]
    overhead = med["sandbox"] - med["bare"]
    verdict = "met" if med["sandbox"] <= 50 else "NOT met"
    lines = [f"{args.runs} interleaved runs of each, load average {load0[0]:.1f} before, {load1[0]:.1f} after "
             f"(2 cores: above ~1 the numbers include waiting for a CPU).", "",
             "| `print(1)` | median ms | p90 ms |", "|---|---:|---:|", *rows, "",
             f"Sandbox overhead over a bare interpreter start: {overhead:.1f} ms (median difference). "
             f"Issue 16 bar (median per execution <= 50 ms): **{verdict}** ({med['sandbox']:.1f} ms)."]
    print("\n".join(lines))
    if args.write:
        command = ".venv/bin/python -m bench.bench_sandbox" + ("" if args.runs == 200 else f" --runs {args.runs}") + \
            f" --write {args.write}"
        results.write_section(args.write, SECTION, ["", f"Command: `{command}` ({time.strftime('%Y-%m-%d')})",
                                                    "", *lines, ""])


if __name__ == "__main__":
    sys.exit(main())
