"""GRPO-family advantages and policy losses: pure functions of tensors, chosen by config.

How to use: `ADVANTAGES[cfg.advantage](rewards, group_ids)` and `policy_loss(..., **loss_options(cfg))`
with the objective, clip range, correction and aggregation from `conf/algo/*.yaml`. The learner calls
these without knowing which variant runs.

Variants (Shao et al. 2024 GRPO; Liu et al. 2025 Dr.GRPO; Yu et al. 2025 DAPO):
- `grpo`: advantage = (r - mean_group) / (std_group + eps); token-level clipped ratio; loss averaged
  over all generated tokens in the batch (token-mean, as in DAPO — the GRPO paper's per-sequence mean
  over-weights short answers).
- `dr_grpo`: advantage = r - mean_group (no std division, which over-weights near-uniform groups);
  loss = sum over tokens / (batch size × max_tokens), a constant normaliser free of length bias.
- `dapo` clip-higher: asymmetric clip (1 - eps_low, 1 + eps_high) with eps_high > eps_low keeps
  low-probability tokens exploring. Selected by `clip_high`, usable with either advantage.
Objectives (`algo.objective`, `OBJECTIVES`): `ppo` (the clipped token ratio above), `gspo` (one
clipped ratio per sequence), `cispo` (detached capped ratio x REINFORCE), `sapo` (a soft sigmoid gate).
Off-policy correction (README "Off-policy correction and async rollouts"): the rollout engine's
behaviour log-probs differ from the learner's (kernels, MXFP4, MoE routing, one step of staleness in
async mode); `algo.correction` reweights or drops tokens by rho = pi_learner / pi_behaviour (`tis`,
`mis`, `icepop`, `CORRECTIONS`), `algo.offpolicy_mask` drops negative-advantage sequences the policy
has drifted from (DeepSeek-V3.2), and `mismatch_metrics` logs the gap every step.
Departures: no PPO value model (GRPO); KL to a reference is optional (k3 estimator) and off by
default, as in DAPO/Dr.GRPO; groups are (task, effort), not task alone — efforts have different
length budgets, so mixing them in one baseline would penalise low effort for being short. Left out
of TRL 1.16's list: high-entropy-token masking (Wang et al. 2025 "Beyond the 80/20 rule") needs an
entropy quantile over the whole batch while the learner sees micro-batches, and it targets sample
efficiency, not MoE stability; VESPO and LUSPO likewise.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple, Sequence

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


# ---- policy objectives ----------------------------------------------------------------------------
# Each takes the learner's log-probs (B, T), the log-ratio to the old (proximal) policy with masked
# positions already 0 (B, T), advantages (B, 1), the live mask (B, T) bool and the `ObjectiveParams`;
# it returns the per-token loss (B, T) to minimise, where its ratio was clipped (B, T) bool, and the
# ratio it used (B, T) (the sequence ratio broadcast for GSPO). Masked positions are zeroed later by
# `aggregate`.


class ObjectiveParams(NamedTuple):
    clip_low: float = 0.2
    clip_high: float = 0.2
    cispo_cap: float = 5.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05


Surrogate = tuple[Tensor, Tensor, Tensor]  # per-token loss (B, T), clipped (B, T) bool, ratio (B, T)


def _clipped_surrogate(ratio: Tensor, adv: Tensor, p: ObjectiveParams) -> Surrogate:
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - p.clip_low, 1.0 + p.clip_high) * adv
    return -torch.minimum(unclipped, clipped), unclipped != clipped, ratio


def ppo_clip(logprobs: Tensor, log_ratio: Tensor, adv: Tensor, live: Tensor, p: ObjectiveParams) -> Surrogate:
    """PPO's clipped token surrogate (Schulman et al. 2017), as GRPO uses it (Shao et al. 2024):

        r_t = exp(lp_t - old_t);  loss_t = -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A)

    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025)."""
    return _clipped_surrogate(torch.exp(log_ratio), adv, p)


def gspo(logprobs: Tensor, log_ratio: Tensor, adv: Tensor, live: Tensor, p: ObjectiveParams) -> Surrogate:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one ratio per sequence, the
    geometric mean of its token ratios, clipped as a whole:

        s_i = exp( sum_t m_t (lp_t - old_t) / sum_t m_t );  loss_i = -min(s_i A_i, clip(s_i, 1 - cl, 1 + ch) A_i)

    broadcast to every token of sequence i (then reduced by `algo.loss_agg`; the paper's 1/G sum over
    sequences is `seq_mean_token_mean`, as in TRL's importance_sampling_level="sequence"). The
    paper clips at (3e-4, 4e-4) (conf/algo/gspo.yaml). Its point for MoE: a sequence ratio does not
    swing when one token's experts change between old and new policy, so Qwen3-MoE trained without
    routing replay. d s_i / d theta = s_i * mean_t grad lp_t (GSPO's own gradient)."""
    m = live.to(log_ratio.dtype)
    seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)  # (B, 1)
    return _clipped_surrogate(torch.exp(seq).expand_as(log_ratio), adv, p)


