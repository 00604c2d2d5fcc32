"""GRPO training loop (Hydra main): rollout → reward → advantage → update → weight sync → log →
checkpoint → eval.

Run:  python -m rl.train model.path=outputs/x/sft run_dir=outputs/x/rl      (local Ray, 1 vLLM worker)
      python -m rl.train ... cluster=remote rollout.num_workers=8           (a running Ray cluster)
      python -m rl.train ... resume=true        (continues from the last complete checkpoint)

What a step does (docs/ARCHITECTURE.md, "One training step"): take `train.tasks_per_step` tasks from
the resumable stream, roll each out at every effort in `env.efforts` with `algo.group_size` samples
(`WorkerPool.rollout`: token ids in/out, behaviour log-probs), score with the composite reward,
compute group advantages over (task, effort) groups, collate one `TrainBatch`, take one learner step,
push the new weights into the workers in place. Each step prints one line with the time split.
With `train.max_staleness=1` the next step's rollout runs while the learner trains
(rl/async_rollouts.py: one-step-off, every sample stamped with the weights version that drew it;
the sync waits for that rollout, so none mixes two versions).

`train_loop` receives its learner, worker pool, reward and logger as arguments (anything with the same
methods), so the fast test tier drives whole steps with in-process fakes; `train` builds the real
ones on Ray and releases them when it returns.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import Future
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch

from envs.types import Sample, Task
from rewards.types import RewardResult
from rl import checkpoint
from rl.algorithms import get_advantage_fn, informative_groups
from rl.async_rollouts import RolloutQueue
from rl.batch import TrainBatch, collate
from rl.config import Config, hydra_main, to_yaml
from rl.data import TaskStream, make_env, make_reward
from rl.model import VocabMap

log = logging.getLogger("deliberate.train")


class Policy(Protocol):
    """What the loop needs of a learner (`rl.learner.Learner`, `RemoteLearner`, a test fake)."""

    def train_step(self, batch: TrainBatch) -> dict[str, float]: ...
    def weights(self) -> Any: ...
    def save(self, path) -> None: ...
    # and, only for train.max_staleness=1 with learner.overlap_threads (rl/overlap.py):
    # rollout_tracker() -> a tracker it watches; watch_rollouts(None) stops watching


class Rollouts(Protocol):
    """What the loop needs of a worker pool (`rl.workers.WorkerPool`, a test fake)."""

    restarts: int

    def submit(self, tasks: Sequence[Task], efforts: Sequence[str], group_size: int,
               seed: int) -> "Future[list[Sample]]": ...
    def update_weights(self, weights, version: int | None = None) -> None: ...


class Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - start


@dataclass
class TrainResult:
    step: int  # steps completed (== cfg.train.steps unless interrupted)
    checkpoint: Path | None  # the last checkpoint written


def build_batch(cfg: Config, samples: Sequence[Sample], results: Sequence[RewardResult],
                vmap: VocabMap) -> tuple[TrainBatch, dict[str, float]]:
    """Advantages over (task, effort) groups, the DAPO group filter, then `collate`."""
    rewards = torch.tensor([r.score for r in results], dtype=torch.float64)  # (N,)
    groups = [s.group_key for s in samples]
    adv = get_advantage_fn(cfg.algo.advantage)(rewards, groups)  # (N,)
    keep = torch.ones(len(samples), dtype=torch.bool)
    if cfg.algo.filter_zero_std:
        keep = informative_groups(rewards, groups)
        if not keep.any():  # every group constant: all advantages are 0; keep the step's shape
            keep = torch.ones_like(keep)
    idx = keep.nonzero().flatten().tolist()
    batch = collate([samples[i] for i in idx], adv[idx], vmap)
    return batch, {"kept_samples": float(len(idx)), "advantage_abs": float(adv.abs().mean())}


def step_metrics(samples: Sequence[Sample], results: Sequence[RewardResult], metric: str,
                 env_metric: Mapping[str, str] | None = None) -> dict[str, float]:
    """Reward, accuracy (reward term `metric`), CoT length, format failures, budget forcing rate and
    budget compliance (with an "effort_length" term), overall and per effort; monotonicity of CoT
    tokens across the step's efforts per task (with two efforts or more); tool calls per sample. See rl/effort_metrics.py. With
    "safety" or "hierarchy" terms: refusal, over-refusal, harmful-compliance, judge-failure, leak and
    rule-break rates (rewards.safety.safety_metrics). With `env_metric` ({mixture label: its accuracy
    term}, `rl.evaluate.env_metrics`), accuracy scores each sample by its own env's term, and
    "reward/env/<label>", "accuracy/env/<label>" give each env's means."""
    from envs.mixture import label_of
    from rewards.safety import safety_metrics
    from rl import effort_metrics as em

    m: dict[str, float] = {}
    if env_metric:
        results = [em.scored_as(r, env_metric[label_of(s.task_id)]) for s, r in zip(samples, results)]
        metric = em.ACCURACY
        for label in env_metric:
            scored = [r for s, r in zip(samples, results) if label_of(s.task_id) == label]
            if scored:
                m[f"reward/env/{label}"] = em.mean_reward(scored)
                m[f"accuracy/env/{label}"] = em.accuracy(scored, metric)
    for effort in sorted({s.effort for s in samples}) + ["all"]:
        idx = [i for i, s in enumerate(samples) if effort in ("all", s.effort)]
        part, scored = [samples[i] for i in idx], [results[i] for i in idx]
        tag = "" if effort == "all" else f"/{effort}"
        m[f"reward{tag}"] = em.mean_reward(scored)
        m[f"accuracy{tag}"] = em.accuracy(scored, metric)
        m[f"cot_tokens{tag}"] = em.cot_token_stats(part)["cot_tokens"]
        m[f"format_failure{tag}"] = em.format_failure_rate(part)
        m[f"budget_forced{tag}"] = em.budget_forced_rate(part)
        if (compliance := em.budget_compliance(scored)) is not None:
            m[f"budget_compliance{tag}"] = compliance
    if (mono := em.monotonicity(samples)) is not None:
        m["monotonicity"] = mono
    m["completion_tokens"] = sum(len(s.completion_ids) for s in samples) / len(samples)
    m["truncated"] = em.truncation_rate(samples)
    m["tool_calls"] = sum(s.transcript.tool_calls for s in samples) / len(samples)  # per sample (python tool)
    m["reward_errors"] = sum(any(k.endswith("/error") for k in r.parts) for r in results) / len(results)
    m.update(safety_metrics(results))
    return m


