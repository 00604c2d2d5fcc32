"""One SFT step on the demo's workload: TRL's own LM head against `sft.loss_head` trl / assistant.

Run:  .venv/bin/python -m bench.bench_sft [--rounds 4] [--steps 12] [--check-steps 50] [--write bench/RESULTS.md]

Workload: `experiment=tiny` (the tiny gpt-oss built as `make demo` builds it; 1400 tasks x 3 efforts,
batch 16, lr 2e-3, 2 threads, our MoE/attention kernels), trained by `rl.sft.sft_trainer` exactly as
`run_sft` does. Variants (rl/sft.py module docstring):
  - TRL head: SFTTrainer's fused head (log-probs, entropy and top-1 on every position on CPU), what
    ran before;
  - loss_head=trl (default): TRL's kernel for the log-probs only, metrics without gradient on the
    assistant tokens;
  - loss_head=assistant (opt-in): our chunked kernel on the assistant tokens only.
Speed: `--rounds` rounds, each running every variant for `--steps` steps in turn (interleaved, so load
from other processes on the box falls on all of them); a step is the wall time between consecutive
step ends (data, forward, backward, clip, Adam, logging), the first 2 of each run skipped as warm-up.
Reported: min / median seconds per step and the per-round ratio of medians against TRL's head.
Trajectory: `--check-steps` steps of each variant from the same weights and seed; the per-step loss
against TRL's head (max abs difference) and whether the final weights are bit-identical.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import results

SECTION = "## SFT step (TRL's fused head vs sft.loss_head)"
VARIANTS = {"TRL head": None, "loss_head=trl": "trl", "loss_head=assistant": "assistant"}
WARMUP = 2


def workload(tmp: Path):
    """(model path, rows, SFTConfig) of the demo's SFT stage."""
    from envs.math_tasks import solution
    from rl.config import compose
    from rl.data import make_env
    from rl.model import VocabMap
    from rl.pipeline import build_model, sft_seed
    from rl.sft import sft_examples

    cfg = compose(["experiment=tiny", f"run_dir={tmp / 'run'}"])
    model = build_model(cfg, tmp / "model")
    tasks = make_env(cfg.env, cfg.seed).tasks("train", cfg.sft.tasks, seed=sft_seed(cfg.seed))
    rows = sft_examples(tasks, solution, VocabMap.load(model), cfg.env.efforts,
                        final_slip_rate=cfg.sft.final_slip_rate, seed=cfg.seed)
    return model, rows, cfg.sft


def train(model, rows, cfg, head: str | None, steps: int, tmp: Path):
    """Train `steps` steps with `head` (None = TRL's own). -> (step seconds, losses per step, final weights)."""
    import dataclasses

    from transformers import TrainerCallback

    from rl.sft import install_lm_head, sft_trainer

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    cfg = dataclasses.replace(cfg, steps=steps, logging_steps=1)
    trainer, _ = sft_trainer(model, tmp / "out", rows, cfg, seed=0, callbacks=[StepClock()])
    if head is not None:
        install_lm_head(trainer.model, head)
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return [b - a for a, b in zip(ends, ends[1:])][WARMUP - 1:], losses, weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="steps per variant per round")
    parser.add_argument("--check-steps", type=int, default=50, help="steps of the trajectory check (0: skip)")
    parser.add_argument("--write", type=Path, default=None, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    args.command = results.command("bench.bench_sft", argv)
    from rl.metrics import quiet_progress_bars

    with tempfile.TemporaryDirectory() as tmp, quiet_progress_bars():
        tmp = Path(tmp)
        model, rows, cfg = workload(tmp)
        torch.set_num_threads(cfg.num_threads)
        times = {name: [] for name in VARIANTS}  # per round: the step times of that round's run
        for r in range(args.rounds):
            for name, head in VARIANTS.items():
                times[name].append(train(model, rows, cfg, head, args.steps, tmp)[0])
                print(f"round {r}  {name:20s} median {statistics.median(times[name][-1]):.3f} s/step", flush=True)
        check = {name: train(model, rows, cfg, head, args.check_steps, tmp)[1:] for name, head in VARIANTS.items()
                 } if args.check_steps else {}
    lines = section(times, check, cfg, args, len(rows))
    print("\n".join(lines))
    if args.write:
        results.write_section(args.write, lines[0], lines[1:])


def section(times, check, cfg, args, n_rows: int) -> list[str]:
    base = "TRL head"
    lines = [SECTION, "",
             f"`{args.command}`: the demo's SFT workload "
             f"({n_rows} rows, batch {cfg.batch_size}, {cfg.num_threads} threads, kernels={cfg.kernels}), "
             f"{args.rounds} interleaved rounds x {args.steps} steps per variant (first {WARMUP} of each run "
             "skipped), wall seconds per step; speed-up = TRL head's median / the variant's, per round.", "",
             "| variant | s/step min | s/step median | speed-up min | speed-up median |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        flat = [t for run in times[name] for t in run]
        ratios = [statistics.median(b) / statistics.median(v) for b, v in zip(times[base], times[name])]
        lines.append(f"| {name} | {min(flat):.3f} | {statistics.median(flat):.3f} | {min(ratios):.2f}x | "
                     f"{statistics.median(ratios):.2f}x |")
    if check:
        lines += ["", f"Trajectory over {args.check_steps} steps from the same weights and seed, against TRL head:", ""]
        base_losses, base_weights = check[base]
        for name in list(VARIANTS)[1:]:
            losses, weights = check[name]
            diff = max(abs(a - b) for a, b in zip(base_losses, losses))
            same = all(torch.equal(base_weights[k], weights[k]) for k in base_weights)
            wdiff = max(float((base_weights[k] - weights[k]).abs().max()) for k in base_weights)
            lines.append(f"- {name}: max |loss difference| {diff:.3g} over {len(losses)} steps (last loss "
                         f"{losses[-1]:.4f} vs {base_losses[-1]:.4f}); final weights "
                         f"{'bit-identical' if same else f'differ by up to {wdiff:.3g}'}.")
    return lines


if __name__ == "__main__":
    main()
