"""Weighted composition of reward plugins into one `RewardResult` per sample, with a failure policy.

    score = sum_i  w_i * score_i    over the rewards that apply to the sample (non-None)

Rewards that return None are left out of the sum (not renormalised: a sample without an effort
simply gets no length term). Every applicable reward is logged as a part under its name, and its
own parts as "name/part", so `parts` shows e.g. {"math": 1.0, "math/correct": 1.0, "effort_length":
0.5, ...}. If no reward applies, the result is score 0.0 with info {"applicable": []}.

Config (`reward.terms` in rl/config.py has this shape): `CompositeReward.from_config({"math":
{"weight": 1.0, "timeout_s": 5.0}, "effort_length": {"weight": 0.2, "budgets": {...}}, "brevity":
{"weight": 0.1, "_target_": "my_pkg.rewards.Brevity"}}, on_error="zero", timeout_s=300.0)`: a weight
plus the reward's options, or a Hydra `_target_` (a bare number is shorthand for {"weight": w}).
`score_batch` hands whole batches to rewards that have `score_batch` (math-verify checks a batch in
parallel in its process pool) and calls the rest per sample.

Correctness gating. A term's option `gate: <other term>` (e.g. `effort_length: {weight: 0.2, gate:
math}`) keeps the term's score where the gating term scored > 0 on that sample and makes it
min(0, score) where it did not (scored <= 0, did not apply, or failed): a bonus needs a right answer,
a penalty applies to all. That is Kimi k1.5's rule for wrong answers; for scores in [0, 1] it is the
same as multiplying by 1[gate > 0]. So with the gated term's scores spanning at most the gate's
weight, a wrong answer never outscores a right one. Gates are scored before the terms they gate (a
chain gates on the gated score); the result logs `parts["<name>/gated"]` = 1.0 where the gate was
closed. An unknown gate name or a cycle of gates fails at build.

Routing by env. A term's option `envs: [<env>, ...]` applies it only to samples whose `sample.env` or
mixture label (the "LABEL:" of a mixture's task ids, `envs.mixture.label_of`) is listed (None elsewhere:
left out of the sum, like a reward that does not apply), so one run can hold two
instances of the same reward with different options for different task families, e.g. the walk world's
token budgets for walk samples and longer ones for safety samples (conf/experiment/safety_walk.yaml).

Failure policy. The plugin's call on a batch runs in its own daemon thread, and the composite stops
waiting for it `timeout_s` after it started. A plugin fails on a sample when its per-sample call
raises or returns something other than a `RewardResult` with a finite score (or None), and on the
whole batch when its `score_batch` raises or returns a number of results different from the number
of samples. Past the deadline, every sample it has not scored yet has failed (a per-sample plugin
keeps the scores it finished). Then:
- `on_error="zero"` (default): its term scores 0 on those samples, each such result gets
  `parts["<name>/error"] = 1.0` and `info["<name>"]["error"]`, `self.errors[name]` counts the
  failed samples since construction, and one warning per plugin and batch names the plugin, how
  many samples failed and the (first) exception. The step goes on.
- `on_error="raise"`: a `RuntimeError` naming the plugin and the cause stops the run.
A timed-out call cannot be stopped from outside: its thread is abandoned and runs on in the
background until the plugin returns (it is a daemon thread, so it does not keep the process alive).
Plugins that can hang should bound themselves, as "math" does with its killable process pool.
"""
from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from envs.mixture import label_of
from envs.types import Sample
from rewards.registry import RewardFn, build_reward, get_reward
from rewards.types import RewardResult

ON_ERROR = ("zero", "raise")
DEFAULT_TIMEOUT_S = 300.0  # a hang guard for a whole step's batch (rl.config.RewardConfig.timeout_s agrees)
log = logging.getLogger(__name__)


