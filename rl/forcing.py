"""Budget forcing at rollout time (s1-style): an analysis message that reaches its effort's cap is
closed and the final channel opened by inserted tokens, token-in/token-out.

What it does
  `RolloutEngine.generate(..., analysis_caps=caps)` (rl/engine.py; `WorkerPool.rollout` passes
  `analysis_caps(rollout.budget_forcing, efforts)`) runs `generate(sample, ...)` here, which samples
  each prompt in up to two phases through the engine's one-call `sample` function (same temperature,
  top_p, stop ids and vocabulary mask in both):
  1. Phase 1 samples at most `phase1_tokens(cap, max_tokens)` = cap + 3 tokens: the
     `<|channel|>analysis<|message|>` header the model writes first, then at most `cap` tokens of
     analysis. A completion that stops (`<|return|>`) inside that window is final: exactly what the
     same request gives without forcing.
  2. `plan` looks at a completion the window cut: if it ends inside analysis content
     (`envs.harmony.open_channel`), the ids `<|end|><|start|>assistant<|channel|>final<|message|>`
     (`envs.harmony.forced_final_header`, as openai-harmony renders them) are appended; otherwise
     (the analysis ended in time) nothing is. Phase 2 samples from prompt + phase 1 + inserted ids
     for what is left of `max_tokens`.
  3. `splice` returns one `Completion`: ids = phase 1 + inserted + phase 2; `sampled` (the sample's
     loss mask) 0 exactly on the inserted ids; their behaviour log-prob is `FORCED_LOGPROB` (0.0 =
     log 1: the rule, not the policy, chose them; the learner masks them out of the loss, the
     importance ratios and the KL, rl/algorithms.py `policy_loss`); `budget_forced` is True.
  The learner thus trains on exactly what was sampled plus the inserted ids, in one sequence.

Guarantees and limits
- Phase 1 holds at most `cap` analysis tokens, however its messages are laid out: every analysis
  message starts with a header of at least those 3 tokens. A completion is forced at most once;
  should the model open another analysis message after the forced final, that one is not capped
  (it counts in `Transcript.analysis_tokens` and the length rewards as usual).
- A cap that leaves no room for the inserted ids and one answer token (cap + 3 + 6 >= max_tokens)
  does not bind: that prompt is sampled in one phase, as without forcing.
- Seeds: phase 1 uses the request's seed (`rl.seeds.request_seed`); sample j's phase 2 uses
  `rl.seeds.continuation_seed(request seed, j)`, so a seeded call is reproducible whatever else is
  batched with it. Without a seed both phases draw from the engine's stream.
- A completion cut by the window whose analysis had ended is continued with nothing inserted: the
  same distribution as one uninterrupted draw, though not the same random numbers.

Departures from s1 (Muennighoff et al. 2025, "s1: Simple test-time scaling", arXiv:2501.19393):
s1 forces at test time, appending its end-of-thinking delimiter and "Final Answer:"; here it runs at
rollout time for RL, the delimiter is Harmony's channel switch, and the inserted ids are masked out
of the policy loss. s1's other half (suppressing the delimiter and appending "Wait" to think longer)
is not implemented. Evaluation (`WorkerPool.generate`) never forces: it measures what the policy
does on its own (budget compliance would be 100% by construction otherwise).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Sequence

from envs import harmony
from envs.types import INSERTED_LOGPROB, Request
from rl.seeds import continuation_seed

if TYPE_CHECKING:
    from rl.config import BudgetForcingConfig
    from rl.engine import Completion

FORCED_LOGPROB = INSERTED_LOGPROB  # behaviour log-prob stored for inserted ids (finite: the learner masks them)

Sampler = Callable[[Sequence[Request]], "list[list[Completion]]"]  # one engine call: result[i][j]


def analysis_caps(cfg: BudgetForcingConfig, efforts: Sequence[str]) -> list[int] | None:
    """The caps of prompts at `efforts` (`RolloutEngine.generate`'s `analysis_caps`); None when off.

    >>> from rl.config import BudgetForcingConfig
    >>> analysis_caps(BudgetForcingConfig(True, {"low": 8, "high": 64}), ["low", "high", "low"])
    [8, 64, 8]
    >>> analysis_caps(BudgetForcingConfig(False), ["low"]) is None
    True
    """
    if not cfg.enabled:
        return None
    missing = sorted(set(efforts) - set(cfg.caps))
    if missing:
        raise ValueError(f"rollout.budget_forcing.caps has no cap for efforts {missing} (caps: {cfg.caps})")
    return [cfg.caps[e] for e in efforts]


def generate(sample: Sampler, prompts: Sequence[Sequence[int]], n: int, caps: Sequence[int | None],
             budgets: Sequence[int], seeds: Sequence[int | None]) -> list[list[Completion]]:
    """`n` completions of each prompt, its analysis capped at `caps[i]` tokens (None: uncapped) and
    its length at `budgets[i]` ids (inserted ones included), in at most two `sample` calls;
    `seeds[i]`: prompt i's request seed. result[i][j] is sample j of prompt i."""
    windows = [phase1_tokens(c, b) for c, b in zip(caps, budgets, strict=True)]
    result = sample([Request(list(p), n, w, s) for p, w, s in zip(prompts, windows, seeds, strict=True)])
    jobs, requests = [], []
    for i, comps in enumerate(result):
        for j, c in enumerate(comps):
            inserted = plan(c.ids, c.finish_reason, windows[i], budgets[i])
            if inserted is None:
                continue
            jobs.append((i, j, inserted))
            rest = budgets[i] - len(c.ids) - len(inserted)  # >= 1 (phase1_tokens leaves room)
            requests.append(Request([*prompts[i], *c.ids, *inserted], 1, rest,
                                    None if seeds[i] is None else continuation_seed(seeds[i], j)))
    if requests:
        for (i, j, inserted), [second] in zip(jobs, sample(requests), strict=True):
            result[i][j] = splice(result[i][j], inserted, second)
    return result


def phase1_tokens(cap: int | None, max_tokens: int) -> int:
    """Tokens phase 1 may sample: the analysis header plus `cap`, or all of `max_tokens` when there
    is no cap or it leaves no room to insert the final header and answer.

    >>> phase1_tokens(None, 320), phase1_tokens(16, 320), phase1_tokens(311, 320), phase1_tokens(310, 320)
    (320, 19, 320, 313)
    """
    if cap is None:
        return max_tokens
    if cap < 1:
        raise ValueError(f"an analysis cap must be >= 1 token, got {cap}")
    window = cap + len(harmony.analysis_header())
    return window if window + len(harmony.forced_final_header()) < max_tokens else max_tokens


def plan(ids: Sequence[int], finish_reason: str, window: int, max_tokens: int) -> tuple[int, ...] | None:
    """What follows phase 1 of a completion: None (it is complete), () (continue as sampled: the
    window cut it after its analysis ended) or the ids to insert before continuing (it was cut
    inside analysis content).

    >>> head = list(harmony.analysis_header())
    >>> plan(head + [1, 2], "length", 5, 320) == harmony.forced_final_header()
    True
    >>> plan(head + [1, 2], "stop", 5, 320), plan(head + [1], "length", 5, 320), plan(head + [1, 2], "length", 5, 5)
    (None, None, None)
    """
    if finish_reason != "length" or len(ids) != window or window >= max_tokens:
        return None  # stopped, cut by the model length, or phase 1 had the whole budget
    return harmony.forced_final_header() if harmony.open_channel(list(ids)) == "analysis" else ()


def splice(first: Completion, inserted: Sequence[int], second: Completion) -> Completion:
    """One completion from phase 1, the inserted ids and phase 2; its finish reason is phase 2's."""
    return dataclasses.replace(
        second,
        ids=[*first.ids, *inserted, *second.ids],
        logprobs=[*first.logprobs, *[FORCED_LOGPROB] * len(inserted), *second.logprobs],
        sampled=[*first.sampled, *[0] * len(inserted), *second.sampled],
        budget_forced=first.budget_forced or bool(inserted) or second.budget_forced,
    )
