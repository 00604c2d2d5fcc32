"""Evaluate checkpoints × reasoning efforts on held-out tasks, through the training reward.

Per (checkpoint, effort), from rl/effort_metrics.py: accuracy (the score of reward term `eval.metric`,
"math" by default: the very plugin training is rewarded by, so train and eval can never disagree on
what is correct) with a 95% Wilson interval, unbiased pass@k over `eval.samples_per_task` samples per
task, CoT tokens (analysis channel: mean, p50, p90), budget compliance (the "effort_length" term's
`within_budget`; null without that term), truncation, format failures, mean reward. Per checkpoint:
monotonicity, the fraction of tasks whose mean CoT tokens strictly increase across the efforts.
Writes `eval.json`, `eval.md`, `report.md` and `effort_scaling.png` (rl/report.py) to the output
folder and prints a table per effort; `samples.jsonl` holds every sample (checkpoint, effort, task,
question, gold answer, analysis, final, CoT tokens, correct, reward) for reading what the model wrote.

eval.json schema (numbers are floats in [0, 1] unless said otherwise):
    {"results": {<checkpoint>: {
         <effort>: {"accuracy", "accuracy_ci95": [lo, hi],
                    "pass@1", "pass@2", ..., "pass@<n>"   (k = 1, powers of two, n = samples_per_task),
                    "cot_tokens", "cot_tokens_p50", "cot_tokens_p90"   (tokens),
                    "budget_compliance"   (null without an effort_length term),
                    "truncation", "format_failure", "reward" (mean score), "n" (int, samples)},
         ...one per effort...,
         "monotonicity": float | null   (null with fewer than two efforts),
         "by_env": {<label>: {<effort>: metrics, "monotonicity", "all_efforts"}}   (env.mixture only: one entry
                    per env, accuracy = that env's metric, `env_metrics`; the top level then scores every
                    sample by its own env's metric),
         "judge_agreement": {<judge>: {...}}   (with eval.judges: `rl.safety_eval.judge_agreement`)}},
     With safety / hierarchy reward terms, an env's per-effort metrics (the checkpoint's own, or its by_env
     entry's in a mixture) also hold "safety": {...} / "hierarchy": {...} (rates with 95% CI, per category /
     protection / attack: `rl.safety_eval.guard_rates`), and "all_efforts" the same rates pooled over efforts.
     "checkpoints": {<checkpoint>: path}, "efforts": [...], "tasks": int, "samples_per_task": int,
     "temperature": float, "seed": int, "metric": str}
e.g. `d["results"]["rl"]["high"]["budget_compliance"]`, `d["results"]["rl"]["monotonicity"]`.

Run:  python -m rl.evaluate 'eval.checkpoints=[outputs/x/sft,outputs/x/checkpoints/step_000020]' \\
          eval.out_dir=outputs/x/eval       (any Hydra overrides of conf/config.yaml also apply)
One worker pool serves every checkpoint: weights are swapped in place between checkpoints.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from envs.types import Task
from rl import report
from rl.config import Config
from rl.effort_metrics import ACCURACY, effort_summary, monotonicity, scored_as
from rl.safety_eval import ALL, GUARDS, cell, collect_guards, guard_rates, judge_agreements
from rl.seeds import eval_seed
from rl.tools import task_prompt


def env_metrics(cfg: Config) -> dict[str, str]:
    """{mixture label: reward term of its accuracy} (`rl.config.component_metric`); {} for a single env."""
    from rl.config import component_metric, mixture_components

    return {label: component_metric(c, cfg.reward.terms, cfg.eval.metric)
            for label, c in mixture_components(cfg.env).items()}


def evaluate_policy(pool, tasks: Sequence[Task], cfg: Config, reward, records: list | None = None,
                    judges: dict | None = None) -> dict:
    """{effort: metrics (see the schema above), ..., "monotonicity": float | None} for the policy `pool`
    samples from (anything with `WorkerPool.generate`), scored by `reward` (a `CompositeReward`).
    With `env.mixture`, every sample's accuracy is its own env's metric (`env_metrics`) and the result
    also holds "by_env": {label: the same per-effort metrics over that env's samples}.
    `records`, if given, receives one `sample_record` per sample; `judges` ({name: judge}) re-judge the
    safety finals for the agreement table."""
    from envs.mixture import label_of
    from rl.workers import to_sample

    by_label = env_metrics(cfg)
    out: dict = {}
    every, per_env = [], {label: [] for label in by_label}  # all efforts' samples, for monotonicity
    every_scored, per_env_scored = [], {label: [] for label in by_label}  # and the pooled safety rates
    for effort in cfg.eval.efforts:
        prompts = [task_prompt(t, effort, cfg.rollout.tools.python) for t in tasks]
        completions = pool.generate(prompts, cfg.eval.samples_per_task, temperature=cfg.eval.temperature,
                                    seed=eval_seed(cfg.seed))
        samples = [to_sample(t, effort, p, c) for t, p, comps in zip(tasks, prompts, completions) for c in comps]
        scored = reward.score_batch(samples)
        metric = cfg.eval.metric
        if by_label:
            metric = ACCURACY
            scored = [scored_as(r, by_label[label_of(s.task_id)]) for s, r in zip(samples, scored)]
            for label in by_label:
                idx = [i for i, s in enumerate(samples) if label_of(s.task_id) == label]
                if idx:
                    sub, sub_scored = [samples[i] for i in idx], [scored[i] for i in idx]
                    out.setdefault("by_env", {}).setdefault(label, {})[effort] = {
                        **effort_summary(sub, sub_scored, metric), **guard_rates(sub, sub_scored)}
                    per_env[label] += sub
                    per_env_scored[label] += sub_scored
        out[effort] = effort_summary(samples, scored, metric)
        if not by_label:
            out[effort].update(guard_rates(samples, scored))
        every += samples
        every_scored += scored
        if records is not None:
            by_id = {t.task_id: t for t in tasks}
            records += [sample_record(by_id[s.task_id], s, r, metric) for s, r in zip(samples, scored)]
    out["monotonicity"] = monotonicity(every)
    for label, sub in per_env.items():
        if sub:
            out["by_env"][label]["monotonicity"] = monotonicity(sub)
            if pooled := guard_rates(sub, per_env_scored[label]):
                out["by_env"][label][ALL] = pooled
    if not by_label and (pooled := guard_rates(every, every_scored)):
        out[ALL] = pooled
    if judges:
        out["judge_agreement"] = judge_agreements(judges, every, every_scored)
    return out


def scalars(res: dict, prefix: str = "eval") -> dict[str, float]:
    """`evaluate_policy`'s result as numbers for a metrics logger: "eval/<key>/<effort>" (the CI as
    `accuracy_ci95_lo`/`_hi`) and "eval/monotonicity"; nulls are left out.

    >>> scalars({"low": {"accuracy": 0.5, "accuracy_ci95": [0.2, 0.8], "budget_compliance": None, "n": 4},
    ...          "monotonicity": None})
    {'eval/accuracy/low': 0.5, 'eval/accuracy_ci95_lo/low': 0.2, 'eval/accuracy_ci95_hi/low': 0.8, 'eval/n/low': 4.0}
    """
    out: dict[str, float] = {}
    for label, sub in res.get("by_env", {}).items():
        out.update(scalars(sub, f"{prefix}/{label}"))
    for effort, m in res.items():
        if effort in ("monotonicity", "by_env", "judge_agreement"):
            continue
        for key, value in m.items():
            if key == "accuracy_ci95":
                out[f"{prefix}/accuracy_ci95_lo/{effort}"], out[f"{prefix}/accuracy_ci95_hi/{effort}"] = value
            elif key in GUARDS:  # the headline rates, not the per-category breakdown
                out.update({f"{prefix}/{key}/{rate}/{'all' if effort == ALL else effort}": float(e["rate"])
                            for rate, e in value.items() if not rate.startswith("by_")})
            elif value is not None:
                out[f"{prefix}/{key}/{effort}"] = float(value)
    if res.get("monotonicity") is not None:
        out[f"{prefix}/monotonicity"] = float(res["monotonicity"])
    return out


def _console_cells(m: dict, k: int) -> list[str]:
    lo, hi = m["accuracy_ci95"]
    budget = m["budget_compliance"]
    return [f"{m['accuracy']:.3f}", f"{lo:.2f}-{hi:.2f}", f"{m[f'pass@{k}']:.3f}", f"{m['reward']:.3f}",
            f"{m['cot_tokens']:.1f}", f"{m['cot_tokens_p50']:.0f}/{m['cot_tokens_p90']:.0f}",
            "-" if budget is None else f"{budget:.2f}", f"{m['truncation']:.2f}", f"{m['format_failure']:.2f}",
            str(m["n"])]


def print_tables(results: dict, efforts: Sequence[str]) -> None:
    """One compact table, a row per checkpoint × effort (eval.md / report.md have the long form)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    first = next(iter(results.values()))[efforts[0]]
    k = max(int(key.split("@")[1]) for key in first if key.startswith("pass@"))
    table = Table(title="held-out eval: accuracy (95% Wilson CI), CoT tokens mean and p50/p90, "
                  "within effort budget, truncated, format failures", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    for col in ("checkpoint", "effort", "acc", "95% CI", f"pass@{k}", "reward", "CoT", "p50/p90", "budget",
                "trunc", "fmt", "n"):
        table.add_column(col, justify="left" if col in ("checkpoint", "effort") else "right", no_wrap=True)
    for name, per in results.items():
        for i, effort in enumerate(efforts):
            table.add_row(name if i == 0 else "", effort, *_console_cells(per[effort], k),
                          end_section=i == len(efforts) - 1)
    console = Console(width=None if sys.stdout.isatty() else 120)  # piped to a log: no terminal to fit
    console.print(table)
    console.print("monotonicity (CoT tokens " + " < ".join(efforts) + " per task): " + ", ".join(
        f"{name} {'n/a' if per['monotonicity'] is None else format(per['monotonicity'], '.3f')}"
        for name, per in results.items()))
    for name, guard in collect_guards(results, efforts).items():
        rates = [f"{term} {rate.replace('_', ' ')} {cell(g[rate])}" for term, g in guard["all"].items()
                 for rate in ("harmful_refusal", "over_refusal", "leak", "rule_break") if rate in g]
        if rates:
            console.print(f"{name}, all efforts (95% CI): " + "; ".join(rates))
    labels = list(dict.fromkeys(label for per in results.values() for label in per.get("by_env", {})))
    if labels:
        env_table = Table(title="per env: accuracy (its own metric) / mean CoT tokens, n per effort",
                          box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
        for col in ("checkpoint", "env", *efforts):
            env_table.add_column(col, justify="left" if col in ("checkpoint", "env") else "right", no_wrap=True)
        for name, per in results.items():
            for i, label in enumerate(labels):
                sub = per.get("by_env", {}).get(label, {})
                env_table.add_row(name if i == 0 else "", label, *(
                    f"{sub[e]['accuracy']:.3f} / {sub[e]['cot_tokens']:.0f}, {sub[e]['n']}" if e in sub else "-"
                    for e in efforts), end_section=i == len(labels) - 1)
        console.print(env_table)


def sample_record(task: Task, sample, result, metric: str) -> dict:
    """One line of samples.jsonl: what the model wrote for a task at an effort, and how it scored."""
    t = sample.transcript
    return {"task_id": task.task_id, "effort": sample.effort, "question": task.question,
            "answer": task.metadata.get("answer"), "analysis": t.analysis, "final": t.final,
            "cot_tokens": t.analysis_tokens, "format_ok": t.format_ok, "truncated": sample.finish_reason == "length",
            "correct": result.parts.get(metric), "reward": result.score}


def write_results(results: dict, out_dir: str | Path, settings: dict) -> None:
    """eval.json (results + settings), eval.md (tables), report.md and effort_scaling.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"results": results, **settings}, indent=1))
    (out / "eval.md").write_text(report.markdown_tables(results, settings["efforts"]) + "\n"
                                 + report.safety_tables(results, settings["efforts"]))
    report.write_report(results, settings, out)


def evaluate_checkpoints(checkpoints: dict[str, str], cfg: Config, out_dir: str | Path, pool=None,
                         reward=None) -> dict:
    """Evaluate named checkpoints with one worker pool (a new one on Ray unless given); write eval.json,
    the tables, the report and the figure to `out_dir`, print the tables; return eval.json's "results"."""
    from rl.data import make_env, make_reward

    tasks = make_env(cfg.env, cfg.seed).tasks("test", cfg.eval.tasks)
    if reward is None:
        reward = make_reward(cfg.reward)
    judges = extra_judges(cfg.eval.judges)
    names = list(checkpoints)
    own = pool is None
    if own:
        from rl.cluster import init_ray
        from rl.workers import WorkerPool

        init_ray(cfg.cluster)
        pool = WorkerPool(checkpoints[names[0]], cfg.rollout, cfg.seed)
    results = {}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lines = open(Path(out_dir) / "samples.jsonl", "w")
    try:
        for i, name in enumerate(names):
            if i > 0 or not own:
                pool.update_weights_from_path(checkpoints[name])
            records: list = []
            results[name] = evaluate_policy(pool, tasks, cfg, reward, records, judges)
            lines.writelines(json.dumps({"checkpoint": name, **r}) + "\n" for r in records)
            if cfg.logging.progress:
                print(f"eval {name} ({i + 1}/{len(names)}): " + " | ".join(
                    f"{e} acc {results[name][e]['accuracy']:.3f}" for e in cfg.eval.efforts), flush=True)
    finally:
        lines.close()
        if own:
            pool.close()
    write_results(results, out_dir, {"checkpoints": checkpoints, "efforts": list(cfg.eval.efforts),
                                     "tasks": len(tasks), "samples_per_task": cfg.eval.samples_per_task,
                                     "temperature": cfg.eval.temperature, "seed": cfg.seed,
                                     "metric": cfg.eval.metric, "env_metrics": env_metrics(cfg)})
    print_tables(results, cfg.eval.efforts)
    return results


def extra_judges(specs: dict) -> dict:
    """{name: judge} from `eval.judges` ({name: {judge: backend, **options}}), built once for every checkpoint."""
    from rewards.safety import make_judge

    out = {}
    for name, opts in specs.items():
        if not isinstance(opts, dict) or "judge" not in opts:
            raise ValueError(f"eval.judges.{name} must be a mapping with 'judge' (rule, http or spec_rm), got {opts!r}")
        out[name] = make_judge(opts["judge"], **{k: v for k, v in opts.items() if k != "judge"})
    return out


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
            if cfg.eval.out_dir:
                remove_hydra_only_dir(Path(cfg.run_dir))

    hydra_main(run)


def remove_hydra_only_dir(path: Path) -> bool:
    """Remove `path` when it holds nothing but what Hydra wrote on start (its `hydra/` folder and empty job
    logs): with `eval.out_dir` set the results are elsewhere, and an empty timestamped run folder per
    evaluation only clutters `outputs/`. Returns whether it was removed; anything else in it keeps it."""
    import shutil

    if not path.is_dir():
        return False
    for entry in path.iterdir():
        if entry.name == "hydra" and entry.is_dir():
            continue
        if entry.suffix == ".log" and entry.is_file() and entry.stat().st_size == 0:
            continue
        return False
    shutil.rmtree(path)
    return True


if __name__ == "__main__":
    main()
