"""Evaluate checkpoints × reasoning efforts on held-out tasks, through the training reward.

Metrics per (checkpoint, effort): accuracy (the score of reward term `eval.metric`, "math" by default:
the very plugin training is rewarded by, so train and eval can never disagree on what is correct),
mean reward, mean CoT tokens (analysis-channel tokens), format-failure rate (no parsable final).
Writes `eval.json` and `eval.md` to the output folder and prints a table per effort.

Run:  python -m rl.evaluate 'eval.checkpoints=[outputs/x/sft,outputs/x/checkpoints/step_000020]' \\
          eval.out_dir=outputs/x/eval       (any Hydra overrides of conf/config.yaml also apply)
One worker pool serves every checkpoint: weights are swapped in place between checkpoints.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

from envs import harmony
from envs.types import Task
from rl.config import Config
from rl.seeds import eval_seed

COLUMNS = ("accuracy", "reward", "cot_tokens", "format_failure", "n")
HEADERS = ("accuracy", "mean reward", "mean CoT tokens", "format failures", "n")


def evaluate_policy(pool, tasks: Sequence[Task], cfg: Config, reward) -> dict[str, dict[str, float]]:
    """{effort: {accuracy, reward, cot_tokens, format_failure, n}} for the policy `pool` samples from
    (anything with `WorkerPool.generate`), scored by `reward` (a `CompositeReward`)."""
    from rl.workers import to_sample

    out: dict[str, dict[str, float]] = {}
    for effort in cfg.eval.efforts:
        prompts = [harmony.render_prompt(t.question, effort, t.developer) for t in tasks]
        completions = pool.generate(prompts, cfg.eval.samples_per_task, temperature=cfg.eval.temperature,
                                    seed=eval_seed(cfg.seed))
        samples = [to_sample(t, effort, p, c) for t, p, comps in zip(tasks, prompts, completions) for c in comps]
        results = reward.score_batch(samples)
        n = len(samples)
        out[effort] = {
            "accuracy": sum(r.parts.get(cfg.eval.metric, 0.0) for r in results) / n,
            "reward": sum(r.score for r in results) / n,
            "cot_tokens": statistics.fmean(s.transcript.analysis_tokens for s in samples),
            "format_failure": sum(not s.transcript.format_ok for s in samples) / n,
            "n": n,
        }
    return out


def _cells(m: dict[str, float]) -> list[str]:
    return [f"{m['accuracy']:.3f}", f"{m['reward']:.3f}", f"{m['cot_tokens']:.1f}", f"{m['format_failure']:.3f}",
            str(m["n"])]


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One table per effort: rows = checkpoints."""
    lines = []
    for effort in next(iter(results.values())):
        lines += [f"### Reasoning: {effort}", "", "| checkpoint | " + " | ".join(HEADERS) + " |",
                  "|---|" + "---:|" * len(HEADERS)]
        lines += [f"| {name} | " + " | ".join(_cells(per[effort])) + " |" for name, per in results.items()]
        lines.append("")
    return "\n".join(lines)


def print_tables(results: dict[str, dict[str, dict[str, float]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for effort in next(iter(results.values())):
        table = Table(title=f"Reasoning: {effort}")
        table.add_column("checkpoint")
        for col in HEADERS:
            table.add_column(col, justify="right")
        for name, per_effort in results.items():
            table.add_row(name, *_cells(per_effort[effort]))
        console.print(table)


def write_results(results: dict, out_dir: str | Path, extra: dict | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"results": results, **(extra or {})}, indent=1))
    (out / "eval.md").write_text(markdown_table(results))


def evaluate_checkpoints(checkpoints: dict[str, str], cfg: Config, out_dir: str | Path, pool=None,
                         reward=None) -> dict:
    """Evaluate named checkpoints with one worker pool (a new one on Ray unless given); write and print
    the tables."""
    from rewards.compose import CompositeReward
    from rl.data import make_env

    tasks = make_env(cfg.env, cfg.seed).tasks("test", cfg.eval.tasks)
    if reward is None:
        reward = CompositeReward.from_config(cfg.reward.terms, on_error=cfg.reward.on_error,
                                             timeout_s=cfg.reward.timeout_s)
    names = list(checkpoints)
    own = pool is None
    if own:
        from rl.cluster import init_ray
        from rl.workers import WorkerPool

        init_ray(cfg.cluster)
        pool = WorkerPool(checkpoints[names[0]], cfg.rollout, cfg.seed)
    results = {}
    try:
        for i, name in enumerate(names):
            if i > 0 or not own:
                pool.update_weights_from_path(checkpoints[name])
            results[name] = evaluate_policy(pool, tasks, cfg, reward)
            if cfg.logging.progress:
                print(f"eval {name} ({i + 1}/{len(names)}): " + " | ".join(
                    f"{e} acc {m['accuracy']:.3f}" for e, m in results[name].items()), flush=True)
    finally:
        if own:
            pool.close()
    write_results(results, out_dir, {"checkpoints": checkpoints, "tasks": len(tasks),
                                     "temperature": cfg.eval.temperature, "metric": cfg.eval.metric})
    print_tables(results)
    return results


def checkpoint_names(paths: Sequence[str]) -> dict[str, str]:
    """{table name: path}: the folder name, or the whole path where two folders share a name.

    >>> checkpoint_names(["runs/a/sft", "runs/b/sft", "runs/a/step_000020"])
    {'runs/a/sft': 'runs/a/sft', 'runs/b/sft': 'runs/b/sft', 'step_000020': 'runs/a/step_000020'}
    """
    short = [Path(p).name for p in paths]
    names = {(s if short.count(s) == 1 else str(p)): str(p) for s, p in zip(short, paths)}
    if len(names) != len(paths):
        raise SystemExit(f"evaluate: eval.checkpoints lists a checkpoint twice: {list(paths)}")
    return names


def main() -> None:
    from rl.config import hydra_main

    def run(cfg: Config):
        if not cfg.eval.checkpoints:
            raise SystemExit("evaluate: pass eval.checkpoints=[path1,path2,...] (HF checkpoint folders)")
        import ray

        names = checkpoint_names(cfg.eval.checkpoints)
        try:
            evaluate_checkpoints(names, cfg, cfg.eval.out_dir or str(Path(cfg.run_dir) / "eval"))
        finally:
            ray.shutdown()

    hydra_main(run)


if __name__ == "__main__":
    main()
