"""The tiny end-to-end pipeline (what `make demo` runs):

    build tiny gpt-oss → cold-start SFT (TRL) → GRPO (Ray + vLLM) → evaluate SFT vs RL per effort

Run:  python -m rl.pipeline experiment=tiny            (≈ minutes on 2 CPU cores)
Outputs in `run_dir`: model/ (initial), sft/, sft_logs/ (SFT metrics), sft_data.json (with safety tasks: what
the deliberative filter kept, rl/deliberative.py), checkpoints/step_*/ (RL), tensorboard/,
metrics.jsonl,
eval/eval.{json,md} (the table printed at the end), timings.json.
With `model.path=...` the build step is skipped (a real gpt-oss checkpoint: a folder or a Hub id, see
`rl.model.resolve_checkpoint`; set `sft.enabled=false` to start RL from it directly, as the
`experiment=gpt_oss_*` presets do).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

from rl import checkpoint
from rl.config import Config, hydra_main, mixture_components
from rl.seeds import sft_seed


def build_model(cfg: Config, out: Path) -> Path:
    """The tiny model, its vocabulary built from the env's corpus and traces (and, with the python
    tool on, the tool's prompts and typical answers)."""
    from envs.types import ToolTrace
    from rl.data import make_env
    from rl.model import build_tiny_model
    from rl.tools import vocabulary_ids

    env = make_env(cfg.env, cfg.seed)
    corpus = env.vocabulary_corpus()
    for t in env.tasks("train", 200) + env.tasks("test", 50):
        corpus.append(t.question)
        for e in cfg.env.efforts:
            trace = env.solution(t, e)
            corpus += trace.texts() if isinstance(trace, ToolTrace) else trace
    if cfg.sft.deliberative.enabled and cfg.sft.deliberative.teacher == "policy":
        from rl.deliberative import teacher_corpus

        corpus += teacher_corpus(env.tasks("train", cfg.sft.tasks, seed=sft_seed(cfg.seed)))  # the SFT tasks' specs
    tool = cfg.rollout.tools.python
    return build_tiny_model(asdict(cfg.model), corpus, out, seed=cfg.seed,
                            extra_ids=vocabulary_ids(tool) if tool.enabled else ())


def run_sft_stage(cfg: Config, model_path: Path, out: Path) -> dict:
    from rl.data import make_env
    from rl.model import VocabMap
    from rl.sft import run_sft, sft_examples

    env = make_env(cfg.env, cfg.seed)
    tasks = env.tasks("train", cfg.sft.tasks, seed=sft_seed(cfg.seed))
    solution = sft_solution_fn(cfg, tasks, env.solution, Path(cfg.run_dir) / "sft_data.json", model_path)
    rows = sft_examples(tasks, solution, VocabMap.load(model_path), cfg.env.efforts,
                        final_slip_rate=cfg.sft.final_slip_rate, seed=cfg.seed, tool=cfg.rollout.tools.python)
    return run_sft(model_path, out, rows, cfg.sft, seed=cfg.seed, logging=cfg.logging,
                   logging_dir=str(Path(cfg.run_dir) / "sft_logs"))


def sft_solution_fn(cfg: Config, tasks: list, solution, report: Path, model_path: Path | str | None = None):
    """The SFT traces: the env's own, except that safety tasks get deliberative data (rl/deliberative.py:
    spec-in-context teacher, judge filter, spec removed for training) when `sft.deliberative.enabled`. The
    teacher is the templated one, or (`sft.deliberative.teacher=policy`) rollout workers sampling
    `teacher_model` (default `model_path`, the checkpoint about to be fine-tuned). The filter's stats go to
    `report` (JSON) and the console."""
    from rl.deliberative import SAFETY_ENV, deliberative_solutions, filtered_solution_fn

    d = cfg.sft.deliberative
    if not d.enabled or not any(t.env == SAFETY_ENV for t in tasks):
        return solution
    from rewards.safety import make_judge

    judge = make_judge(d.judge, **d.judge_options)
    with deliberative_teacher(cfg, d.teacher_model or model_path, tasks, student=model_path) as teacher:
        kept, stats = deliberative_solutions(tasks, cfg.env.efforts, judge, teacher, seed=cfg.seed)
    report.write_text(json.dumps({"judge": d.judge, "teacher": d.teacher, "teacher_noise": d.teacher_noise,
                                  **stats.as_dict()}, indent=1))
    print(f"deliberative SFT data: the {d.judge} judge kept {stats.kept}/{stats.candidates} safety candidates "
          f"({stats.kept_fraction:.1%}; rejected {dict(stats.rejected)}) -> {report}", flush=True)
    return filtered_solution_fn(kept, solution)


