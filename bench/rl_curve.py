"""A GRPO learning curve on one effort, in one process: which parameters can RL move on this policy?

Run:  .venv/bin/python -m bench.rl_curve --policy outputs/x/sft [--effort low] [--steps 40] [--lr 1.5e-2]
          [--lr-scale '{"norm\\.weight$": 1.0, ".": 0.0}'] [--tasks 16] [--group 8] [--mini-batches 1]
          [--eval-every 10]

Each step samples `--tasks` fresh training tasks x `--group` completions at temperature 1 (vLLM, in
process), scores them with math-verify, builds GRPO advantages and takes one learner step (Adam, the
`learner.lr_scale` parameter groups of the pipeline), then pushes the weights into the engine. Every
`--eval-every` steps it measures T=1 accuracy on 150 held-out tasks x 4 samples with a fixed sampling
seed. Correctness is the only reward and a single effort is trained, so the curve isolates what the
optimizer and the trainable subset do; `python -m rl.pipeline` is the full thing (three efforts, the
effort-length reward, Ray).
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from bench.rl_step_probe import grpo_batch, sample_and_score
from envs.math_tasks import MathEnv
from rl.learner import Learner
from rl.model import VocabMap
from rl.config import AlgoConfig, LearnerConfig, LrScale, RolloutConfig
from rl.engine import RolloutEngine


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="HF checkpoint folder (e.g. a pipeline's sft/)")
    ap.add_argument("--effort", default="low", choices=["low", "medium", "high"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tasks", type=int, default=16, help="training tasks per step")
    ap.add_argument("--group", type=int, default=8, help="samples per task (GRPO group)")
    ap.add_argument("--lr", type=float, default=1.5e-2)
    ap.add_argument("--betas", default="0.9,0.999")
    ap.add_argument("--warmup", type=int, default=0, help="learner.warmup_steps (linear lr warm-up)")
    ap.add_argument("--lr-scale", default='{"norm\\\\.weight$": 1.0, ".": 0.0}',
                    help="JSON {regex: multiplier} as learner.lr_scale ('{}' trains every weight)")
    ap.add_argument("--mini-batches", type=int, default=1,
                    help="algo.mini_batches: optimizer steps per rollout batch (old log-probs = the engine's)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    env = MathEnv(families=["digit_sum"], difficulty=1)
    train, test = env.tasks("train", 1400), env.tasks("test", 150)
    engine = RolloutEngine(args.policy, RolloutConfig(max_model_len=256, max_tokens=96, num_threads=args.threads),
                           seed=0)

    def evaluate() -> float:
        return float(sample_and_score(engine, test, args.effort, 4, seed=12345)[1].mean())

    rules = [LrScale(pattern, scale) for pattern, scale in json.loads(args.lr_scale).items()]
    cfg = LearnerConfig(lr=args.lr, betas=[float(b) for b in args.betas.split(",")], micro_batch_size=128,
                        grad_clip=1.0, num_threads=args.threads, lr_scale=rules, warmup_steps=args.warmup)
    algo = AlgoConfig(mini_batches=args.mini_batches, old_logprobs="behavior")
    learner = Learner(args.policy, cfg, algo, seed=0)
    vmap = VocabMap.load(args.policy)
    n_train = sum(p.numel() for p in learner.trainable)
    curve = [(0, evaluate())]
    print(f"policy {args.policy}, effort {args.effort}, lr {args.lr:g} (warm-up {args.warmup}), "
          f"{args.mini_batches} optimizer step(s) per batch, lr_scale {args.lr_scale}: "
          f"{n_train} trainable weights; held-out T=1 accuracy at step 0: {curve[0][1]:.3f}", flush=True)
    rng, t0 = random.Random(0), time.perf_counter()
    for step in range(1, args.steps + 1):
        tasks = rng.sample(train, args.tasks)
        samples, rewards = sample_and_score(engine, tasks, args.effort, args.group, seed=step)
        m = learner.train_step(grpo_batch(samples, rewards, vmap))
        engine.update_weights(learner.state_for_sync())
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate()))
            print(f"step {step}: batch accuracy {rewards.mean():.3f}, entropy {m['entropy']:.3f}, "
                  f"held-out {curve[-1][1]:.3f} ({curve[-1][1] - curve[0][1]:+.3f}), "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    print("| step | held-out T=1 accuracy |\n|---:|---:|\n" + "\n".join(f"| {s} | {a:.3f} |" for s, a in curve))
    engine.shutdown()


if __name__ == "__main__":
    main()