def cispo(logprobs: Tensor, log_ratio: Tensor, adv: Tensor, live: Tensor, p: ObjectiveParams) -> Surrogate:
    """CISPO (MiniMax-M1, Chen et al. 2025): REINFORCE weighted by the clipped ratio, the weight
    detached, so no token loses its gradient to the clip (PPO's clip zeroes it, and the rare
    "reflective" tokens were the ones clipped):

        loss_t = -sg(min(r_t, cispo_cap)) A lp_t

    Departure: only the upper cap, as TRL's loss_type="cispo" (epsilon_high) and ScaleRL, which
    recommend cispo_cap = 5 (algo.cispo_cap); the paper's lower bound is set wide there too. The
    loss value is not -A at r = 1 (it is -A lp); its gradient is A grad lp."""
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=p.cispo_cap).detach()
    return -weight * adv * logprobs, ratio > p.cispo_cap, ratio


def sapo(logprobs: Tensor, log_ratio: Tensor, adv: Tensor, live: Tensor, p: ObjectiveParams) -> Surrogate:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization", Qwen): a smooth gate instead of
    the hard clip, sharper for negative advantages:

        tau = sapo_tau_pos if A > 0 else sapo_tau_neg;  loss_t = -sigmoid(tau (r_t - 1)) * 4 / tau * A

    At r = 1 the gradient equals the unclipped surrogate's (sigmoid' (0) * 4 = 1) and it fades
    smoothly as r leaves 1, so off-policy tokens are damped rather than cut; the paper's MoE runs
    (Qwen3-30B-A3B) were stabler than GSPO/GRPO. TRL 1.16 defaults tau = (1.0, 1.05). Nothing is
    clipped (the clipped mask is all False)."""
    ratio = torch.exp(log_ratio)
    tau = torch.full_like(adv, p.sapo_tau_neg, dtype=ratio.dtype).masked_fill(adv > 0, p.sapo_tau_pos)  # (B, 1)
    return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv, torch.zeros_like(live), ratio


OBJECTIVES: dict[str, Callable[..., Surrogate]] = {"ppo": ppo_clip, "gspo": gspo, "cispo": cispo, "sapo": sapo}


def _registered(table: dict, name: str, key: str):
    if name not in table:
        raise KeyError(f"{key}={name!r} is unknown; valid: {sorted(table)}")
    return table[name]


# ---- rollout/learner mismatch ----------------------------------------------------------------------
# rho_t = pi_learner(y_t) / pi_behaviour(y_t) = exp(old_t - behaviour_t): the learner's proximal
# ("old") policy over the rollout engine's, per generated token. It is != 1 because vLLM and the
# learner compute differently (kernels, batch shapes, MXFP4 experts, MoE routing flips) and, with
# train.max_staleness > 0, because the engine sampled with weights one step older. Each correction
# maps rho (B, T) and the live mask to (weight, dropped, truncated), all (B, T); the weight multiplies
# the per-token loss (Hilton et al. 2021 "decoupled PPO": the clip stays anchored at the proximal
# policy, the behaviour policy only reweights).


Correction = tuple[Tensor, Tensor, Tensor]  # weight (B, T), dropped (B, T) bool, truncated (B, T) bool


def no_correction(rho: Tensor, live: Tensor, cap: float) -> Correction:
    """Weight 1: the behaviour log-probs are ignored (today's loss)."""
    none = torch.zeros_like(live)
    return torch.ones_like(rho), none, none


def tis(rho: Tensor, live: Tensor, cap: float) -> Correction:
    """Truncated IS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"): w_t = min(rho_t, C), C = algo.correction_cap (the paper uses 2). Biased where the
    cap binds, bounded variance; every token keeps a gradient."""
    return rho.clamp(max=cap), torch.zeros_like(live), live & (rho > cap)


def mis(rho: Tensor, live: Tensor, cap: float) -> Correction:
    """Masked IS (Li et al. 2025, "RL collapse" part 3; TRL's vllm_importance_sampling_mode=
    "token_mask"): w_t = rho_t if rho_t <= C else 0. A token the engine found far less likely than
    the learner does teaches nothing rather than a capped, still wrong, amount."""
    keep = rho <= cap
    return torch.where(keep, rho, torch.zeros_like(rho)), live & ~keep, torch.zeros_like(live)


def icepop(rho: Tensor, live: Tensor, cap: float) -> Correction:
    """IcePop (Ling team 2025, "Small leak can sink a great ship", Ring-1T; for MoE): masking on both
    sides, w_t = rho_t if 1/C <= rho_t <= C else 0 (C = algo.correction_cap; the paper's band is
    [0.5, 5]). Tokens where the engine and the learner disagree either way (typically a flipped
    expert choice) are dropped from the gradient."""
    keep = (rho >= 1.0 / cap) & (rho <= cap)
    return torch.where(keep, rho, torch.zeros_like(rho)), live & ~keep, torch.zeros_like(live)


CORRECTIONS: dict[str, Callable[[Tensor, Tensor, float], Correction]] = {
    "none": no_correction, "tis": tis, "mis": mis, "icepop": icepop,
}


def offpolicy_sequence_mask(logprobs: Tensor, behavior_logprobs: Tensor, advantages: Tensor, live: Tensor,
                            delta: float) -> Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2 2025, eq. 9; TRL off_policy_mask_threshold):
    drop sequence i when A_i < 0 and its mean token KL(behaviour || current) estimate exceeds delta,

        keep_i = A_i >= 0  or  sum_t m_t (behaviour_t - lp_t) / sum_t m_t <= delta

    (lp detached). A negative advantage on a sequence the current policy would rarely write pushes
    probability into unknown places; positive ones are kept. (B, T), (B, T), (B,), (B, T) -> (B,) float.

    >>> lp = torch.tensor([[-1.0, -1.0], [-3.0, -3.0]])
    >>> offpolicy_sequence_mask(lp, torch.full((2, 2), -1.0), torch.tensor([-1.0, -1.0]), lp < 0, 0.5).tolist()
    [1.0, 0.0]
    """
    m = live.to(logprobs.dtype)
    kl = ((behavior_logprobs - logprobs.detach()) * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # (B,)
    return ((advantages >= 0) | (kl <= delta)).to(logprobs.dtype)


def quantiles(values: Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles of a 1-d tensor (torch.quantile's rule, without its 16M-element
    limit): sorted x, position q (n - 1)."""
    x = values.detach().flatten().double().sort().values
    out = []
    for q in qs:
        pos = q * (x.numel() - 1)
        lo = int(pos)
        hi = min(lo + 1, x.numel() - 1)
        out.append(float(x[lo] + (pos - lo) * (x[hi] - x[lo])))
    return out


