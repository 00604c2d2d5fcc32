"""Learner: holds the policy, recomputes log-probs, takes GRPO optimizer steps, hands out weights.

Algorithm-blind (STYLE 11): the advantage is computed by the train loop; the loss is
`rl.algorithms.policy_loss` with the clip range/aggregation from the `algo` config. The learner only
turns `Sample`-like dicts (canonical ids) into padded tensors, runs forward/backward with AdamW and
gradient clipping, and returns float metrics.

Run as a Ray actor (`LearnerActor`) in the pipeline, or in-process (tests, SFT). Log-probs use the
chunked selective log-softmax from `kernels.logprobs` when `learner.kernels=deliberate` (never builds
(B, T, V) logits) and the MoE/attention kernels from `kernels.patch`; `learner.kernels=stock` keeps
transformers' modules and full logits.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl.algorithms import policy_loss
from rl.model import VocabMap, load_policy, save_checkpoint

LEARNER_STATE = "learner_state.pt"


def pad_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad to (B, L): input_ids, attention_mask, loss_mask."""
    L = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    lmask = torch.zeros((B, L), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        lmask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, attn, lmask


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, chunked: bool,
                   temperature: float = 1.0, chunk_size: int = 1024, n_vocab: int | None = None,
                   with_entropy: bool = False,
                   positions: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(x_t | x_<t) for t >= 1, aligned so out[:, t] scores input_ids[:, t]; out[:, 0] = 0. (B, L).
    With `with_entropy`, also the entropy of the same predictive distributions, aligned the same way.

    `positions` (B, L) bool/0-1: score only these tokens (the learner passes the completion tokens);
    every other entry is 0. The unembedding and softmax then run on those rows alone: a Harmony prompt
    is most of each sequence, so this skips most of the vocabulary work, forward and backward.

    `n_vocab` restricts the softmax to the first rows of the unembedding: the tiny model pads its
    embedding past the vocab map and the rollout engine masks those rows, so the learner must too."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
    h = hidden[:, :-1]  # (B, L-1, H) predicts tokens 1..L-1
    targets = input_ids[:, 1:]  # (B, L-1)
    sel = None
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
        return torch.nn.functional.pad(v, (1, 0))

    return (place(lp), place(ent)) if with_entropy else place(lp)


def completion_values(batch: list[dict[str, Any]], values: list[list[float] | None], like: torch.Tensor) -> torch.Tensor:
    """Per-completion-token values (log-probs) laid out like the padded batch `like` (B, L): sample i's
    values start at its prompt length; positions without a value (prompt, padding, None) are 0."""
    out = torch.zeros_like(like)
    for i, (b, v) in enumerate(zip(batch, values)):
        if v:
            p = len(b["prompt_ids"])
            out[i, p : p + len(v)] = torch.tensor(v, dtype=out.dtype)
    return out


def param_groups(model: torch.nn.Module, lr_scale: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer groups from `learner.lr_scale` = {regex on parameter names: lr multiplier}.

    The first pattern that `re.search`es a name sets its multiplier (unmatched: 1.0); 0 freezes the
    parameter (requires_grad off, no optimizer state, no backward through it if nothing above needs it).
    Parameters already frozen (e.g. `freeze_router`) stay frozen. A pattern that matches nothing is an
    error (a typo would otherwise silently train everything), as is freezing every parameter.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> [(g["lr_scale"], len(g["params"])) for g in param_groups(m, {r"^0\\.": 0.0, r"bias": 0.1})]
    [(1.0, 1), (0.1, 1)]
    >>> m[0].weight.requires_grad
    False
    """
    import re

    pats = []
    for pattern, scale in lr_scale.items():
        try:
            pats.append((re.compile(pattern), float(scale)))
        except re.error as exc:
            raise ValueError(f"learner.lr_scale: {pattern!r} is not a regular expression ({exc})") from None
        if float(scale) < 0:
            raise ValueError(f"learner.lr_scale[{pattern!r}]={scale}: multipliers must be >= 0 (0 freezes)")
    hits = dict.fromkeys(lr_scale, 0)
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


class Learner:
    """Policy + optimizer. `cfg` is the `learner` config node, `algo` the `algo` node (dicts)."""

    def __init__(self, model_path: str, cfg: dict, algo: dict, seed: int = 0):
        torch.manual_seed(seed)
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg["num_threads"]))
        self.cfg, self.algo = dict(cfg), dict(algo)
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        self.model, self.vmap = load_policy(model_path, dtype=dtype)
        self.kernels = cfg.get("kernels", "stock")
        self.qat = bool(cfg.get("qat", False))
        # The rollout engine gets MXFP4-quantised experts (what a gpt-oss engine serves) under QAT or
        # when asked; without QAT the learner then computes on different experts than the sampler.
        self.sync_mxfp4 = self.qat or bool(cfg.get("sync_mxfp4", False))
        if self.kernels == "deliberate":
            from kernels.patch import apply_kernels

            apply_kernels(self.model, qat=self.qat)
        elif self.kernels != "stock":
            raise ValueError(f"learner.kernels={self.kernels!r}; valid: ['deliberate', 'stock']")
        if self.qat and self.kernels != "deliberate":
            raise ValueError("learner.qat=true needs learner.kernels=deliberate (QAT runs in our MoE kernel)")
        self.model.train()
        self.pad_id = self.model.config.pad_token_id or 0
        self.n_vocab = None if self.vmap.canonical is None else len(self.vmap)
        self.ref = None
        if algo.get("kl_coef", 0.0) > 0:
            self.ref, _ = load_policy(model_path, dtype=dtype)
            self.ref.eval().requires_grad_(False)
        if cfg.get("freeze_router", False):
            # MoE RL is unstable when small updates flip top-k routing; keep the routing fixed.
            for name, p in self.model.named_parameters():
                if ".mlp.router." in name:
                    p.requires_grad_(False)
        groups = param_groups(self.model, cfg.get("lr_scale") or {})
        self.trainable = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(
            groups, lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))),
            weight_decay=cfg.get("weight_decay", 0.0),
        )
        self.step = 0  # train_step calls (rollout batches)
        self.opt_steps = 0  # optimizer steps (mini-batches x epochs per train_step)

    def _lr(self) -> float:
        """Linear warm-up over `learner.warmup_steps` optimizer steps. Adam's first steps are sign
        updates of size lr on every parameter (m/sqrt(v) = g/|g| after bias correction), so a noisy
        policy gradient at full lr moves every weight by lr at once; the warm-up lets v settle first."""
        warmup = int(self.cfg.get("warmup_steps", 0))
        return self.cfg["lr"] * min(1.0, (self.opt_steps + 1) / warmup) if warmup > 0 else self.cfg["lr"]

    # ---- batches -------------------------------------------------------------------------------
    @staticmethod
    def _completion_positions(batch: list[dict[str, Any]], like: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True on each sample's completion tokens (what the learner scores)."""
        pos = torch.zeros(like.shape, dtype=torch.bool)
        for i, b in enumerate(batch):
            pos[i, len(b["prompt_ids"]) : len(b["prompt_ids"]) + len(b["completion_ids"])] = True
        return pos

    def _tensors(self, batch: list[dict[str, Any]]):
        seqs = [self.vmap.to_model(b["prompt_ids"] + b["completion_ids"]) for b in batch]
        masks = [[0] * len(b["prompt_ids"]) + list(b["loss_mask"]) for b in batch]
        ids, attn, lmask = pad_batch(seqs, masks, self.pad_id)
        behav = completion_values(batch, [b.get("behavior_logprobs") for b in batch], lmask)
        adv = torch.tensor([float(b.get("advantage", 0.0)) for b in batch])
        return ids, attn, lmask, behav, adv

    def _logprobs(self, model, ids, attn, positions=None, with_entropy: bool = False):
        return token_logprobs(model, ids, attn, chunked=self.kernels == "deliberate", positions=positions,
                              temperature=self.cfg.get("temperature", 1.0),
                              chunk_size=self.cfg.get("logprob_chunk", 1024), n_vocab=self.n_vocab,
                              with_entropy=with_entropy)

    @torch.no_grad()
    def logprobs(self, batch: list[dict[str, Any]]) -> list[list[float]]:
        """Learner log-probs of each sample's completion tokens (canonical-id samples in)."""
        ids, attn, lmask, _, _ = self._tensors(batch)
        lp = self._logprobs(self.model, ids, attn, positions=self._completion_positions(batch, lmask))
        return [lp[i, len(b["prompt_ids"]) : len(b["prompt_ids"]) + len(b["completion_ids"])].tolist()
                for i, b in enumerate(batch)]

    # ---- update --------------------------------------------------------------------------------
    def train_step(self, batch: list[dict[str, Any]]) -> dict[str, float]:
        """PPO-style update on one rollout batch: `algo.ppo_epochs` passes, each split (shuffled) into
        `algo.mini_batches` optimizer steps, each accumulated over micro-batches; returns metrics
        averaged over the optimizer steps.

        With one optimizer step the old log-probs equal the current ones (ratio 1, exact gradient).
        With more, every step after the first is off-policy and the clip needs the log-probs of the
        policy that sampled: `algo.old_logprobs` = recompute (a no-grad learner pass before updating,
        as verl) or behavior (the rollout engine's, no extra pass; they match the learner's to ~1e-6
        in fp32, see the rollout_logprob_diff metric).
        """
        n_mini = int(self.algo.get("mini_batches", 1))
        epochs = int(self.algo.get("ppo_epochs", 1))
        if n_mini < 1 or epochs < 1:
            raise ValueError(f"algo.mini_batches={n_mini} and algo.ppo_epochs={epochs} must be >= 1")
        n_mini = min(n_mini, len(batch))
        old = None
        if n_mini * epochs > 1:
            source = self.algo.get("old_logprobs", "recompute")
            if source == "recompute":
                old = self.logprobs(batch)
            elif source == "behavior":
                old = [b.get("behavior_logprobs") for b in batch]
                if any(o is None or len(o) != len(b["completion_ids"]) for o, b in zip(old, batch)):
                    raise ValueError("algo.old_logprobs=behavior needs behavior_logprobs for every completion token")
            else:
                raise ValueError(f"algo.old_logprobs={source!r}; valid: ['behavior', 'recompute']")
        sums: dict[str, float] = {}
        n_steps = 0
        for _ in range(epochs):
            order = torch.randperm(len(batch)).tolist() if n_mini > 1 else list(range(len(batch)))
            for chunk in torch.tensor_split(torch.tensor(order), n_mini):
                idx = chunk.tolist()
                m = self._optimizer_step([batch[i] for i in idx], None if old is None else [old[i] for i in idx])
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_steps += 1
        self.step += 1
        metrics = {k: v / n_steps for k, v in sums.items()}
        metrics["tokens"] = float(sum(sum(b["loss_mask"]) for b in batch))
        metrics["optimizer_steps"] = float(n_steps)
        return metrics

    def _optimizer_step(self, batch: list[dict[str, Any]], old: list[list[float]] | None) -> dict[str, float]:
        """One AdamW step on `batch`, accumulated over micro-batches; `old` = per-sample old log-probs of
        the completion tokens (None: on-policy, old = current)."""
        mb = int(self.cfg.get("micro_batch_size", len(batch)))
        # Micro-batches of similar lengths pad less; the loss is a weighted sum over micro-batches, so
        # the order only changes the float summation order.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]["prompt_ids"]) + len(batch[i]["completion_ids"]))
        batch, old = [batch[i] for i in order], None if old is None else [old[i] for i in order]
        total_tokens = float(sum(sum(b["loss_mask"]) for b in batch))
        agg = self.algo.get("loss_agg", "token_mean")
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for start in range(0, len(batch), mb):
            part = batch[start : start + mb]
            ids, attn, lmask, behav, adv = self._tensors(part)
            pos = self._completion_positions(part, lmask)
            lp, ent = self._logprobs(self.model, ids, attn, positions=pos, with_entropy=True)  # (b, L) each
            old_lp = lp.detach() if old is None else completion_values(part, old[start : start + mb], lmask)
            ref_lp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_lp = self._logprobs(self.ref, ids, attn, positions=pos)
            loss, m = policy_loss(
                lp, old_lp, adv, lmask,
                clip_low=self.algo.get("clip_low", 0.2), clip_high=self.algo.get("clip_high", 0.2),
                loss_agg=agg, max_tokens=self.algo.get("max_tokens"),
                ref_logprobs=ref_lp, kl_coef=self.algo.get("kl_coef", 0.0),
                entropy=ent, entropy_coef=self.algo.get("entropy_coef", 0.0),
            )
            # Re-weight micro-batch means so the sum equals the full-batch aggregate.
            n_tok = float(lmask.sum())
            weight = n_tok / max(total_tokens, 1.0) if agg == "token_mean" else len(part) / len(batch)
            (loss * weight).backward()
            with torch.no_grad():
                tok = lmask.bool()
                learner_lp = lp.detach()[tok]
                diff = behav[tok] - learner_lp  # behaviour vs learner log-prob gap
                gaps = {"rollout_logprob_diff": float(diff.abs().mean()), "rollout_kl": float(diff.mean()),
                        "entropy_proxy": float(-learner_lp.mean())} if diff.numel() else \
                    dict.fromkeys(("rollout_logprob_diff", "rollout_kl", "entropy_proxy"), 0.0)
                for k, v in {**m, "loss": float(loss), **gaps}.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.get("grad_clip", 1.0))
        lr = self._lr()
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.opt.step()
        self.opt_steps += 1
        return {**sums, "grad_norm": float(grad_norm), "lr": lr}

    # ---- weights and state ---------------------------------------------------------------------
    def state_for_sync(self) -> dict[str, torch.Tensor]:
        """HF-named tensors for the rollout engine (detached, contiguous, CPU)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        if self.sync_mxfp4:
            from kernels.qat import quantized_expert_weights

            state.update(quantized_expert_weights(self.model))  # exactly the QAT forward's experts
        return state

    def save(self, path: str | os.PathLike) -> None:
        """HF checkpoint + optimizer/step/RNG in `path` (caller makes the whole folder atomic)."""
        path = Path(path)
        save_checkpoint(self.model, self.vmap, path)
        torch.save({"optimizer": self.opt.state_dict(), "step": self.step, "opt_steps": self.opt_steps,
                    "rng": rng_state()},
                   path / LEARNER_STATE)

    def load(self, path: str | os.PathLike) -> None:
        """Restore weights, optimizer, step and RNG saved by `save`."""
        from safetensors.torch import load_file

        path = Path(path)
        state = load_file(str(path / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"checkpoint {path} does not match the policy: {missing=} {unexpected=}")
        extra = torch.load(path / LEARNER_STATE, weights_only=False)
        self.opt.load_state_dict(extra["optimizer"])
        self.step = extra["step"]
        self.opt_steps = extra.get("opt_steps", self.step)
        set_rng_state(extra["rng"])

    def get_step(self) -> int:
        return self.step


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def learner_actor(num_cpus: float = 1):
    """The Learner as a Ray actor class."""
    import ray

    return ray.remote(num_cpus=num_cpus)(Learner)
