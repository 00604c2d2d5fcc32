"""GRPO-family advantages and policy losses: pure functions of tensors, chosen by config.

How to use: `ADVANTAGES[cfg.advantage](rewards, group_ids)` and `policy_loss(...)` with the clip range
and aggregation from `conf/algo/*.yaml`. The learner calls these without knowing which variant runs.

Variants (Shao et al. 2024 GRPO; Liu et al. 2025 Dr.GRPO; Yu et al. 2025 DAPO):
- `grpo`: advantage = (r - mean_group) / (std_group + eps); token-level clipped ratio; loss averaged
  over all generated tokens in the batch (token-mean, as in DAPO — the GRPO paper's per-sequence mean
  over-weights short answers).
- `dr_grpo`: advantage = r - mean_group (no std division, which over-weights near-uniform groups);
  loss = sum over tokens / (batch size × max_tokens), a constant normaliser free of length bias.
- `dapo` clip-higher: asymmetric clip (1 - eps_low, 1 + eps_high) with eps_high > eps_low keeps
  low-probability tokens exploring. Selected by `clip_high`, usable with either advantage.
Departures: no PPO value model (GRPO); KL to a reference is optional (k3 estimator) and off by
default, as in DAPO/Dr.GRPO; groups are (task, effort), not task alone — efforts have different
length budgets, so mixing them in one baseline would penalise low effort for being short.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor


def _group_index(group_ids: Sequence[Hashable]) -> Tensor:
    """Map arbitrary hashable group keys to dense ints: (N,) long."""
    dense: dict[Hashable, int] = {}
    return torch.tensor([dense.setdefault(g, len(dense)) for g in group_ids], dtype=torch.long)


def _group_stats(rewards: Tensor, group_ids: Sequence[Hashable]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group mean, (unbiased=False) std and "all rewards equal" flag: each (N,).

    Computed in float64; a group whose rewards are all equal is flagged from its min and max, not
    from its std: a float32 mean of equal values can be one rounding step off (e.g. 8 x 1.2), which
    would give every member (step / (step + eps)) ~ 0.1 instead of 0."""
    idx = _group_index(group_ids)
    n_groups = int(idx.max()) + 1 if len(idx) else 0
    r = rewards.to(torch.float64)
    count = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, idx, r) / count
    sq = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, idx, (r - mean[idx]) ** 2)
    std = (sq / count).sqrt()
    lo = torch.full((n_groups,), float("inf"), dtype=r.dtype).scatter_reduce(0, idx, r, "amin")
    hi = torch.full((n_groups,), float("-inf"), dtype=r.dtype).scatter_reduce(0, idx, r, "amax")
    return mean[idx], std[idx], (lo == hi)[idx]


def grpo_advantages(rewards: Tensor, group_ids: Sequence[Hashable], eps: float = 1e-6) -> Tensor:
    """(r - group mean) / (group std + eps). rewards: (N,) -> (N,) float32. Constant groups give
    exactly 0.

    >>> grpo_advantages(torch.full((8,), 1.2), ["g"] * 8).abs().max().item()
    0.0
    """
    mean, std, constant = _group_stats(rewards, group_ids)
    adv = (rewards.to(torch.float64) - mean) / (std + eps)
    return torch.where(constant, torch.zeros_like(adv), adv).to(torch.float32)


def dr_grpo_advantages(rewards: Tensor, group_ids: Sequence[Hashable], eps: float = 0.0) -> Tensor:
    """Dr.GRPO: r - group mean, no std normalisation. rewards: (N,) -> (N,) float32; constant groups
    give exactly 0."""
    mean, _, constant = _group_stats(rewards, group_ids)
    adv = rewards.to(torch.float64) - mean
    return torch.where(constant, torch.zeros_like(adv), adv).to(torch.float32)


