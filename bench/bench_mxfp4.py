"""MXFP4 quantise / dequantise bandwidth against memcpy, every path side by side in one run.

Run:  .venv/bin/python -m bench.bench_mxfp4 [--experts 8] [--device auto|cpu|cuda] [--write bench/RESULTS.md]

Workload: E experts of a gpt-oss-sized 2880 x 2880 expert matrix (the real layer has 32; scaled down so
one measurement takes about a second). Bytes counted for every row, memcpy included, are the bytes of
the bf16 tensor on the wide side: the bf16 output of dequantise, the bf16 input of quantise. memcpy is
`clone()` of a bf16 buffer of that size (allocation included, as dequantise/quantise allocate their
outputs too), with torch's threads and with one thread, and a copy into a buffer allocated the way
the CPU dequantise allocates (huge-page hint); ratios use the fastest memcpy row. GB/s uses the best
wall time over repeats (the box is shared; best-of filters out the neighbours).
The torch reference paths are slow, so they run on one expert (their GB/s is size-independent).
Peak memory: the peak resident set (CPU; /proc VmHWM, reset before each row) or the peak CUDA
allocation above what was live before the row.
`--device`: auto (default) = CUDA when torch sees one, else CPU; cpu / cuda force it. CUDA results go
to their own RESULTS.md section, so a GPU run never replaces the CPU table.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import results

from kernels.mxfp4 import dequantize, quantize
from kernels.mxfp4_cpu import empty_hugepages

DIM = 2880  # gpt-oss hidden size = expert intermediate size
SECTION = "## MXFP4 quantise/dequantise"
CUDA_SECTION = "## MXFP4 quantise/dequantise on CUDA"
_LIBC = ctypes.CDLL(None)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory above the live baseline while `fn` runs once, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        if hasattr(_LIBC, "malloc_trim"):  # glibc: hand freed heap pages back, or reuse hides the peak
            _LIBC.malloc_trim(0)
        base = _vm_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    fn()
    return (_vm_kib("VmHWM") - base) / 2**10


def _best_seconds(fn: Callable[[], object], device: torch.device, min_time: float, min_runs: int = 3) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm up: JIT builds, caches, first-touch of tables
    sync()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_runs or spent < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best


def _single_threaded(fn: Callable[[], object]) -> Callable[[], object]:
    """On a shared box torch's OpenMP copy can lose to one thread; the baseline takes the better."""

    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    return run


def _rows(experts: int, device: torch.device) -> list[tuple[str, str, int, Callable[[], object]]]:
    """(op, path, bf16 bytes, fn) for every path available on `device`."""
    g = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(experts, DIM, DIM, generator=g, device=device) * 0.02).to(torch.bfloat16)  # (E, 2880, 2880)
    w1 = w[:1].clone()  # one expert for the slow reference paths
    blocks, scales = quantize(w)
    blocks1, scales1 = blocks[:1].clone(), scales[:1].clone()
    n, n1 = w.numel() * 2, w1.numel() * 2
    rows = [("memcpy", f"torch clone, {torch.get_num_threads()} threads", n, lambda: w.clone())]
    if device.type == "cpu":
        if torch.get_num_threads() > 1:
            rows.append(("memcpy", "torch clone, 1 thread", n, _single_threaded(lambda: w.clone())))
        # the output allocation dequantise uses, so the baseline gets the same huge-page advantage
        rows.append(("memcpy", "copy into huge-page buffer", n, lambda: empty_hugepages(w.shape, w.dtype).copy_(w)))
    if device.type == "cuda":
        rows += [
            ("dequantise", "triton", n, lambda: dequantize(blocks, scales, backend="triton")),
            ("quantise", "triton (RNE)", n, lambda: quantize(w, backend="triton")),
            ("quantise", "triton (stochastic)", n, lambda: quantize(w, stochastic=True, generator=g, backend="triton")),
        ]
    else:
        rows += [
            ("dequantise", "cpu (C table)", n, lambda: dequantize(blocks, scales, backend="cpu")),
            ("quantise", "cpu (C, RNE)", n, lambda: quantize(w, backend="cpu")),
            ("quantise", "cpu (C, stochastic)", n, lambda: quantize(w, stochastic=True, generator=g, backend="cpu")),
        ]
    rows += [
        ("dequantise", "torch reference (1 expert)", n1, lambda: dequantize(blocks1, scales1, backend="torch")),
        ("quantise", "torch reference (1 expert)", n1, lambda: quantize(w1, backend="torch")),
    ]
    return rows


def run(experts: int, min_time: float, device: torch.device) -> tuple[list[str], list[str]]:
    """Measure every row; returns (header lines, markdown table lines)."""
    results = []
    for op, path, nbytes, fn in _rows(experts, device):
        seconds = _best_seconds(fn, device, min_time)
        results.append((op, path, nbytes, nbytes / seconds / 1e9, _peak_mib(fn, device)))
        print(f"  {op:10s} {path:28s} {results[-1][3]:7.2f} GB/s", file=sys.stderr, flush=True)
    memcpy_gbs = max(gbs for op, _, _, gbs, _ in results if op == "memcpy")
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:  # the load average says how shared the box was; ratios come from the same minutes
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        where = f"{_cpu_model()}, {torch.get_num_threads()} torch threads, load average {load}; no CUDA, no Triton rows"
    header = [
        f"Device: {where}; torch {torch.__version__}.",
        f"Workload: {experts} x {DIM} x {DIM} bf16 ({experts * DIM * DIM * 2 / 1e6:.0f} MB); "
        "bytes counted = bf16 output of dequantise / bf16 input of quantise, memcpy rows copy that many bytes; "
        "stochastic rows include drawing the fp32 uniforms (torch.rand).",
        "GB/s from the best of repeated runs (>= 3, >= ~1 s in total); x memcpy = ratio to the fastest memcpy row; "
        "peak = memory above the live baseline.",
    ]
    table = [
        "| op | path | MB | GB/s | x memcpy | peak MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for op, path, nbytes, gbs, peak in results:
        table.append(f"| {op} | {path} | {nbytes / 1e6:.0f} | {gbs:.2f} | {gbs / memcpy_gbs:.2f} | {peak:.0f} |")
    return header, table


def write_section(results_md: Path, command: str, header: list[str], table: list[str], title: str = SECTION) -> None:
    """This benchmark's section (`title`) of RESULTS.md, with the command and today's date."""
    today = datetime.date.today().isoformat()
    results.write_section(results_md, title, ["", f"Command: `{command}` ({today})", "", *header, "", *table, ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, help="2880 x 2880 expert matrices to convert")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of repeats per row (at least)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (default): CUDA when torch sees one, else CPU")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    title = CUDA_SECTION if device.type == "cuda" else SECTION
    header, table = run(args.experts, args.min_time, device)
    print("\n".join([title, "", *header, "", *table]))
    if args.write is not None:
        command = results.command("bench.bench_mxfp4", argv)
        write_section(args.write, command, header, table, title)


if __name__ == "__main__":
    main()
