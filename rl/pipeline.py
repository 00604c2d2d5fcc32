"""The tiny end-to-end pipeline (what `make demo` runs):

    build tiny gpt-oss → cold-start SFT (TRL) → GRPO (Ray + vLLM) → evaluate SFT vs RL per effort

Run:  python -m rl.pipeline experiment=tiny            (≈ minutes on 2 CPU cores)
Outputs in `run_dir`: model/ (initial), sft/, checkpoints/step_*/ (RL), tensorboard/, metrics.jsonl,
eval/eval.{json,md} (the table printed at the end), timings.json.
With `model.path=...` the build step is skipped (a real gpt-oss checkpoint; set `sft.enabled=false`
to start RL from it directly).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from rl.config import hydra_main


def build_model(cfg, out: Path) -> Path:
    from envs.math_tasks import solution, vocabulary_corpus
    from rl.data import make_env
    from rl.model import build_tiny_model

    env = make_env(cfg.env, cfg.seed)
    corpus = vocabulary_corpus()
    for t in env.tasks("train", 200) + env.tasks("test", 50):
        corpus.append(t.question)
        corpus += [x for e in cfg.env.efforts for x in solution(t, e)]
    return build_tiny_model(OmegaConf.to_container(cfg.model), corpus, out, seed=cfg.seed)


def run_sft_stage(cfg, model_path: Path, out: Path) -> dict:
    from envs.math_tasks import solution
    from rl.data import make_env
    from rl.model import VocabMap
    from rl.sft import run_sft, sft_examples

    env = make_env(cfg.env, cfg.seed)
    tasks = env.tasks("train", cfg.sft.tasks, seed=cfg.seed + 1)
    rows = sft_examples(tasks, solution, VocabMap.load(model_path), cfg.env.efforts,
                        final_slip_rate=cfg.sft.final_slip_rate, seed=cfg.seed)
    return run_sft(model_path, out, rows, OmegaConf.to_container(cfg.sft), seed=cfg.seed,
                   logging_dir=str(Path(cfg.run_dir) / "tensorboard" / "sft"))


def run(cfg) -> dict:
    from rl.evaluate import evaluate_checkpoints
    from rl.train import train

    if cfg.env.name != "math" and (cfg.sft.enabled or not cfg.model.path):
        raise SystemExit(f"pipeline: env={cfg.env.name} has no generated solution traces for the tiny "
                         "build/SFT; pass model.path=<HF checkpoint> and sft.enabled=false")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    policy = Path(cfg.model.path) if cfg.model.path else build_model(cfg, run_dir / "model")
    timings["build"] = time.perf_counter() - t0
    if cfg.sft.enabled:
        t = time.perf_counter()
        sft_metrics = run_sft_stage(cfg, policy, run_dir / "sft")
        policy = run_dir / "sft"
        timings["sft"] = time.perf_counter() - t
        print(f"SFT done: {sft_metrics} in {timings['sft']:.0f}s", flush=True)
    t = time.perf_counter()
    state = train(cfg, policy_path=str(policy))
    timings["grpo"] = time.perf_counter() - t
    t = time.perf_counter()
    final = str(Path(cfg.run_dir) / "checkpoints" / f"step_{state.step:06d}")
    names = {"sft" if cfg.sft.enabled else "initial": str(policy), "rl": final}
    try:
        results = evaluate_checkpoints(names, cfg, run_dir / "eval", engine=state.workers[0])
    finally:
        state.close()
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=1))
    print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), flush=True)
    print(f"results: {run_dir / 'eval' / 'eval.md'}", flush=True)
    return results


def main() -> None:
    hydra_main(run)

if __name__ == "__main__":
    main()
