"""How a GRPO step's cost grows with the work: group size, max new tokens and tasks per step, 4 points
each; the exponent of each; the learner's MFU against a matmul peak measured in the same run; and weight
sync's share of every step.

Run:  .venv/bin/python -m bench.bench_scaling [--policy outputs/tiny-<date>/sft] [--steps 3]
          [--group-sizes 2,4,8,16] [--max-new-tokens 24,48,96,192] [--tasks-per-step 3,6,12,24]
          [--hold 12,8,96] [--write bench/RESULTS.md]
Smoke (about a minute a point, proves the pipeline end to end; not a result):
      .venv/bin/python -m bench.bench_scaling --steps 2 --group-sizes 2,3 --max-new-tokens 8,16
          --tasks-per-step 1,2 --hold 1,2,8

Workload: the demo's RL stage, exactly as bench/bench_vs_trl.py's "ours" side runs it (`rl.train.train`
on Ray: one vLLM rollout worker, the learner actor, weights synced in place every step; the sizes as
Hydra overrides of `experiment=tiny`, bench/grpo_workload.py) from the demo's SFT checkpoint. One axis
moves at a time; the others stay at `--hold` (tasks per step, group size, max new tokens; default the
demo's step, 12 x 8 x 96). Each distinct point runs in its own subprocess (fresh Ray, engine and learner)
for `--steps` steps; its means skip step 1 (start-up). Max new tokens is a cap: the policy stops at
Harmony's `<|return|>`, so the table gives the tokens it did write.

Phases (rl/train.py's timers): rollout (generation), reward, learner (the actor's `train_step`, the
batch's trip through Ray included), sync (`update_weights` into the engine), other (advantages, collate).
Exponent: the least-squares slope of log(seconds) on log(axis value) over the axis's points.

MFU: model FLOPs of the learner's step / learner seconds / matmul peak. The FLOPs are counted from the
policy's config (`train_flops`): per token, the matmuls of attention projections, router, the top-k
experts, attention scores and values (causal; sliding-window layers see at most the window) and the
LM head on completion tokens only (the learner scores no prompt position); backward = activation
gradients of every matmul (x1 for weight matmuls, x2 for scores/values) plus weight gradients of the
matrices that train (the demo trains RMSNorm gains only: none). Rows use the step's mean prompt and
completion lengths; elementwise work, norms and softmax are not counted. The peak is the best of
square `torch.mm` runs at the learner's thread count and dtype, measured before and after the points.
The points run with `learner.share_prompts=false`: the count assumes every row runs its own prompt
(shared prompts do less work for the same step; bench_vs_trl measures that gain).

CPU load is probed for 3 s before each point (bench_vs_trl.idle_probe): if other processes use more
than a quarter of the CPUs the section says its timings are not valid.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

AXES = ("tasks_per_step", "group_size", "max_new_tokens")  # `--hold` order
SECTION = "## How a GRPO step's cost grows (and weight sync's share)"
SYNC_BAR = 0.03  # the project bar: weight sync <= 3% of step time at every point
PHASE_KEYS = (("rollout", "generation"), ("reward", "reward"), ("learner", "update"), ("sync", "sync"),
              ("other", "other"))  # (column, grpo_workload.PHASES key)
WEIGHT_PARTS = ("attn", "router", "experts", "head")  # weight matmuls `train_flops` counts
MIN_FIT_S = 0.01  # a phase faster than this at some point of an axis gets no exponent (timer noise)


# ---- pure parts (tests/bench/test_bench_scaling.py) --------------------------------------------------
def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope b of log y = a + b log x: cost grows as x^b.

    >>> round(fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]), 6)
    2.0
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"fit_exponent needs two or more (x, y) pairs, got {len(xs)} x and {len(ys)} y")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError(f"fit_exponent needs positive values (log-log fit): {list(xs)=} {list(ys)=}")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0:
        raise ValueError(f"fit_exponent needs two or more distinct x values, got {list(xs)}")
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx


def mean_context(length: int, window: int | None) -> float:
    """Mean number of positions a token attends to over a causal row of `length` tokens (a sliding-window
    layer: at most `window`).

    >>> mean_context(4, None), mean_context(4, 2)
    (2.5, 1.75)
    """
    if length <= 0:
        return 0.0
    w = length if window is None else min(window, length)
    # positions 1..w attend to t each, the rest to w
    return (w * (w + 1) / 2 + (length - w) * w) / length


@dataclass
class StepFlops:
    """Matmul FLOPs of one learner pass over a step's rows, forward and training (forward + backward)."""

    forward: float
    train: float


