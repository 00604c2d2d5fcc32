"""Evaluate checkpoints × reasoning efforts on held-out tasks.

Metrics per (checkpoint, effort): accuracy (math-verify on the final channel), mean CoT tokens
(analysis-channel tokens), format-failure rate (no parsable final). Writes `eval.json` and
`eval.md` to the output folder and prints a table per effort.

Run:  python -m rl.evaluate 'eval.checkpoints=[outputs/x/sft,outputs/x/checkpoints/step_000020]' \
          eval.out_dir=outputs/x/eval       (any Hydra overrides of conf/config.yaml also apply)
One vLLM engine serves every checkpoint: weights are swapped in place between checkpoints.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable, Sequence

from envs import harmony
from envs.types import Task
from rl.seeds import eval_seed

GenerateFn = Callable[[list[list[int]], int], list[list]]  # (prompts, n) -> completions per prompt


def evaluate_policy(generate: GenerateFn, tasks: Sequence[Task], efforts: Sequence[str],
                    samples_per_task: int = 1, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
    """{effort: {accuracy, cot_tokens, format_failure, n}} for one policy behind `generate`."""
    from rewards.math_verify_reward import verify_batch

    out: dict[str, dict[str, float]] = {}
    for effort in efforts:
        prompts = [harmony.render_prompt(t.question, effort, t.developer) for t in tasks]
        completions = generate(prompts, samples_per_task)
        transcripts, golds = [], []
        for task, comps in zip(tasks, completions):
            for c in comps:
                transcripts.append(harmony.parse_completion(c.ids))
                golds.append(str(task.metadata["answer"]))
        scores = verify_batch([(t.final, g) for t, g in zip(transcripts, golds)], timeout_s=timeout_s)
        n = len(transcripts)
        out[effort] = {
            "accuracy": sum(scores) / n,
            "cot_tokens": statistics.fmean(t.analysis_tokens for t in transcripts),
            "format_failure": sum(not t.format_ok for t in transcripts) / n,
            "n": n,
        }
    return out


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One table per effort: rows = checkpoints."""
    efforts = list(next(iter(results.values())).keys())
    lines = []
    for effort in efforts:
        lines += [f"### Reasoning: {effort}", "", "| checkpoint | accuracy | mean CoT tokens | format failures | n |",
                  "|---|---:|---:|---:|---:|"]
        for name, per_effort in results.items():
            m = per_effort[effort]
            lines.append(f"| {name} | {m['accuracy']:.3f} | {m['cot_tokens']:.1f} | "
                         f"{m['format_failure']:.3f} | {m['n']} |")
        lines.append("")
    return "\n".join(lines)


def print_tables(results: dict[str, dict[str, dict[str, float]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for effort in next(iter(results.values())):
        table = Table(title=f"Reasoning: {effort}")
        for col in ("checkpoint", "accuracy", "mean CoT tokens", "format failures", "n"):
            table.add_column(col, justify="left" if col == "checkpoint" else "right")
        for name, per_effort in results.items():
            m = per_effort[effort]
            table.add_row(name, f"{m['accuracy']:.3f}", f"{m['cot_tokens']:.1f}",
                          f"{m['format_failure']:.3f}", str(m["n"]))
        console.print(table)


def write_results(results: dict, out_dir: str | Path, extra: dict | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"results": results, **(extra or {})}, indent=1))
    (out / "eval.md").write_text(markdown_table(results))


def evaluate_checkpoints(checkpoints: dict[str, str], cfg, out_dir: str | Path, engine=None) -> dict:
    """Evaluate named checkpoints with one rollout engine; write and print the tables."""
    from rl.data import make_env
    from rl.rollout_client import call, engine_generate, make_engine

    env = make_env(cfg.env, cfg.seed)
    tasks = env.tasks("test", cfg.eval.tasks)
    names = list(checkpoints)
    own = engine is None
    if own:
        engine = make_engine(checkpoints[names[0]], cfg.rollout, cfg.seed)
    results = {}
    try:
        for i, name in enumerate(names):
            if i > 0 or not own:
                call(engine, "update_weights_from_path", checkpoints[name])
            gen = engine_generate(engine, cfg, temperature=cfg.eval.temperature, seed=eval_seed(cfg.seed))
            results[name] = evaluate_policy(gen, tasks, cfg.eval.efforts, cfg.eval.samples_per_task,
                                            cfg.reward.math_timeout_s)
    finally:
        if own:
            call(engine, "shutdown")
    write_results(results, out_dir, {"checkpoints": checkpoints, "tasks": len(tasks),
                                     "temperature": cfg.eval.temperature})
    print_tables(results)
    return results


def main() -> None:
    from rl.config import hydra_main

    def run(cfg):
        if not cfg.eval.checkpoints:
            raise SystemExit("evaluate: pass eval.checkpoints=[path1,path2,...] (HF checkpoint folders)")
        names = {Path(p).name: str(p) for p in cfg.eval.checkpoints}
        evaluate_checkpoints(names, cfg, cfg.eval.out_dir or str(Path(cfg.run_dir) / "eval"))

    hydra_main(run)

if __name__ == "__main__":
    main()
