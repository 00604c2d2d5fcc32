"""Weighted composition of reward plugins into one `RewardResult` per sample.

    score = sum_i  w_i * score_i    over the rewards that apply to the sample (non-None)

Rewards that return None are left out of the sum (not renormalised: a sample without an effort
simply gets no length term). Every applicable reward is logged as a part under its name, and its
own parts as "name/part", so `parts` shows e.g. {"math": 1.0, "math/correct": 1.0, "effort_length":
0.5, ...}. If no reward applies, the result is score 0.0 with info {"applicable": []}.

Config: `CompositeReward.from_config({"math": 1.0, "effort_length": {"weight": 0.2, "budgets":
{...}}, "format": 0.1})` — a weight, or a dict with "weight" plus the reward's options (or a Hydra
`_target_`). `score_batch` hands whole batches to rewards that have `score_batch` (math-verify checks
a batch in parallel in its process pool) and calls the rest per sample.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from rewards.registry import RewardFn, build_reward, get_reward
from envs.types import Sample
from rewards.types import RewardResult


class CompositeReward:
    """Weighted sum of named rewards.

    >>> from envs.harmony import Transcript
    >>> s = Sample("t", "math", "low", [], [], [], [], Transcript(final="4"), {"answer": "4"})
    >>> r = CompositeReward({"math": 1.0, "format": 0.1})(s)
    >>> round(r.score, 3), r.parts["math/correct"]
    (1.1, 1.0)
    """

    def __init__(self, weights: Mapping[str, float], rewards: Mapping[str, RewardFn] | None = None):
        if not weights:
            raise ValueError("CompositeReward needs at least one {name: weight}")
        bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float))}
        if bad:
            raise TypeError(f"weights must be numbers, got {bad}; use from_config for per-reward options")
        self.weights = {k: float(w) for k, w in weights.items()}
        rewards = dict(rewards or {})
        self.rewards = {name: rewards.get(name) or get_reward(name) for name in self.weights}

    @classmethod
    def from_config(cls, cfg: Mapping) -> "CompositeReward":
        """Build from `{name: weight | {"weight": w, **options or _target_}}`."""
        weights, rewards = {}, {}
        for name, entry in dict(cfg).items():
            if isinstance(entry, (int, float)):
                weights[name] = entry
                continue
            if not isinstance(entry, Mapping) or "weight" not in entry:
                raise ValueError(f"reward config {name!r}: give a number or a mapping with 'weight', got {entry!r}")
            spec = {k: v for k, v in dict(entry).items() if k != "weight"}
            weights[name] = entry["weight"]
            if "_target_" not in spec:
                spec["name"] = spec.get("name", name)
            rewards[name] = build_reward(spec)
        return cls(weights, rewards)

    def __call__(self, sample: Sample) -> RewardResult:
        return self.score_batch([sample])[0]

    def score_batch(self, samples: Sequence[Sample]) -> list[RewardResult]:
        """One combined result per sample; batch-capable rewards see the whole batch at once."""
        per_reward = {name: self._run(fn, samples) for name, fn in self.rewards.items()}
        return [self._combine({n: rs[i] for n, rs in per_reward.items()}) for i in range(len(samples))]

    @staticmethod
    def _run(fn: RewardFn, samples: Sequence[Sample]) -> list[RewardResult | None]:
        batch = getattr(fn, "score_batch", None)
        out = list(batch(samples)) if batch else [fn(s) for s in samples]
        if len(out) != len(samples):
            raise RuntimeError(f"reward {fn!r} returned {len(out)} results for {len(samples)} samples")
        return out

    def _combine(self, results: Mapping[str, RewardResult | None]) -> RewardResult:
        score, parts, info = 0.0, {}, {"applicable": []}
        for name, r in results.items():
            if r is None:
                continue
            score += self.weights[name] * r.score
            parts[name] = r.score
            parts.update({f"{name}/{k}": v for k, v in r.parts.items() if k != name})
            info["applicable"].append(name)
            if r.info:
                info[name] = r.info
        return RewardResult(score, parts, info)
