"""Seed mixing, named once: every derived seed in a run comes from here.

A run's `seed` fans out to per-step rollout seeds, per-request sampling seeds and the evaluation
stream. The multipliers are primes, so streams of different steps / requests never coincide for the
run lengths we use.
"""
from __future__ import annotations

STEP_PRIME = 7_919  # distance between the rollout seeds of consecutive steps
RUN_PRIME = 1_000_003  # distance between runs (and between requests of one engine call)
EVAL_OFFSET = 500_009  # evaluation: off the step lattice (step * STEP_PRIME + worker) of any real run
SFT_OFFSET = 1  # the cold-start SFT draws its tasks from a stream of its own
CONTINUATION_OFFSET = 3_000_017  # continuations (forcing's phase 2, tool turns): off the request lattice


def step_seed(seed: int, step: int) -> int:
    """The rollout seed of training step `step` (worker i adds i)."""
    return seed * RUN_PRIME + step * STEP_PRIME


def request_seed(seed: int, index: int, n: int) -> int:
    """vLLM seed of prompt `index` in one engine call with `n` samples per prompt (sample j is the
    j-th draw of that stream), folded into 31 bits."""
    return (seed * RUN_PRIME + index * n) % 2**31


def continuation_seed(seed: int, sample: int, turn: int = 1) -> int:
    """vLLM seed of continuation `turn` (>= 1) of sample `sample` of a request seeded `seed`: what is
    sampled after inserted ids (budget forcing's second phase, rl/forcing.py; the turn after the k-th
    tool answer of a python-tool episode, rl/tools.py), folded into 31 bits.

    >>> continuation_seed(5, 2) == continuation_seed(5, 2, turn=1) != continuation_seed(5, 2, turn=2)
    True
    """
    return (seed * RUN_PRIME + CONTINUATION_OFFSET * turn + sample) % 2**31


def eval_seed(seed: int) -> int:
    """The sampling seed of held-out evaluation: never a rollout seed of the same run (step k, worker i
    gives k * 7919 + i, which would need i = 1112 at k = 63 to meet it)."""
    return seed * RUN_PRIME + EVAL_OFFSET


def sft_seed(seed: int) -> int:
    """The seed of the SFT task draw."""
    return seed + SFT_OFFSET
