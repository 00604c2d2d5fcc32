"""Learner: holds the policy, recomputes log-probs, takes GRPO optimizer steps, hands out weights.

Algorithm-blind (STYLE 11): the advantage is computed by the train loop; the loss is
`rl.algorithms.policy_loss` with the clip range/aggregation from the `algo` config. The learner's
input is one `rl.batch.TrainBatch` of tensors (built by `rl.batch.collate`); it runs forward/backward
with AdamW and gradient clipping and returns float metrics.

The KL reference (`algo.kl_coef > 0`) is the policy the learner was constructed from, for the whole
run: a resumed run constructs the learner from the same initial policy and then `load`s the
checkpoint's weights and optimizer into it.

LoRA (`learner.lora.rank > 0`, rl/lora.py): the policy is the frozen base with adapters, the only
parameters in the optimizer; the KL reference is the same model with its adapters disabled (no second
copy); `state_for_sync` and checkpoints carry the merged weights, and checkpoints the adapters too.

Run as a Ray actor (`RemoteLearner` wraps the handle behind the same methods) in the pipeline, or
in-process (tests, benches). Log-probs use the
chunked selective log-softmax from `kernels.logprobs` when `learner.kernels=deliberate` (never builds
(B, T, V) logits) and the MoE/attention kernels from `kernels.patch`; `learner.kernels=stock` keeps
transformers' modules and full logits.

Device (`learner.device`, rl/device.py): the policy, the KL reference, the optimizer state and every
batch live on it; batches arrive on CPU and move once per `train_step`; `state_for_sync` and
`logprobs` hand back CPU tensors. On CUDA the same `learner.kernels=deliberate` switch selects the
Triton kernels, by tensor device: MoE experts as grouped Triton GEMMs (kernels/moe_grouped_triton.py,
in the autocast dtype under autocast), attention with sinks in Triton (kernels/attention_triton.py;
right-padded batches are passed without their padding mask on CUDA, because under causal attention no
real token sees a padded key, and a mask would send attention to the blocked torch path). The chunked
log-prob kernel has no Triton twin: it runs as torch ops on the GPU. `learner.autocast=auto` adds bf16
autocast over fp32 master weights on CUDA and nothing on CPU, where results are bit-identical to a
learner without these options.

Shared prompts (`learner.share_prompts`; on by default for a CPU learner alone with our kernels): a
micro-batch's rows that share a prompt (a GRPO group) run it once (`shared_prompt_states`: the prompts'
pass records every layer's keys and values, the completions' pass attends to them), with the same
log-probs and gradients as one padded row each; `algo.mini_batch_split=groups` keeps a group in one
mini-batch (`mini_batches`), so each prompt runs once a step.

Data parallel (`parallel`, a `DataParallel`): a learner alone in its process uses `SingleProcess`
(every collective the identity). A rank of the FSDP2 group (rl/learner_group.py) hands in its own:
the policy and the KL reference are sharded where `.to(device)` would be, `train_step` gets the
rank's rows of the rollout batch (`rows`, `total`), and the loss normalisers (tokens, sequences),
the number of micro-batches and the metrics are summed over the ranks, so the group's step is the
one-process step on the whole batch.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from rl.algorithms import loss_options, mismatch_metrics, policy_loss
from rl.batch import PromptSplit, TrainBatch
from rl.checkpoint import LEARNER_STATE
from rl.config import AlgoConfig, LearnerConfig, LrScale, not_implemented
from rl.device import autocast, autocast_dtype, resolve_device
from rl.model import load_policy, save_checkpoint
from rl.overlap import RolloutTracker, ThreadSwitch
from rl.router_metrics import RouterStats



def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, chunked: bool,
                   temperature: float = 1.0, chunk_size: int = 1024, n_vocab: int | None = None,
                   with_entropy: bool = False,
                   positions: torch.Tensor | None = None,
                   split: PromptSplit | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(x_t | x_<t) for t >= 1, aligned so out[:, t] scores input_ids[:, t]; out[:, 0] = 0. (B, L).
    With `with_entropy`, also the entropy of the same predictive distributions, aligned the same way.

    `positions` (B, L) bool/0-1: score only these tokens (the learner passes the completion tokens);
    every other entry is 0. The unembedding and softmax then run on those rows alone: a Harmony prompt
    is most of each sequence, so this skips most of the vocabulary work, forward and backward.

    `n_vocab` restricts the softmax to the first rows of the unembedding: the tiny model pads its
    embedding past the vocab map and the rollout engine masks those rows, so the learner must too.

    `split` (the batch's `PromptSplit`, with `positions` its completion mask): run each distinct prompt
    once and the completions on its keys (`shared_prompt_states`); same values, fewer tokens."""
    sel = shift = None
    if split is not None:
        if positions is None:
            raise ValueError("token_logprobs: `split` scores completions, so `positions` must be the completion mask")
        h, targets = shared_prompt_states(model, split)  # (1, n, H), (1, n)
        sel = positions.bool()  # (B, L): the same tokens in the batch's layout
        if int(sel.sum()) != targets.shape[1]:
            raise ValueError(f"`positions` holds {int(sel.sum())} tokens, the split's completions {targets.shape[1]}")
    else:
        shift = 1
        # use_cache=False: a training pass needs no KV cache (on a GPU it would hold every layer's K and V)
        out = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # (B, L, H)
        h = hidden[:, :-1]  # (B, L-1, H) predicts tokens 1..L-1
        targets = input_ids[:, 1:]  # (B, L-1)
        if positions is not None:
            sel = positions[:, 1:].bool()  # (B, L-1)
            h, targets = h[sel][None], targets[sel][None]  # (1, n, H), (1, n)
    weight = model.lm_head.weight[:n_vocab]  # (V, H)
    if chunked:
        from kernels.logprobs import logprobs_and_entropy

        lp, ent = logprobs_and_entropy(h, weight, targets, temperature=temperature, chunk_size=chunk_size)
    else:
        logits = torch.nn.functional.linear(h, weight).float() / temperature  # (B, T, V)
        logp_all = torch.log_softmax(logits, -1)
        lp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None

    def place(v: torch.Tensor) -> torch.Tensor:  # back to (B, L): scatter the scored rows, pad position 0
        if sel is not None:
            v = v.new_zeros(sel.shape).masked_scatter(sel, v[0])
        return torch.nn.functional.pad(v, (shift, 0)) if shift else v

    return (place(lp), place(ent)) if with_entropy else place(lp)


