"""The rollout benchmark's vLLM workload alone, for a profiler: one engine, a few timed `generate` calls.

Run:  .venv/bin/python -m bench.profile_rollout [--mode eager|compiled] [--threads 2] [--calls 3]
Profile (what bench/RESULTS.md "Where the rollout engine's time goes" did, 50 Hz, collapsed stacks):
      .venv/bin/py-spy record -r 50 --format raw -o prof.raw -- .venv/bin/python -m bench.profile_rollout

Same workload as bench/bench_rollout.py's defaults (its `_questions`: 24 Harmony prompts at the three
efforts x n=8, exactly 320 sampled tokens each, temperature 1), the tiny model built into a temp folder.
Prints the engine's start-up and each call's seconds and tokens/s.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)

    from bench.bench_rollout import _questions
    from envs import harmony
    from rl.config import RolloutConfig
    from rl.engine import RolloutEngine
    from rl.model import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="profile_rollout_"))
    try:
        questions = _questions(24)
        ckpt = build_tiny_model(yaml.safe_load(open("conf/model/tiny.yaml")), questions, tmp / "tiny")
        prompts = [harmony.render_prompt(q, harmony.EFFORTS[i % 3]) for i, q in enumerate(questions)]
        cfg = RolloutConfig(max_model_len=1024, kv_cache_gib=1, num_threads=args.threads,
                            enforce_eager=args.mode == "eager")
        t0 = time.perf_counter()
        eng = RolloutEngine(str(ckpt), cfg, seed=0)
        print(f"{args.mode}: start-up {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            for i in range(args.calls):
                t = time.perf_counter()
                out = eng.generate(prompts, n=8, temperature=1.0, top_p=1.0, max_tokens=320, stop=False)
                dt = time.perf_counter() - t
                tokens = sum(len(c.ids) for s in out for c in s)
                print(f"{args.mode}: call {i} {dt:.2f} s, {tokens / dt:.0f} tokens/s", flush=True)
        finally:
            eng.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
