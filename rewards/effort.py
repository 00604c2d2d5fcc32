"""Reward "effort_length": a family of chain-of-thought length rewards against the effort's budget.

One registered reward, `EffortLengthReward(budgets, shape=..., **shape options)`; config picks the
shape: `reward.terms.effort_length={weight: 0.2, shape: l1_max, alpha: 0.01, gate: math}`. With t =
analysis-channel tokens and B = the budget of the sample's effort (defaults: the tiny world's
16/64/256 tokens; gpt-oss scale 1k/4k/16k):

| shape          | score                                                     | range        | source |
|----------------|-----------------------------------------------------------|--------------|--------|
| ceiling        | 1 if t <= B; 1 - (t-B)/B up to 2B; 0 past 2B (default)   | [0, 1]       | ours |
| l1_exact       | -min(1, alpha * abs(t - B))                               | [-1, 0]      | L1/LCPO-Exact |
| l1_max         | clip(alpha * (B - t) + delta, 0, 1)                       | [0, 1]       | L1/LCPO-Max |
| dapo_overlong  | 0 if t <= B - C; (B - C - t) / C up to B; -1 past B       | [-1, 0]      | DAPO |
| group_relative | 0.5 - (t - min_g t) / (max_g t - min_g t), over the group | [-0.5, 0.5]  | Kimi k1.5 |
| thinkprune     | 1 if t <= B and the trace was not truncated, else 0       | [0, 1]       | ThinkPrune |

Sources and where we depart from them:
- L1 / LCPO (Aggarwal & Welleck 2025, arXiv:2503.04697): LCPO-Exact r = 1[y = y_gold] - alpha *
  |n_gold - n_y|; LCPO-Max r = 1[y = y_gold] * clip(alpha * (n_gold - n_y) + delta, 0, 1); alpha =
  0.0003 (per token), delta = 0.5. Here n_gold is the effort's budget, not a length in the prompt,
  the correctness factor is the composite's `gate`, and Exact is clipped at -1 so that every shape
  spans a range of width 1 (see gating below). alpha is per token: at the tiny world's budgets the
  paper's 0.0003 barely moves the score; scale it as ~1/B to make it bind.
- DAPO overlong reward shaping (Yu et al. 2025, arXiv:2503.14476, Eq. 13): 0 for |y| <= L_max -
  L_cache, ((L_max - L_cache) - |y|) / L_cache up to L_max, -1 past it (L_max 20480, L_cache 4096).
  Here L_max = B and L_cache = C = `cache` * B (default 0.2, DAPO's 4096/20480); a truncated trace is
  past L_max.
- Kimi k1.5 length reward (Kimi Team 2025, arXiv:2501.12599, §2.3.3): lambda = 0.5 - (len(i) -
  min_len) / (max_len - min_len) over the k responses to one problem; reward lambda if correct,
  min(0, lambda) if not. Here the group is `Sample.group_key` (task, effort), lengths are CoT tokens,
  a group whose lengths are all equal scores 0 (the formula is 0/0), and the min(0, .) rule for wrong
  answers is the composite's `gate`. Kimi's warm-up (the penalty phased in) is left out.
- ThinkPrune (Hou et al. 2025, arXiv:2504.01296): RL under a hard length limit, where a response
  over the limit is truncated and earns no reward. Here the limit is B; as a term gated on the task
  reward (`math: {weight: 0}`, `effort_length: {weight: 1, shape: thinkprune, gate: math}`) the total
  is ThinkPrune's 1[correct] * 1[t <= B].
- ceiling is ours: only over-length is penalised; a short CoT at high effort is not punished here
  (the accuracy reward decides whether it was too short).

Correctness gating lives in `rewards.compose` (a term's `gate: <term>`): with the gate closed (the
gating term scored <= 0) a score becomes min(0, score), Kimi's rule for wrong answers; bonuses need a
right answer, penalties apply to all. Every shape spans a range of width 1, so with the length
weight below the task weight a wrong answer never outscores a right one, however short it is.

Malformed output (`format_ok` False) never earns length credit: it gets the shape's floor (its worst
score), since a policy could otherwise farm the term with garbage once the task reward is all zero
(and GRPO's std normalisation amplifies it to full size). Samples without an effort are not
applicable (None).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from envs.types import Sample
from rewards.registry import register_reward
from rewards.types import RewardResult

TINY_BUDGETS = {"low": 16, "medium": 64, "high": 256}


def length_score(tokens: int, budget: int) -> float:
    """ceiling: 1 within budget, linear to 0 at twice the budget.

    >>> [length_score(t, 16) for t in (0, 16, 24, 32, 40)]
    [1.0, 1.0, 0.5, 0.0, 0.0]
    """
    if tokens <= budget:
        return 1.0
    return max(0.0, 1.0 - (tokens - budget) / budget)


def l1_exact(tokens: int, budget: int, *, alpha: float = 0.0003) -> float:
    """LCPO-Exact's length term, -alpha * |B - t|, clipped at -1.

    >>> [l1_exact(t, 16, alpha=0.0625) for t in (0, 8, 16, 24, 40)]
    [-1.0, -0.5, 0.0, -0.5, -1.0]
    """
    return max(-1.0, alpha * -abs(tokens - budget))


def l1_max(tokens: int, budget: int, *, alpha: float = 0.0003, delta: float = 0.5) -> float:
    """LCPO-Max's soft gate, clip(alpha * (B - t) + delta, 0, 1).

    >>> [l1_max(t, 16, alpha=0.0625) for t in (0, 8, 16, 20, 24, 40)]
    [1.0, 1.0, 0.5, 0.25, 0.0, 0.0]
    """
    return min(1.0, max(0.0, alpha * (budget - tokens) + delta))


def dapo_overlong(tokens: int, budget: int, *, cache: float = 0.2) -> float:
    """DAPO's soft overlong punishment with L_max = B and L_cache = cache * B.

    >>> [dapo_overlong(t, 64, cache=0.25) for t in (0, 48, 56, 64, 65)]
    [0.0, 0.0, -0.5, -1.0, -1.0]
    """
    cache_tokens = cache * budget
    if tokens <= budget - cache_tokens:
        return 0.0
    if tokens <= budget:
        return (budget - cache_tokens - tokens) / cache_tokens
    return -1.0


def thinkprune(tokens: int, budget: int) -> float:
    """ThinkPrune's hard limit: 1 within it, 0 past it (truncated traces are handled by the caller).

    >>> [thinkprune(t, 16) for t in (0, 16, 17)]
    [1.0, 1.0, 0.0]
    """
    return float(tokens <= budget)


def group_relative(tokens: Sequence[int]) -> list[float]:
    """Kimi k1.5's lambda over one group: 0.5 for the shortest, -0.5 for the longest; 0 if all equal.

    >>> group_relative([10, 20, 30])
    [0.5, 0.0, -0.5]
    """
    lo, hi = min(tokens), max(tokens)
    if hi == lo:
        return [0.0] * len(tokens)
    return [0.5 - (t - lo) / (hi - lo) for t in tokens]


class Shape(NamedTuple):
    fn: Callable  # (tokens, budget, **options) -> score; a group shape: (tokens of one group) -> scores
    floor: float  # the worst score: what malformed (and, under truncation_fails, truncated) output gets
    truncation_fails: bool = False  # finish_reason "length" counts as past the limit
    group: bool = False  # scored over a GRPO group (needs score_batch)


SHAPES: dict[str, Shape] = {
    "ceiling": Shape(length_score, 0.0),
    "l1_exact": Shape(l1_exact, -1.0),
    "l1_max": Shape(l1_max, 0.0),
    "dapo_overlong": Shape(dapo_overlong, -1.0, truncation_fails=True),
    "group_relative": Shape(group_relative, -0.5, group=True),
    "thinkprune": Shape(thinkprune, 0.0, truncation_fails=True),
}


@register_reward("effort_length")
class EffortLengthReward:
    """Score the analysis-token count against the per-effort budget, in the configured `shape`.

    >>> from envs.harmony import Transcript
    >>> s = Sample("t", "math", "low", [], [], [], [], Transcript(final="4", analysis_tokens=24))
    >>> r = EffortLengthReward()(s); (r.score, r.parts["tokens"], r.parts["budget"])
    (0.5, 24.0, 16.0)
    >>> EffortLengthReward(shape="l1_max", alpha=0.0625)(s).score
    0.0
    """

    def __init__(self, budgets: Mapping[str, int] | None = None, shape: str = "ceiling", **options):
        self.budgets = dict(TINY_BUDGETS if budgets is None else budgets)
        bad = {k: v for k, v in self.budgets.items() if not isinstance(v, int) or v <= 0}
        if bad:
            raise ValueError(f"effort budgets must be positive integers (tokens), got {bad}")
        if shape not in SHAPES:
            raise ValueError(f"unknown effort_length shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
        self.shape, self._shape = shape, SHAPES[shape]
        self.options = _check_options(shape, self._shape.fn, options)
        if self._shape.group:
            # Only group shapes are batch-capable: the composite then hands them whole batches, while
            # per-sample shapes keep per-sample failure isolation.
            self.score_batch = self._score_groups

    def __call__(self, sample: Sample) -> RewardResult | None:
        if self._shape.group:
            return self._score_groups([sample])[0]  # a group of one: lambda is 0
        budget = self._budget(sample)
        if budget is None:
            return None
        return self._result(sample, budget, self._shape.fn(sample.transcript.analysis_tokens, budget,
                                                           **self.options))

    def _score_groups(self, samples: Sequence[Sample]) -> list[RewardResult | None]:
        """Kimi's lambda within each `group_key` group of `samples` (order kept)."""
        groups: dict[tuple[str, str], list[int]] = {}
        budgets = [self._budget(s) for s in samples]
        for i, (s, b) in enumerate(zip(samples, budgets)):
            if b is not None:
                groups.setdefault(s.group_key, []).append(i)
        out: list[RewardResult | None] = [None] * len(samples)
        for idx in groups.values():
            lambdas = self._shape.fn([samples[i].transcript.analysis_tokens for i in idx])
            for i, lam in zip(idx, lambdas):
                out[i] = self._result(samples[i], budgets[i], lam)
        return out

    def _budget(self, sample: Sample) -> int | None:
        effort = sample.effort
        if not effort:
            return None
        if effort not in self.budgets:
            raise KeyError(
                f"no length budget for effort {effort!r}; budgets are {self.budgets} — "
                f"add one under the effort_length reward's `budgets`"
            )
        return self.budgets[effort]

    def _result(self, sample: Sample, budget: int, raw: float) -> RewardResult:
        tokens = sample.transcript.analysis_tokens
        truncated = self._shape.truncation_fails and sample.finish_reason == "length"
        score = self._shape.floor if not sample.transcript.format_ok or truncated else float(raw)
        return RewardResult(score, {"effort_length": score, "tokens": float(tokens),
                                    "budget": float(budget), "within_budget": float(tokens <= budget)})


def _check_options(shape: str, fn: Callable, options: Mapping) -> dict[str, float]:
    """The shape's keyword options (defaults from its function's signature), validated."""
    params = {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise TypeError(f"effort_length shape {shape!r} takes options {sorted(params) or 'none'}, "
                        f"got unknown {unknown}")
    merged = {**params, **options}
    for name, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"effort_length option {name}={value!r} must be a finite number")
    if "alpha" in merged and merged["alpha"] <= 0:
        raise ValueError(f"effort_length option alpha={merged['alpha']} must be positive (score per token)")
    if "cache" in merged and not 0 < merged["cache"] <= 1:
        raise ValueError(f"effort_length option cache={merged['cache']} must be in (0, 1] (a fraction of B)")
    return merged