def shared_prompt_states(model, split: PromptSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, targets) = ((1, n, H), (1, n)): the final hidden state before each of the n completion tokens of
    `split` (row-major) and the tokens, from two passes: the G distinct prompts (recording every layer's
    keys and values in a `kernels.attention.PrefixKV`), then the B completions attending to their prompt's.
    A completion's first token is predicted by its prompt's last state (the last column: prompts are
    left-padded). Needs our attention (`learner.kernels=deliberate`), which is what reads `prefix_kv`."""
    from kernels.attention import PrefixKV
    from kernels.patch import ATTENTION_IMPL

    impl = getattr(model.config, "_attn_implementation", None)
    if impl != ATTENTION_IMPL:
        raise ValueError(f"shared prompts need the {ATTENTION_IMPL!r} attention (learner.kernels=deliberate); "
                         f"the model runs {impl!r}")

    def masks(keys: torch.Tensor) -> dict[str, torch.Tensor | None]:  # the 2D key-padding mask both layer kinds get
        m = None if bool(keys.all()) else keys
        return {"full_attention": m, "sliding_attention": m}

    kv = PrefixKV()
    hp = model.model(input_ids=split.prompt_ids, attention_mask=masks(split.prompt_mask),
                     position_ids=split.prompt_positions, use_cache=False, prefix_kv=kv).last_hidden_state  # (G, P, H)
    keys = torch.cat([split.prompt_mask[split.rows], split.completion_mask], 1)  # (B, P + C)
    hc = model.model(input_ids=split.completion_ids, attention_mask=masks(keys),
                     position_ids=split.completion_positions, use_cache=False,
                     prefix_kv=kv.extend(split.rows)).last_hidden_state  # (B, C, H)
    pred = torch.cat([hp[split.rows, -1:], hc[:, :-1]], 1)  # (B, C, H): the state before each completion token
    sel = split.completion_mask
    return pred[sel][None], split.completion_ids[sel][None]


def mini_batches(total: int, n: int, prompts: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices of `n` mini-batches over `total` rows, drawn from torch's RNG: a random split of the rows,
    or with `prompts` ((total,) each row's prompt id) a random split of the prompts into `n` parts, each
    mini-batch the rows of its prompts (fewer parts when there are fewer prompts). n == 1: every row, in order.

    >>> torch.manual_seed(0) and None
    >>> [sorted(m.tolist()) for m in mini_batches(6, 2, torch.tensor([0, 0, 1, 1, 2, 2]))]
    [[0, 1, 4, 5], [2, 3]]
    """
    if n <= 1:
        return [torch.arange(total)]
    if prompts is None:
        return list(torch.tensor_split(torch.randperm(total), n))
    ids, inverse = torch.unique(prompts, return_inverse=True)
    parts = torch.tensor_split(torch.randperm(len(ids)), min(n, len(ids)))
    return [torch.nonzero(torch.isin(inverse, part)).flatten() for part in parts]


