"""Typed, documented config schema (Hydra structured configs), validated at start.

The YAML tree under `conf/` composes the values; `validate(cfg)` merges them onto these dataclasses so
a misspelt key or a wrong type fails at start with one line naming the key. Each run writes the
resolved config to `<run_dir>/config.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from envs.types import EFFORTS


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: Optional[str] = None  # HF folder; null = build the tiny model into the run folder
    hidden_size: int = 192  # multiple of 32 (MXFP4 groups)
    intermediate_size: int = 192  # expert width, multiple of 32
    num_hidden_layers: int = 4  # even layers sliding-window, odd full attention
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA
    head_dim: int = 64  # vLLM's CPU attention needs 64
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    sliding_window: int = 64
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    dtype: str = "float32"  # learner master weights


@dataclass
class EnvConfig:
    name: str = "math"  # procedural arithmetic (envs.math_tasks) or "dataset"
    difficulty: int = 1  # MathEnv difficulty level (1..3; see envs/math_tasks.DIFFICULTY)
    families: list[str] = field(default_factory=lambda: ["add", "mul", "muladd", "chain"])  # MathEnv problem kinds
    dataset: Optional[str] = None  # local jsonl/parquet path or Hub name (env.name=dataset)
    question_key: str = "question"
    answer_key: str = "answer"
    train_size: int = 20000  # tasks in the training pool (cycled by the data cursor)
    test_size: int = 200  # held-out tasks for evaluation
    efforts: list[str] = field(default_factory=lambda: list(EFFORTS))  # rolled out per task


@dataclass
class SFTConfig:
    enabled: bool = True
    tasks: int = 2000  # tasks rendered at every effort
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    lr_scheduler: str = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    logging_steps: int = 25
    num_threads: int = 2
    progress: bool = False
    kernels: str = "deliberate"  # deliberate | stock (transformers modules)
    final_slip_rate: float = 0.0  # fraction of cold-start traces whose final is off by one (imperfect teacher)


@dataclass
class AlgoConfig:
    name: str = "grpo"
    advantage: str = "grpo"  # grpo (mean/std) | dr_grpo (mean only)
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low = DAPO clip-higher
    kl_coef: float = 0.0  # k3 KL to the initial policy; 0 = no reference model
    entropy_coef: float = 0.0  # > 0 entropy bonus, < 0 entropy minimisation (loss -= coef * H)
    max_tokens: Optional[int] = None  # Dr.GRPO normaliser (defaults to rollout.max_tokens)
    group_size: int = 8  # samples per (task, effort)
    filter_zero_std: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal
    mini_batches: int = 1  # optimizer steps per pass over a rollout batch (shuffled split)
    ppo_epochs: int = 1  # passes over each rollout batch
    old_logprobs: str = "recompute"  # recompute (learner no-grad pass) | behavior (rollout engine's)


@dataclass
class RolloutConfig:
    engine: str = "vllm"
    num_workers: int = 1
    temperature: float = 1.0  # gpt-oss recommends 1.0
    top_p: float = 1.0
    max_tokens: int = 320  # completion budget (analysis + final)
    max_model_len: int = 512
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE
    dtype: str = "float32"
    num_cpus: float = 1.0  # Ray CPUs per worker
    num_threads: Optional[int] = 1  # engine threads; on 2 CPU cores vLLM runs 3-5x faster with 1 than 2
    max_num_seqs: int = 256  # sequences batched per engine step
    max_restarts: int = 2  # a crashed worker is restarted and the step retried


@dataclass
class LearnerConfig:
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear lr warm-up over this many optimizer steps
    micro_batch_size: int = 16
    kernels: str = "deliberate"  # deliberate (our MoE/attention/log-prob kernels) | stock (transformers)
    qat: bool = False  # experts forward on fake-quantised MXFP4 weights (STE); rollout gets those weights
    # {regex on parameter names: lr multiplier}; first match wins, 0 freezes. E.g.
    # {"norm\\.weight$": 1.0, ".": 0.0} trains only the RMSNorm gains (experiment=tiny; README says why).
    lr_scale: dict[str, float] = field(default_factory=dict)
    freeze_router: bool = False  # keep MoE routers fixed during RL (top-k flips destabilise updates)
    sync_mxfp4: bool = False  # send MXFP4-quantised experts to the rollout engine even without QAT
    logprob_chunk: int = 1024
    dtype: str = "float32"
    num_threads: int = 2
    num_cpus: float = 1.0  # Ray CPUs for the learner actor
    temperature: float = 1.0  # must match rollout.temperature (log-probs of the sampling distribution)


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"math": 1.0, "effort_length": 0.2})
    math_timeout_s: float = 5.0
    effort_budgets: dict[str, int] = field(default_factory=lambda: {"low": 16, "medium": 64, "high": 256})
    plugins: list[Any] = field(default_factory=list)  # extra `_target_` specs or registered names


@dataclass
class EvalConfig:
    every: int = 0  # held-out eval every N steps during training (0 = off)
    tasks: int = 200
    samples_per_task: int = 1
    temperature: float = 1.0
    efforts: list[str] = field(default_factory=lambda: list(EFFORTS))
    checkpoints: list[str] = field(default_factory=list)  # `python -m rl.evaluate` only: HF folders
    out_dir: Optional[str] = None  # `python -m rl.evaluate` only: where eval.{json,md} go


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # null = embedded local Ray; "auto" or "ray://host:10001" joins one
    num_cpus: Optional[int] = None  # local Ray only
    namespace: str = "deliberate"


@dataclass
class TrainConfig:
    steps: int = 20
    tasks_per_step: int = 8  # tasks per step; each at every effort x algo.group_size samples
    checkpoint_every: int = 10
    keep_checkpoints: int = 2


@dataclass
class Config:
    seed: int = 0
    run_dir: str = "outputs/run"
    resume: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def register_schema() -> None:
    """Put the schema in Hydra's ConfigStore; conf/config.yaml lists it first in its defaults, so every
    field is overridable from the command line and typed before `validate` runs."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="deliberate_schema", node=Config)


