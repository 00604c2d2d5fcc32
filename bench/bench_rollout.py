"""Rollout throughput, vLLM (`rl.engine.RolloutEngine`) vs HF `generate`, and weight-sync time.

Run:  .venv/bin/python -m bench.bench_rollout [--prompts 24 --n 8 --max-tokens 320] [--vllm-threads 1,2]
          [--vllm-modes eager,compiled] [--pool-workers 2] [--pool-groups-per-call K] [--hf-procs 2]
          [--write bench/RESULTS.md]

Workload (defaults = one GRPO step of the tiny experiment: 8 tasks x 3 efforts, group 8, 320
tokens): the tiny gpt-oss (conf/model/tiny.yaml, built into a temp folder with a vocabulary that
covers the prompts), P Harmony prompts x n samples, exactly `max_tokens` sampled tokens per sequence
on both sides (vLLM `stop=False`; HF `min_new_tokens`), temperature 1, top_p 1, top_k off, padded
vocabulary rows masked on both sides, fp32. Both run in one invocation, one after the other.
- HF: `GptOssForCausalLM.generate` (eager attention, KV cache, `num_return_sequences=n`), in this
  process, at whichever of `--hf-threads` is faster on a short probe: on this shared 2-core box 2 threads can be 7x slower than 1 when the
  neighbours are busy, and faster when they are not.
- vLLM: one engine (`RolloutEngine` with the `rollout` schema's defaults: KV blocks of
  `rollout.block_size` tokens, prefix caching, whole-prompt prefill), repeats of the workload; once
  per count in `--vllm-threads` and mode in `--vllm-modes` (eager, the rollout default; compiled:
  `rollout.enforce_eager=false`, vLLM's torch.compile path, whose start-up pays for inductor), each in a
  fresh subprocess (vLLM pins a process's thread count when it starts), so vLLM gets the same choice of
  thread count HF gets; the ratio uses the fastest.
- HF data-parallel (`--hf-procs P`): P processes at one thread each, the prompts split evenly, each run
  started together at a barrier (what torchrun/accelerate would give HF on P cores); a run lasts from
  the first start to the last end.
- The rollout workers (`--pool-workers W`): the pipeline's `rl.workers.WorkerPool` of W `RolloutWorker`
  Ray actors at one thread each (local Ray), timed around `WorkerPool.generate`, the call path a
  rollout takes (chunks of prompts to whichever worker is free, samples back through Ray);
  `--pool-groups-per-call` (default: one call per worker, prompts split evenly).
- The ratio is the fastest vLLM set-up over the fastest HF set-up (single process or data-parallel).
- Weight sync (of the fastest vLLM set-up; the pool's includes `ray.put` and every worker loading):
  `update_weights(model.state_dict())` (HF names -> vLLM layout, CPU repack, prefix
  cache reset), a trained-only update of the RMSNorm gains (what the demo's steps after the first
  send, `rl.vllm_weights.TrainedWeights`) and `update_weights_from_path` (adds the safetensors read).
tokens/s is the best of the repeats (the box is shared; best-of filters out the neighbours; it also
leaves out vLLM's cold first call); the median is printed too. Time to first batch: start-up (HF: loading
the model; vLLM: the engine's constructor, vLLM import included) + the first workload call (HF's runs
after its thread probe, warm; vLLM's is its first call). Before each side the CPUs are probed for 3 s (bench_vs_trl.idle_probe): if
other processes use more than a quarter of them, the section says the ratio is not a result.
Takes 7-10 minutes on 2 cores: ~3 of HF (one process, then data-parallel), the rest the vLLM
engine processes and the pool.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
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


def workload(folder: Path, count: int) -> tuple[str, list[list[int]]]:
    """The tiny model built into `folder` over `count` questions, and their Harmony prompts (efforts in turn)."""
    from envs import harmony
    from rl.model import build_tiny_model

    questions = _questions(count)
    ckpt = str(build_tiny_model(yaml.safe_load(open("conf/model/tiny.yaml")), questions, folder))
    return ckpt, [harmony.render_prompt(q, harmony.EFFORTS[i % 3]) for i, q in enumerate(questions)]


def engine_config(threads: int, eager: bool):
    """The engine the benchmark measures: the rollout schema's defaults at `threads`, eager or compiled."""
    from rl.config import RolloutConfig

    return RolloutConfig(max_model_len=1024, kv_cache_gib=1, num_threads=threads, enforce_eager=eager)