def step_line(cfg: Config, step: int, metrics: dict[str, float], t: dict[str, float]) -> str:
    cot = "/".join(f"{metrics.get(f'cot_tokens/{e}', 0):.0f}" for e in cfg.env.efforts)
    return (f"step {step}/{cfg.train.steps} | reward {metrics['reward']:.3f} acc {metrics['accuracy']:.3f} "
            f"fmt_fail {metrics['format_failure']:.2f} | cot {cot} | loss {metrics['loss']:+.4f} "
            f"gnorm {metrics['grad_norm']:.2f} | {sum(t.values()):.1f}s (rollout {t.get('rollout', 0):.1f} "
            f"reward {t.get('reward', 0):.1f} learner {t.get('learner', 0):.1f} sync {t.get('sync', 0):.2f})")


def train_loop(cfg: Config, learner: Policy, pool: Rollouts, reward, stream: TaskStream, logger, vmap: VocabMap,
               *, start_step: int = 0, initial_policy: str = "", evaluate=None) -> TrainResult:
    """Steps `start_step + 1 .. cfg.train.steps`; checkpoints every `train.checkpoint_every` steps and
    at the end. `evaluate(step)` (optional) runs every `eval.every` steps."""
    from rl.evaluate import env_metrics

    step, last, env_metric = start_step, None, env_metrics(cfg)
    # learner.overlap_threads: the learner yields cores while a rollout runs beside it (rl/overlap.py)
    tracker = learner.rollout_tracker() if cfg.train.max_staleness and cfg.learner.overlap_threads else None
    rollouts = RolloutQueue(cfg, pool, stream, start_step, tracker)  # up to train.max_staleness steps ahead
    try:
        while step < cfg.train.steps:
            timer = Timer()
            with timer("rollout"):
                samples, staleness = rollouts.take(step + 1)  # submits the next step's first when async
            with timer("reward"):
                results = reward.score_batch(samples)
            with timer("advantage"):
                batch, extra = build_batch(cfg, samples, results, vmap)
            with timer("learner"):
                metrics = learner.train_step(batch)
            with timer("rollout"):
                rollouts.drain()  # async: the next step's rollout (running since this step began) ends first
            with timer("sync"):
                pool.update_weights(learner.weights(), version=step + 1)
            step += 1
            metrics = {**step_metrics(samples, results, cfg.eval.metric, env_metric), **metrics, **extra, **staleness,
                       "worker_restarts": float(pool.restarts), **{f"time/{k}": v for k, v in timer.t.items()}}
            logger.log(metrics, step)
            print(step_line(cfg, step, metrics, timer.t), flush=True)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                last = checkpoint.save(cfg.run_dir, step, learner.save,
                                       {"cursor": rollouts.cursor, "seed": cfg.seed, "initial_policy": initial_policy},
                                       keep=cfg.train.keep_checkpoints)
            if evaluate is not None and cfg.eval.every and step % cfg.eval.every == 0:
                evaluate(step)
    finally:
        if tracker is not None:
            with contextlib.suppress(Exception):  # a learner already gone: nothing to stop
                learner.watch_rollouts(None)
            tracker.close()
    return TrainResult(step, last)