def hydra_main(fn) -> None:
    """Run `fn(cfg)` as a Hydra app on conf/config.yaml: schema registered, the timestamped run_dir
    resolved once (Hydra's output dir), the config validated before `fn` sees it."""
    import hydra

    register_schema()

    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")

    @hydra.main(config_path=conf_dir, config_name="config", version_base=None)
    def _run(cfg):
        from hydra.core.hydra_config import HydraConfig

        cfg.run_dir = HydraConfig.get().runtime.output_dir
        fn(validate(cfg))

    _run()


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key."""


def _betas_ok(betas) -> bool:
    return len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Merge onto the schema: unknown keys and wrong types fail with one line naming the key."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"bad config key '{key}': {str(exc).splitlines()[0]}") from None
    checks = [
        (merged.algo.advantage in ("grpo", "dr_grpo"), "algo.advantage", "grpo | dr_grpo"),
        (merged.learner.kernels in ("deliberate", "stock"), "learner.kernels", "deliberate | stock"),
        (merged.sft.kernels in ("deliberate", "stock"), "sft.kernels", "deliberate | stock"),
        (all(e in EFFORTS for e in merged.env.efforts), "env.efforts", "low|medium|high"),
        (merged.algo.mini_batches >= 1, "algo.mini_batches", ">= 1"),
        (merged.algo.ppo_epochs >= 1, "algo.ppo_epochs", ">= 1"),
        (merged.algo.old_logprobs in ("recompute", "behavior"), "algo.old_logprobs", "recompute | behavior"),
        (all(v >= 0 for v in merged.learner.lr_scale.values()), "learner.lr_scale", "multipliers >= 0"),
        (_betas_ok(merged.sft.betas), "sft.betas", "[beta1, beta2] each in [0, 1)"),
        (_betas_ok(merged.learner.betas), "learner.betas", "[beta1, beta2] each in [0, 1)"),
        (merged.algo.group_size >= 2, "algo.group_size", ">= 2 (GRPO needs a group)"),
        (merged.rollout.max_tokens < merged.rollout.max_model_len, "rollout.max_tokens",
         "< rollout.max_model_len (prompt must fit)"),
        (merged.learner.temperature == merged.rollout.temperature, "learner.temperature",
         "== rollout.temperature"),
        (merged.eval.temperature > 0 or merged.eval.samples_per_task == 1, "eval.samples_per_task",
         "1 for greedy decoding (eval.temperature=0)"),
    ]
    for ok, key, want in checks:
        if not ok:
            raise ConfigError(f"bad config key '{key}': must be {want}, got {OmegaConf.select(merged, key)}")
    return merged
