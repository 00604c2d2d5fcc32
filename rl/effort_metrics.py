"""Effort metrics: pure functions over rollouts (`Sample`s) and their `RewardResult`s.

Used by held-out evaluation (`rl/evaluate.py`, one call per checkpoint × effort) and by the training
log (`rl/train.py` `step_metrics`), so eval and training report the same quantities the same way:

- accuracy with a 95% Wilson score interval (`wilson_interval`);
- pass@k, the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
  Code", eq. 1) from n samples per task (`pass_at_k`, `pass_k_values`, `mean_pass_at_k`);
- CoT tokens (analysis-channel tokens): mean, p50, p90 (`cot_token_stats`);
- budget compliance: the fraction of samples whose CoT fits the budget of their effort, read from the
  "effort_length" reward's `within_budget` part (`budget_compliance`; None without that term);
- truncation rate (finish reason "length") and format failures (no parsable final);
- monotonicity across efforts: the fraction of tasks whose mean CoT tokens strictly increase along
  the efforts evaluated, in `EFFORTS` order (`monotonicity`).

A sample counts as solved for pass@k when its `metric` score is >= 0.5 (`SOLVED_AT`): the same as
"score 1" for the binary "math" term; a partial-credit term counts as solved at half credit or more.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from envs.types import EFFORTS, Sample
from rewards.types import RewardResult

Z95 = 1.959963984540054  # two-sided 95% standard-normal quantile
SOLVED_AT = 0.5  # a sample "passes" (pass@k) when its accuracy-term score is at least this
BUDGET_PART = "effort_length/within_budget"  # CompositeReward names a plugin's parts "<term>/<part>"


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0.0, 1.0) when n == 0.

    Not the normal approximation p ± z·sqrt(p(1-p)/n): at p = 0 or 1 that interval has zero width
    (0/10 correct would claim [0, 0]), and near the edges it leaves [0, 1] and under-covers badly for
    the small n of a per-effort or per-step eval. Wilson stays inside [0, 1] and keeps close to the
    nominal coverage there. `successes` may be fractional (a mean of partial scores times n).

    >>> [round(x, 3) for x in wilson_interval(0, 10)]
    [0.0, 0.278]
    >>> [round(x, 3) for x in wilson_interval(5, 10)]
    [0.237, 0.763]
    >>> wilson_interval(0, 600)[0], wilson_interval(600, 600)[1]
    (0.0, 1.0)
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # rounding can leave the bound a hair past p at the edges (4e-19 for 0/600): the interval holds p
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    computed as a product so large n does not overflow.

    >>> pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2), pass_at_k(10, 5, 1)
    (0.5, 0.0, 1.0, 0.5)
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples per task, got {k=} {n=}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_k_values(n: int) -> list[int]:
    """The k worth reporting for n samples per task: 1, the powers of two below n, and n.

    >>> pass_k_values(1), pass_k_values(4), pass_k_values(6)
    ([1], [1, 2, 4], [1, 2, 4, 6])
    """
    return sorted({1, n} | {2 ** i for i in range(n.bit_length()) if 2 ** i <= n}) if n >= 1 else []


def mean_pass_at_k(samples: Sequence[Sample], results: Sequence[RewardResult], metric: str) -> dict[str, float]:
    """{"pass@k": mean over tasks} for every k in `pass_k_values` of the smallest per-task sample count.

    >>> from envs.types import Transcript
    >>> s = [Sample(t, "math", "low", [], [], [], [], Transcript()) for t in "aaaabbbb"]
    >>> r = [RewardResult(x, {"math": x}) for x in (1, 0, 0, 0, 1, 1, 1, 1)]
    >>> mean_pass_at_k(s, r, "math")  # task a: 1 of 4 correct; task b: 4 of 4
    {'pass@1': 0.625, 'pass@2': 0.75, 'pass@4': 1.0}
    """
    per_task: dict[str, list[bool]] = defaultdict(list)
    for s, r in zip(samples, results, strict=True):
        per_task[s.task_id].append(r.parts.get(metric, 0.0) >= SOLVED_AT)
    if not per_task:
        return {}
    ks = pass_k_values(min(len(v) for v in per_task.values()))
    return {f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
            for k in ks}


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default); nan for no values.

    >>> quantile([1, 2, 3, 4], 0.5), quantile([10, 20, 30, 40, 50], 0.9), quantile([7], 0.9)
    (2.5, 46.0, 7.0)
    """
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def cot_token_stats(samples: Sequence[Sample]) -> dict[str, float]:
    """Mean, median and 90th percentile of analysis-channel (CoT) tokens.

    >>> from envs.types import Transcript
    >>> s = [Sample("t", "math", "low", [], [], [], [], Transcript(analysis_tokens=t)) for t in [*range(10), 76]]
    >>> cot_token_stats(s)  # one long trace pulls the mean, not the median
    {'cot_tokens': 11.0, 'cot_tokens_p50': 5.0, 'cot_tokens_p90': 9.0}
    """
    tokens = [s.transcript.analysis_tokens for s in samples]
    mean = sum(tokens) / len(tokens) if tokens else math.nan
    return {"cot_tokens": mean, "cot_tokens_p50": quantile(tokens, 0.5),
            "cot_tokens_p90": quantile(tokens, 0.9)}


