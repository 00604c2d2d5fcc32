"""Budget forcing (rl/forcing.py) with a scripted in-process sampler: the two phases, what is inserted
where, the loss mask, seeds and budgets. The real vLLM engine on the tiny model: test_forcing_vllm.py.
"""
import doctest

import pytest

from envs import harmony
from envs.types import Task
from rl import forcing
from rl.config import BudgetForcingConfig
from rl.engine import Completion
from rl.seeds import continuation_seed
from rl.workers import to_sample

PROMPT = harmony.render_prompt("Compute 47+86.", "high")
FORCED = list(harmony.forced_final_header())
HEAD = list(harmony.analysis_header())
LP = -0.5  # the scripted sampler's log-prob of every id it samples


class Scripted:
    """A deterministic stand-in for the engine's one-call sampler: after `prompt` it writes `script`
    token by token; once the forced final header is in the context it writes `answer` + <|return|>.
    Stops at a Harmony stop id or `max_tokens`, as vLLM does. Records every call's requests."""

    def __init__(self, script, answer="133"):
        self.script, self.answer = list(script), harmony.encode(answer) + [harmony.RETURN]
        self.calls: list[list[forcing.Request]] = []

    def _next(self, generated):
        for k in range(len(generated) - len(FORCED) + 1):
            if generated[k:k + len(FORCED)] == FORCED:
                return self.answer[len(generated) - k - len(FORCED)]
        return self.script[len(generated)]

    def __call__(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            assert r.prompt[:len(PROMPT)] == PROMPT
            ids = []
            while len(ids) < r.max_tokens and not (ids and ids[-1] in harmony.STOP_TOKENS):
                ids.append(self._next(r.prompt[len(PROMPT):] + ids))
            reason = "stop" if ids[-1] in harmony.STOP_TOKENS else "length"
            out.append([Completion(list(ids), [LP] * len(ids), reason) for _ in range(r.n)])
        return out


def _script(analysis: str, final: str = "133"):
    return harmony.render_completion(analysis, final)


LONG = "47+86: units 7+6=13, write 3 carry 1. tens 4+8+1=13. So 47+86=133. Check: 133-86=47."


def test_docstring_examples_hold():
    assert doctest.testmod(forcing).failed == 0
    assert doctest.testmod(harmony).failed == 0  # open_channel's table


def test_forcing_ids_are_openai_harmony_renderings():
    """header + analysis + forced + final + <|return|> is exactly what openai-harmony renders for
    an (analysis, final) pair: the inserted ids are canonical Harmony, not a hand-typed list."""
    assert harmony.decode(FORCED) == "<|end|><|start|>assistant<|channel|>final<|message|>"
    assert harmony.decode(HEAD) == "<|channel|>analysis<|message|>"
    cut = harmony.encode("47+86: units")
    assert HEAD + cut + FORCED + harmony.encode("133") + [harmony.RETURN] == _script("47+86: units")


@pytest.mark.parametrize("n", [1, 3])
def test_an_analysis_over_its_cap_is_closed_and_the_final_opened(n):
    script, cap, budget = _script(LONG), 8, 100
    sampler = Scripted(script)
    [comps] = forcing.generate(sampler, [PROMPT], n, [cap], [budget], [1234])
    assert len(comps) == n
    window = cap + len(HEAD)
    phase1, phase2 = script[:window], harmony.encode("133") + [harmony.RETURN]
    for c in comps:
        assert c.ids == phase1 + FORCED + phase2  # token-in/token-out: nothing re-tokenized
        assert c.sampled == [1] * window + [0] * len(FORCED) + [1] * len(phase2)
        assert c.logprobs == [LP] * window + [forcing.FORCED_LOGPROB] * len(FORCED) + [LP] * len(phase2)
        assert c.finish_reason == "stop" and c.budget_forced
        t = harmony.parse_completion(c.ids)
        assert t.format_ok and t.final == "133" and t.analysis_tokens == cap
    # Phase 1: the request seed, a window of cap + header; phase 2: one request per sample, each
    # with its own continuation seed and what is left of the budget.
    first, second = sampler.calls
    assert first == [forcing.Request(PROMPT, n, window, 1234)]
    assert second == [forcing.Request(PROMPT + phase1 + FORCED, 1, budget - window - len(FORCED),
                                      continuation_seed(1234, j)) for j in range(n)]


def test_an_analysis_that_ends_in_time_is_left_alone():
    # Stops inside the window: one call, the sample as drawn.
    short = _script("47+86=133.")
    sampler = Scripted(short)
    [[c]] = forcing.generate(sampler, [PROMPT], 1, [64], [100], [7])
    assert c.ids == short and c.sampled == [1] * len(short) and not c.budget_forced
    assert len(sampler.calls) == 1
    # The analysis ends in time but the window cuts the final: continued with nothing inserted.
    sampler = Scripted(short)
    cap = harmony.channel_token_counts(short)["analysis"] + 2  # window ends inside the final header
    [[c]] = forcing.generate(sampler, [PROMPT], 1, [cap], [100], [7])
    assert c.ids == short and c.sampled == [1] * len(short) and not c.budget_forced
    assert c.logprobs == [LP] * len(short) and c.finish_reason == "stop"
    assert [r.prompt for r in sampler.calls[1]] == [PROMPT + short[:cap + len(HEAD)]]


def test_no_cap_or_no_room_samples_in_one_phase():
    script = _script(LONG)
    for caps, budget in (([None], 40), ([40 - 9], 40)):  # a cap leaving no room to answer does not bind
        sampler = Scripted(script)
        [[c]] = forcing.generate(sampler, [PROMPT], 1, caps, [budget], [None])
        assert c.ids == script[:budget] and c.finish_reason == "length" and not c.budget_forced
        assert sampler.calls == [[forcing.Request(PROMPT, 1, budget, None)]]
    sampler = Scripted(script)
    [[c]] = forcing.generate(sampler, [PROMPT], 1, [40 - 10], [40], [None])  # one token of room: forced
    assert c.budget_forced and len(c.ids) == 40 and c.finish_reason == "length"
    assert sampler.calls[1][0].seed is None  # unseeded calls stay unseeded


def test_mixed_prompts_keep_their_order_and_caps():
    long = _script(LONG)
    sampler = Scripted(long)
    out = forcing.generate(sampler, [PROMPT] * 3, 2, [4, None, 16], [100] * 3, [1, 2, 3])
    assert [[c.budget_forced for c in comps] for comps in out] == [[True, True], [False, False], [True, True]]
    assert [harmony.channel_token_counts(c.ids)["analysis"] for c in out[0] + out[2]] == [4, 4, 16, 16]
    assert out[1][0].ids == long  # uncapped: the whole script
    assert [r.seed for r in sampler.calls[1]] == [continuation_seed(s, j) for s in (1, 3) for j in range(2)]


@pytest.mark.parametrize("ids, reason, window, budget, expected", [
    (HEAD + [1, 2], "length", 5, 100, tuple(FORCED)),  # cut inside analysis content
    (HEAD + [1, 2], "stop", 5, 100, None),  # stopped: complete
    (HEAD + [1], "length", 5, 100, None),  # shorter than the window: the model length cut it
    (HEAD + [1, 2], "length", 5, 5, None),  # phase 1 had the whole budget
    (HEAD + [1, harmony.END], "length", 5, 100, ()),  # analysis ended in time: continue as sampled
    ([harmony.CHANNEL, *harmony.encode("final"), harmony.MESSAGE, 1, 2], "length", 5, 100, ()),  # no analysis
    ([harmony.CHANNEL, *harmony.encode("analysis"), 1, 2, 3], "length", 5, 100, ()),  # still in a header
])
def test_plan_table(ids, reason, window, budget, expected):
    assert forcing.plan(ids, reason, window, budget) == expected


def test_completion_and_sample_carry_the_mask():
    c = forcing.splice(Completion([1, 2], [-0.1, -0.2], "length"), FORCED, Completion([3], [-0.3], "stop"))
    assert c.sampled == [1, 1] + [0] * len(FORCED) + [1] and c.budget_forced
    s = to_sample(Task("t", "math", "q", {"answer": "1"}), "low", PROMPT, c)
    assert s.loss_mask == c.sampled and s.behavior_logprobs == c.logprobs and s.budget_forced
    assert s.metadata == {"answer": "1"}  # task metadata stays the task's
    plain = to_sample(Task("t", "math", "q"), "low", PROMPT, Completion([1, 2], [-0.1, -0.2], "stop"))
    assert plain.loss_mask == [1, 1] and not plain.budget_forced
    with pytest.raises(ValueError, match="one log-prob and one sampled flag per id"):
        Completion([1, 2], [-0.1], "stop")


def test_caps_per_effort_from_config():
    cfg = BudgetForcingConfig(enabled=True, caps={"low": 8, "high": 64})
    assert forcing.analysis_caps(cfg, ["low", "high"]) == [8, 64]
    assert forcing.analysis_caps(BudgetForcingConfig(), ["low"]) is None  # off by default
    with pytest.raises(ValueError, match=r"no cap for efforts \['medium'\]"):
        forcing.analysis_caps(cfg, ["medium"])
