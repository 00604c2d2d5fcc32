"""Every speed/memory benchmark, one after another, each rewriting its own section of bench/RESULTS.md.

Run:  make bench    (= .venv/bin/python -m bench.run_all [--only kernels,moe_threads] [--results bench/RESULTS.md])

Benchmarks (module: what it measures): bench_mxfp4 (MXFP4 quantise/dequantise GB/s vs memcpy),
bench_kernels (MoE, attention, log-probs, learner step vs transformers' stock modules), bench_moe_threads
(where the MoE activation's row blocks run at the learner's thread count), bench_gemm_shapes (what a new
GEMM row count costs on CPU; MoE experts with and without row buckets under new routing), bench_rollout (vLLM vs HF
generate, weight sync), bench_qat (rollout/learner log-prob mismatch with and without QAT, on a random
tiny model unless run by hand with --policy), bench_sft (SFT step vs TRL's head), bench_vs_trl (our GRPO
step vs TRL's GRPOTrainer on the demo's workload; needs the SFT checkpoint `make demo` writes; long: ten
of the demo's RL steps on each of five sides), bench_sandbox (bubblewrap sandbox cost per execution vs a bare
interpreter start), bench_scaling (step time and its split as group size, max new tokens and tasks per step
grow, fitted exponents, learner MFU, weight sync's share; same checkpoint; ten points of three steps). Each
runs in its own process: vLLM fixes the process' torch
thread count once it starts, and the timings must not share state. The RL experiments (bench/rl_curve.py,
bench/rl_step_probe.py) need a trained policy and take hours: run them by hand.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = {
    "mxfp4": "bench.bench_mxfp4",
    "kernels": "bench.bench_kernels",
    "moe_threads": "bench.bench_moe_threads",
    "gemm_shapes": "bench.bench_gemm_shapes",
    "rollout": "bench.bench_rollout",
    "qat": "bench.bench_qat",
    "sft": "bench.bench_sft",
    "vs_trl": "bench.bench_vs_trl",
    "sandbox": "bench.bench_sandbox",
    "scaling": "bench.bench_scaling",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {list(BENCHMARKS)}")
    parser.add_argument("--results", default="bench/RESULTS.md")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name}: python -m {BENCHMARKS[name]} --write {args.results}", flush=True)
        rc = subprocess.run([sys.executable, "-m", BENCHMARKS[name], "--write", args.results]).returncode
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        raise SystemExit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
