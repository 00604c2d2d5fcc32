"""A learner that yields cores to the rollout running beside it (`learner.overlap_threads`).

Why
  With `train.max_staleness=1` the next step's rollout runs while the learner trains. Where both share
  a node's CPU cores (a CPU box, a rollout engine and learner ranks on the same cores), a learner with
  all its threads competes with the engine's: OpenMP threads that lose their core stall every parallel
  region of the learner until they get it back, so the overlap buys nothing (bench/RESULTS.md, "Async
  rollouts": 2 cores, the 2-thread learner took 336 s beside the rollout instead of 247 s alone). With
  `learner.overlap_threads=k` the learner computes with k threads while a rollout is in flight and with
  `learner.num_threads` once it has ended, so the rollout's cores are its own while it needs them and
  come back to the learner after.

What it does
  `RolloutTracker` (driver side): the rollout queue calls `start(key)` before it submits a rollout and
  `end(key)` when its Future completes (from the pool's thread). `busy()` is true while a started key
  has not ended (`start` returns before the rollout is submitted, so its `end` always comes after; an
  `end` that arrived first would cancel its `start`). `SharedTracker` is the same state in a Ray actor
  (0 CPUs) for a learner in another process; its `probe()` is a picklable callable the learner polls.
  `ThreadSwitch` (learner side): `poll()` before each forward/backward pass sets torch's thread count
  to `overlap_threads` while the probe says busy and to `num_threads` otherwise, counting the passes
  run at each (the learner's `overlap/yielded` metric: the share of passes that ran yielded; a learner
  group reports rank 0's); `release()` at the end of a step gives `num_threads` back for what follows
  (weights for the sync, checkpoints), which runs after the loop has waited for the rollout.

Guarantees and limits
- Results do not depend on the thread count beyond float summation order (torch's CPU kernels split
  work across threads, and a reduction's order may change the last bits); the loss, weights and
  samples are otherwise those of the same run without it.
- The switch happens between passes, not inside one: a pass that starts while the rollout runs keeps
  the yielded count to its end, and the `end` of a rollout reaches the tracker's actor a moment after the
  loop sees the rollout done (one pass at a step boundary may run yielded).
- Nothing here stops training: a probe whose actor is gone turns the switch off with a warning (the
  learner keeps `num_threads`); a probe that times out counts as not busy for that pass; a tracker whose
  actor is gone stops tracking with a warning; a process where `torch.set_num_threads` does nothing
  (vLLM's CPU worker makes it a no-op in the process it runs in) turns the switch off with a warning.
- On GPU learners the thread count only affects host-side work; leave `overlap_threads` null there.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Hashable

import torch

log = logging.getLogger("deliberate.train")


class RolloutTracker:
    """Which rollouts are in flight (module docstring); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[Hashable, int] = {}  # key -> starts less ends (-1: ended before its start arrived)

    def start(self, key: Hashable) -> None:
        self._add(key, 1)

    def end(self, key: Hashable) -> None:
        self._add(key, -1)

    def _add(self, key: Hashable, delta: int) -> None:
        with self._lock:
            n = self._open.pop(key, 0) + delta
            if n:
                self._open[key] = n

    def busy(self) -> bool:
        with self._lock:
            return any(n > 0 for n in self._open.values())

    def probe(self) -> Callable[[], bool]:
        """What an in-process learner polls."""
        return self.busy

    def close(self) -> None:
        pass


class _ActorProbe:
    """`busy()` of a `SharedTracker`'s actor, from any process (picklable: it holds the actor handle)."""

    def __init__(self, actor):
        self.actor = actor

    def __call__(self) -> bool:
        import ray

        return bool(ray.get(self.actor.busy.remote(), timeout=10))


class SharedTracker:
    """A `RolloutTracker` in a Ray actor (0 CPUs) that a learner actor polls through `probe()`."""

    def __init__(self):
        import ray

        self._ray = ray
        self.actor = ray.remote(num_cpus=0)(RolloutTracker).remote()
        self.live = True  # false once the actor failed: tracking stops, training goes on

    def start(self, key: Hashable) -> None:
        if self.live:  # waits: busy before the rollout is submitted
            self._call(lambda: self._ray.get(self.actor.start.remote(key), timeout=30))

    def end(self, key: Hashable):
        """From the pool's thread when the rollout's Future completes; the call's ObjectRef (None when
        tracking stopped), which `ray.get` waits on."""
        return self._call(lambda: self.actor.end.remote(key)) if self.live else None

    def _call(self, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the actor gone or stuck: stop tracking, train on
            log.warning("learner.overlap_threads: the rollout tracker failed (%s); the learner keeps its threads",
                        exc)
            self.live = False
            return None

    def probe(self) -> Callable[[], bool]:
        return _ActorProbe(self.actor)

    def close(self) -> None:
        from rl.cluster import kill_actors

        kill_actors([self.actor])


def shared_tracker(watch: Callable[[Callable[[], bool]], None]) -> SharedTracker:
    """A `SharedTracker` whose probe `watch` hands to the learner actor(s); closed if that fails."""
    tracker = SharedTracker()
    try:
        watch(tracker.probe())
    except BaseException:
        tracker.close()
        raise
    return tracker


class ThreadSwitch:
    """The learner's side: torch's thread count follows the probe (module docstring)."""

    def __init__(self, num_threads: int | None, overlap_threads: int | None):
        self.full, self.yielded = num_threads, overlap_threads
        self.probe: Callable[[], bool] | None = None
        self.counts = {"yielded": 0, "full": 0}  # passes run at each thread count since `metrics()`

    def watch(self, probe: Callable[[], bool] | None) -> None:
        """Start polling `probe` (None: stop, back to `num_threads`)."""
        self.probe = probe if self.yielded else None
        if self.probe is None:
            self._set(self.full)

    def poll(self) -> None:
        """Before a pass: yield the cores while a rollout is in flight, take them back after."""
        if self.probe is None:
            return
        try:
            busy = self.probe()
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "GetTimeoutError":  # a slow answer: not busy for this pass, ask again
                busy = False
            else:  # the tracker's actor gone: train on, unyielded
                log.warning("learner.overlap_threads: the rollout probe failed (%s); keeping %s threads",
                            exc, self.full)
                self.watch(None)
                return
        n = self.yielded if busy else self.full
        if not self._set(n):
            log.warning("learner.overlap_threads: torch.set_num_threads(%s) had no effect in this process "
                        "(vLLM's CPU worker makes it a no-op); the switch is off", n)
            self.probe = None
            return
        self.counts["yielded" if busy else "full"] += 1

    def release(self) -> None:
        """After a step: `num_threads` again (the probe stays watched)."""
        if self.probe is not None:
            self._set(self.full)

    def metrics(self) -> dict[str, float]:
        """`overlap/yielded`: the share of the passes since the last call that ran yielded (none: {})."""
        n = sum(self.counts.values())
        out = {"overlap/yielded": self.counts["yielded"] / n} if n else {}
        self.counts = {"yielded": 0, "full": 0}
        return out

    @staticmethod
    def _set(n: int | None) -> bool:
        """torch's thread count to `n` (None: unchanged); whether it holds `n` now."""
        if n and torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return not n or torch.get_num_threads() == n
