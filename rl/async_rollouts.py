"""Rollouts submitted ahead of the learner, with bounded staleness (`train.max_staleness`).

What it does
  `RolloutQueue(cfg, pool, stream, start_step)` owns the rollouts in flight. `take(t)` returns step
  t's samples: it first submits the rollouts of steps up to t + max_staleness (each with its own
  tasks from the stream and its step's seed, `rl.seeds.step_seed`), then waits for step t's.
  `drain()` waits for the rollouts still in flight; the loop calls it before every weight sync.
  With max_staleness = 0 this is the synchronous loop: one rollout, submitted and awaited when its
  step begins. With 1 (one-step-off), step t+1's rollout is submitted before step t trains:

      step t:  submit rollout t+1 (weights v_t-1) | wait for rollout t | reward, advantage | train t
                                                     ... rollout t+1 runs meanwhile ...
               drain: rollout t+1 done | sync v_t | step t+1 submits rollout t+2, which samples v_t

  so a step costs about max(rollout, learner) + sync instead of their sum.

Guarantees and limits
- Versions: the pool stamps every sample with `policy_version`, the learner step of the weights
  that drew it. At step t the learner has taken t - 1 steps, so staleness = t - 1 - policy_version:
  0 in the synchronous loop, 1 one-step-off (0 on the first step). Logged as staleness/mean, /max.
- Samples staler than the bound are dropped (`drop_stale`, staleness/dropped); if none is left, the
  step is rolled out again on the current weights (same tasks, same seed). With the pool's ordering
  (rl/workers.py) this does not happen in this loop: it guards pools that do not keep it.
- No weight sync races a rollout: the loop drains before it syncs, and the pool itself runs an
  update only after the rollouts submitted before it. A sample's weights are therefore exactly
  those of its version, and no rollout mixes two versions.
- Checkpoints: `cursor` is the data cursor less the tasks of rollouts not yet trained on, so a
  resume draws them again, with the same seeds. The weights that drew an in-flight rollout are not
  saved: after a resume the first rollout samples the resumed weights (staleness 0), so an async
  run resumed is exact in data, weights and optimizer state but not sample for sample.
Departures: as verl's one-step-off-policy recipe, the sync waits for the rollout in flight; AReaL
and PipelineRL instead update weights mid-generation (partial rollouts), which deeper pipelines
need. Here a bound above 1 would only add staleness, so `train.max_staleness` stops at 1. Pair it
with a correction for the extra step of mismatch: `algo.correction=tis|mis|icepop` (the learner's
own old log-probs against the stale behaviour ones), or `algo.old_logprobs=behavior` with several
optimizer steps (the clip is then anchored at the behaviour policy).
Cores: where the rollout and the learner share a node's CPU cores, set `learner.overlap_threads` so the
learner computes with fewer threads while a rollout is in flight (rl/overlap.py); the queue marks each
rollout on the learner's tracker from its submission to its Future's completion.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from concurrent.futures import Future
from typing import Any, Sequence

from envs.types import Sample, Task
from rl import seeds
from rl.config import Config
from rl.data import TaskStream
from rl.overlap import RolloutTracker

log = logging.getLogger("deliberate.train")


def drop_stale(samples: Sequence[Sample], learner_version: int, max_staleness: int
               ) -> tuple[list[Sample], dict[str, float]]:
    """The samples drawn at most `max_staleness` learner steps before `learner_version`, and the
    staleness metrics. Samples without a version (a pool that does not stamp) are kept, uncounted.

    >>> from envs.types import Transcript
    >>> s = [Sample("t", "math", "low", [1], [2], [1], [0.0], Transcript(), policy_version=v) for v in (4, 3, 2)]
    >>> kept, m = drop_stale(s, 4, 1)
    >>> [x.policy_version for x in kept], m
    ([4, 3], {'staleness/mean': 1.0, 'staleness/max': 2.0, 'staleness/dropped': 0.3333333333333333})
    """
    ages = [None if s.policy_version is None else learner_version - s.policy_version for s in samples]
    kept = [s for s, age in zip(samples, ages) if age is None or age <= max_staleness]
    known = [age for age in ages if age is not None]
    return kept, {"staleness/mean": sum(known) / len(known) if known else 0.0,
                  "staleness/max": float(max(known, default=0)),
                  "staleness/dropped": (len(samples) - len(kept)) / max(len(samples), 1)}


class RolloutQueue:
    """The rollouts submitted ahead of the learner (see the module docstring). `tracker` (optional, a
    `rl.overlap.RolloutTracker`): marked while each rollout is in flight, for a learner that yields cores."""

    def __init__(self, cfg: Config, pool: Any, stream: TaskStream, start_step: int, tracker: Any = None):
        self.cfg, self.pool, self.stream = cfg, pool, stream
        self.tracker = tracker if tracker is not None else RolloutTracker()  # unwatched: marks only
        self.pending: deque[tuple[int, list[Task], Future]] = deque()  # (step, its tasks, its samples)
        self.submitted = start_step  # the last step whose rollout was submitted
        self._calls = itertools.count()  # tracker keys: one per submitted rollout

    def take(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """Step `step`'s samples (waits for them) and their staleness metrics, once the rollouts of the
        steps up to `step + train.max_staleness` are submitted."""
        train = self.cfg.train
        while self.submitted < min(step + train.max_staleness, train.steps):
            self.submitted += 1
            tasks = self.stream.next(train.tasks_per_step)
            self.pending.append((self.submitted, tasks, self._submit(tasks, self.submitted)))
        owner, tasks, future = self.pending.popleft()
        if owner != step:
            raise RuntimeError(f"RolloutQueue.take({step}) but the oldest rollout in flight is step {owner}'s")
        samples, metrics = drop_stale(future.result(), step - 1, train.max_staleness)
        if not samples:
            log.warning("step %d: every sample was more than %d learner steps stale; rolling it out again",
                        step, train.max_staleness)
            samples, _ = drop_stale(self._submit(tasks, step).result(), step - 1, train.max_staleness)
        return samples, metrics

    def drain(self) -> None:
        """Wait for every rollout in flight (their errors surface here)."""
        for _, _, future in self.pending:
            future.result()

    @property
    def cursor(self) -> int:
        """The data cursor a checkpoint saves: tasks of rollouts not yet trained on are drawn again."""
        return self.stream.cursor - sum(len(tasks) for _, tasks, _ in self.pending)

    def _submit(self, tasks: list[Task], step: int) -> Future:
        key = next(self._calls)
        self.tracker.start(key)
        try:
            future = self.pool.submit(tasks, self.cfg.env.efforts, self.cfg.algo.group_size,
                                      seeds.step_seed(self.cfg.seed, step - 1))
        except BaseException:
            self.tracker.end(key)
            raise
        future.add_done_callback(lambda _: self.tracker.end(key))  # now if it is done already
        return future
