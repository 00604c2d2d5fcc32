"""Reward "format": did the completion parse as well-formed Harmony with a final answer?

`envs.harmony.parse_completion` never raises on malformed output; it sets `format_ok=False` and an
error string instead (missing final channel, unknown channel, unparseable tokens). This reward
turns that flag into a score so the policy is pushed towards parseable output.
"""
from __future__ import annotations

from rewards.registry import register_reward
from envs.types import Sample
from rewards.types import RewardResult


@register_reward("format")
def format_reward(sample: Sample) -> RewardResult:
    """1.0 when the transcript is well formed, else 0.0 (the parse error goes to info).

    >>> from envs.harmony import Transcript
    >>> s = Sample("t", "math", "low", [], [], [], [], Transcript(final="4"))
    >>> format_reward(s).score
    1.0
    """
    t = sample.transcript
    score = 1.0 if t.format_ok else 0.0
    return RewardResult(score, {"format": score}, {"error": t.error} if t.error else {})
