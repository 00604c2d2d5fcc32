"""Task sources for training and evaluation, with a resumable data cursor.

`TaskStream` cycles through a fixed, seeded pool of training tasks in a seeded order; its whole state
is the integer `cursor`, saved in every checkpoint so `resume=true` continues with the next unseen
task. Held-out tasks come from the environment's test split (never overlapping training).
"""
from __future__ import annotations

import random

from envs.types import Task
from rl.config import EnvConfig, RewardConfig, mixture_components


def make_env(env_cfg: EnvConfig, seed: int):
    """The task environment named by `env.name` ("math", "chain", "dataset", "safety", "hierarchy", "code";
    the schema checks the choice), or with `env.mixture` an `envs.mixture.MixtureEnv` of its components."""
    if env_cfg.mixture:
        from envs.mixture import MixtureEnv

        return MixtureEnv({label: (_single_env(c.config, seed), c.weight)
                           for label, c in mixture_components(env_cfg).items()}, seed=seed)
    return _single_env(env_cfg, seed)


def _single_env(env_cfg: EnvConfig, seed: int):
    if env_cfg.name == "chain":
        from envs.chain_tasks import ChainEnv

        return ChainEnv(seed=seed, steps=env_cfg.steps, shuffle_rows=env_cfg.chain_shuffle_rows,
                        fixed_points=env_cfg.chain_fixed_points)
    if env_cfg.name == "walk":
        from envs.walk_tasks import WalkEnv

        return WalkEnv(seed=seed, steps=env_cfg.steps, stay=env_cfg.walk_stay, show_doors=env_cfg.walk_show_doors,
                       stop=env_cfg.walk_stop, draw=env_cfg.walk_draw)
    if env_cfg.name == "math":
        from envs.math_tasks import MathEnv

        return MathEnv(seed=seed, difficulty=env_cfg.difficulty, families=tuple(env_cfg.families),
                       digit_sum_trace=env_cfg.digit_sum_trace, tool_traces=env_cfg.tool_traces)
    if env_cfg.name == "dataset":
        from envs.datasets_loader import DatasetEnv

        return DatasetEnv(env_cfg.dataset, question_key=env_cfg.question_key, answer_key=env_cfg.answer_key,
                          answer_format=env_cfg.answer_format, test_fraction=env_cfg.test_fraction)
    if env_cfg.name == "safety" and env_cfg.dataset:
        from envs.safety_datasets import SafetyDatasetEnv

        return SafetyDatasetEnv(env_cfg.dataset, spec_path=env_cfg.spec, prompt_key=env_cfg.question_key,
                                category_key=env_cfg.category_key, category=env_cfg.category)
    if env_cfg.name == "safety":
        from envs.safety_tasks import SafetyEnv

        return SafetyEnv(spec_path=env_cfg.spec, seed=seed)
    if env_cfg.name == "hierarchy":
        from envs.hierarchy import HierarchyEnv

        return HierarchyEnv(seed=seed, protections=tuple(env_cfg.protections), attacks=tuple(env_cfg.attacks))
    if env_cfg.name == "code" and env_cfg.dataset:
        from envs.code_datasets import CodeDatasetEnv

        return CodeDatasetEnv(env_cfg.dataset, layout=env_cfg.code_layout, test_fraction=env_cfg.test_fraction)
    if env_cfg.name == "code":
        from envs.code_tasks import CodeEnv

        return CodeEnv(seed=seed, families=tuple(env_cfg.code_families))
    raise ValueError(f"env.name={env_cfg.name!r} is unknown; valid: ['chain', 'code', 'dataset', 'hierarchy', 'math', "
                     "'safety', 'walk']")


def make_reward(reward_cfg: RewardConfig):
    """The composite reward of the `reward` node (training and evaluation score with the same one)."""
    import rl.judge_server  # noqa: F401  registers the vLLM judge backend (judge=vllm) with rewards.safety
    from rewards.compose import CompositeReward

    return CompositeReward.from_config(reward_cfg.terms, on_error=reward_cfg.on_error,
                                       timeout_s=reward_cfg.timeout_s)


class TaskStream:
    """Seeded, resumable iterator over a training pool. State = `cursor` (tasks consumed)."""

    def __init__(self, pool: list[Task], seed: int, cursor: int = 0):
        if not pool:
            raise ValueError("the training task pool is empty; check env.train_size and the dataset")
        self.pool, self.seed, self.cursor = pool, seed, cursor

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.pool)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[Task]:
        out, cached = [], (None, None)
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.pool))
            if cached[0] != epoch:
                cached = (epoch, self._order(epoch))
            out.append(self.pool[cached[1][pos]])
            self.cursor += 1
        return out