def param_groups(model: torch.nn.Module, lr_scale: Sequence[LrScale]) -> list[dict[str, Any]]:
    """Optimizer groups from `learner.lr_scale` = ordered [LrScale(pattern, scale)] rules.

    The first pattern that `re.search`es a name sets its multiplier (unmatched: 1.0); 0 freezes the
    parameter (requires_grad off, no optimizer state, no backward through it if nothing above needs it).
    Parameters already frozen (e.g. `freeze_router`) stay frozen. A pattern that matches nothing is an
    error (a typo would otherwise silently train everything), as is freezing every parameter.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> rules = [LrScale(r"^0\\.", 0.0), LrScale("bias", 0.1)]
    >>> [(g["lr_scale"], len(g["params"])) for g in param_groups(m, rules)]
    [(1.0, 1), (0.1, 1)]
    >>> m[0].weight.requires_grad
    False
    """
    import re

    pats = []
    for rule in lr_scale:
        try:
            pats.append((re.compile(rule.pattern), float(rule.scale)))
        except re.error as exc:
            raise ValueError(f"learner.lr_scale: {rule.pattern!r} is not a regular expression ({exc})") from None
        if float(rule.scale) < 0:
            raise ValueError(f"learner.lr_scale {rule.pattern!r}: scale {rule.scale} must be >= 0 (0 freezes)")
    hits = {rule.pattern: 0 for rule in lr_scale}
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        scale = 1.0
        for pat, s in pats:
            if pat.search(name):
                scale, hits[pat.pattern] = s, hits[pat.pattern] + 1
                break
        if scale == 0.0:
            param.requires_grad_(False)
        elif param.requires_grad:
            groups.setdefault(scale, []).append(param)
    unused = [p for p, n in hits.items() if n == 0]
    if unused:
        raise ValueError(f"learner.lr_scale: {unused} match no parameter name (e.g. {next(model.named_parameters())[0]!r})")
    if not groups:
        raise ValueError("learner.lr_scale freezes every parameter; nothing left to train")
    return [{"params": ps, "lr_scale": s} for s, ps in groups.items()]


