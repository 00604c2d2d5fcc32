"""MoE experts on CPU at the learner's thread count: where the SwiGLU activation's row blocks run.

Run:  .venv/bin/python -m bench.bench_moe_threads [--threads 2] [--reps 12] [--write bench/RESULTS.md]

The tiny model's MoE layer (conf/model/tiny.yaml: hidden 192 / intermediate 192 / 8 experts top-2) at
4096 tokens, `GptOssMLP` forward+backward, fp32 and bf16, side by side in one process (best of
interleaved repeats, wall time). Ours differs only in where the SwiGLU tiles' row blocks run:
  - OpenMP (landed): on torch's own OpenMP threads (kernels/moe.py's C is built with -fopenmp and binds
    to the libgomp torch has loaded);
  - Python pool: on a Python thread pool, what a build without OpenMP does (and what ran before);
  - one thread: the whole activation on the calling thread.
Stock: transformers' default experts implementation (grouped_mm). The three give the same values bit
for bit (tests/kernels/test_moe.py). Also tried and not landed: a C loop adding one expert's rows back
over the same threads instead of `index_add_` (no faster: 33.4 vs 32.3 ms fp32, 21.4 vs 21.2 ms bf16,
1024-row tiles).
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from bench import bench_kernels, results

SECTION = "## MoE on CPU at the learner's thread count (where the activation's row blocks run)"


@contextlib.contextmanager
def activation_blocks(where: str):
    """Run the activation's row blocks on "openmp" threads (as built), a Python "pool", or "one" thread."""
    from kernels import moe

    lib = moe._cpu_lib()
    saved = dict(lib.fwd_par), dict(lib.bwd_par), moe.CPU_MIN_ROWS_PER_THREAD
    if where != "openmp":
        lib.fwd_par.clear()
        lib.bwd_par.clear()
    if where == "one":
        moe.CPU_MIN_ROWS_PER_THREAD = 1 << 62
    try:
        yield
    finally:
        lib.fwd_par.update(saved[0])
        lib.bwd_par.update(saved[1])
        moe.CPU_MIN_ROWS_PER_THREAD = saved[2]


VARIANTS = {"OpenMP (landed)": "openmp", "Python pool": "pool", "one thread": "one"}


def rows(reps: int) -> list[str]:
    from kernels import moe
    from kernels.patch import EXPERTS_IMPL

    if not moe._cpu_lib().fwd_par:
        raise SystemExit("the C activation was built without OpenMP: nothing to compare")
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        step = bench_kernels.moe_step(192, 192, 8, 2, 4096, dtype)

        def run(where, fn=step(EXPERTS_IMPL)):
            def timed():
                with activation_blocks(where):
                    fn()
            return timed

        fns = {name: run(where) for name, where in VARIANTS.items()} | {"stock": step("grouped_mm")}
        t = bench_kernels.best_times(fns, reps)
        name = str(dtype).removeprefix("torch.")
        out += [f"| {name} | {v} | {t[v] * 1e3:.1f} ms | {t['stock'] / t[v]:.2f}x |" for v in fns]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=bench_kernels.LEARNER_THREADS)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = rows(args.reps)
    command = results.command("bench.bench_moe_threads", argv)
    section = [SECTION, "", f"Command: `{command}` ({bench_kernels.DATE})", "",
               f"Tiny MoE shape (H192 I192 E8 top-2, N=4096), `GptOssMLP` fwd+bwd, {args.threads} torch threads, "
               "best of interleaved repeats, wall time; ratio = stock / variant. Variants: where the activation's row "
               "blocks run (module docstring).",
               "", "| dtype | variant | time | stock / variant |", "|---|---|---:|---:|", *table, ""]
    print("\n".join(section))
    if args.write:
        results.write_section(args.write, section[0], section[1:])


if __name__ == "__main__":
    main()
