"""The summary of `scripts/gpu_check.sh` as a bench/RESULTS.md section: the device, each stage's exit
status, the `gpu`-marked tests, and the GRPO steps of the tiny pipeline on CUDA.

Run (the script does):  .venv/bin/python -m bench.gpu_check --out <dir> --write bench/RESULTS.md

Reads, from `--out`: `env.txt` (nvidia-smi and package versions), `status.tsv` (stage, exit code,
seconds; one line per stage), `pytest_gpu.xml` (JUnit of `pytest -m gpu`), `tiny_cuda/metrics.jsonl`
(the GRPO steps), `tiny_fsdp/metrics.jsonl` (the same with the FSDP2 group, 2+ GPUs). A missing file is reported as missing, never an error: a check that died half-way
still leaves a section saying how far it got. The kernel benchmarks write their own sections
("Kernels on CUDA ...", "MXFP4 quantise/dequantise on CUDA"); this one names them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from bench import results

SECTION = "## GPU check (scripts/gpu_check.sh)"
STEP_KEYS = ("time/rollout", "time/learner", "time/sync", "loss", "grad_norm", "reward", "rollout_logprob_diff")


def test_counts(junit: Path) -> str:
    """'N passed, F failed, S skipped' from a JUnit file (pytest --junitxml)."""
    if not junit.exists():
        return "no JUnit file (the test stage did not run)"
    suites = ET.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return f"{n - fail - err - skip} passed, {fail + err} failed, {skip} skipped"


def step_rows(metrics: Path) -> list[str]:
    """One markdown row per GRPO step of metrics.jsonl (the eval lines are left out)."""
    if not metrics.exists():
        return ["(no metrics.jsonl: the GRPO stage did not get to a step)"]
    rows = ["| step | " + " | ".join(STEP_KEYS) + " |", "|---:|" + "---:|" * len(STEP_KEYS)]
    for line in metrics.read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            rows.append(f"| {m['step']} | " + " | ".join(f"{m.get(k, float('nan')):.4g}" for k in STEP_KEYS) + " |")
    return rows


def section(out: Path, command: str) -> list[str]:
    env = (out / "env.txt").read_text().strip().splitlines() if (out / "env.txt").exists() else ["(no env.txt)"]
    status = (out / "status.tsv").read_text().strip().splitlines() if (out / "status.tsv").exists() else []
    lines = ["", f"Command: `{command}` ({datetime.date.today().isoformat()}); outputs in `{out}`.", "",
             "Environment:", "", "```", *env, "```", "", "| stage | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| {' | '.join(s.split(chr(9)))} |" for s in status]
    lines += ["", f"`pytest -m gpu`: {test_counts(out / 'pytest_gpu.xml')}.", "",
              "Kernel benchmarks: sections \"Kernels on CUDA (MoE, attention, log-probs, learner step)\" and "
              "\"MXFP4 quantise/dequantise on CUDA\" (same run).", "",
              "GRPO steps of the tiny pipeline on CUDA (learner and one vLLM engine sharing the GPU):", "",
              *step_rows(out / "tiny_cuda" / "metrics.jsonl"), ""]
    if (out / "tiny_fsdp").exists():  # 2 GPUs or more: the FSDP2 learner group over all of them
        lines += ["The same steps with the FSDP2 learner group (a rank and an engine per GPU):", "",
                  *step_rows(out / "tiny_fsdp" / "metrics.jsonl"), ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder scripts/gpu_check.sh wrote")
    parser.add_argument("--command", default="bash scripts/gpu_check.sh", help="the command to cite")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    body = section(args.out, args.command)
    print("\n".join([SECTION, *body]))
    (args.out / "summary.md").write_text("\n".join([SECTION, *body]) + "\n")
    if args.write is not None:
        results.write_section(args.write, SECTION, body)


if __name__ == "__main__":
    main()
