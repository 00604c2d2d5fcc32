"""Driver-side glue for rollout engines: build them from config, call them the same way whether they
are in-process `RolloutEngine`s or Ray actor handles, restart crashed workers, and turn tasks into
`Sample`s (token ids in, ids + behaviour log-probs out, parsed Harmony transcript)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

from envs import harmony
from envs.types import Sample, Task

log = logging.getLogger(__name__)


def engine_config(rollout_cfg, seed: int) -> dict[str, Any]:
    """The engine's settings from the `rollout` node (EngineConfig.from_dict picks its fields)."""
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(rollout_cfg, resolve=True), "seed": seed}


def make_engine(model_path: str, rollout_cfg, seed: int):
    """An in-process vLLM engine (evaluation, tests)."""
    from rl.rollout import RolloutEngine

    return RolloutEngine(str(model_path), engine_config(rollout_cfg, seed))


def make_worker(model_path: str, rollout_cfg, seed: int):
    """A vLLM engine inside a Ray actor."""
    from rl.rollout import RolloutWorker

    return RolloutWorker.options(num_cpus=rollout_cfg.num_cpus).remote(
        str(model_path), engine_config(rollout_cfg, seed))


def call(engine, method: str, *args, **kwargs):
    """engine.method(...) for a local engine, ray.get(engine.method.remote(...)) for an actor."""
    fn = getattr(engine, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args, **kwargs))
    return fn(*args, **kwargs)


def engine_generate(engine, cfg, temperature: float, seed: int | None):
    """A `(prompts, n) -> completions` function bound to the rollout settings of `cfg`."""
    def generate(prompts: list[list[int]], n: int):
        return call(engine, "generate", prompts, n=n, temperature=temperature, top_p=cfg.rollout.top_p,
                    max_tokens=cfg.rollout.max_tokens, seed=seed)
    return generate


def rollout(workers: list, tasks: Sequence[Task], efforts: Sequence[str], group_size: int, cfg,
            seed: int) -> list[Sample]:
    """Every task at every effort, `group_size` samples each, spread over the workers."""
    import ray

    jobs = [(t, e, harmony.render_prompt(t.question, e, t.developer)) for t in tasks for e in efforts]
    shards = [jobs[i :: len(workers)] for i in range(len(workers))]
    refs = [w.generate.remote([p for _, _, p in shard], n=group_size, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_tokens, seed=seed + i)
            for i, (w, shard) in enumerate(zip(workers, shards)) if shard]
    samples: list[Sample] = []
    for shard, comps_per_prompt in zip([s for s in shards if s], ray.get(refs)):
        for (task, effort, prompt), comps in zip(shard, comps_per_prompt):
            for c in comps:
                samples.append(Sample(
                    task_id=task.task_id, env=task.env, effort=effort, prompt_ids=prompt,
                    completion_ids=list(c.ids), loss_mask=[1] * len(c.ids),
                    behavior_logprobs=list(c.logprobs), transcript=harmony.parse_completion(c.ids),
                    metadata=dict(task.metadata), finish_reason=c.finish_reason))
    return samples


def rollout_with_restart(state, tasks, efforts, group_size, cfg, seed) -> list[Sample]:
    """`rollout`, restarting crashed workers (from the learner's current weights) and retrying."""
    import ray

    for attempt in range(cfg.rollout.max_restarts + 1):
        try:
            return rollout(state.workers, tasks, efforts, group_size, cfg, seed)
        except ray.exceptions.RayActorError as exc:
            if attempt == cfg.rollout.max_restarts:
                raise
            log.warning("rollout worker died (%s); restarting and retrying the step", exc)
            state.restart_workers()
    raise AssertionError("unreachable")
