"""Rollout throughput, vLLM (`rl.engine.RolloutEngine`) vs HF `generate`, and weight-sync time.

Run:  .venv/bin/python -m bench.bench_rollout [--prompts 24 --n 8 --max-tokens 320] [--write bench/RESULTS.md]

Workload (defaults = one GRPO step of the tiny experiment: 8 tasks x 3 efforts, group 8, 320
tokens): the tiny gpt-oss (conf/model/tiny.yaml, built into a temp folder with a vocabulary that
covers the prompts), P Harmony prompts x n samples, exactly `max_tokens` sampled tokens per sequence
on both sides (vLLM `stop=False`; HF `min_new_tokens`), temperature 1, top_p 1, top_k off, padded
vocabulary rows masked on both sides, fp32. Both run in this process, side by side.
- HF: `GptOssForCausalLM.generate` (eager attention, KV cache, `num_return_sequences=n`). It runs
  before vLLM starts (vLLM then pins the process's thread count), at whichever of `--hf-threads`
  is faster on a short probe: on this shared 2-core box 2 threads can be 7x slower than 1 when the
  neighbours are busy, and faster when they are not.
- vLLM: one engine (`RolloutEngine`, 1 thread, its default), warm-up call, then repeats.
- Weight sync: `update_weights(model.state_dict())` (HF names -> vLLM layout, CPU repack, prefix
  cache reset) and `update_weights_from_path` (adds the safetensors read).
tokens/s is the best of the repeats (the box is shared; best-of filters out the neighbours); the
median is printed too. Takes about 4 minutes on 2 cores, mostly HF.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import results
import yaml

SECTION = "## Rollout (vLLM vs HF generate) and weight sync"
TARGET_RATIO = 5.0  # the project bar (docs/ARCHITECTURE.md, bench/RESULTS.md): vLLM rollout >= 5x HF generate


def _questions(count: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randint(10, 99, (count,), generator=g).tolist() for _ in range(3))
    return [f"Compute {x}*{y}+{z}." for x, y, z in zip(a, b, c)]


def _best_and_median(fn, reps: int) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


@torch.no_grad()
def hf_generate(model, vm, prompts: list[list[int]], n: int, max_tokens: int) -> int:
    """Left-padded batch, n samples per prompt; returns the number of sampled tokens."""
    rows = [vm.to_model(p) for p in prompts]
    width = max(map(len, rows))
    pad = model.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (P, L)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(
        ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        max_new_tokens=max_tokens, min_new_tokens=max_tokens, num_return_sequences=n,
        suppress_tokens=list(range(len(vm), model.config.vocab_size)), pad_token_id=pad,
    )  # (P*n, L + max_tokens)
    return (out.shape[1] - width) * out.shape[0]


def measure_hf(model, vm, prompts, args) -> dict:
    """HF at the faster of `--hf-threads` (short probe first), then the full workload."""

    def hf_run(max_tokens=args.max_tokens):
        got = hf_generate(model, vm, prompts, args.n, max_tokens)
        want = len(prompts) * args.n * max_tokens
        assert got == want, f"HF sampled {got} tokens, expected {want}"

    hf_generate(model, vm, prompts[:2], 2, 8)  # warm-up
    probe_tokens, probes = max(8, args.max_tokens // 16), {}
    for threads in args.hf_threads:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        hf_run(probe_tokens)
        probes[threads] = len(prompts) * args.n * probe_tokens / (time.perf_counter() - t0)
    threads = max(probes, key=probes.get)
    torch.set_num_threads(threads)
    best, med = _best_and_median(hf_run, args.hf_reps)
    return {"threads": threads, "best": best, "median": med, "probe_tokens": probe_tokens, "probes": probes}


def measure_vllm(ckpt, prompts, state, args) -> dict:
    """RolloutEngine throughput (after a warm-up call), then weight-sync time."""
    from rl.config import RolloutConfig
    from rl.engine import RolloutEngine

    eng = RolloutEngine(ckpt, RolloutConfig(max_model_len=1024, kv_cache_gib=1), seed=0)
    try:
        def gen():
            out = eng.generate(prompts, n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                               stop=False)
            assert sum(len(c.ids) for s in out for c in s) == len(prompts) * args.n * args.max_tokens

        eng.generate(prompts[:2], n=2, max_tokens=8)  # warm-up
        best, med = _best_and_median(gen, args.reps)
        sync = _best_and_median(lambda: eng.update_weights(state), args.reps)
        from_path = _best_and_median(lambda: eng.update_weights_from_path(ckpt), args.reps)
        return {"threads": torch.get_num_threads(), "best": best, "median": med, "start_s": eng.start_time_s,
                "sync": sync, "from_path": from_path}
    finally:
        eng.shutdown()


def run(args) -> tuple[list[str], list[str]]:
    from envs import harmony
    from rl.model import build_tiny_model, load_policy

    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    try:
        questions = _questions(args.prompts)
        ckpt = build_tiny_model(yaml.safe_load(open("conf/model/tiny.yaml")), questions, tmp / "tiny")
        prompts = [harmony.render_prompt(q, harmony.EFFORTS[i % 3]) for i, q in enumerate(questions)]
        model, vm = load_policy(ckpt)
        model.eval()
        hf = measure_hf(model, vm, prompts, args)  # first: vLLM pins the process's thread count
        vl = measure_vllm(ckpt, prompts, model.state_dict(), args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tokens = len(prompts) * args.n * args.max_tokens
    n_params = sum(p.numel() for p in model.parameters())
    header = [
        f"Device: {_cpu()}, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"torch {torch.__version__}.",
        f"Workload: tiny gpt-oss ({n_params / 1e6:.1f}M params, vocab {len(vm)} real rows), {len(prompts)} "
        f"Harmony prompts ({min(map(len, prompts))}-{max(map(len, prompts))} ids) x n={args.n}, exactly "
        f"{args.max_tokens} sampled tokens each = {tokens} tokens per run, temperature 1, top_p 1, fp32. "
        f"tokens/s from the best of {args.reps} vLLM / {args.hf_reps} HF runs (median in brackets).",
        f"HF thread probe ({hf['probe_tokens']} tokens/sequence, tokens/s): "
        + ", ".join(f"{t} thread{'s' * (t > 1)}: {r:.0f}" for t, r in hf["probes"].items())
        + f"; full HF run at {hf['threads']}.",
        f"vLLM engine start (RolloutEngine constructor, vLLM import included): {vl['start_s']:.1f} s.",
    ]
    ratio = hf["best"] / vl["best"]
    table = ["| engine | threads | s / run | tokens/s | x HF |", "|---|---:|---:|---:|---:|"]
    for name, r in (("HF generate", hf), ("vLLM RolloutEngine", vl)):
        rate = f"{tokens / r['best']:.0f} ({tokens / r['median']:.0f})"
        table.append(f"| {name} | {r['threads']} | {r['best']:.2f} ({r['median']:.2f}) | {rate} "
                     f"| {hf['best'] / r['best']:.2f} |")
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    table += [
        "",
        f"vLLM / HF generate: **{ratio:.1f}x** (target >= {TARGET_RATIO:.0f}x: {verdict}).",
        "",
        "| weight sync | s (median) | vs one vLLM rollout run |",
        "|---|---:|---:|",
    ]
    for name, (best, med) in (("update_weights(HF state dict), in memory", vl["sync"]),
                              ("update_weights_from_path (safetensors read + same)", vl["from_path"])):
        table.append(f"| {name} | {best:.3f} ({med:.3f}) | {100 * best / vl['best']:.2f}% |")
    return header, table


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


def write_section(results_md: Path, command: str, header: list[str], table: list[str]) -> None:
    """This benchmark's section of RESULTS.md, with the command and today's date."""
    today = datetime.date.today().isoformat()
    results.write_section(results_md, SECTION, ["", f"Command: `{command}` ({today})", "", *header, "", *table, ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: one GRPO step of the tiny experiment (8 tasks x 3 efforts, group 8, rollout.max_tokens).
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (GRPO group size)")
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--reps", type=int, default=3, help="timed vLLM runs")
    parser.add_argument("--hf-reps", type=int, default=2, help="timed HF runs (the slow side)")
    parser.add_argument("--hf-threads", type=lambda x: [int(t) for t in x.split(",")], default=[2, 1],
                        help="torch thread counts HF may use (probed; the faster runs the workload)")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    if min(args.reps, args.hf_reps) < 1:
        parser.error("--reps and --hf-reps must be >= 1")
    header, table = run(args)
    print("\n".join([SECTION, "", *header, "", *table]))
    if args.write:
        command = ".venv/bin/python -m bench.bench_rollout " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(args.write, command.strip(), header, table)


if __name__ == "__main__":
    main()