def mismatch_metrics(learner_logprobs: Tensor, behavior_logprobs: Tensor, *, correction: str = "none",
                     correction_cap: float = 2.0) -> dict[str, float]:
    """How far the rollout engine's policy is from the learner's, over the generated tokens of a
    batch (1-d tensors of equal length, learner = the proximal policy the correction uses):

    - mismatch/kl: KL(behaviour || learner), Schulman's k3 with samples from the behaviour policy,
      mean of rho - 1 - log rho (>= 0; ~1e-5..1e-3 dense, 1e-3..1e-1 MoE in the Miles/slime study);
    - mismatch/ratio_p1, _p50, _p99: quantiles of rho = pi_learner / pi_behaviour;
    - mismatch/masked, mismatch/truncated: fractions of tokens `algo.correction` gives weight 0
      (mis, icepop) or caps (tis), whatever the correction currently on (0 for none).

    >>> m = mismatch_metrics(torch.zeros(3), torch.tensor([0.0, 0.0, -1.0]), correction="tis")
    >>> round(m["mismatch/truncated"], 4), round(m["mismatch/ratio_p99"], 4)
    (0.3333, 2.6839)
    """
    if learner_logprobs.numel() == 0:
        return dict.fromkeys(("mismatch/kl", "mismatch/ratio_p1", "mismatch/ratio_p50", "mismatch/ratio_p99",
                              "mismatch/masked", "mismatch/truncated"), 0.0)
    log_rho = (learner_logprobs - behavior_logprobs).detach().double()
    rho = torch.exp(log_rho)
    live = torch.ones_like(rho, dtype=torch.bool)
    _, masked, truncated = _registered(CORRECTIONS, correction, "algo.correction")(rho, live, correction_cap)
    p1, p50, p99 = quantiles(rho, (0.01, 0.5, 0.99))
    return {"mismatch/kl": float(kl_k3(behavior_logprobs.double(), learner_logprobs.double()).mean()),
            "mismatch/ratio_p1": p1, "mismatch/ratio_p50": p50, "mismatch/ratio_p99": p99,
            "mismatch/masked": float(masked.double().mean()), "mismatch/truncated": float(truncated.double().mean())}


