"""The eval report: the model card's effort-scaling figure and a Markdown report, from `eval.json` data.

`effort_scaling_figure` plots accuracy (with 95% CI error bars) against mean CoT tokens: one line per
checkpoint, one labelled point per effort (gpt-oss model card, "accuracy vs. CoT length" per
reasoning level). `write_report` writes `effort_scaling.png` and `report.md` (the figure, the eval
settings, monotonicity and one table per effort) into a folder; `rl.evaluate` calls it next to
`eval.json`. Input: `results` = {checkpoint: {effort: metrics, "monotonicity": float | None}} as in
`eval.json` (schema in rl/evaluate.py), and the eval `settings` (tasks, samples_per_task,
temperature, seed, metric, efforts, checkpoints).

Rebuild a report from a saved eval.json:
    python -c "import json, rl.report as r; d = json.load(open('eval/eval.json')); r.write_report(d['results'], d, 'eval')"

matplotlib runs headless: a bare `Figure` rendered by Agg, no pyplot, no display needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

FIGURE = "effort_scaling.png"
REPORT = "report.md"
HEADERS = ("accuracy [95% CI]", "pass@k", "mean reward", "CoT mean / p50 / p90", "in budget", "truncated",
           "format failures", "n")


def _largest_pass(m: Mapping) -> tuple[int, float] | None:
    ks = [int(key.split("@", 1)[1]) for key in m if key.startswith("pass@")]
    return (max(ks), m[f"pass@{max(ks)}"]) if ks else None


def cells(m: Mapping) -> list[str]:
    """One table row's cells for one checkpoint at one effort (columns `HEADERS`)."""
    lo, hi = m["accuracy_ci95"]
    passk = _largest_pass(m)
    compliance = m.get("budget_compliance")
    return [f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]",
            "–" if passk is None else f"{passk[1]:.3f} (k={passk[0]})",
            f"{m['reward']:.3f}",
            f"{m['cot_tokens']:.1f} / {m['cot_tokens_p50']:.0f} / {m['cot_tokens_p90']:.0f}",
            "–" if compliance is None else f"{compliance:.3f}",
            f"{m['truncation']:.3f}", f"{m['format_failure']:.3f}", str(m["n"])]


def markdown_tables(results: Mapping[str, Mapping], efforts: Sequence[str]) -> str:
    """One table per effort (rows = checkpoints), then monotonicity per checkpoint."""
    lines = []
    for effort in efforts:
        lines += [f"### Reasoning: {effort}", "", "| checkpoint | " + " | ".join(HEADERS) + " |",
                  "|---|" + "---:|" * len(HEADERS)]
        lines += [f"| {name} | " + " | ".join(cells(per[effort])) + " |" for name, per in results.items()]
        lines.append("")
    lines += ["### Monotonicity", "",
              "Fraction of tasks whose mean CoT tokens strictly increase " + " < ".join(efforts) +
              " (n/a with fewer than two efforts).", "", "| checkpoint | monotonicity |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(per.get('monotonicity'))} |" for name, per in results.items()]
    labels = list(dict.fromkeys(label for per in results.values() for label in per.get("by_env", {})))
    for label in labels:  # env.mixture: the same tables over each env's samples
        per_env = {name: per["by_env"][label] for name, per in results.items() if label in per.get("by_env", {})}
        lines += ["", f"## Env: {label}", "", markdown_tables(per_env, [e for e in efforts if all(
            e in per for per in per_env.values())]).replace("### ", "#### ")]
    return "\n".join(lines) + "\n"


def safety_tables(results: Mapping[str, Mapping], efforts: Sequence[str]) -> str:
    """The safety and hierarchy rates (with 95% CIs, per category) and the judge agreement table, from the
    entries `rl.safety_eval` adds; "" for a run without safety or hierarchy tasks."""
    from rl.safety_eval import agreement_markdown, collect_guards, markdown

    text = markdown(collect_guards(results, efforts), efforts)
    text += agreement_markdown({name: per.get("judge_agreement", {}) for name, per in results.items()})
    return text and "## Safety and instruction hierarchy (held-out)\n\n" + text


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def effort_scaling_figure(results: Mapping[str, Mapping], efforts: Sequence[str], path: str | Path) -> Path:
    """Accuracy (95% CI bars) against mean CoT tokens, a line per checkpoint, a labelled point per effort."""
    from matplotlib.figure import Figure  # Agg renders savefig(".png"); no pyplot, no display

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    xs_all = []
    for name, per in results.items():
        xs = [per[e]["cot_tokens"] for e in efforts]
        ys = [per[e]["accuracy"] for e in efforts]
        err = [[max(0.0, y - per[e]["accuracy_ci95"][0]) for e, y in zip(efforts, ys)],  # matplotlib: >= 0
               [max(0.0, per[e]["accuracy_ci95"][1] - y) for e, y in zip(efforts, ys)]]
        line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        for x, y, e in zip(xs, ys, efforts):
            ax.annotate(e, (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8,
                        color=line[0].get_color())
        xs_all += xs
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
        from matplotlib.ticker import LogFormatter

        ax.set_xscale("log")  # budgets grow geometrically across efforts (16/64/256 tokens)
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # "20", not "2 x 10^1"
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("mean CoT tokens (analysis channel)")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(0, 1.05)
    ax.margins(x=0.12)  # room for the effort labels
    ax.set_title("Effort scaling: accuracy vs. chain-of-thought length")
    ax.grid(alpha=0.3)
    ax.legend(title="checkpoint")
    out = Path(path)
    fig.savefig(out, dpi=150)
    return out


def write_report(results: Mapping[str, Mapping], settings: Mapping, out_dir: str | Path) -> Path:
    """Write `effort_scaling.png` and `report.md` (figure, settings, monotonicity, tables) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    efforts = list(settings["efforts"])
    effort_scaling_figure(results, efforts, out / FIGURE)
    paths = settings.get("checkpoints") or {}
    lines = [
        "# Effort scaling report", "",
        f"Checkpoints: {', '.join(results)}. Efforts: {', '.join(efforts)}.", "",
        f"![accuracy against mean CoT tokens, one line per checkpoint, one point per effort]({FIGURE})", "",
        ("Accuracy is each sample's own env's reward term (" + ", ".join(
            f"{label}: `{term}`" for label, term in settings["env_metrics"].items()) + "; the tables per env "
         "follow the overall ones)" if settings.get("env_metrics") else
         f"Accuracy is the score of the reward term `{settings['metric']}`") + " (the training reward's own plugin), "
        "with a 95% Wilson score interval; pass@k is the unbiased estimator over the samples of each task "
        "(largest k shown; eval.json has every k); CoT tokens count the analysis channel; in budget is the "
        "fraction within the effort's `effort_length` budget (– without that reward term); truncated means "
        "the completion hit the token limit.", "",
        "## Settings", "",
        "| held-out tasks | samples per task | temperature | seed | accuracy term |",
        "|---:|---:|---:|---:|---|",
        f"| {settings['tasks']} | {settings['samples_per_task']} | {settings['temperature']} | "
        f"{settings['seed']} | {settings['metric']} |", "",
        "## Results", "", markdown_tables(results, efforts), safety_tables(results, efforts),
        "## Checkpoints", "", "| name | path |", "|---|---|",
        *[f"| {name} | {paths.get(name, '')} |" for name in results], "",
    ]
    report = out / REPORT
    report.write_text("\n".join(lines))
    return report
