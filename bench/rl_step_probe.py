"""One GRPO step, many step sizes: does the update raise the expected reward on the tasks it trained on?

Run:  .venv/bin/python -m bench.rl_step_probe --policy outputs/x/sft [--effort low] [--tasks 32]
          [--train-samples 16] [--eval-samples 64] [--adam-lrs 3e-5,1e-4,3e-4] [--sgd-lrs 0.03,0.1]

A diagnostic for "RL does not learn": it samples `--train-samples` completions per task at temperature 1
(vLLM, in process), scores them (math-verify), builds GRPO advantages and takes ONE learner step from the
same starting weights per optimizer and learning rate, then re-estimates accuracy on the same tasks with
`--eval-samples` fresh samples per task (same sampling seed before and after, so the comparison uses
common random numbers). A correct policy gradient raises the expected reward for small enough steps; the
largest step that still does so, and by how much, says how much one rollout batch can teach this policy.
Grad clipping is off so the step size is the learning rate's alone.
"""
from __future__ import annotations

import argparse

import torch

from envs import harmony
from envs.math_tasks import MathEnv
from envs.types import Sample
from rewards.math_verify_reward import MathReward
from rl.algorithms import grpo_advantages
from rl.batch import TrainBatch, collate
from rl.learner import Learner
from rl.model import VocabMap
from rl.workers import to_sample
from rl.config import AlgoConfig, LearnerConfig, RolloutConfig
from rl.engine import RolloutEngine


def sample_and_score(engine: RolloutEngine, tasks, effort: str, n: int, seed: int,
                     max_tokens: int = 96) -> tuple[list[Sample], torch.Tensor]:
    """n samples per task at temperature 1, scored by the "math" reward plugin: (samples, (len*n,) scores)."""
    prompts = [harmony.render_prompt(t.question, effort, t.developer) for t in tasks]
    comps = engine.generate(prompts, n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=seed)
    samples = [to_sample(t, effort, p, c) for t, p, cs in zip(tasks, prompts, comps) for c in cs]
    return samples, torch.tensor([r.score for r in MathReward().score_batch(samples)])


def grpo_batch(samples: list[Sample], rewards: torch.Tensor, vmap: VocabMap) -> TrainBatch:
    """The learner's batch with GRPO advantages over (task, effort) groups (all completion tokens trained)."""
    return collate(samples, grpo_advantages(rewards, [s.group_key for s in samples]), vmap)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="HF checkpoint folder (e.g. a pipeline's sft/)")
    ap.add_argument("--effort", default="low", choices=["low", "medium", "high"])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--train-samples", type=int, default=16, help="samples per task in the training batch")
    ap.add_argument("--eval-samples", type=int, default=64, help="samples per task for each accuracy estimate")
    ap.add_argument("--adam-lrs", default="3e-5,1e-4,3e-4")
    ap.add_argument("--sgd-lrs", default="0.03,0.1")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tasks = MathEnv(families=["digit_sum"], difficulty=1).tasks("train", args.tasks, seed=7)
    engine = RolloutEngine(args.policy, RolloutConfig(max_model_len=256, max_tokens=96, num_threads=1), seed=0)

    def sample(n: int, seed: int):
        return sample_and_score(engine, tasks, args.effort, n, seed, args.max_tokens)

    samples, rewards = sample(args.train_samples, seed=0)
    batch = grpo_batch(samples, rewards, VocabMap.load(args.policy))
    _, before = sample(args.eval_samples, seed=99)
    print(f"policy {args.policy}, effort {args.effort}: {len(tasks)} tasks, training batch {batch.size} samples "
          f"(accuracy {rewards.mean():.3f}); expected accuracy before {before.mean():.4f} "
          f"({before.numel()} samples)")

    learner = Learner(args.policy, LearnerConfig(lr=1.0, micro_batch_size=128, grad_clip=1e9, num_threads=1),
                      AlgoConfig(), seed=0)
    start = {k: v.clone() for k, v in learner.model.state_dict().items()}
    runs = [("adam", float(x)) for x in args.adam_lrs.split(",") if x] + \
           [("sgd", float(x)) for x in args.sgd_lrs.split(",") if x]
    print("| optimizer | lr | expected accuracy after | change |\n|---|---:|---:|---:|")
    for opt, lr in runs:
        learner.model.load_state_dict(start)
        groups = [{"params": learner.trainable, "lr_scale": 1.0}]
        learner.opt = (torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), weight_decay=0.0) if opt == "adam"
                       else torch.optim.SGD(groups, lr=lr))
        learner.cfg.lr = lr
        learner.train_step(batch)
        engine.update_weights(learner.state_for_sync())
        _, after = sample(args.eval_samples, seed=99)
        print(f"| {opt} | {lr:g} | {after.mean():.4f} | {after.mean() - before.mean():+.4f} |", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