def _best_and_median(fn, reps: int) -> tuple[float, float, float]:
    """(best, median, first) seconds of `reps` calls of `fn`."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), times[0]


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
    best, med, first = _best_and_median(hf_run, args.hf_reps)
    return {"threads": threads, "best": best, "median": med, "first": first, "probe_tokens": probe_tokens,
            "probes": probes}


def sync_times(target, state: dict, ckpt: str, reps: int) -> dict:
    """(best, median) seconds of `target`'s three weight syncs (a `RolloutEngine` or a `WorkerPool`: the same
    methods): the whole HF state dict, the RMSNorm gains alone (`TrainedWeights`, what the demo's steps after
    the first send) and `update_weights_from_path`."""
    from rl.vllm_weights import TrainedWeights, trained_units

    norms = TrainedWeights(trained_units(state, [k for k in state if k.endswith("norm.weight")]))
    return {"sync": _best_and_median(lambda: target.update_weights(state), reps)[:2],
            "trained": _best_and_median(lambda: target.update_weights(norms), reps)[:2],
            "from_path": _best_and_median(lambda: target.update_weights_from_path(ckpt), reps)[:2]}


def measure_vllm(ckpt: str, prompts: list[list[int]], n: int, max_tokens: int, reps: int, threads: int,
                 eager: bool = True) -> dict:
    """RolloutEngine throughput at `threads` (after a warm-up call), then weight-sync time; `eager` = False:
    `rollout.enforce_eager=false` (vLLM's torch.compile path). Run it in a process of its own
    (`vllm_subprocess`): the engine pins the thread count of its process."""
    from rl.engine import RolloutEngine
    from rl.model import load_policy

    cfg = engine_config(threads, eager)
    state = load_policy(ckpt)[0].state_dict()
    eng = RolloutEngine(ckpt, cfg, seed=0)
    try:
        def gen():
            out = eng.generate(prompts, n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, stop=False)
            assert sum(len(c.ids) for s in out for c in s) == len(prompts) * n * max_tokens

        best, med, first = _best_and_median(gen, reps)  # the first call is cold: best-of leaves it out
        return {"threads": torch.get_num_threads(), "eager": eager, "best": best, "median": med, "first": first,
                "start_s": eng.start_time_s, **sync_times(eng, state, ckpt, reps),
                "block_size": eng.llm.llm_engine.vllm_config.cache_config.block_size}
    finally:
        eng.shutdown()


def measure_pool(ckpt: str, prompts: list[list[int]], n: int, max_tokens: int, reps: int, workers: int,
                 per_call: int | None = None) -> dict:
    """The rollout workers as the pipeline runs them: `rl.workers.WorkerPool` of `workers` Ray actors at one
    thread each (local Ray), `rollout.groups_per_call=per_call` (None: the pool's default chunking), timed
    around `WorkerPool.generate` (the call path `rollout` uses: chunks to whichever worker is free, results
    back through Ray); then the pool's weight sync (ray.put + every worker loads). Run it in a process of
    its own (`vllm_subprocess`): Ray starts here and stops with it."""
    import dataclasses

    import ray

    from rl.cluster import init_ray
    from rl.config import ClusterConfig
    from rl.engine import CPU_BLOCK_SIZE
    from rl.model import load_policy
    from rl.workers import WorkerPool

    cfg = dataclasses.replace(engine_config(1, True), num_workers=workers, groups_per_call=per_call)
    state = load_policy(ckpt)[0].state_dict()
    t0 = time.perf_counter()
    init_ray(ClusterConfig(num_cpus=max(workers, os.cpu_count() or 1, 4)))  # room for every worker (1 CPU each)
    pool = WorkerPool(ckpt, cfg, seed=0)
    pool.health()  # every engine started
    start_s = time.perf_counter() - t0
    calls = iter(range(10 ** 6))
    try:
        def gen():
            out = pool.generate(prompts, n, temperature=1.0, seed=next(calls), max_tokens=max_tokens, stop=False)
            assert sum(len(c.ids) for s in out for c in s) == len(prompts) * n * max_tokens

        best, med, first = _best_and_median(gen, reps)
        return {"threads": 1, "workers": workers, "per_call": per_call, "eager": True, "best": best,
                "median": med, "first": first, "start_s": start_s, **sync_times(pool, state, ckpt, reps),
                "served": pool.served,
                "block_size": cfg.block_size or CPU_BLOCK_SIZE}
    finally:
        pool.close()
        ray.shutdown()


VLLM_CHILD_TIMEOUT_S = 3600  # one vLLM / pool measurement process (~1.5 min at the defaults)
HF_PROC_TIMEOUT_S = 1800  # one data-parallel HF process's load + warm-up, or one run: past this it is stuck


def _hf_child(ckpt: str, prompts: list[list[int]], n: int, max_tokens: int, reps: int, barrier, results) -> None:
    """One data-parallel HF process: one thread, its share of the prompts, `reps` runs each started at the
    barrier with the other processes (waiting at most HF_PROC_TIMEOUT_S). Puts ("ready", t) after load and
    warm-up, then ("run", rep, start, end) per run (time.monotonic, one clock for the box)."""
    torch.set_num_threads(1)
    from rl.model import load_policy

    model, vm = load_policy(ckpt)
    model.eval()
    hf_generate(model, vm, prompts[:1], 2, 8)  # warm-up
    results.put(("ready", time.monotonic()))
    for rep in range(reps):
        barrier.wait(timeout=HF_PROC_TIMEOUT_S)
        t0 = time.monotonic()
        got = hf_generate(model, vm, prompts, n, max_tokens)
        assert got == len(prompts) * n * max_tokens, f"HF sampled {got} tokens"
        results.put(("run", rep, t0, time.monotonic()))


def run_walls(spans: dict[int, list[tuple[float, float]]]) -> list[float]:
    """Each data-parallel run's time, from its first process's start to its last one's end.

    >>> run_walls({0: [(0.0, 3.0), (1.0, 5.0)], 1: [(10.0, 12.0), (10.5, 11.0)]})
    [5.0, 2.0]
    """
    return [max(b for _, b in spans[r]) - min(a for a, _ in spans[r]) for r in sorted(spans)]


def measure_hf_procs(ckpt: str, prompts: list[list[int]], args, procs: int) -> dict:
    """HF `generate` data-parallel: `procs` processes at one thread each, the prompts split evenly between
    them (what `accelerate` or torchrun would give HF on this many cores); a run's time is from the first
    process's start to the last one's end (`run_walls`). start_s: spawn to the last process ready (its
    interpreter, imports, load and warm-up). A process that dies or stalls gives {"error": ...} at once
    (the others are killed), never a hang."""
    import multiprocessing as mp
    import queue

    if not 1 <= procs <= len(prompts):
        return {"threads": 1, "procs": procs, "error": f"{procs} processes for {len(prompts)} prompts"}
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    t0 = time.monotonic()
    children = [ctx.Process(target=_hf_child, args=(ckpt, prompts[i::procs], args.n, args.max_tokens,
                                                    args.hf_reps, barrier, results)) for i in range(procs)]
    for c in children:
        c.start()
    ready, spans, error = [], {}, None
    last = time.monotonic()
    try:
        while len(ready) < procs or sum(map(len, spans.values())) < procs * args.hf_reps:
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                dead = [c.exitcode for c in children if c.exitcode not in (None, 0)]
                if dead or time.monotonic() - last > HF_PROC_TIMEOUT_S:
                    error = f"exit status {dead}" if dead else f"no progress in {HF_PROC_TIMEOUT_S} s"
                    break
                continue
            last = time.monotonic()
            if msg[0] == "ready":
                ready.append(msg[1])
            else:
                spans.setdefault(msg[1], []).append(msg[2:])
    finally:
        for c in children:  # on an error the rest are killed, not released: a killed waiter can wedge the barrier
            if error:
                c.kill()
            c.join(timeout=60 if not error else 5)
            if c.is_alive():
                c.kill()
    if error or any(c.exitcode for c in children):
        return {"threads": 1, "procs": procs, "error": error or f"exit status {[c.exitcode for c in children]}"}
    walls = run_walls(spans)
    return {"threads": 1, "procs": procs, "best": min(walls), "median": statistics.median(walls),
            "first": walls[0], "start_s": max(ready) - t0}


def vllm_subprocess(ckpt: str, prompts: list[list[int]], args, threads: int, out: Path, mode: str = "eager",
                    workers: int = 0) -> dict:
    """`measure_vllm` (or, `workers` > 0, `measure_pool` with that many workers) in a fresh interpreter
    (`--vllm-child`); its result, or {"error": ...}."""
    name = f"pool_{workers}" if workers else f"vllm_{threads}_{mode}"
    spec, result = out / f"{name}.json", out / f"{name}.result.json"
    call = {"ckpt": ckpt, "prompts": prompts, "n": args.n, "max_tokens": args.max_tokens, "reps": args.reps}
    if workers:  # --pool-groups-per-call, by default one call per worker
        call |= {"workers": workers, "per_call": args.pool_groups_per_call or math.ceil(len(prompts) / workers)}
    else:
        call |= {"threads": threads, "eager": mode == "eager"}
    spec.write_text(json.dumps({"pool": bool(workers), "call": call}))
    try:
        rc = subprocess.run([sys.executable, "-m", "bench.bench_rollout", "--vllm-child", str(spec),
                             "--result", str(result)], timeout=VLLM_CHILD_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        rc = f"timeout ({VLLM_CHILD_TIMEOUT_S} s)"
    if rc or not result.exists():
        return {"threads": threads, "eager": mode == "eager", "workers": workers, "error": f"exit status {rc}"}
    return json.loads(result.read_text())


def run(args) -> tuple[list[str], list[str]]:
    from rl.model import load_policy

    from bench.bench_vs_trl import box_state, idle_probe

    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    probes = []
    try:
        ckpt, prompts = workload(tmp / "tiny", args.prompts)
        t0 = time.perf_counter()
        model, vm = load_policy(ckpt)
        model.eval()
        load_s = time.perf_counter() - t0
        probes.append(idle_probe())
        hfs = [{**measure_hf(model, vm, prompts, args), "start_s": load_s}]
        for procs in args.hf_procs:
            probes.append(idle_probe())
            hfs.append(measure_hf_procs(ckpt, prompts, args, procs))
        runs = []
        for mode in args.vllm_modes:
            for threads in args.vllm_threads:
                probes.append(idle_probe())
                runs.append(vllm_subprocess(ckpt, prompts, args, threads, tmp, mode))
        for workers in args.pool_workers:
            probes.append(idle_probe())
            runs.append(vllm_subprocess(ckpt, prompts, args, 1, tmp, workers=workers))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = [r for r in runs if "error" not in r]
    if not ok:
        raise SystemExit(f"no vLLM run finished: {runs}")
    vl = min(ok, key=lambda r: r["best"])
    hf = min((h for h in hfs if "error" not in h), key=lambda r: r["best"])  # the fastest HF set-up is the baseline
    load, busy = box_state(probes)

    tokens = len(prompts) * args.n * args.max_tokens
    n_params = sum(p.numel() for p in model.parameters())
    hf1 = hfs[0]
    header = [
        f"Device: {_cpu()}; torch {torch.__version__}. {load}",
        f"Workload: tiny gpt-oss ({n_params / 1e6:.1f}M params, vocab {len(vm)} real rows), {len(prompts)} "
        f"Harmony prompts ({min(map(len, prompts))}-{max(map(len, prompts))} ids) x n={args.n}, exactly "
        f"{args.max_tokens} sampled tokens each = {tokens} tokens per run, temperature 1, top_p 1, fp32. "
        f"tokens/s from the best of {args.reps} vLLM / {args.hf_reps} HF runs (median in brackets).",
        f"HF thread probe ({hf1['probe_tokens']} tokens/sequence, tokens/s): "
        + ", ".join(f"{t} thread{'s' * (t > 1)}: {r:.0f}" for t, r in hf1["probes"].items())
        + f"; full HF run at {hf1['threads']}."
        + (" HF data-parallel: P processes at 1 thread each, the prompts split evenly, started together at a "
           "barrier; a run lasts from the first start to the last end." if args.hf_procs else ""),
        f"vLLM: `RolloutEngine` with the rollout schema's defaults (KV block {vl['block_size']} tokens), one fresh "
        "process per thread count and mode: eager (`rollout.enforce_eager=true`, the default) or compiled "
        "(`rollout.enforce_eager=false`: vLLM traces the model once and inductor compiles it; on CPU no CUDA graphs)."
        + (" WorkerPool: the pipeline's rollout workers (`rl.workers.WorkerPool`, local Ray, `rollout.num_workers=W "
           "rollout.num_threads=1`, eager), timed around `WorkerPool.generate` (chunks to whichever worker is free, "
           "`rollout.groups_per_call="
           + (f"{args.pool_groups_per_call}`" if args.pool_groups_per_call
              else "ceil(prompts / W)`: one call per worker, as every sequence runs exactly max-tokens")
           + "; samples through Ray); start = Ray + every engine."
           if args.pool_workers else ""),
        "The ratio is fastest vLLM set-up / fastest HF set-up.",
    ]
    ratio = hf["best"] / vl["best"]
    table = ["| engine | processes x threads | s / run | tokens/s | x best HF | first batch s (start + first run) |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = [(_name(h), h) for h in hfs] + [(_name(r), r) for r in runs]
    for name, r in rows:
        shape = f"{r.get('procs') or r.get('workers') or 1} x {r['threads']}"
        if "error" in r:
            table.append(f"| {name} | {shape} | failed: {r['error']} | | | |")
            continue
        rate = f"{tokens / r['best']:.0f} ({tokens / r['median']:.0f})"
        table.append(f"| {name} | {shape} | {r['best']:.2f} ({r['median']:.2f}) | {rate} "
                     f"| {hf['best'] / r['best']:.2f} | {r['start_s']:.1f} + {r['first']:.1f} |")
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    table += [
        "",
        f"{_name(vl)} / {_name(hf)}: **{ratio:.1f}x** (target >= "
        f"{TARGET_RATIO:.0f}x: {verdict})" + (": **busy box, not a result**." if busy else "."),
        "",
        f"| weight sync ({_name(vl)}) | s (median) | vs one rollout run |",
        "|---|---:|---:|",
    ]
    for name, (best, med) in (("update_weights(HF state dict), in memory", vl["sync"]),
                              ("update_weights(TrainedWeights: the RMSNorm gains the demo trains)", vl["trained"]),
                              ("update_weights_from_path (safetensors read + same)", vl["from_path"])):
        table.append(f"| {name} | {best:.3f} ({med:.3f}) | {100 * best / vl['best']:.2f}% |")
    return header, table


def _mode(run: dict) -> str:
    return "eager" if run.get("eager", True) else "compiled"


def _name(run: dict) -> str:
    """The set-up a result row measured.

    >>> _name({"threads": 2, "probes": {}}), _name({"threads": 1, "procs": 2}), _name({"threads": 1, "procs": 1})
    ('HF generate, 2 threads', 'HF generate, 2 processes (data-parallel)', 'HF generate, 1 thread (own process)')
    >>> _name({"threads": 2, "eager": False}), _name({"threads": 1, "workers": 2, "eager": True})
    ('vLLM RolloutEngine, compiled, 2 threads', 'WorkerPool, 2 workers (Ray)')
    """
    if "probes" in run:
        return f"HF generate, {run['threads']} thread{'s' * (run['threads'] > 1)}"
    if run.get("procs"):
        return (f"HF generate, {run['procs']} processes (data-parallel)" if run["procs"] > 1
                else "HF generate, 1 thread (own process)")
    if run.get("workers"):
        return f"WorkerPool, {run['workers']} workers (Ray)"
    return f"vLLM RolloutEngine, {_mode(run)}, {run['threads']} thread{'s' * (run['threads'] > 1)}"


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


def _ints(text: str) -> list[int]:
    """A comma-separated list of counts; '' = none.

    >>> _ints("1,2"), _ints("")
    ([1, 2], [])
    """
    return [int(t) for t in text.split(",") if t.strip()]


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
    parser.add_argument("--vllm-threads", type=lambda x: [int(t) for t in x.split(",")], default=[1, 2],
                        help="torch thread counts vLLM runs at, each in its own process (the faster sets the ratio)")
    parser.add_argument("--vllm-modes", type=lambda x: [m.strip() for m in x.split(",")], default=["eager", "compiled"],
                        help="eager (rollout.enforce_eager=true) and/or compiled (false: torch.compile), each per thread count")
    parser.add_argument("--pool-workers", type=_ints, default=[2],
                        help="also the pipeline's WorkerPool with this many 1-thread workers (Ray), per count; "
                             "'' for none")
    parser.add_argument("--pool-groups-per-call", type=int, default=None,
                        help="rollout.groups_per_call of the pool runs (default: one call per worker, the prompts split "
                             "evenly; every sequence runs exactly --max-tokens, so nothing is left to balance)")
    parser.add_argument("--hf-procs", type=_ints, default=[2],
                        help="also HF generate data-parallel in this many 1-thread processes, per count; '' for none")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    # internal: one vLLM measurement in this process
    parser.add_argument("--vllm-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vllm_child:
        spec = json.loads(args.vllm_child.read_text())
        args.result.write_text(json.dumps((measure_pool if spec["pool"] else measure_vllm)(**spec["call"])))
        return
    if min(args.reps, args.hf_reps) < 1:
        parser.error("--reps and --hf-reps must be >= 1")
    per_call = [] if args.pool_groups_per_call is None else [args.pool_groups_per_call]
    if min(args.pool_workers + args.hf_procs + per_call, default=1) < 1:
        parser.error("--pool-workers, --hf-procs and --pool-groups-per-call must be >= 1")
    if max(args.pool_workers + args.hf_procs, default=1) > args.prompts:
        parser.error(f"--pool-workers and --hf-procs must be <= --prompts ({args.prompts}): each needs a prompt")
    if not args.vllm_modes or set(args.vllm_modes) - {"eager", "compiled"}:
        parser.error(f"--vllm-modes: eager and/or compiled, got {args.vllm_modes}")
    header, table = run(args)
    print("\n".join([SECTION, "", *header, "", *table]))
    if args.write:
        command = results.command("bench.bench_rollout", argv)
        write_section(args.write, command, header, table)


if __name__ == "__main__":
    main()
