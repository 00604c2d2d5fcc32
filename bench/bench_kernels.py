"""Learner kernels side by side with what transformers does by default: MoE, attention, log-probs, a step.

Run:  .venv/bin/python -m bench.bench_kernels [--threads 1] [--quick] [--device cuda] [--write bench/RESULTS.md]

Rows (ours / stock, ratio printed as stock time / our time):
  - MoE layer forward+backward: `GptOssMLP` with our experts ("deliberate_grouped") against
    transformers' default experts implementation on this machine ("grouped_mm", torch's grouped GEMM),
    the tiny model's experts (conf/model/tiny.yaml: hidden 192 / intermediate 192 / 8 experts top-2)
    at 4096 tokens (a learner micro-batch), hidden 256 / intermediate 256 / 8 experts top-2 / 2048 tokens and hidden 512 / intermediate 512 /
    16 experts top-4 / 2048 tokens, fp32 and bf16.
  - the tiny MoE shape again with new routing on every call, as between training steps (each call's
    batch is new, so every expert's row count is), median time: on CPU, bf16 GEMMs go to oneDNN, which
    builds a kernel for each new shape (`kernels.moe.CPU_PAD_DTYPES`).
  - (in the bars) the MoE GEMM floor at the tiny shape: the six expert GEMMs alone, no gather, scatter
    or activation (`moe_gemm_floor`); stock / floor bounds any implementation that runs the same GEMMs.
  - attention forward+backward: `sink_attention` against transformers' `eager_attention_forward`
    (gpt-oss' default in this project), head_dim 64, 8 query / 2 KV heads, T = 1024 and 4096, sliding
    window 128 and full.
  - log-probs: chunked selective log-softmax + entropy against full logits + log_softmax, forward and
    backward, 1024 tokens, hidden 256, vocab 8k .. 128k at a fixed chunk (1024 tokens x 4096 vocab rows).
  - learner step: the brief's tiny GptOssForCausalLM (2 layers, hidden 128, 4 experts top-2, window 8),
    4 x 512 tokens, loss = -mean log p(next token), forward+backward: `apply_kernels` + chunked log-probs
    against stock modules + full logits. Reported as tokens/s.
Timing: best of `--reps` interleaved runs (ours, stock, ours, ...). Default one torch thread, timed by
the thread's CPU time: the box is shared, and on 2 shared cores OpenMP barriers make 2-thread wall
times swing by 5-10x with the neighbours' load. `--threads 2` measures wall time instead. A one-thread
run also times the tiny MoE shape at the learner's default thread count (`learner.num_threads`), by wall time.
`--device cuda`: every row on the GPU (ours = the grouped Triton GEMMs of kernels/moe_grouped_triton.py
and the Triton attention), timed by wall clock between `torch.cuda.synchronize()` calls, peak memory
from `torch.cuda.max_memory_allocated`; written to its own RESULTS.md section.
Peak memory: `kernels.logprobs.peak_bytes()` - the most bytes of tensor storage alive at once among
tensors created during one run (activations, saved tensors, gradients; inputs and weights excluded).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import results

from kernels.logprobs import logprobs_and_entropy, logprobs_and_entropy_ref, peak_bytes
from rl.config import LearnerConfig

SECTION = "## Kernels (MoE, attention, log-probs, learner step)"
CUDA_SECTION = "## Kernels on CUDA (MoE, attention, log-probs, learner step)"
DEVICE = torch.device("cpu")  # set by --device
DATE = "2026-11-22"
LEARNER_THREADS = LearnerConfig.num_threads  # the learner's default: the MoE tiny shape is also timed at it


def _clock() -> Callable[[], float]:
    """CPU time of this thread when torch runs on one thread on the CPU (all work is on it, and time the
    neighbours take from us is not counted); wall time otherwise (on CUDA after a synchronize)."""
    if DEVICE.type == "cuda":
        def synced() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
        return synced
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Every time (s) of each function over `reps` interleaved rounds, after one warm-up each."""
    clock = _clock()
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def best_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best time (s) of each function over `reps` interleaved rounds, after one warm-up each."""
    return {name: min(ts) for name, ts in interleaved_times(fns, reps).items()}


def median_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median time (s) of each function over `reps` interleaved rounds, after one warm-up each: for runs
    whose cost differs call to call (new routing, so new GEMM shapes), where the best would hide it."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, reps).items()}


def peak_mib(fn: Callable[[], object]) -> float:
    if DEVICE.type == "cuda":  # allocator peak above what was allocated before the run
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with peak_bytes() as mem:
        fn()
    return mem.peak / 2**20


# ---- MoE -----------------------------------------------------------------------------------------
def moe_rows(reps: int, dtype: torch.dtype, quick: bool, threads: int | None = None,
             fresh: bool = False) -> list[tuple]:
    """MoE rows at the current torch thread count; with `threads`, the tiny shape alone at that many
    threads (wall time), labelled so; with `fresh`, the tiny shape alone with new routing on every call
    (as in training), median time."""
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            rows = moe_rows(reps, dtype, quick=True)[:1]
        finally:
            torch.set_num_threads(before)
        return [(f"{w}, {threads} threads (wall)", *rest) for w, *rest in rows]
    from kernels.patch import EXPERTS_IMPL

    rows = []
    # conf/model/tiny.yaml's experts (what the demo trains) at a learner micro-batch, then larger shapes
    shapes = [(192, 192, 8, 2, 4096), (256, 256, 8, 2, 2048)] + ([] if quick else [(512, 512, 16, 4, 2048)])
    for H, I, E, k, N in shapes[:1] if fresh else shapes:
        step = moe_step(H, I, E, k, N, dtype, inputs=reps + 1 if fresh else 1)
        stock_impl = "grouped_mm"  # transformers' default for GptOss (get_correct_experts_implementation)
        t = (median_times if fresh else best_times)({"ours": step(EXPERTS_IMPL), "stock": step(stock_impl)}, reps)
        mem = {name: peak_mib(step(impl)) for name, impl in (("ours", EXPERTS_IMPL), ("stock", stock_impl))}
        label = f"MoE fwd+bwd H{H} I{I} E{E} top{k} N{N} {str(dtype).removeprefix('torch.')}"
        label += ", new routing every call (median)" if fresh else ""
        rows.append((label, f"{t['ours'] * 1e3:.1f} ms", f"{t['stock'] * 1e3:.1f} ms ({stock_impl})",
                     t["stock"] / t["ours"], mem["ours"], mem["stock"]))
    return rows


def moe_step(H: int, I: int, E: int, k: int, N: int, dtype: torch.dtype,
             inputs: int = 1) -> Callable[[str], Callable[[], None]]:
    """step(impl)() runs one `GptOssMLP` forward+backward on N tokens with transformers' experts
    implementation `impl` ("grouped_mm", ..., or ours, `kernels.patch.EXPERTS_IMPL`). With inputs > 1,
    each step(impl) cycles through that many different token batches, so the routing (and with it every
    expert's row count) changes from call to call, as between training steps."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from kernels.patch import register

    register()
    config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    torch.manual_seed(0)
    mlp = GptOssMLP(config).to(DEVICE, dtype)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    xs = [torch.randn(1, N, H, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(inputs)]

    def step(impl: str) -> Callable[[], None]:
        calls = iter(range(1 << 62))

        def run():
            x = xs[next(calls) % inputs]
            config._experts_implementation = impl
            mlp.zero_grad(set_to_none=True)
            x.grad = None
            mlp(x)[0].sum().backward()
        return run

    return step


def moe_gemm_floor(reps: int, dtype: torch.dtype, H: int = 192, I: int = 192, E: int = 8, k: int = 2,
                   N: int = 4096) -> float:
    """Seconds for the six expert GEMMs of one MoE fwd+bwd alone (u = x W1, z = y W2, g = go W2^T,
    dW2 = y^T go, dx = du W1^T, dW1 = x^T du), on contiguous pre-sorted rows split evenly over the
    experts: the work any implementation that runs transformers' GEMMs must do, with no gather, scatter,
    activation or bias. stock / floor bounds the ratio such an implementation can reach."""
    n = N * k // E
    g = torch.Generator().manual_seed(0)

    def mats(*shape):
        return [torch.randn(*shape, generator=g).to(DEVICE, dtype) for _ in range(E)]

    xs, us, ys, gos = mats(n, H), mats(n, 2 * I), mats(n, I), mats(n, H)
    w1 = torch.randn(E, H, 2 * I, generator=g).to(DEVICE, dtype)
    w2 = torch.randn(E, I, H, generator=g).to(DEVICE, dtype)

    def run():
        for e in range(E):
            xs[e] @ w1[e], ys[e] @ w2[e]
        for e in range(E):
            gos[e] @ w2[e].t(), ys[e].t() @ gos[e], us[e] @ w1[e].t(), xs[e].t() @ us[e]

    return best_times({"floor": run}, reps)["floor"]


# ---- attention -----------------------------------------------------------------------------------
def attention_rows(reps: int, quick: bool) -> list[tuple]:
    import types

    from transformers.masking_utils import causal_mask_function, eager_mask, sliding_window_causal_mask_function
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from kernels.attention import sink_attention

    rows = []
    cases = [(1024, 128), (1024, None)] + ([] if quick else [(4096, 128), (4096, None)])
    for T, window in cases:
        B, Hq, Hkv, D = 1, 8, 2, 64
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, Hq, T, D, generator=g).to(DEVICE).requires_grad_()
        k, v = (torch.randn(B, Hkv, T, D, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
        sinks = torch.randn(Hq, generator=g).to(DEVICE).requires_grad_()
        module = types.SimpleNamespace(num_key_value_groups=Hq // Hkv, sinks=sinks, training=True)
        fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)

        def ours():
            sink_attention(q, k, v, sinks, D**-0.5, window).sum().backward()

        def stock():  # the mask is built per call, as the model does per forward
            mask = eager_mask(batch_size=B, q_length=T, kv_length=T, mask_function=fn, dtype=q.dtype, device=DEVICE)
            eager_attention_forward(module, q, k, v, mask, scaling=D**-0.5)[0].sum().backward()

        t = best_times({"ours": ours, "stock": stock}, reps)
        what = "full" if window is None else f"window {window}"
        rows.append((f"attention fwd+bwd T{T} {what} (8q/2kv heads, d64)", f"{t['ours'] * 1e3:.1f} ms",
                     f"{t['stock'] * 1e3:.1f} ms (eager)", t["stock"] / t["ours"], peak_mib(ours), peak_mib(stock)))
    return rows


# ---- log-probs -----------------------------------------------------------------------------------
def logprob_rows(reps: int, quick: bool) -> list[tuple]:
    rows = []
    N, H = 1024, 256
    for V in (8192, 32768) if quick else (8192, 32768, 131072):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(1, N, H, generator=g).to(DEVICE).requires_grad_()
        w = (torch.randn(V, H, generator=g) * 0.05).to(DEVICE).requires_grad_()
        targets = torch.randint(0, V, (1, N), generator=g).to(DEVICE)

        def ours():
            lp, ent = logprobs_and_entropy(h, w, targets, chunk_size=1024, vocab_chunk=4096)
            (lp.sum() + ent.sum()).backward()

        def stock():
            lp, ent = logprobs_and_entropy_ref(h, w, targets)
            (lp.sum() + ent.sum()).backward()

        t = best_times({"ours": ours, "stock": stock}, max(1, reps // 2))
        weight_mib = V * H * 4 / 2**20  # dW, the weight-sized gradient, is in both peaks
        rows.append((f"log-probs+entropy fwd+bwd N{N} H{H} V{V} (dW {weight_mib:.0f} MiB)", f"{t['ours'] * 1e3:.1f} ms",
                     f"{t['stock'] * 1e3:.1f} ms (full logits)", t["stock"] / t["ours"], peak_mib(ours), peak_mib(stock)))
    return rows


# ---- learner step --------------------------------------------------------------------------------
def step_rows(reps: int, quick: bool) -> list[tuple]:
    from transformers import GptOssConfig, GptOssForCausalLM

    from kernels.logprobs import selective_log_softmax
    from kernels.patch import apply_kernels, remove_kernels

    config = GptOssConfig(head_dim=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
                          intermediate_size=128, vocab_size=512, layer_types=["sliding_attention", "full_attention"],
                          attn_implementation="eager")
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).to(DEVICE).train()
    B, T = (4, 256) if quick else (4, 512)
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def stock():
        remove_kernels(model)
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]  # (B, T-1, H)
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)  # (B, T-1, V)
        (-logp.gather(-1, ids[:, 1:, None]).mean()).backward()

    def ours():
        apply_kernels(model)
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        (-selective_log_softmax(hidden, model.lm_head.weight, ids[:, 1:]).mean()).backward()

    t = best_times({"ours": ours, "stock": stock}, reps)
    tokens = B * T
    return [(f"learner step fwd+bwd, tiny gpt-oss, {B}x{T} tokens", f"{tokens / t['ours']:.0f} tok/s",
             f"{tokens / t['stock']:.0f} tok/s (eager + grouped_mm + full logits)", t["stock"] / t["ours"],
             peak_mib(ours), peak_mib(stock))]


# ---- report --------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type."""
    if not os.path.exists("/proc/cpuinfo"):
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.machine())


def render(rows: list[tuple], command: str, threads: int, floors: dict[str, float] | None = None) -> list[str]:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = cpu_name()
    if DEVICE.type == "cuda":
        device = f"{torch.cuda.get_device_name(DEVICE)} (CUDA {torch.version.cuda}), host {cpu}"
        clock = "wall time between CUDA synchronisations"
    else:
        device = f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s), load average {load}"
        clock = "thread CPU time" if threads == 1 else "wall time"
    lines = [CUDA_SECTION if DEVICE.type == "cuda" else SECTION, "", f"Command: `{command}` ({DATE})", "",
             f"Device: {device}; torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}.",
             f"Times are the best of interleaved repeats ({clock}); "
             "ratio = stock time / our time (higher is better). "
             "Peak = most tensor bytes alive at once among tensors made during one run (`kernels.logprobs.peak_bytes`).",
             "", "| workload | ours | stock | ratio | peak ours MiB | peak stock MiB |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {w} | {o} | {s} | {r:.2f}x | {po:.1f} | {ps:.1f} |" for w, o, s, r, po, ps in rows]
    return lines + ["", *bars(rows, floors or {}), ""]


