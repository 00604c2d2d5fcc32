"""GRPO training loop (Hydra main): rollout → reward → advantage → update → weight sync → log →
checkpoint → eval.

Run:  python -m rl.train model.path=outputs/x/sft run_dir=outputs/x/rl      (local Ray, 1 vLLM worker)
      python -m rl.train ... cluster=remote cluster.address=auto rollout.num_workers=8
      python -m rl.train ... resume=true        (continues from <run_dir>/checkpoints/latest)

What a step does (DESIGN §2): sample `train.tasks_per_step` tasks from the resumable stream, roll each
out at every effort in `env.efforts` with `algo.group_size` samples on the vLLM workers (token ids
in/out, behaviour log-probs), score with the composite reward, compute group advantages over
(task, effort) groups, take one learner step, push the new weights into the workers in place.
Each step prints one progress line with the time split rollout / reward / learner / sync.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rl import checkpoint, seeds
from rl.seeds import eval_seed
from rl.algorithms import get_advantage_fn
from rl.config import hydra_main
from rl.data import TaskStream, make_env
from rl.rollout_client import call, engine_generate, make_worker, rollout_with_restart

log = logging.getLogger("deliberate.train")


class Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - start


class TrainState:
    """Live handles of one run: learner actor, rollout workers, reward, data stream, logger."""

    def __init__(self, cfg, policy_path: str, resume_from: Path | None):
        import ray
        from torch.utils.tensorboard import SummaryWriter

        from rl.learner import learner_actor

        self.cfg = cfg
        env = make_env(cfg.env, cfg.seed)
        self.test_tasks = env.tasks("test", cfg.eval.tasks) if cfg.eval.every else []
        state = checkpoint.trainer_state(resume_from) if resume_from else {"step": 0, "cursor": 0}
        self.stream = TaskStream(env.tasks("train", cfg.env.train_size), cfg.seed, state["cursor"])
        self.step = state["step"]
        start_path = str(resume_from) if resume_from else policy_path
        Learner = learner_actor(cfg.learner.num_cpus)
        self.learner = Learner.remote(start_path, OmegaConf.to_container(cfg.learner),
                                      OmegaConf.to_container(cfg.algo), cfg.seed)
        if resume_from:
            ray.get(self.learner.load.remote(str(resume_from)))
        self.start_path = start_path
        self.workers = [make_worker(start_path, cfg.rollout, cfg.seed + i) for i in range(cfg.rollout.num_workers)]
        self.reward = build_reward(cfg.reward)
        self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"))

    def restart_workers(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = [make_worker(self.start_path, self.cfg.rollout, self.cfg.seed + i)
                        for i in range(self.cfg.rollout.num_workers)]
        sync_weights(self)

    def close(self) -> None:
        """Stop the actors of this run (Ray itself stays up for the caller)."""
        import ray

        self.writer.close()
        for actor in [*self.workers, self.learner]:
            ray.kill(actor, no_restart=True)

    def save(self) -> Path:
        import ray

        return checkpoint.save(
            self.cfg.run_dir, self.step, lambda p: ray.get(self.learner.save.remote(str(p))),
            {"cursor": self.stream.cursor, "seed": self.cfg.seed}, keep=self.cfg.train.keep_checkpoints)


def build_reward(reward_cfg):
    """CompositeReward from the `reward` node: weights by name, built-in options, extra plugins.

    plugins entries: {weight: w, name: registered_name, **options} or {weight: w, _target_: ...,
    key: log_name}."""
    from rewards.compose import CompositeReward

    options = {"math": {"timeout_s": reward_cfg.math_timeout_s},
               "effort_length": {"budgets": dict(reward_cfg.effort_budgets)}}
    spec: dict = {name: {"weight": w, **options.get(name, {})} for name, w in reward_cfg.weights.items()}
    for i, plugin in enumerate(OmegaConf.to_container(reward_cfg.plugins, resolve=True)):
        if not isinstance(plugin, dict) or "weight" not in plugin:
            raise ValueError(f"reward.plugins[{i}] must be a mapping with 'weight', got {plugin!r}")
        key = plugin.pop("key", None) or plugin.get("name") or plugin["_target_"].rsplit(".", 1)[-1]
        spec[key] = plugin
    return CompositeReward.from_config(spec)


def sync_weights(state: TrainState) -> None:
    """Learner -> every rollout worker, in place; the weights go actor to actor via Ray's store."""
    import ray

    weights = state.learner.state_for_sync.remote()
    ray.get([w.update_weights.remote(weights) for w in state.workers])