# ---- the loss the learner calls -------------------------------------------------------------------


def loss_options(algo) -> dict[str, Any]:
    """`policy_loss` keyword arguments from the `algo` config node (rl/config.py AlgoConfig), so the
    learner passes the algorithm through without reading its fields (STYLE 11)."""
    return dict(objective=algo.objective, clip_low=algo.clip_low, clip_high=algo.clip_high,
                cispo_cap=algo.cispo_cap, sapo_tau_pos=algo.sapo_tau_pos, sapo_tau_neg=algo.sapo_tau_neg,
                loss_agg=algo.loss_agg, max_tokens=algo.max_tokens, correction=algo.correction,
                correction_cap=algo.correction_cap, offpolicy_mask=algo.offpolicy_mask,
                kl_coef=algo.kl_coef, entropy_coef=algo.entropy_coef)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    objective: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    cispo_cap: float = 5.0,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    behavior_logprobs: Tensor | None = None,
    correction: str = "none",
    correction_cap: float = 2.0,
    offpolicy_mask: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """The policy loss: objective, mismatch correction, masks, KL and entropy terms, aggregated.
    logprobs/old/behaviour/ref/entropy/mask: (B, T); advantages: (B,). Positions where `mask` is 0
    contribute nothing, whatever their old/behaviour/ref log-probs hold (they never reach exp()).

    loss_t = OBJECTIVES[objective]_t * w_t * keep_i [+ kl_coef * k3_t] [- entropy_coef * H_t]
    w_t = CORRECTIONS[correction](rho_t) with rho_t = exp(old_t - behaviour_t); keep_i =
    `offpolicy_sequence_mask` when `offpolicy_mask` (its delta) is set. Both need `behavior_logprobs`.
    entropy_coef > 0 is PPO's entropy bonus (verl's entropy_coeff); < 0 minimises entropy (sharpens the
    policy toward its modes, as in entropy-minimisation RL).
    Returns (scalar loss, metrics) — metrics are floats for logging.
    """
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("behavior_logprobs", behavior_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{logprobs.shape=} and {name}.shape={tuple(t.shape)} must be equal")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"{advantages.shape=} must be (B,) for {logprobs.shape=}")
    adv = advantages.unsqueeze(-1)  # (B, 1)
    # Masked positions (padding, ids inserted by budget forcing) may hold placeholder log-probs: keep
    # them out of exp(), so that no value there (however large) reaches the loss or its gradient.
    live = mask.bool()  # (B, T)
    log_ratio = torch.where(live, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
    params = ObjectiveParams(clip_low, clip_high, cispo_cap, sapo_tau_pos, sapo_tau_neg)
    per_token, clipped, ratio = _registered(OBJECTIVES, objective, "algo.objective")(
        logprobs, log_ratio, adv, live, params)
    metrics: dict[str, float] = {}
    if correction != "none" or offpolicy_mask is not None:
        if behavior_logprobs is None:
            raise ValueError(f"correction={correction!r} / offpolicy_mask={offpolicy_mask} need behavior_logprobs")
        per_token = _off_policy(per_token, logprobs, old_logprobs, behavior_logprobs, advantages, live,
                                correction, correction_cap, offpolicy_mask, metrics)
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
        metrics["clip_frac"] = float((clipped.to(m.dtype) * m).sum() / n)
        metrics["ratio_mean"] = float((ratio * m).sum() / n)
    return loss, metrics


def _off_policy(per_token: Tensor, logprobs: Tensor, old: Tensor, behavior: Tensor, advantages: Tensor,
                live: Tensor, correction: str, cap: float, delta: float | None, metrics: dict) -> Tensor:
    """`per_token` (B, T) reweighted by the mismatch correction and masked by the off-policy sequence
    mask; their weight means go to `metrics`."""
    with torch.no_grad():
        rho = torch.exp(torch.where(live, old - behavior, torch.zeros_like(old)))  # (B, T), 1 where masked
        weight, _, _ = _registered(CORRECTIONS, correction, "algo.correction")(rho, live, cap)
        m = live.to(per_token.dtype)
        metrics["is_weight_mean"] = float((weight * m).sum() / m.sum().clamp_min(1.0))
        if delta is not None:
            keep = offpolicy_sequence_mask(logprobs, torch.where(live, behavior, logprobs), advantages, live, delta)
            weight = weight * keep.unsqueeze(-1)
            metrics["offpolicy_masked"] = float(1.0 - keep.mean())
    return per_token * weight