def bars(rows: list[tuple], floors: dict[str, float]) -> list[str]:
    """The brief's bars, checked against this run's rows; `floors` = {dtype: GEMM floor s} at the tiny shape."""
    moe: dict[str, dict[str, list[str]]] = {}  # dtype -> {"rows": ratios, "threads": the extra thread-count rows}
    for w, _, _, r, *_ in rows:
        if w.startswith("MoE"):
            base, _, threads = w.partition(", ")  # "MoE fwd+bwd H.. N.. float32[, 2 threads (wall)]"
            entry = moe.setdefault(base.split()[-1], {"rows": [], "threads": []})
            if threads:
                entry["threads"].append(f"{r:.2f}x at the tiny shape, {threads}")
            else:
                entry["rows"].append(f"{r:.2f}x")
    step = [r for w, _, _, r, *_ in rows if w.startswith("learner step")]
    extra = [po - float(w.split("dW ")[1].split()[0]) for w, _, _, _, po, _ in rows if w.startswith("log-probs")]
    out = ["Bars:"]
    out += [f"- MoE fwd+bwd >= 2x stock: {dt} {', '.join(v['rows'])}"
            + "".join(f"; {t}" for t in v["threads"]) + "." for dt, v in moe.items()]
    out += [f"  The {LEARNER_THREADS}-thread rows run at the learner's default thread count (`learner.num_threads`)."
            ] if any(v["threads"] for v in moe.values()) else []
    out += ["  Both paths run the same expert GEMMs (same FLOPs); ours removes part of the gather/scatter/elementwise"
            " work around them. In fp32 the GEMMs are most of both paths' time; with bf16 GEMMs (AMX, ~5x faster"
            " here) the work around them dominates both."] if "float32" in moe and DEVICE.type == "cpu" else []
    for dt, floor in floors.items():  # the tiny shape is the first MoE row of each dtype
        w, o, s_, r, *_ = next(row for row in rows if row[0].startswith("MoE") and row[0].endswith(dt))
        stock_ms, ours_ms = float(s_.split()[0]), float(o.split()[0])
        out.append(f"  GEMM floor, {dt}, tiny shape (`moe_gemm_floor`: the six expert GEMMs alone): {floor * 1e3:.1f} ms."
                   f" Ours spends {ours_ms - floor * 1e3:.1f} ms around them; stock / floor = {stock_ms / (floor * 1e3):.2f}x"
                   " is the most any implementation running the same GEMMs could reach.")
    out += [f"- learner step >= 1.5x stock: {step[0]:.2f}x."] if step else []
    out += [f"- log-prob peak memory independent of V: ours minus the weight-sized dW = "
            f"{', '.join(f'{m:.0f}' for m in extra)} MiB across the vocab sizes above (stock grows with V)."] if extra else []
    return out


def write_section(results_md: Path, section: list[str]) -> None:
    """This benchmark's section of RESULTS.md (`section[0]` is its title)."""
    results.write_section(results_md, section[0], section[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see module docstring)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repeats per row (best is kept)")
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    rows, floors = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        rows += moe_rows(args.reps, dtype, args.quick)
        floors[str(dtype).removeprefix("torch.")] = moe_gemm_floor(args.reps, dtype)
        if DEVICE.type == "cpu" and args.threads == 1 and (os.cpu_count() or 1) >= LEARNER_THREADS:
            rows += moe_rows(args.reps, dtype, args.quick, threads=LEARNER_THREADS)  # what the learner runs
        rows += moe_rows(max(args.reps, 15), dtype, args.quick, fresh=True)  # medians need more calls
        print(*rows[-1], sep=" | ", flush=True)
    rows += attention_rows(args.reps, args.quick)
    rows += logprob_rows(args.reps, args.quick)
    rows += step_rows(args.reps, args.quick)
    command = results.command("bench.bench_kernels", argv)
    section = render(rows, command, args.threads, floors)
    print("\n".join(section))
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    main()
