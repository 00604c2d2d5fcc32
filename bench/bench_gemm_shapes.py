"""What a new GEMM shape costs on CPU, and the MoE experts with and without row buckets.

Run:  .venv/bin/python -m bench.bench_gemm_shapes [--reps 20] [--write bench/RESULTS.md]

Routing moves every expert's row count from one training step to the next, so a per-expert GEMM meets
a row count it has not seen before. On CPU, torch sends bf16/fp16 matmuls to oneDNN, which builds
(JIT-compiles) a kernel for each new shape and caches it; fp32 goes to MKL.
  - GEMM rows: the three shapes of the tiny model's expert GEMMs (hidden 192, 2 x intermediate 384) at
    1400-2000 rows, each timed on row counts never used before in the process ("new shape"), then
    again on the same counts ("seen"); median over `--reps` counts.
  - Layer rows: the tiny MoE layer (`GptOssMLP`, 4096 tokens, 8 experts top-2) forward+backward with new
    routing on every call (a new token batch each call), median time: our experts with the row buckets
    of `kernels.moe.CPU_PAD_DTYPES` (landed: each active expert one tile, padded to `_row_bucket` rows),
    the same without them (1024-row tiles, the fp32 layout), and transformers' grouped_mm.
One torch thread, wall time of each call, in one process. Every timed layer call meets new row counts
here; in a long run the counts recur (they scatter ~100 rows around N k / E) and oneDNN's primitive
cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024 by default) keeps part of them, so the unbucketed cost
there lies between this and the fixed-routing rows of bench_kernels.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench import bench_kernels, results

SECTION = "## GEMM shapes on CPU: what a new row count costs, and the MoE row buckets"


def gemm_rows(reps: int) -> list[str]:
    H, I2 = 192, 384
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, H, generator=g).to(dtype)
        w = torch.randn(H, I2, generator=g).to(dtype)
        du = torch.randn(4096, I2, generator=g).to(dtype)
        kinds = {"x W1 (m x 192 @ 192 x 384)": lambda m: torch.mm(x[:m], w),
                 "x^T du (192 x m @ m x 384)": lambda m: torch.mm(x[:m].t(), du[:m]),
                 "du W1^T (m x 384 @ 384 x 192)": lambda m: torch.mm(du[:m], w.t())}
        name = str(dtype).removeprefix("torch.")
        for fn in kinds.values():  # library start-up and first touches, outside the timed calls
            fn(64)
        for i, (kind, fn) in enumerate(kinds.items()):
            # counts no other row uses (the layer rows below see ~1024 +- 100 rows an expert)
            counts = [1401 + 100 * (2 * i + (dtype == torch.bfloat16)) + 3 * j for j in range(reps)]
            times = {}
            for label in ("new shape", "seen"):
                ts = []
                for m in counts:
                    t0 = time.perf_counter()
                    fn(m)
                    ts.append(time.perf_counter() - t0)
                times[label] = statistics.median(ts)
            out.append(f"| {name} | {kind} | {times['new shape'] * 1e3:.2f} ms | {times['seen'] * 1e3:.2f} ms | "
                       f"{times['new shape'] / times['seen']:.1f}x |")
    return out


def layer_rows(reps: int) -> list[str]:
    from kernels import moe
    from kernels.patch import EXPERTS_IMPL

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        step = bench_kernels.moe_step(192, 192, 8, 2, 4096, dtype, inputs=reps + 1)
        ours, plain = step(EXPERTS_IMPL), step(EXPERTS_IMPL)

        def unpadded():
            saved, moe.CPU_PAD_DTYPES = moe.CPU_PAD_DTYPES, ()
            try:
                plain()
            finally:
                moe.CPU_PAD_DTYPES = saved

        fns = {"ours, row buckets (landed)": ours, "ours, no buckets": unpadded, "stock grouped_mm": step("grouped_mm")}
        t = bench_kernels.median_times(fns, reps)
        name = str(dtype).removeprefix("torch.")
        padded = dtype in moe.CPU_PAD_DTYPES
        for v in fns:
            note = " (fp32 is not padded: same as below)" if v.startswith("ours, row") and not padded else ""
            out.append(f"| {name} | {v}{note} | {t[v] * 1e3:.1f} ms | {t['stock grouped_mm'] / t[v]:.2f}x |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="row counts per GEMM row / calls per layer row")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = results.command("bench.bench_gemm_shapes", argv)
    body = ["", f"Command: `{command}` ({bench_kernels.DATE})", "",
            f"{bench_kernels.cpu_name()}, 1 torch thread, wall time, median; torch {torch.__version__}.", "",
            "| dtype | GEMM | new shape | seen | new / seen |", "|---|---|---:|---:|---:|", *gemm_rows(args.reps), "",
            "Tiny MoE layer fwd+bwd (`GptOssMLP`, H192 I192 E8 top-2, N4096), new routing on every call:", "",
            "| dtype | experts | time | stock / this |", "|---|---|---:|---:|", *layer_rows(args.reps), ""]
    print("\n".join([SECTION, *body]))
    if args.write:
        results.write_section(args.write, SECTION, body)


if __name__ == "__main__":
    main()