@dataclass
class Run:
    """The live parts of one training run, built by `start_run` and released when it ends."""

    learner: Any
    pool: Any
    reward: Any
    stream: TaskStream
    vmap: VocabMap
    start_step: int
    initial_policy: str


def resume_point(cfg: Config, policy_path: str) -> tuple[Path | None, dict]:
    """The checkpoint to resume from (newest complete one) and its trainer state, or (None, {})."""
    if not cfg.resume:
        return None, {}
    path = checkpoint.latest(cfg.run_dir)
    if path is None:
        found = sorted(p.name for p in checkpoint.ckpt_root(cfg.run_dir).glob("step_*"))
        if found:  # starting fresh would prune them at the first save: stop instead
            raise checkpoint.CheckpointError(
                f"resume=true but no checkpoint in {checkpoint.ckpt_root(cfg.run_dir)} verifies ({found}); "
                "the warnings above name the broken files. Move them away to start fresh")
        log.warning("resume=true but %s has no checkpoint; starting fresh", cfg.run_dir)
        return None, {}
    state = checkpoint.trainer_state(path)
    if state.get("initial_policy") and state["initial_policy"] != str(policy_path):
        log.warning("resuming a run started from %s with model.path=%s; the KL reference and the run's "
                    "initial policy stay %s", state["initial_policy"], policy_path, state["initial_policy"])
    return path, state