class DataParallel(Protocol):
    """What a learner needs of the ranks it trains with: `SingleProcess` alone, `rl.learner_group.FSDP`
    as a rank of the FSDP2 group."""

    def load(self, path: str | os.PathLike, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        """(model, VocabMap) of the HF folder `path`; a group's model may stay empty until `shard`."""
    def shard(self, model: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
        """Put `model` on `device` (sharded, for a group) and return `token_logprobs` bound to it."""
    def sum(self, values: torch.Tensor) -> torch.Tensor: ...  # elementwise over the ranks
    def max(self, n: int) -> int: ...
    def cat(self, values: torch.Tensor) -> torch.Tensor: ...  # (n,) of every rank, concatenated


class SingleProcess:
    """The `DataParallel` of a learner alone: the model moves to the device, every collective is the
    identity."""

    def load(self, path: str | os.PathLike, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        return load_policy(path, dtype=dtype)

    def shard(self, model: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
        model.to(device)
        return functools.partial(token_logprobs, model)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def max(self, n: int) -> int:
        return n

    def cat(self, values: torch.Tensor) -> torch.Tensor:
        return values


def syncs_trained_only(cfg: LearnerConfig) -> bool:
    """Whether weight syncs after the first send only the tensors that train: `learner.sync_trained_only`,
    unless the engines get tensors that change without training themselves (LoRA's merged base, MXFP4
    experts quantised for the engine)."""
    return cfg.sync_trained_only and cfg.lora.rank == 0 and not (cfg.qat or cfg.sync_mxfp4)


class Learner:
    """Policy + optimizer, configured by the typed `learner` and `algo` config objects."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algo: AlgoConfig, seed: int = 0, *,
                 parallel: DataParallel | None = None):
        if gaps := not_implemented(cfg):
            raise NotImplementedError(gaps[0])
        torch.manual_seed(seed)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.cfg, self.algo = cfg, algo
        self.parallel = parallel or SingleProcess()
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = autocast_dtype(self.device, cfg.autocast, cfg.dtype)
        dtype = getattr(torch, cfg.dtype)
        self.lora = cfg.lora.rank > 0  # one rank only (rl.config.not_implemented refuses LoRA in a group)
        if self.lora:  # frozen base (MXFP4 experts stay 4-bit) + adapters, the only trainable parameters
            from rl.lora import load_lora_policy

            self.model, self.vmap = load_lora_policy(model_path, cfg.lora, dtype=dtype)
        else:
            self.model, self.vmap = self.parallel.load(model_path, dtype)
        if cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs and our autograd Functions
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The rollout engine gets MXFP4-quantised experts (what a gpt-oss engine serves) under QAT or
        # when asked; without QAT the learner then computes on different experts than the sampler.
        self.sync_mxfp4 = cfg.qat or cfg.sync_mxfp4
        self._full_sync_done = False  # `weights()`: the first update after construction or `load` is whole
        if cfg.qat and cfg.kernels != "deliberate":
            raise ValueError("learner.qat=true needs learner.kernels=deliberate (QAT runs in our MoE kernel)")
        if cfg.kernels == "deliberate":
            from kernels.patch import apply_kernels

            apply_kernels(self.model, qat=cfg.qat)
        self.model.train()
        self.n_vocab = None if self.vmap.canonical is None else len(self.vmap)
        self.ref = self.score_ref = None
        # the initial policy, whatever checkpoint `load` brings in later; under LoRA the policy with its
        # adapters off (`_reference`), no second copy
        if algo.kl_coef > 0 and not self.lora:
            self.ref, _ = self.parallel.load(model_path, dtype)
            if cfg.kernels == "deliberate":  # computed exactly as the policy is (QAT experts included)
                from kernels.patch import apply_kernels

                apply_kernels(self.ref, qat=cfg.qat)
            self.ref.eval().requires_grad_(False)
            self.score_ref = self.parallel.shard(self.ref, self.device)
        if cfg.freeze_router:
            # MoE RL is unstable when small updates flip top-k routing; keep the routing fixed.
            for name, p in self.model.named_parameters():
                if ".mlp.router." in name:
                    p.requires_grad_(False)
        self.score = self.parallel.shard(self.model, self.device)  # token_logprobs of the policy
        self.router = RouterStats(self.model)  # router/... metrics of the first epoch's passes
        self.threads = ThreadSwitch(cfg.num_threads, cfg.overlap_threads)  # rl/overlap.py
        groups = param_groups(self.model, cfg.lr_scale)  # after `shard`: FSDP2 replaces the parameters
        self.trainable = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.step = 0  # train_step calls (rollout batches)
        self.opt_steps = 0  # optimizer steps (mini-batches x epochs per train_step)
        self._blank = blank_batch(self.vmap.pad_id, self.device)
        share, alone = cfg.share_prompts, isinstance(self.parallel, SingleProcess)
        if share and cfg.kernels != "deliberate":
            raise ValueError("learner.share_prompts=true needs learner.kernels=deliberate")
        if share and not alone:  # two passes through each FSDP unit before one backward: its hooks deadlock
            raise ValueError("learner.share_prompts=true is for a learner alone (learner.world_size=1)")
        self.share_prompts = bool(share) if share is not None else \
            cfg.kernels == "deliberate" and self.device.type == "cpu" and alone

    def _lr(self) -> float:
        """Linear warm-up over `learner.warmup_steps` optimizer steps. Adam's first steps are sign
        updates of size lr on every parameter (m/sqrt(v) = g/|g| after bias correction), so a noisy
        policy gradient at full lr moves every weight by lr at once; the warm-up lets v settle first."""
        warmup = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (self.opt_steps + 1) / warmup) if warmup > 0 else self.cfg.lr

    def _split(self, batch: TrainBatch):
        """The batch's `PromptSplit` under `learner.share_prompts` (None: off, or no prompt is shared)."""
        return batch.split_prompts() if self.share_prompts else None

    def _logprobs(self, score, batch: TrainBatch, with_entropy: bool = False, split=None):
        """`score` (`self.score` or `self.score_ref`: `token_logprobs` of a model) on a batch already on
        `self.device`, under the learner's autocast; `split`: the batch's `PromptSplit` (`_split`)."""
        mask = batch.attention_mask
        if self.device.type == "cuda" and batch.right_padded():
            mask = None  # causal: no real token sees a padded key; None lets the Triton attention run
        with autocast(self.device, self.autocast_dtype):
            return score(batch.input_ids, mask, chunked=self.cfg.kernels == "deliberate",
                         positions=batch.completion_mask, temperature=self.cfg.temperature,
                         chunk_size=self.cfg.logprob_chunk, n_vocab=self.n_vocab, with_entropy=with_entropy,
                         split=split)

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """(B, L) learner log-probs of the completion tokens (0 elsewhere), on CPU."""
        batch = batch.to(self.device)
        return self._logprobs(self.score, batch, split=self._split(batch)).cpu()

    # ---- update --------------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch, *, rows: torch.Tensor | None = None,
                   total: int | None = None, prompts: torch.Tensor | None = None) -> dict[str, float]:
        """PPO-style update on one rollout batch: `algo.ppo_epochs` passes, each split (shuffled) into
        `algo.mini_batches` optimizer steps, each accumulated over micro-batches; returns metrics
        averaged over the optimizer steps.

        With one optimizer step the old log-probs equal the current ones (ratio 1, exact gradient).
        With more, every step after the first is off-policy and the clip needs the log-probs of the
        policy that sampled: `algo.old_logprobs` = recompute (a no-grad learner pass before updating,
        as verl) or behavior (the rollout engine's, no extra pass; they match the learner's to ~1e-6
        in fp32, see the rollout_logprob_diff metric).
        The loss gets the engine's log-probs too (`algo.correction`, `algo.offpolicy_mask`), and the
        returned metrics hold `rl.algorithms.mismatch_metrics` over every loss token of the first pass.

        A rank of a group (rl/learner_group.py) gets its share: `batch` holds rows `rows` (b,) of a rollout
        batch of `total` rows. Mini-batches are drawn over all `total` rows (the group hands every rank rank
        0's RNG state first, so all draw the same permutation) and each rank trains on its rows of each.
        `algo.mini_batch_split=groups` cuts the prompts, not the rows (`prompts`: (total,) each row's prompt,
        which a rank must be handed; alone the learner reads them off the batch).
        """
        if batch.size == 0:
            raise ValueError("train_step got an empty batch")
        batch = batch.to(self.device)
        total = batch.size if rows is None else total
        held = torch.arange(total) if rows is None else torch.full((total,), -1).index_copy_(
            0, rows, torch.arange(batch.size))  # (total,): row -> its index in `batch`, -1 if another rank's
        n_mini = min(self.algo.mini_batches, total)
        epochs = self.algo.ppo_epochs
        by_groups = self.algo.mini_batch_split == "groups" and n_mini > 1
        if by_groups and prompts is None:
            if rows is not None:
                raise ValueError("algo.mini_batch_split=groups: a rank's train_step needs `prompts` of all rows")
            prompts = batch.prompt_rows()[1]
        if by_groups:  # as many mini-batches as there are prompts at most (`mini_batches`)
            n_mini = min(n_mini, int(torch.unique(prompts).numel()))
        old = None  # (B, L); None: on-policy, old = current
        if n_mini * epochs > 1:
            if self.algo.old_logprobs == "recompute":
                self.threads.poll()
                with torch.no_grad():
                    old = self._logprobs(self.score, batch, split=self._split(batch))
            else:
                old = batch.behavior_logprobs
        sums: dict[str, float] = {}
        n_steps = 0
        gap: tuple[list, list] = ([], [])  # learner / behaviour log-probs of every loss token, first pass
        for epoch in range(epochs):
            minis = mini_batches(total, n_mini, prompts.cpu() if by_groups and n_mini > 1 else None)
            for idx in minis:
                mine = held[idx][held[idx] >= 0]  # this rank's rows of the mini-batch, in its order
                part_old = None if old is None else old[mine]
                m = self._optimizer_step(batch.select(mine), part_old, gap if epoch == 0 else None, len(idx))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_steps += 1
        self.step += 1
        metrics = {k: v / n_steps for k, v in sums.items()}
        metrics["tokens"] = float(self.parallel.sum(batch.loss_mask.sum().double()))
        metrics.update(mismatch_metrics(self.parallel.cat(torch.cat(gap[0])), self.parallel.cat(torch.cat(gap[1])),
                                        correction=self.algo.correction, correction_cap=self.algo.correction_cap))
        metrics["optimizer_steps"] = float(n_steps)
        metrics.update(self.router.collect(self.parallel.sum))
        metrics.update(self.threads.metrics())
        self.threads.release()  # what follows (sync, checkpoint) runs once the rollout is done
        return metrics

    def watch_rollouts(self, probe: Callable[[], bool] | None) -> None:
        """`learner.overlap_threads`: poll `probe()` (true while a rollout runs beside this learner) before
        each pass and compute with `overlap_threads` threads while it is true (rl/overlap.py)."""
        self.threads.watch(probe)

    def rollout_tracker(self) -> RolloutTracker:
        """A tracker the rollout queue marks rollouts in flight on, watched by this learner."""
        tracker = RolloutTracker()
        self.watch_rollouts(tracker.probe())
        return tracker

    def _optimizer_step(self, batch: TrainBatch, old: torch.Tensor | None, gap: tuple[list, list] | None,
                        n_rows: int) -> dict[str, float]:
        """One AdamW step on `batch`, accumulated over micro-batches; `old` (B, L') = old log-probs
        (None: on-policy, old = current). `gap`: lists that get the learner's and the engine's
        log-probs of the loss tokens (the learner's: the proximal ones, or the current ones when the
        engine's are the old policy). `n_rows`: rows of the mini-batch over every rank (`batch` holds
        this rank's; the loss is normalised by the tokens or rows of all of them)."""
        # Micro-batches of similar lengths pad less; the loss is a weighted sum over micro-batches, so
        # the order only changes the float summation order. Sharing prompts, the rows of one prompt go
        # together (by prompt length, then prompt, then length) so a micro-batch runs each prompt once.
        order = torch.argsort(batch.lengths, stable=True)
        if self.share_prompts:
            starts, prompt = batch.prompt_rows()
            key = list(zip(starts.tolist(), prompt.tolist(), batch.lengths.tolist()))
            order = torch.tensor(sorted(range(batch.size), key=key.__getitem__), dtype=torch.long)
        total_tokens = max(float(self.parallel.sum(batch.loss_mask.sum().double())), 1.0)
        agg = self.algo.loss_agg
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        micro = [m for m in torch.split(order, self.cfg.micro_batch_size) if len(m)]  # none for a rank without rows
        # FSDP: every rank runs as many forward/backward passes as the busiest one (each pass is a
        # collective); a rank with fewer rows pads with blank passes that carry no loss.
        micro += [None] * (self.parallel.max(len(micro)) - len(micro))
        for idx in micro:
            self.threads.poll()  # yield the cores to a rollout in flight (learner.overlap_threads)
            part = self._blank if idx is None else batch.select(idx)
            split = None if idx is None else self._split(part)
            masks = part.attention_mask if split is None else split.masks()  # the real tokens of each pass
            counted = self.router.record(masks) if gap is not None and idx is not None else contextlib.nullcontext()
            with counted:  # every row of the batch once: its first epoch's pass
                lp, ent = self._logprobs(self.score, part, with_entropy=True, split=split)  # (b, l) each
            old_lp = lp.detach() if old is None or idx is None else old[idx][:, : lp.shape[1]]
            ref_lp = None
            if self.algo.kl_coef > 0:
                with torch.no_grad(), self._reference() as score_ref:
                    ref_lp = self._logprobs(score_ref, part, split=split)
            loss, m = policy_loss(lp, old_lp, part.advantages, part.loss_mask, behavior_logprobs=part.behavior_logprobs,
                                  ref_logprobs=ref_lp, entropy=ent, **loss_options(self.algo))
            # Re-weight micro-batch means so the sum equals the full-batch aggregate.
            weight = 0.0 if idx is None else part.num_tokens() / total_tokens if agg == "token_mean" else \
                part.size / n_rows
            (loss * weight).backward()
            with torch.no_grad():
                tok = part.loss_mask.bool()
                learner_lp = lp.detach()[tok]
                if gap is not None:
                    gap[0].append((learner_lp if old is not None and self.algo.old_logprobs == "behavior"
                                   else old_lp[tok]).double())
                    gap[1].append(part.behavior_logprobs[tok].double())
                diff = part.behavior_logprobs[tok] - learner_lp  # behaviour vs learner log-prob gap
                gaps = {"rollout_logprob_diff": float(diff.abs().mean()), "rollout_kl": float(diff.mean()),
                        "entropy_proxy": float(-learner_lp.mean())} if diff.numel() else \
                    dict.fromkeys(("rollout_logprob_diff", "rollout_kl", "entropy_proxy"), 0.0)
                for k, v in {**m, "loss": float(loss), **gaps}.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
        keys = sorted(sums)
        sums = dict(zip(keys, self.parallel.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, replicated on every rank
            grad_norm = grad_norm.full_tensor()
        lr = self._lr()
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.opt.step()
        self.opt_steps += 1
        return {**sums, "grad_norm": float(grad_norm), "lr": lr}

    @contextlib.contextmanager
    def _reference(self):
        """The KL reference's scorer: the initial policy's copy, or under LoRA the policy with its adapters off."""
        if not self.lora:
            yield self.score_ref
            return
        from rl.lora import adapters_disabled

        with adapters_disabled(self.model):
            yield self.score

    # ---- weights and state ---------------------------------------------------------------------
    def state_for_sync(self) -> dict[str, torch.Tensor]:
        """HF-named tensors for the rollout engine (detached, contiguous, CPU); under LoRA the merged
        weights, one parameter at a time (rl/lora.py `merged_state`)."""
        if self.lora:
            from rl.lora import merged_state

            return {k: v.contiguous() for k, v in merged_state(self.model)}
        state = dict(self.model.state_dict())
        if self.sync_mxfp4:
            from kernels.qat import quantized_expert_weights

            state.update(quantized_expert_weights(self.model))  # exactly the QAT forward's experts
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def trained_state_for_sync(self) -> dict[str, torch.Tensor]:
        """The tensors that train, HF-named (detached, contiguous, CPU), with the rest of their sync units
        (`rl.vllm_weights.trained_units`: a layer's q, k and v travel together)."""
        from rl.vllm_weights import trained_units

        trained = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return {k: v.detach().contiguous().cpu() for k, v in trained_units(self.model.state_dict(), trained).items()}

    def weights(self):
        """What `WorkerPool.update_weights` takes: the whole state the first time after construction or
        `load`, then, where `syncs_trained_only(cfg)`, `TrainedWeights` of the tensors that train (the
        engines keep the rest from that first update). `RemoteLearner.weights` gives the same as ObjectRefs."""
        if self._full_sync_done and syncs_trained_only(self.cfg):
            from rl.vllm_weights import TrainedWeights

            return TrainedWeights(self.trained_state_for_sync())
        self._full_sync_done = True
        return self.state_for_sync()

    def close(self) -> None:
        """Nothing to release in-process (`RemoteLearner.close` kills its actor)."""

    def save(self, path: str | os.PathLike) -> None:
        """HF checkpoint + optimizer/step/RNG in `path` (the caller makes the whole folder atomic)."""
        path = Path(path)
        if self.lora:  # the merged model as the HF folder, the adapters in adapter/
            from rl import lora

            lora.save(self.model, self.vmap, path, self.cfg.lora)
        else:
            save_checkpoint(self.model, self.vmap, path)
        torch.save({"optimizer": self.opt.state_dict(), "step": self.step, "opt_steps": self.opt_steps,
                    "rng": rng_state()},
                   path / LEARNER_STATE)

    def load(self, path: str | os.PathLike) -> None:
        """Restore weights (model.safetensors or the shards its index names, MXFP4 experts decoded),
        optimizer, step and RNG saved by `save`. The KL reference stays the initial policy. Under LoRA
        the adapters are what is restored (the base stays the initial policy's)."""
        from kernels.mxfp4_checkpoint import read_state_dict, unpack_state_dict

        path = Path(path)
        if self.lora:
            from rl.lora import load_adapters

            load_adapters(self.model, path)
        else:
            state = unpack_state_dict(read_state_dict(path), getattr(torch, self.cfg.dtype))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise RuntimeError(f"checkpoint {path} does not match the policy: {missing=} {unexpected=}")
        # on CPU: the RNG states must be CPU tensors; the optimizer moves its state to its parameters' device
        extra = torch.load(path / LEARNER_STATE, weights_only=False, map_location="cpu")
        if "optimizer" not in extra:  # rl/learner_group.py keeps its optimizer sharded next to it
            raise RuntimeError(f"{path} was written by a {extra.get('world_size')}-rank learner group: resume it with "
                               f"learner.world_size={extra.get('world_size')}")
        self.opt.load_state_dict(extra["optimizer"])
        self.step = extra["step"]
        self.opt_steps = extra["opt_steps"]
        set_rng_state(extra["rng"])
        self._full_sync_done = False  # the engines may hold other weights: the next sync is whole

    def get_step(self) -> int:
        return self.step


class RemoteLearner:
    """A `Learner` in a Ray actor behind the same methods (each call waits for its result), so the
    train loop takes either. `weights()` returns an ObjectRef: the tensors go actor to actor through
    Ray's object store and never through the driver."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algo: AlgoConfig, seed: int = 0, *,
                 options: dict[str, Any] | None = None):
        """`options`: Ray actor options (`rl.placement.RunPlacement.learner_options`: resources and the
        placement-group bundle); default `learner.num_cpus` / `learner.num_gpus`, placed by Ray."""
        import ray

        self._ray = ray
        opts = options or {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
        self.actor = ray.remote(Learner).options(**opts).remote(model_path, cfg, algo, seed)
        ray.get(self.actor.get_step.remote())  # a constructor error (bad lr_scale...) surfaces here
        self.cfg, self._full_sync_done = cfg, False

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self._ray.get(self.actor.train_step.remote(batch))

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return self._ray.get(self.actor.logprobs.remote(batch))

    def rollout_tracker(self):
        """A `rl.overlap.SharedTracker` this learner's actor polls (`Learner.watch_rollouts`)."""
        from rl.overlap import shared_tracker

        return shared_tracker(self.watch_rollouts)

    def watch_rollouts(self, probe) -> None:
        self._ray.get(self.actor.watch_rollouts.remote(probe))

    def weights(self):
        """`Learner.weights` with the tensors left in Ray's object store (the full/trained-only choice is
        made here, so the pool can tell the two apart without fetching them)."""
        if self._full_sync_done and syncs_trained_only(self.cfg):
            from rl.vllm_weights import TrainedWeights

            return TrainedWeights(self.actor.trained_state_for_sync.remote())
        self._full_sync_done = True
        return self.actor.state_for_sync.remote()

    def save(self, path) -> None:
        self._ray.get(self.actor.save.remote(str(path)))

    def load(self, path) -> None:
        self._ray.get(self.actor.load.remote(str(path)))
        self._full_sync_done = False

    def close(self) -> None:
        """Kill the learner actor and wait until it is gone (`rl.cluster.kill_actors`)."""
        from rl.cluster import kill_actors

        kill_actors([self.actor])

def blank_batch(pad_id: int, device: torch.device) -> TrainBatch:
    """One row of two pad ids that scores one position and carries no loss: the pass a rank runs when
    it has fewer micro-batches than another (every parameter gets a zero gradient, lm_head included)."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    zeros = torch.zeros((1, 2), device=device)
    return TrainBatch(ids, torch.ones_like(ids), torch.tensor([[False, True]], device=device), zeros, zeros,
                      torch.zeros(1, device=device))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
