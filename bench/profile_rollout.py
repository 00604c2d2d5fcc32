"""The rollout benchmark's vLLM workload alone, for a profiler: one engine, a few timed `generate` calls.

Run:  .venv/bin/python -m bench.profile_rollout [--mode eager|compiled] [--threads 2] [--calls 3]
Profile (what bench/RESULTS.md "Where the rollout engine's time goes" did, 50 Hz, collapsed stacks):
      .venv/bin/py-spy record -r 50 --format raw -o prof.raw -- .venv/bin/python -m bench.profile_rollout

Same workload and engine as bench/bench_rollout.py's defaults (its `workload` and `engine_config`: 24 Harmony
prompts at the three efforts x n=8, exactly 320 sampled tokens each, temperature 1), the tiny model built into
a temp folder.
Prints the engine's start-up and each call's seconds and tokens/s.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)

    from bench.bench_rollout import engine_config, workload
    from rl.engine import RolloutEngine

    tmp = Path(tempfile.mkdtemp(prefix="profile_rollout_"))
    try:
        ckpt, prompts = workload(tmp / "tiny", 24)
        t0 = time.perf_counter()
        eng = RolloutEngine(ckpt, engine_config(args.threads, args.mode == "eager"), seed=0)
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
