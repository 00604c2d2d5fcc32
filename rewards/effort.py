"""Reward "effort_length": keep the chain of thought within the budget of the requested effort.

Shape, with t = analysis-channel tokens and B = budget of the sample's effort:

    score = 1                    if t <= B
          = 1 - (t - B) / B      if B < t < 2B     (linear decay)
          = 0                    if t >= 2B

Only over-length is penalised: a short CoT at high effort is not punished here (accuracy rewards
decide whether it was too short). Samples without an effort are not applicable (None). Budgets are
configurable; the defaults are the tiny world's 16/64/256 tokens (gpt-oss scale: 1k/4k/16k).
Departure from length-penalty papers (e.g. L1's exact-length target): we use a budget ceiling with
a soft edge rather than a target length, so the accuracy reward alone decides how much of the
budget is worth spending.
"""
from __future__ import annotations

from collections.abc import Mapping

from rewards.registry import register_reward
from envs.types import Sample
from rewards.types import RewardResult

TINY_BUDGETS = {"low": 16, "medium": 64, "high": 256}


def length_score(tokens: int, budget: int) -> float:
    """1 within budget, linear to 0 at twice the budget.

    >>> [length_score(t, 16) for t in (0, 16, 24, 32, 40)]
    [1.0, 1.0, 0.5, 0.0, 0.0]
    """
    if tokens <= budget:
        return 1.0
    return max(0.0, 1.0 - (tokens - budget) / budget)


@register_reward("effort_length")
class EffortLengthReward:
    """Score the analysis-token count against the per-effort budget.

    >>> from envs.harmony import Transcript
    >>> s = Sample("t", "math", "low", [], [], [], [], Transcript(final="4", analysis_tokens=24))
    >>> r = EffortLengthReward()(s); (r.score, r.parts["tokens"], r.parts["budget"])
    (0.5, 24.0, 16.0)
    """

    def __init__(self, budgets: Mapping[str, int] | None = None):
        self.budgets = dict(TINY_BUDGETS if budgets is None else budgets)
        bad = {k: v for k, v in self.budgets.items() if not isinstance(v, int) or v <= 0}
        if bad:
            raise ValueError(f"effort budgets must be positive integers (tokens), got {bad}")

    def __call__(self, sample: Sample) -> RewardResult | None:
        effort = sample.effort
        if not effort:
            return None
        if effort not in self.budgets:
            raise KeyError(
                f"no length budget for effort {effort!r}; budgets are {self.budgets} — "
                f"add one under the effort_length reward's `budgets`"
            )
        budget, tokens = self.budgets[effort], sample.transcript.analysis_tokens
        # No length credit for malformed output: otherwise a policy can farm this term with garbage
        # once the task reward is all zero (and GRPO's std normalisation amplifies it to full size).
        score = length_score(tokens, budget) if sample.transcript.format_ok else 0.0
        return RewardResult(score, {"effort_length": score, "tokens": float(tokens),
                                    "budget": float(budget), "within_budget": float(tokens <= budget)})