class CompositeReward:
    """Weighted sum of named rewards.

    >>> from envs.types import Transcript
    >>> s = Sample("t", "math", "low", [], [], [], [], Transcript(final="4"), {"answer": "4"})
    >>> r = CompositeReward({"math": 1.0, "format": 0.1})(s)
    >>> round(r.score, 3), r.parts["math/correct"]
    (1.1, 1.0)
    """

    def __init__(self, weights: Mapping[str, float], rewards: Mapping[str, RewardFn] | None = None,
                 on_error: str = "zero", timeout_s: float = DEFAULT_TIMEOUT_S,
                 gates: Mapping[str, str] | None = None, envs: Mapping[str, Sequence[str]] | None = None):
        if not weights:
            raise ValueError("CompositeReward needs at least one {name: weight}")
        bad = {k: w for k, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))}
        if bad:
            raise TypeError(f"weights must be numbers, got {bad}; use from_config for per-reward options")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive (seconds per plugin call on a batch)")
        self.weights = {k: float(w) for k, w in weights.items()}
        rewards = dict(rewards or {})
        self.rewards = {name: rewards.get(name) or get_reward(name) for name in self.weights}
        self.on_error, self.timeout_s = on_error, float(timeout_s)
        self.gates = dict(gates or {})  # {gated term: gating term}
        self._order = _gate_order(self.weights, self.gates)  # every gate before the terms it gates
        self.envs = {name: env_list(name, e) for name, e in (envs or {}).items()}  # {term: envs it scores}
        unknown = sorted(set(self.envs) - set(self.weights))
        if unknown:
            raise ValueError(f"envs names {unknown[0]!r}, which is not a reward term; terms: {', '.join(self.weights)}")
        self.errors: dict[str, int] = {}  # samples each plugin failed on, since construction

    @classmethod
    def from_config(cls, terms: Mapping, on_error: str = "zero",
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> "CompositeReward":
        """Build from `{name: {"weight": w, "gate": other_name, "envs": [env, ...], **options or _target_}}`
        (or `{name: w}`)."""
        weights, rewards, gates, envs = {}, {}, {}, {}
        for name, entry in dict(terms).items():
            if isinstance(entry, (int, float)) and not isinstance(entry, bool):
                weights[name] = entry
                continue
            if not isinstance(entry, Mapping) or "weight" not in entry:
                raise ValueError(
                    f"reward term {name!r}: give a mapping with 'weight' (and the reward's options), "
                    f"e.g. {{weight: 0.1}}; got {entry!r}"
                )
            spec = {k: v for k, v in dict(entry).items() if k not in ("weight", "gate", "envs")}
            weights[name] = entry["weight"]
            if "gate" in entry:
                gates[name] = entry["gate"]
            if "envs" in entry:
                envs[name] = entry["envs"]
            if "_target_" not in spec:
                spec["name"] = spec.get("name", name)
            rewards[name] = build_reward(spec)
        return cls(weights, rewards, on_error=on_error, timeout_s=timeout_s, gates=gates, envs=envs)

    def __call__(self, sample: Sample) -> RewardResult:
        return self.score_batch([sample])[0]

    def score_batch(self, samples: Sequence[Sample]) -> list[RewardResult]:
        """One combined result per sample; batch-capable rewards see the whole batch at once."""
        per_reward: dict[str, list[RewardResult | None]] = {}
        for name in self._order:
            results = self._routed(name, samples)
            if name in self.gates:
                results = [_gated(r, g) for r, g in zip(results, per_reward[self.gates[name]])]
            per_reward[name] = results
        return [self._combine({n: per_reward[n][i] for n in self.rewards}) for i in range(len(samples))]

    def _routed(self, name: str, samples: Sequence[Sample]) -> list[RewardResult | None]:
        """The term's results, None on the samples of envs it is not routed to (`envs`)."""
        if name not in self.envs:
            return self._run(name, self.rewards[name], samples)
        routed = self.envs[name]
        keep = [i for i, s in enumerate(samples) if s.env in routed or label_of(s.task_id) in routed]
        out: list[RewardResult | None] = [None] * len(samples)
        if keep:
            for i, r in zip(keep, self._run(name, self.rewards[name], [samples[i] for i in keep])):
                out[i] = r
        return out

    def _run(self, name: str, fn: RewardFn, samples: Sequence[Sample]) -> list[RewardResult | None]:
        slots: list = [_PENDING] * len(samples)  # filled by the plugin's thread
        try:
            _call_with_deadline(lambda: _fill(fn, samples, slots), self.timeout_s, name)
            whole_call = None
        except Exception as exc:  # score_batch raised or miscounted, or the deadline passed
            whole_call = exc
        snapshot = list(slots)  # an abandoned thread may still write to `slots`
        failed: dict[int, Exception] = {}
        for i, r in enumerate(snapshot):
            if r is _PENDING:
                failed[i] = whole_call
            elif isinstance(r, _Failure):
                failed[i] = r.exc
            elif (bad := _bad_result(r, i)) is not None:
                failed[i] = bad
        return self._failed(name, failed, snapshot) if failed else snapshot

    def _failed(self, name: str, failed: Mapping[int, Exception], results: list) -> list[RewardResult | None]:
        first = next(iter(failed.values()))
        cause, where = f"{type(first).__name__}: {first}", f"{len(failed)} of {len(results)} samples"
        if self.on_error == "raise":
            raise RuntimeError(f"reward plugin {name!r} failed: {cause} ({where}; reward.on_error=raise)") from first
        self.errors[name] = self.errors.get(name, 0) + len(failed)
        log.warning("reward plugin %r failed on %s: %s; scored 0 (reward.on_error=zero, %d failed samples "
                    "so far)", name, where, cause, self.errors[name])
        out = list(results)
        for i, exc in failed.items():
            out[i] = RewardResult(0.0, {"error": 1.0}, {"error": f"{type(exc).__name__}: {exc}"})
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


def _gate_order(terms: Sequence[str], gates: Mapping[str, str]) -> list[str]:
    """`terms` with every gate before the terms it gates (config order otherwise); fails on an
    unknown name or a cycle."""
    for name, gate in gates.items():
        if name not in terms:
            raise ValueError(f"gates name {name!r}, which is not a reward term; terms: {', '.join(terms)}")
        if gate not in terms:
            raise ValueError(f"reward term {name!r}: gate {gate!r} is not a reward term; valid terms: "
                             f"{', '.join(t for t in terms if t != name)}")
    order: list[str] = []
    for name in terms:
        chain = [name]
        while chain[-1] in gates and chain[-1] not in order:
            chain.append(gates[chain[-1]])
            if chain[-1] in chain[:-1]:
                raise ValueError(f"reward gates form a cycle: {' -> '.join(chain)} (a term cannot "
                                 f"gate itself, directly or through others)")
        order.extend(t for t in reversed(chain) if t not in order)
    return order


def env_list(name: str, envs) -> frozenset[str]:
    """A term's `envs` option checked: a non-empty list of env names."""
    if isinstance(envs, str) or not isinstance(envs, Sequence) or not envs or \
            not all(isinstance(e, str) and e for e in envs):
        raise ValueError(f"reward term {name!r}: envs must be a non-empty list of env names "
                         f"(e.g. [walk, math]), got {envs!r}")
    return frozenset(envs)


def _gated(r: RewardResult | None, gate: RewardResult | None) -> RewardResult | None:
    """`r` where the gate scored > 0; min(0, r) where it did not (see the module docstring)."""
    if r is None:
        return None
    closed = gate is None or not gate.score > 0
    score = min(0.0, r.score) if closed else r.score
    return RewardResult(score, {**r.parts, "gated": float(closed)}, r.info)


class _Failure(NamedTuple):
    exc: Exception


_PENDING = object()  # a sample the plugin has not scored (yet)


def _fill(fn: RewardFn, samples: Sequence[Sample], slots: list) -> None:
    """Score `samples` into `slots`: a batch at once through `score_batch`, or one by one, where an
    exception costs only its own sample."""
    batch = getattr(fn, "score_batch", None)
    if batch is not None:
        out = list(batch(samples))
        if len(out) != len(samples):
            raise ValueError(f"returned {len(out)} results for {len(samples)} samples")
        slots[:] = out
        return
    for i, sample in enumerate(samples):
        try:
            slots[i] = fn(sample)
        except Exception as exc:
            slots[i] = _Failure(exc)


def _call_with_deadline(call: Callable[[], None], timeout_s: float, name: str) -> None:
    """`call()` in a daemon thread; TimeoutError if it has not returned after `timeout_s` (the thread
    is then abandoned: Python cannot stop it)."""
    box: dict = {}

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # re-raised in the caller's thread below
            box["exc"] = exc

    thread = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no result within reward.timeout_s={timeout_s:g} s (its thread is abandoned)")
    if "exc" in box:
        raise box["exc"]


def _bad_result(r, i: int) -> Exception | None:
    """Why `r` is not a valid plugin result for sample `i` (None when it is one)."""
    if r is None:
        return None
    if not isinstance(r, RewardResult):
        return TypeError(f"returned {type(r).__name__} for sample {i}; expected RewardResult or None")
    if not isinstance(r.score, numbers.Real) or not math.isfinite(r.score):
        return ValueError(f"returned score {r.score!r} for sample {i}; expected a finite number")
    return None