@contextlib.contextmanager
def deliberative_teacher(cfg: Config, checkpoint: Path | str | None, tasks: list, student: Path | str | None = None):
    """The teacher of `sft.deliberative.teacher`: templated, or a `SampledTeacher` over rollout workers serving
    `checkpoint` (`cfg.rollout`'s engine settings, `max_model_len` raised to fit the longest spec-in-context
    prompt of `tasks`; the workers are closed on exit, Ray too if started here). Candidates that `student`'s
    vocabulary cannot render are rejected. A teacher whose vocabulary lacks the prompts' ids fails here, saying so."""
    from rl.deliberative import SampledTeacher, TemplateTeacher, teacher_prompts
    from rl.model import VocabMap

    d = cfg.sft.deliberative
    if d.teacher == "template":
        yield TemplateTeacher(d.teacher_noise)
        return
    if not checkpoint:
        raise ValueError("sft.deliberative.teacher=policy needs a checkpoint: set sft.deliberative.teacher_model")
    prompts = teacher_prompts(tasks, cfg.env.efforts)
    teacher_vocab = VocabMap.load(checkpoint)
    if not all(teacher_vocab.covers(p) for p in prompts):
        raise ValueError(f"sft.deliberative.teacher=policy: the teacher checkpoint {checkpoint} has a trimmed "
                         "vocabulary without the spec text of its prompts; build the tiny model with "
                         "sft.deliberative.teacher=policy (rl.pipeline adds it) or use a full-vocabulary checkpoint")
    longest = max((len(p) for p in prompts), default=0)
    rollout = dataclasses.replace(cfg.rollout, max_model_len=max(cfg.rollout.max_model_len,
                                                                 longest + cfg.rollout.max_tokens))
    import ray

    from rl.cluster import init_ray
    from rl.workers import WorkerPool

    owns_ray, pool = not ray.is_initialized(), None
    try:
        init_ray(cfg.cluster)
        pool = WorkerPool(str(checkpoint), rollout, cfg.seed)
        yield SampledTeacher(pool, temperature=d.teacher_temperature, seed=cfg.seed,
                             covers=VocabMap.load(student).covers if student else None)
    finally:
        if pool is not None:
            pool.close()
        if owns_ray and ray.is_initialized():
            ray.shutdown()


def run(cfg: Config) -> dict:
    from rl.evaluate import evaluate_checkpoints
    from rl.model import resolve_checkpoint
    from rl.train import fit, session

    names = [c.config.name for c in mixture_components(cfg.env).values()] or [cfg.env.name]
    if "dataset" in names and (cfg.sft.enabled or not cfg.model.path):
        raise SystemExit("pipeline: env=dataset has no generated solution traces for the tiny "
                         "build/SFT; pass model.path=<HF checkpoint> and sft.enabled=false")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    resuming = cfg.resume and (run_dir / "sft" / "config.json").exists()
    if cfg.model.path:  # a folder, or a Hub id fetched into the cache; a named preset must match it
        policy = resolve_checkpoint(cfg.model)
    elif resuming:  # the initial policy of the run being resumed (its KL reference): never rebuilt
        policy = run_dir / "model"
    else:
        policy = build_model(cfg, run_dir / "model")
    timings["build"] = time.perf_counter() - t0
    if cfg.sft.enabled and resuming:
        policy = run_dir / "sft"
        print(f"resume: keeping the SFT checkpoint {policy}", flush=True)
    elif cfg.sft.enabled:
        t = time.perf_counter()
        sft_metrics = run_sft_stage(cfg, policy, run_dir / "sft")
        policy = run_dir / "sft"
        timings["sft"] = time.perf_counter() - t
        print(f"SFT done: {sft_metrics} in {timings['sft']:.0f}s", flush=True)
    t = time.perf_counter()
    with session(cfg, str(policy)) as (live, logger):
        result = fit(cfg, live, logger)
        timings["grpo"] = time.perf_counter() - t
        t = time.perf_counter()
        final = result.checkpoint or checkpoint.latest(cfg.run_dir)  # None: a resumed run that was done
        names = {"sft" if cfg.sft.enabled else "initial": str(policy), "rl": str(final)}
        results = evaluate_checkpoints(names, cfg, run_dir / "eval", pool=live.pool, reward=live.reward)
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