@contextmanager
def start_run(cfg: Config, policy_path: str, make_learner=None, make_pool=None) -> Iterator[Run]:
    """The learner, the worker pool and the reward for `cfg`; every actor is released on exit.

    By default a Ray learner actor (`RemoteLearner`; with `learner.world_size > 1` the FSDP2
    `rl.learner_group.LearnerGroup`, one actor per rank) and a vLLM `WorkerPool` on the cluster
    `cfg.cluster` names; `make_learner(path, learner_cfg, algo_cfg, seed)` / `make_pool(path,
    rollout_cfg, seed)` replace them (in-process learners, test fakes: no Ray is started then)."""
    resume_from, state = resume_point(cfg, policy_path)
    initial = state.get("initial_policy") or str(policy_path)
    placement = None  # the run's Ray placement group (cluster.placement; rl/placement.py)
    if make_learner is None or make_pool is None:
        from rl.cluster import init_ray
        from rl.placement import RunPlacement

        init_ray(cfg.cluster)
        placement = RunPlacement.create(cfg)
    if make_learner is None and cfg.learner.world_size > 1:
        from rl.learner_group import LearnerGroup

        make_learner = functools.partial(LearnerGroup, options=placement.learner_options)
    elif make_learner is None:
        from rl.learner import RemoteLearner

        make_learner = functools.partial(RemoteLearner, options=placement.learner_options(0))
    if make_pool is None:
        from rl.workers import WorkerPool

        make_pool = functools.partial(WorkerPool, options=placement.worker_options)
    env = make_env(cfg.env, cfg.seed)
    stream = TaskStream(env.tasks("train", cfg.env.train_size), cfg.seed, state.get("cursor", 0))
    reward = make_reward(cfg.reward)
    learner = make_learner(initial, cfg.learner, cfg.algo, cfg.seed)  # KL reference = initial policy
    pool = None
    try:
        if resume_from is not None:
            learner.load(resume_from)
        # Engines start from the initial policy (a folder that outlives pruning: a replacement worker
        # starts from it too) and get the learner's weights before the first rollout: after a resume,
        # and under QAT, where the engines serve the learner's MXFP4-quantised experts.
        pool = make_pool(initial, cfg.rollout, cfg.seed)
        pool.update_weights(learner.weights(), version=state.get("step", 0))
        yield Run(learner, pool, reward, stream, VocabMap.load(initial), state.get("step", 0), initial)
    finally:
        if pool is not None:
            pool.close()
        learner.close()
        if placement is not None:
            placement.remove()


def periodic_eval(cfg: Config, run: Run, logger):
    """`evaluate(step)` for `train_loop`: held-out accuracy per effort through the training reward."""
    from rl.evaluate import evaluate_policy, scalars

    tasks = make_env(cfg.env, cfg.seed).tasks("test", cfg.eval.tasks)

    def evaluate(step: int) -> None:
        res = evaluate_policy(run.pool, tasks, cfg, run.reward)
        logger.log(scalars(res), step)
        print("eval " + " | ".join(f"{e}: acc {res[e]['accuracy']:.3f} cot {res[e]['cot_tokens']:.0f}"
                                   for e in cfg.eval.efforts), flush=True)

    return evaluate


@contextmanager
def session(cfg: Config, policy_path: str, make_learner=None, make_pool=None) -> Iterator[tuple[Run, Any]]:
    """`start_run` plus the run folder, its resolved config.yaml and the metrics logger; releases every
    actor on exit (Ray itself too, if this call started it)."""
    import ray

    from rl.metrics import MetricsLogger

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "config.yaml").write_text(to_yaml(cfg))
    owns_ray = not ray.is_initialized()
    try:
        with start_run(cfg, policy_path, make_learner, make_pool) as run, \
                MetricsLogger(cfg.run_dir, cfg.logging, config=_plain(cfg)) as logger:
            yield run, logger
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()


def fit(cfg: Config, run: Run, logger) -> TrainResult:
    """`train_loop` on the parts of a `session`."""
    return train_loop(cfg, run.learner, run.pool, run.reward, run.stream, logger, run.vmap,
                      start_step=run.start_step, initial_policy=run.initial_policy,
                      evaluate=periodic_eval(cfg, run, logger))


def train(cfg: Config, policy_path: str | None = None, make_learner=None, make_pool=None) -> TrainResult:
    """GRPO from `policy_path` (or cfg.model.path) for cfg.train.steps steps; every actor is released
    when it returns. `make_learner`/`make_pool`: see `start_run`."""
    with session(cfg, str(policy_path or cfg.model.path), make_learner, make_pool) as (run, logger):
        return fit(cfg, run, logger)


def _plain(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def main() -> None:
    def run(cfg: Config):
        if not cfg.model.path:
            raise SystemExit("train: set model.path to an HF checkpoint (or run `python -m rl.pipeline`)")
        from rl.model import resolve_checkpoint

        train(cfg, resolve_checkpoint(cfg.model))  # a Hub id becomes its cached folder

    hydra_main(run)


if __name__ == "__main__":
    main()