def train_flops(config: Mapping, n_vocab: int, rows: int, prompt_len: float, completion_len: float,
                trained: frozenset[str] = frozenset()) -> StepFlops:
    """Model FLOPs of forward and forward + backward over `rows` sequences of `prompt_len` +
    `completion_len` tokens (means), for an HF gpt-oss `config` (config.json keys); the LM head runs on
    completion tokens over `n_vocab` rows. `trained`: the weight matmuls whose weights get gradients, of
    WEIGHT_PARTS. 2 FLOPs a multiply-add.

    >>> cfg = {"hidden_size": 2, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2,
    ...        "num_local_experts": 1, "num_experts_per_tok": 1, "intermediate_size": 1,
    ...        "layer_types": ["full_attention"], "sliding_window": None}
    >>> f = train_flops(cfg, n_vocab=3, rows=1, prompt_len=0, completion_len=1)
    >>> f.forward, f.train   # qkv 24 + o 8 + router 4 + expert 12 + head 12 + scores/values 8; backward 60 + 2 x 8
    (68.0, 144.0)
    """
    bad = set(trained) - set(WEIGHT_PARTS)
    if bad:
        raise ValueError(f"train_flops: unknown parts {sorted(bad)}; choose from {WEIGHT_PARTS}")
    h, nq, nkv, d = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    e, k, inter = config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]
    length = prompt_len + completion_len
    tokens, scored = rows * length, rows * completion_len
    per_layer = {"attn": 2 * h * (nq + 2 * nkv) * d + 2 * nq * d * h, "router": 2 * h * e,
                 "experts": k * (2 * h * 2 * inter + 2 * inter * h)}
    weights = {part: tokens * flops * len(config["layer_types"]) for part, flops in per_layer.items()}
    weights["head"] = scored * 2 * h * n_vocab
    core = 0.0  # attention scores (Q K^T) and values (P V): 2 matmuls of nq x d x context each
    for kind in config["layer_types"]:
        window = config.get("sliding_window") if kind == "sliding_attention" else None
        core += tokens * 2 * 2 * nq * d * mean_context(round(length), window)
    forward = sum(weights.values()) + core
    backward = sum(weights.values()) + 2 * core + sum(weights[p] for p in trained)
    return StepFlops(forward=float(forward), train=float(forward + backward))


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Achieved FLOP/s as a fraction of the peak.

    >>> mfu(4e9, 2.0, 1e10)
    0.2
    """
    if seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"mfu needs positive seconds and peak, got {seconds=} {peak_flops_per_s=}")
    return flops / seconds / peak_flops_per_s


def plan(hold: Mapping[str, int], grid: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """The distinct points to run: each axis of `grid` moved over its values with the others at `hold`
    (the held point, shared by the axes, runs once), in axis order.

    >>> plan({"a": 1, "b": 5}, {"a": [1, 2], "b": [5, 6]})
    [{'a': 1, 'b': 5}, {'a': 2, 'b': 5}, {'a': 1, 'b': 6}]
    """
    points: list[dict[str, int]] = []
    for axis, values in grid.items():
        for v in values:
            p = {**hold, axis: v}
            if p not in points:
                points.append(p)
    return points


def trained_parts(model, lr_scale) -> frozenset[str]:
    """Which of WEIGHT_PARTS have a trainable matrix once `learner.lr_scale` is applied (`param_groups`)."""
    from rl.learner import param_groups

    param_groups(model, lr_scale)
    parts = {"self_attn.q_proj.weight": "attn", "self_attn.k_proj.weight": "attn", "self_attn.v_proj.weight": "attn",
             "self_attn.o_proj.weight": "attn", "mlp.router.weight": "router", "experts.gate_up_proj": "experts",
             "experts.down_proj": "experts", "lm_head.weight": "head"}
    return frozenset(part for name, p in model.named_parameters() if p.requires_grad
                     for suffix, part in parts.items() if name.endswith(suffix))


# ---- measuring ----------------------------------------------------------------------------------------
def matmul_peak(threads: int, dtype: str, n: int = 1024, reps: int = 8) -> float:
    """Best FLOP/s of an n x n x n `torch.mm` at `threads` threads (after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def prompt_lengths(overrides: list[str]) -> list[float]:
    """Mean prompt ids per sample of every step, from the tasks rl/train.py draws (`step_tasks`)."""
    from bench.grpo_workload import step_tasks
    from rl import tools
    from rl.config import compose

    cfg = compose(overrides)
    return [sum(len(tools.task_prompt(t, e, cfg.rollout.tools.python)) for t in tasks for e in cfg.env.efforts)
            / (len(tasks) * len(cfg.env.efforts)) for tasks in step_tasks(cfg)]


def run_point(point: dict[str, int], policy: str, steps: int, out: Path, timeout_s: float):
    """One point: `rl.train.train` in a subprocess (bench_vs_trl's "ours" side); its SideResult and the
    overrides it ran with."""
    from bench.bench_vs_trl import launch
    from bench.grpo_workload import overrides

    name = "_".join(f"{point[a]}" for a in AXES)  # tasks_group_tokens
    folder = out / f"point_{name}"
    shutil.rmtree(folder, ignore_errors=True)  # metrics.jsonl appends; checkpoints would be resumed
    folder.mkdir(parents=True)
    ov = overrides(policy, folder / "run", steps, point["tasks_per_step"], point["group_size"], point["max_new_tokens"])
    ov.append("learner.share_prompts=false")  # MFU counts every row's prompt: the learner must run them all
    spec = folder / "ours.spec.json"
    spec.write_text(json.dumps({"overrides": ov}))
    return launch("ours", spec, folder, timeout_s), ov


@dataclass
class Point:
    """One measured point: its sizes and what its timed steps cost (means)."""

    sizes: dict[str, int]
    seconds: dict[str, float]  # "step" and each PHASE_KEYS column
    samples: int  # per step
    completion_tokens: float  # mean per sample
    prompt_tokens: float  # mean per sample
    learner_flops: float  # per step (train_flops x ppo_epochs)
    error: str | None = None

    @property
    def sync_share(self) -> float:
        return self.seconds["sync"] / self.seconds["step"]


def measure(point: dict[str, int], result, ov: list[str], config: Mapping, n_vocab: int,
            trained: frozenset[str]) -> Point:
    """A `Point` from one run's SideResult (bench_vs_trl's step records, first step skipped)."""
    from bench.bench_vs_trl import summary, timed_steps
    from envs.types import EFFORTS
    from rl.config import compose

    samples = point["tasks_per_step"] * len(EFFORTS) * point["group_size"]
    if result.error or not result.steps:
        return Point(point, {}, samples, 0.0, 0.0, 0.0, error=result.error or "no steps recorded")
    s = summary(result)
    steps = timed_steps(result)
    seconds = {"step": s["s_per_step"], **{col: s[key] for col, key in PHASE_KEYS}}
    completion = sum(r.generated_tokens for r in steps) / (len(steps) * samples)
    prompts = prompt_lengths(ov)
    prompt = sum(prompts[r.step - 1] for r in steps) / len(steps)
    flops = train_flops(config, n_vocab, samples, prompt, completion, trained).train * compose(ov).algo.ppo_epochs
    return Point(point, seconds, samples, completion, prompt, flops)


def exponents(points: Sequence[Point], axis: str, hold: Mapping[str, int]) -> dict[str, float | None]:
    """Fitted exponent of step time and of each phase along `axis` (the points with the others held);
    None where a phase took under MIN_FIT_S at some point or fewer than two points ran."""
    on_axis = sorted((p for p in points if not p.error and all(p.sizes[a] == hold[a] for a in AXES if a != axis)),
                     key=lambda p: p.sizes[axis])
    out: dict[str, float | None] = {}
    for col in ("step", *(c for c, _ in PHASE_KEYS)):
        ys = [p.seconds[col] for p in on_axis]
        ok = len(on_axis) >= 2 and min(ys, default=0) >= MIN_FIT_S and len({p.sizes[axis] for p in on_axis}) >= 2
        out[col] = fit_exponent([p.sizes[axis] for p in on_axis], ys) if ok else None
    return out


def report(points: list[Point], grid: Mapping[str, Sequence[int]], hold: Mapping[str, int], peak: float,
           peak_note: str) -> list[str]:
    """The per-point table (per axis), the exponents, the sync bar, the MFU line."""
    cols = [c for c, _ in PHASE_KEYS]
    lines = []
    for axis, values in grid.items():
        lines += ["", f"Moving `{axis}` ({', '.join(f'{a}={hold[a]}' for a in AXES if a != axis)} held):", "",
                  f"| {axis} | samples | tokens / sample (prompt + completion) | s / step | "
                  + " | ".join(cols) + " | sync share | learner GFLOP/s | MFU |", "|" + "---:|" * (7 + len(cols))]
        for v in values:
            p = next(p for p in points if p.sizes == {**hold, axis: v})
            if p.error:
                lines.append(f"| {v} | {p.samples} | failed: {p.error} |" + " |" * (4 + len(cols)))
                continue
            gflops = p.learner_flops / p.seconds["learner"] / 1e9
            lines.append(f"| {v} | {p.samples} | {p.prompt_tokens:.0f} + {p.completion_tokens:.1f} | "
                         f"{p.seconds['step']:.2f} | " + " | ".join(f"{p.seconds[c]:.2f}" for c in cols)
                         + f" | {100 * p.sync_share:.2f}% | {gflops:.2f} | {100 * mfu(p.learner_flops, p.seconds['learner'], peak):.1f}% |")
    fmt = lambda b: "n/a" if b is None else f"{b:.2f}"  # noqa: E731
    lines += ["", "Fitted exponents (seconds ~ value^b, log-log least squares over the points above):", "",
              "| axis | step | " + " | ".join(cols) + " |", "|---|" + "---:|" * (1 + len(cols))]
    for axis in grid:
        ex = exponents(points, axis, hold)
        lines.append(f"| {axis} | " + " | ".join(fmt(ex[c]) for c in ("step", *cols)) + " |")
    ran = [p for p in points if not p.error]
    worst = max(ran, key=lambda p: p.sync_share, default=None)
    if worst is not None:
        verdict = "met" if worst.sync_share <= SYNC_BAR else "NOT met"
        lines += ["", f"Weight sync share of step time: at most **{100 * worst.sync_share:.2f}%** (at {worst.sizes}; "
                      f"target <= {100 * SYNC_BAR:.0f}% at every point: {verdict})."]
        best = max(ran, key=lambda p: p.learner_flops / p.seconds["learner"])
        lines += [f"Learner MFU: {100 * min(mfu(p.learner_flops, p.seconds['learner'], peak) for p in ran):.1f}% - "
                  f"{100 * mfu(best.learner_flops, best.seconds['learner'], peak):.1f}% of the matmul peak "
                  f"({peak / 1e9:.1f} GFLOP/s, {peak_note})."]
    return lines


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    from bench.bench_vs_trl import DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=None, help="SFT checkpoint (default: the newest outputs/tiny-*/sft)")
    parser.add_argument("--steps", type=int, default=3, help="steps per point (the first is not timed)")
    parser.add_argument("--tasks-per-step", type=ints, default=[3, 6, 12, 24])
    parser.add_argument("--group-sizes", type=ints, default=[2, 4, 8, 16])
    parser.add_argument("--max-new-tokens", type=ints, default=[24, 48, 96, 192])
    parser.add_argument("--hold", type=ints, default=[DEFAULTS[a] for a in AXES],
                        help=f"held values of {', '.join(AXES)} (default: the demo's step)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_scaling"), help="run folders and logs")
    parser.add_argument("--point-timeout", type=float, default=3600, help="seconds one point may run")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    if len(args.hold) != len(AXES):
        parser.error(f"--hold takes {len(AXES)} values ({', '.join(AXES)}), got {args.hold}")
    if min(args.hold + args.tasks_per_step + args.group_sizes + args.max_new_tokens) < 1 or args.steps < 1:
        parser.error("sizes and --steps must be >= 1")
    hold = dict(zip(AXES, args.hold))
    grid = {"group_size": args.group_sizes, "max_new_tokens": args.max_new_tokens, "tasks_per_step": args.tasks_per_step}
    body = run(args, hold, grid)
    print("\n".join([SECTION, "", *body]))
    if args.write:
        from bench import results

        command = results.command("bench.bench_scaling", argv)
        today = datetime.date.today().isoformat()
        results.write_section(args.write, SECTION, ["", f"Command: `{command}` ({today})", "", *body, ""])