def advantages(cfg, samples, results) -> tuple[list[dict], dict[str, float]]:
    """Learner batch (dicts of canonical ids + advantage) from scored samples; DAPO group filter."""
    rewards = torch.tensor([r.score for r in results], dtype=torch.float32)
    adv = get_advantage_fn(cfg.algo.advantage)(rewards, [s.group_key for s in samples])
    batch = [{"prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids, "loss_mask": s.loss_mask,
              "behavior_logprobs": s.behavior_logprobs, "advantage": a}
             for s, a in zip(samples, adv.tolist())]
    if cfg.algo.filter_zero_std:
        scores: dict = {}
        for s, r in zip(samples, results):
            scores.setdefault(s.group_key, set()).add(round(r.score, 6))
        batch = [b for b, s in zip(batch, samples) if len(scores[s.group_key]) > 1] or batch
    return batch, {"kept_samples": float(len(batch))}


def step_metrics(samples, results) -> dict[str, float]:
    """Reward, accuracy, CoT length and format failures, overall and per effort."""
    m: dict[str, float] = {}
    for effort in sorted({s.effort for s in samples}) + ["all"]:
        idx = [i for i, s in enumerate(samples) if effort in ("all", s.effort)]
        tag = "" if effort == "all" else f"/{effort}"
        m[f"reward{tag}"] = sum(results[i].score for i in idx) / len(idx)
        m[f"accuracy{tag}"] = sum(results[i].parts.get("math", 0.0) for i in idx) / len(idx)
        m[f"cot_tokens{tag}"] = sum(samples[i].transcript.analysis_tokens for i in idx) / len(idx)
        m[f"format_failure{tag}"] = sum(not samples[i].transcript.format_ok for i in idx) / len(idx)
    m["completion_tokens"] = sum(len(s.completion_ids) for s in samples) / len(samples)
    m["truncated"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
    return m


def log_step(state: TrainState, metrics: dict[str, float], timer: Timer) -> None:
    for k, v in {**metrics, **{f"time/{k}": v for k, v in timer.t.items()}}.items():
        state.writer.add_scalar(k, v, state.step)
    cot = "/".join(f"{metrics.get(f'cot_tokens/{e}', 0):.0f}" for e in state.cfg.env.efforts)
    t = timer.t
    total = sum(t.values())
    line = (f"step {state.step}/{state.cfg.train.steps} | reward {metrics['reward']:.3f} "
            f"acc {metrics['accuracy']:.3f} fmt_fail {metrics['format_failure']:.2f} | cot {cot} | "
            f"loss {metrics['loss']:+.4f} gnorm {metrics['grad_norm']:.2f} | {total:.1f}s (rollout "
            f"{t.get('rollout', 0):.1f} reward {t.get('reward', 0):.1f} learner {t.get('learner', 0):.1f} "
            f"sync {t.get('sync', 0):.2f})")
    print(line, flush=True)
    with open(Path(state.cfg.run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": state.step, **metrics, **{f"time/{k}": v for k, v in t.items()}}) + "\n")


def periodic_eval(state: TrainState) -> None:
    from rl.evaluate import evaluate_policy

    cfg = state.cfg
    gen = engine_generate(state.workers[0], cfg, temperature=cfg.eval.temperature, seed=eval_seed(cfg.seed))
    res = evaluate_policy(gen, state.test_tasks, cfg.eval.efforts, cfg.eval.samples_per_task,
                          cfg.reward.math_timeout_s)
    for effort, m in res.items():
        for k, v in m.items():
            state.writer.add_scalar(f"eval/{k}/{effort}", v, state.step)
    print("eval " + " | ".join(f"{e}: acc {m['accuracy']:.3f} cot {m['cot_tokens']:.0f}"
                               for e, m in res.items()), flush=True)


def train(cfg, policy_path: str | None = None) -> TrainState:
    """Run GRPO from `policy_path` (or cfg.model.path) for cfg.train.steps steps; returns the state."""
    import ray

    from rl.cluster import init_ray

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    init_ray(cfg.cluster)
    resume_from = checkpoint.latest(cfg.run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log.warning("resume=true but %s has no checkpoint; starting fresh", cfg.run_dir)
    state = TrainState(cfg, policy_path or cfg.model.path, resume_from)
    while state.step < cfg.train.steps:
        timer = Timer()
        tasks = state.stream.next(cfg.train.tasks_per_step)
        step_seed = seeds.step_seed(cfg.seed, state.step)
        with timer("rollout"):
            samples = rollout_with_restart(state, tasks, cfg.env.efforts, cfg.algo.group_size, cfg, step_seed)
        with timer("reward"):
            results = state.reward.score_batch(samples)
        with timer("advantage"):
            batch, extra = advantages(cfg, samples, results)
        with timer("learner"):
            metrics = ray.get(state.learner.train_step.remote(batch))
        with timer("sync"):
            sync_weights(state)
        state.step += 1
        log_step(state, {**step_metrics(samples, results), **metrics, **extra}, timer)
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.steps:
            state.save()
        if cfg.eval.every and state.step % cfg.eval.every == 0:
            periodic_eval(state)
    state.writer.flush()
    return state


def main() -> None:
    def run(cfg):
        if not cfg.model.path:
            raise SystemExit("train: set model.path to an HF checkpoint (or run `python -m rl.pipeline`)")
        train(cfg)

    hydra_main(run)

if __name__ == "__main__":
    main()