def informative_groups(rewards: Tensor, group_ids: Sequence[Hashable]) -> Tensor:
    """DAPO dynamic sampling: (N,) bool, True for samples whose group's rewards are not all equal (a
    constant group has zero advantage and only dilutes the token-mean loss).

    >>> informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), ["a", "a", "b", "b"]).tolist()
    [False, False, True, True]
    """
    _, _, constant = _group_stats(rewards, group_ids)
    return ~constant


ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
}


def get_advantage_fn(name: str) -> Callable[..., Tensor]:
    if name not in ADVANTAGES:
        raise KeyError(f"algo.advantage={name!r} is unknown; valid: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name]


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref), elementwise, >= 0: exp(d) - d - 1, d = ref - lp."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def aggregate(values: Tensor, mask: Tensor, mode: str, max_tokens: int | None = None) -> Tensor:
    """Reduce per-token values (B, T) with mask (B, T) to a scalar.

    token_mean: sum / #tokens in batch. seq_mean_token_mean: mean over sequences of per-sequence
    token means (original GRPO). seq_mean_token_sum_norm: sum / (B * max_tokens) (Dr.GRPO; max_tokens is a constant, required).
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.mean()
    if mode == "seq_mean_token_sum_norm":
        if max_tokens is None or max_tokens < 1:
            # The padded width would make the normaliser depend on each micro-batch's longest sample:
            # the length bias Dr.GRPO removes, and a gradient scale that moves with micro_batch_size.
            raise ValueError("loss_agg='seq_mean_token_sum_norm' needs a constant max_tokens "
                             "(algo.max_tokens; defaults to rollout.max_tokens)")
        return (values * mask).sum() / (values.shape[0] * max_tokens)
    raise KeyError(
        f"algo.loss_agg={mode!r} is unknown; valid: "
        "['seq_mean_token_mean', 'seq_mean_token_sum_norm', 'token_mean']"
    )


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped token-level surrogate. logprobs/old/ref/entropy/mask: (B, T); advantages: (B,).
    Positions where `mask` is 0 contribute nothing, whatever their old/ref log-probs hold.

    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A) [+ kl_coef * k3_t]
             [- entropy_coef * H_t]
    entropy_coef > 0 is PPO's entropy bonus (verl's entropy_coeff); < 0 minimises entropy (sharpens the
    policy toward its modes, as in entropy-minimisation RL).
    Returns (scalar loss, metrics) — metrics are floats for logging.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"{logprobs.shape=} {old_logprobs.shape=} {mask.shape=} must be equal")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"{advantages.shape=} must be (B,) for {logprobs.shape=}")
    adv = advantages.unsqueeze(-1)  # (B, 1)
    # Masked positions (padding, ids inserted by budget forcing) may hold placeholder log-probs: keep
    # them out of exp(), so that no value there (however large) reaches the loss or its gradient.
    live = mask.bool()  # (B, T)
    ratio = torch.exp(torch.where(live, logprobs - old_logprobs, torch.zeros_like(logprobs)))  # (B, T)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    metrics: dict[str, float] = {}
    if ref_logprobs is not None and kl_coef > 0:
        kl = kl_k3(logprobs, torch.where(live, ref_logprobs, logprobs.detach()))  # 0 where masked
        per_token = per_token + kl_coef * kl
        metrics["kl_ref"] = float(aggregate(kl.detach(), mask, "token_mean"))
    if entropy is not None:
        if entropy.shape != logprobs.shape:
            raise ValueError(f"{entropy.shape=} must equal {logprobs.shape=}")
        if entropy_coef != 0.0:
            per_token = per_token - entropy_coef * entropy
        metrics["entropy"] = float(aggregate(entropy.detach(), mask, "token_mean"))
    loss = aggregate(per_token, mask, loss_agg, max_tokens)
    with torch.no_grad():
        m = mask.to(logprobs.dtype)
        n = m.sum().clamp_min(1.0)
        metrics["clip_frac"] = float(((unclipped != clipped).to(m.dtype) * m).sum() / n)
        metrics["ratio_mean"] = float((ratio * m).sum() / n)
    return loss, metrics