def run(args, hold: dict[str, int], grid: dict[str, list[int]]) -> list[str]:
    """Every point, then the section's lines."""
    import torch

    from bench.bench_vs_trl import DEFAULTS, box_state, idle_probe

    from bench.bench_rollout import _cpu
    from bench.grpo_workload import require_policy, default_policy
    from rl.config import compose
    from rl.model import VocabMap, load_policy

    policy = require_policy(args.policy or default_policy())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose(["experiment=tiny", f"model.path={policy}"])
    model, _ = load_policy(policy)
    trained = trained_parts(model, cfg.learner.lr_scale)
    config = json.loads(Path(policy, "config.json").read_text())
    n_vocab = len(VocabMap.load(policy))
    peaks = [matmul_peak(cfg.learner.num_threads, cfg.learner.dtype)]
    points, probes = [], []
    for point in plan(hold, grid):
        probes.append(idle_probe())
        result, ov = run_point(point, policy, args.steps, out, args.point_timeout)
        points.append(measure(point, result, ov, config, n_vocab, trained))
    peaks.append(matmul_peak(cfg.learner.num_threads, cfg.learner.dtype))
    said, busy = box_state(probes)
    smoke = args.steps < 3 or hold != {a: DEFAULTS[a] for a in AXES}
    header = [f"Device: {_cpu()}; torch {torch.__version__}. {said}",
              f"Workload: `experiment=tiny` from `{policy}` (bench/bench_scaling.py): `rl.train.train` on Ray, one "
              f"vLLM worker at {cfg.rollout.num_threads} thread(s), the learner actor at {cfg.learner.num_threads}; "
              f"{args.steps} steps a point, means over steps 2-{args.steps}; held: "
              + ", ".join(f"{a}={v}" for a, v in hold.items()) + f". Learner trains: "
              f"{', '.join(sorted(trained)) or 'no weight matrix (e.g. the demo: RMSNorm gains only)'}; {cfg.algo.mini_batches} "
              f"optimizer steps per batch, {cfg.algo.ppo_epochs} pass(es)."]
    if smoke:
        header += ["", "**Smoke size, not the benchmark result.** Run on an idle box: "
                       "`.venv/bin/python -m bench.bench_scaling --write bench/RESULTS.md`."]
    if busy:
        header += ["", "**The box was busy: these timings are not valid.**"]
    note = (f"n=1024 fp32 torch.mm at {cfg.learner.num_threads} threads, best of the runs before and after the "
            f"points: {', '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s")
    return header + report(points, grid, hold, max(peaks), note)


if __name__ == "__main__":
    main()