def budget_compliance(results: Sequence[RewardResult]) -> float | None:
    """Fraction of samples whose CoT is within their effort's budget, from the "effort_length" term's
    `within_budget` part; None when no result carries it (no such term, or it failed everywhere).

    >>> budget_compliance([RewardResult(1, {BUDGET_PART: 1.0}), RewardResult(0, {BUDGET_PART: 0.0})])
    0.5
    >>> budget_compliance([RewardResult(1, {"math": 1.0})]) is None
    True
    """
    flags = [r.parts[BUDGET_PART] for r in results if BUDGET_PART in r.parts]
    return sum(flags) / len(flags) if flags else None


def truncation_rate(samples: Sequence[Sample]) -> float:
    """Fraction of samples cut at the token limit (finish reason "length")."""
    return sum(s.finish_reason == "length" for s in samples) / len(samples)


def budget_forced_rate(samples: Sequence[Sample]) -> float:
    """Fraction of samples whose analysis rollout closed at its cap (rl/forcing.py)."""
    return sum(s.budget_forced for s in samples) / len(samples)


def format_failure_rate(samples: Sequence[Sample]) -> float:
    """Fraction of samples with no parsable final answer."""
    return sum(not s.transcript.format_ok for s in samples) / len(samples)


def mean_reward(results: Sequence[RewardResult]) -> float:
    """Mean total reward."""
    return sum(r.score for r in results) / len(results)


ACCURACY = "accuracy"  # the part that holds each sample's own env's metric in an env.mixture run


def scored_as(result: RewardResult, metric: str) -> RewardResult:
    """A copy of `result` whose part ACCURACY is the score of term `metric` (0 where it did not apply):
    in an env mixture each sample is scored by its own env's metric, then summarised under one name.

    >>> scored_as(RewardResult(1.0, {"safety": 1.0}), "safety").parts[ACCURACY]
    1.0
    """
    return RewardResult(result.score, {**result.parts, ACCURACY: result.parts.get(metric, 0.0)}, result.info)


def accuracy(results: Sequence[RewardResult], metric: str) -> float:
    """Mean score of reward term `metric` clipped to [0, 1] (0 where the term did not apply): a proportion
    even for terms that score penalties below 0 (safety's -1 for a disallowed answer, hierarchy's -1 for a
    leak count as 0), so its Wilson interval is defined; terms scoring in [0, 1] (math) are unchanged.

    >>> accuracy([RewardResult(1, {"safety": 1.0}), RewardResult(-1, {"safety": -1.0})], "safety")
    0.5
    """
    return sum(min(1.0, max(0.0, r.parts.get(metric, 0.0))) for r in results) / len(results)


def ordered_efforts(efforts: Iterable[str]) -> list[str]:
    """The distinct efforts among `efforts`, low to high (`EFFORTS` order).

    >>> ordered_efforts(["high", "low", "high"])
    ['low', 'high']
    """
    seen = set(efforts)
    unknown = seen - set(EFFORTS)
    if unknown:
        raise ValueError(f"unknown efforts {sorted(unknown)}; valid ones are {EFFORTS}")
    return [e for e in EFFORTS if e in seen]


def monotonicity(samples: Sequence[Sample]) -> float | None:
    """Fraction of tasks whose mean CoT tokens strictly increase along the efforts present, in
    `EFFORTS` order (e.g. low < high when only those two were sampled). Only tasks sampled at every
    effort present count. None when fewer than two efforts (or no task at all of them).

    >>> from envs.types import Transcript
    >>> def s(task, effort, t): return Sample(task, "math", effort, [], [], [], [], Transcript(analysis_tokens=t))
    >>> monotonicity([s("a", "low", 5), s("a", "high", 9), s("b", "low", 5), s("b", "high", 5)])
    0.5
    >>> monotonicity([s("a", "low", 5)]) is None
    True
    """
    efforts = ordered_efforts(s.effort for s in samples)
    if len(efforts) < 2:
        return None
    tokens: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        tokens[s.task_id][s.effort].append(s.transcript.analysis_tokens)
    means = [[sum(by[e]) / len(by[e]) for e in efforts] for by in tokens.values() if all(e in by for e in efforts)]
    if not means:
        return None
    return sum(all(a < b for a, b in zip(m, m[1:])) for m in means) / len(means)


def effort_summary(samples: Sequence[Sample], results: Sequence[RewardResult], metric: str) -> dict:
    """Every per-effort eval metric for one checkpoint at one effort (the `eval.json` entry, see
    `rl/evaluate.py`): accuracy and its 95% CI, pass@k, CoT tokens, budget compliance (None without an
    "effort_length" term), truncation, format failures, mean reward, n."""
    if not samples or len(samples) != len(results):
        raise ValueError(f"effort_summary needs one result per sample, got {len(samples)} samples and "
                         f"{len(results)} results")
    n = len(samples)
    acc = accuracy(results, metric)
    lo, hi = wilson_interval(acc * n, n)
    return {"accuracy": acc, "accuracy_ci95": [lo, hi], **mean_pass_at_k(samples, results, metric),
            **cot_token_stats(samples), "budget_compliance": budget_compliance(results),
            "truncation": truncation_rate(samples), "format_failure": format_failure_rate(samples),
            "reward": mean_reward(results), "n": n}
