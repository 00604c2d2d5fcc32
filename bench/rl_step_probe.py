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
from rewards.math_verify_reward import verify_batch
from rl.algorithms import grpo_advantages
from rl.learner import Learner
from rl.config import RolloutConfig
from rl.engine import RolloutEngine


def sample_and_score(engine: RolloutEngine, tasks, prompts: list[list[int]], n: int, seed: int,
                     max_tokens: int = 96):
    """n completions per prompt at temperature 1 and their math-verify scores: (completions, (len*n,) tensor)."""
    comps = engine.generate(prompts, n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=seed)
    pairs = [(harmony.parse_completion(c.ids).final, str(t.metadata["answer"])) for t, cs in zip(tasks, comps)
             for c in cs]
    return comps, torch.tensor(verify_batch(pairs))


def grpo_batch(prompts: list[list[int]], comps, rewards: torch.Tensor) -> list[dict]:
    """Learner batch with GRPO advantages, one group per prompt (all completion tokens trained)."""
    adv = grpo_advantages(rewards, [i for i, cs in enumerate(comps) for _ in cs]).tolist()
    batch = [{"prompt_ids": p, "completion_ids": list(c.ids), "loss_mask": [1] * len(c.ids),
              "behavior_logprobs": list(c.logprobs)}
             for p, cs in zip(prompts, comps) for c in cs]
    for b, a in zip(batch, adv):
        b["advantage"] = a
    return batch


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
    prompts = [harmony.render_prompt(t.question, args.effort, t.developer) for t in tasks]
    engine = RolloutEngine(args.policy, RolloutConfig(max_model_len=256, max_tokens=96, num_threads=1), seed=0)

    def sample(n: int, seed: int):
        return sample_and_score(engine, tasks, prompts, n, seed, args.max_tokens)

    comps, rewards = sample(args.train_samples, seed=0)
    batch = grpo_batch(prompts, comps, rewards)
    _, before = sample(args.eval_samples, seed=99)
    print(f"policy {args.policy}, effort {args.effort}: {len(tasks)} tasks, training batch {len(batch)} samples "
          f"(accuracy {rewards.mean():.3f}); expected accuracy before {before.mean():.4f} "
          f"({before.numel()} samples)")

    learner = Learner(args.policy, {"lr": 1.0, "kernels": "deliberate", "micro_batch_size": 128,
                                    "grad_clip": 1e9, "num_threads": 1}, {}, seed=0)
    start = {k: v.clone() for k, v in learner.model.state_dict().items()}
    runs = [("adam", float(x)) for x in args.adam_lrs.split(",") if x] + \
           [("sgd", float(x)) for x in args.sgd_lrs.split(",") if x]
    print("| optimizer | lr | expected accuracy after | change |\n|---|---:|---:|---:|")
    for opt, lr in runs:
        learner.model.load_state_dict(start)
        learner.opt = (torch.optim.AdamW(learner.trainable, lr=lr, betas=(0.9, 0.99), weight_decay=0.0) if opt == "adam"
                       else torch.optim.SGD(learner.trainable, lr=lr))
        learner.cfg["lr"] = lr
        learner.train_step(batch)
        engine.update_weights(learner.state_for_sync())
        _, after = sample(args.eval_samples, seed=99)
        print(f"| {opt} | {lr:g} | {after.mean():.4f} | {after.mean() - before.mean():+.4f} |", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
