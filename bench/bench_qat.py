"""Rollout-vs-learner log-prob mismatch with and without QAT (issue: MXFP4 QAT).

A real gpt-oss rollout engine serves MXFP4 experts. Without QAT the learner computes on its fp32
master experts, so the sampler and the learner disagree; with `learner.qat=true` the learner's expert
forward runs on the same fake-quantised weights the engine receives, and the gap closes. Measured on
the tiny model: samples from the engine (temperature 1), learner log-probs of the same tokens, per
token mean KL(behaviour || learner) (k1 and k3 estimators) and mean |Δ log p|.

Run:  .venv/bin/python -m bench.bench_qat [--policy outputs/tiny-*/sft] [--write bench/RESULTS.md]
Without --policy a tiny random model is built (its distribution is near uniform, so the gap is small).
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from pathlib import Path

MODES = [  # (label, learner overrides)
    ("fp32 experts everywhere (reference)", {"qat": False, "sync_mxfp4": False}),
    ("MXFP4 rollout, fp32 learner (no QAT)", {"qat": False, "sync_mxfp4": True}),
    ("MXFP4 rollout, QAT learner", {"qat": True, "sync_mxfp4": True}),
]


def measure(policy: str, n_tasks: int, n: int) -> list[dict]:
    import torch

    from envs import harmony
    from envs.math_tasks import MathEnv
    from rl.batch import collate
    from rl.config import AlgoConfig, LearnerConfig, RolloutConfig
    from rl.engine import RolloutEngine
    from rl.learner import Learner
    from rl.model import VocabMap
    from rl.workers import to_sample

    engine = RolloutEngine(policy, RolloutConfig(max_model_len=256, max_tokens=96), seed=0)
    tasks = MathEnv(seed=0, difficulty=1, families=("digit_sum",)).tasks("test", n_tasks)
    jobs = [(t, e, harmony.render_prompt(t.question, e)) for t in tasks for e in harmony.EFFORTS]
    vmap = VocabMap.load(policy)
    rows = []
    for label, over in MODES:
        learner = Learner(policy, LearnerConfig(lr=0.0, **over), AlgoConfig(), seed=0)
        engine.update_weights(learner.state_for_sync())
        comps = engine.generate([p for _, _, p in jobs], n=n, temperature=1.0, max_tokens=96, seed=1)
        samples = [to_sample(t, e, p, c) for (t, e, p), cs in zip(jobs, comps) for c in cs]
        batch = collate(samples, [0.0] * len(samples), vmap)
        tok = batch.completion_mask
        d = batch.behavior_logprobs[tok] - learner.logprobs(batch)[tok]  # log p_behaviour - log p_learner
        rows.append({"mode": label, "tokens": int(d.numel()), "kl_k1": float(d.mean()),
                     "kl_k3": float((torch.exp(-d) + d - 1).mean()), "abs": float(d.abs().mean()),
                     "max_abs": float(d.abs().max())})
    engine.shutdown()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| rollout / learner | tokens | mean KL k1 | mean KL k3 | mean abs Δlogp | max abs Δlogp |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['tokens']} | {r['kl_k1']:.2e} | {r['kl_k3']:.2e} | {r['abs']:.2e} | "
              f"{r['max_abs']:.2e} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", help="HF checkpoint (e.g. a demo's sft/ folder); default: a random tiny model")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--write", help="append/replace the section in this RESULTS.md")
    args = ap.parse_args()
    policy = args.policy
    if policy is None:
        import yaml

        from envs.math_tasks import vocabulary_corpus
        from rl.model import build_tiny_model

        cfg = yaml.safe_load(open(Path(__file__).parents[1] / "conf/model/tiny.yaml"))
        policy = str(build_tiny_model(cfg, vocabulary_corpus(), Path(tempfile.mkdtemp()) / "tiny"))
    rows = measure(policy, args.tasks, args.n)
    from bench.results import command, write_section

    body = (f"Command: `{command('bench.bench_qat')}` ({datetime.date.today()})\n\n"
            f"Policy: {'`' + args.policy + '`' if args.policy else 'random tiny model'}; "
            f"{args.tasks} held-out digit-sum tasks x 3 efforts x n={args.n}, temperature 1, fp32, CPU "
            f"({os.cpu_count()} cores).\n\n{table(rows)}\n")
    print(body)
    if args.write:
        write_section(Path(args.write), "## QAT: rollout vs learner log-prob mismatch", ["", *body.splitlines()])

if __name__ == "__main__":
    main()
