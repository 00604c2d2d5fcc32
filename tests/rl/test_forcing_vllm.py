"""Budget forcing on the real vLLM engine (rl/engine.py + rl/forcing.py) and the tiny model.

The policy is the session's tiny test model fitted for a few seconds to one task's high-effort
Harmony transcript (plus the same transcript cut short and budget-forced, inserted ids out of the
loss, as an RL run would train on), so that it writes `<|channel|>analysis<|message|>` and a long
analysis by itself and answers after the final header. Checked: with a small cap the analysis never
exceeds it; the completion parses as a Harmony transcript with a final message; the ids are exactly
phase 1 + inserted + phase 2 (each phase reproduced on its own); the loss mask is 0 exactly on the
inserted ids; behaviour log-probs are what transformers computes on the spliced sequence; an
analysis that ends in time gives the sample an unforced call gives; seeded calls reproduce.
"""
import pytest
import torch

from envs import harmony
from envs.math_tasks import solution
from envs.types import Task
from rl.config import BudgetForcingConfig, RolloutConfig
from rl.workers import to_sample

pytestmark = pytest.mark.slow

TASK = Task("bf", "math", "Compute 47+86.", {"answer": "133", "expr": "47+86"})
PROMPT = harmony.render_prompt(TASK.question, "high")
FORCED = list(harmony.forced_final_header())
HEAD = len(harmony.analysis_header())
MAX_TOKENS = 96


def _fit_rows(vm):
    """(ids, loss mask) rows in model ids: the full high-effort transcript and budget-forced cuts."""
    analysis, final = solution(TASK, "high")
    rows = [harmony.render_training(TASK.question, analysis, final, "high")]
    full = harmony.render_completion(analysis, final)
    tail = harmony.encode(final) + [harmony.RETURN]
    for k in (2, 4, 8):
        body = full[:HEAD + k]
        rows.append((PROMPT + body + FORCED + tail,
                     [0] * len(PROMPT) + [1] * len(body) + [0] * len(FORCED) + [1] * len(tail)))
    ids = [torch.tensor(vm.to_model(i)) for i, _ in rows]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(rows), width), vm.pad_id)  # (B, L)
    labels = torch.full((len(rows), width), -100)  # (B, L)
    for r, (x, (_, mask)) in enumerate(zip(ids, rows)):
        input_ids[r, : len(x)] = x
        labels[r, : len(x)] = torch.where(torch.tensor(mask).bool(), x, -100)
    return input_ids, (input_ids != vm.pad_id).long(), labels


@pytest.fixture(scope="module")
def fitted(policy, tmp_path_factory):
    from rl.model import load_policy, save_checkpoint

    torch.manual_seed(0)
    model, vm = load_policy(policy)
    input_ids, attention_mask, labels = _fit_rows(vm)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: 1 thread ~12 s, 2 threads on a busy 2-core box ~110 s
    try:
        for _ in range(100):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1, f"the fixture policy did not fit its transcript (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("bf") / "fitted"
    save_checkpoint(model.eval(), vm, out)
    return out, model, vm


@pytest.fixture(scope="module")
def engine(fitted):
    from rl.engine import RolloutEngine

    cfg = RolloutConfig(max_tokens=MAX_TOKENS, max_model_len=256, kv_cache_gib=1,
                        budget_forcing=BudgetForcingConfig(enabled=True, caps={"high": 4}))
    eng = RolloutEngine(fitted[0], cfg, seed=0)
    yield eng
    eng.shutdown()


@torch.no_grad()
def _hf_logprobs(model, vm, prompt, completion):
    """log_softmax(logits) of each completion id under transformers, over the real vocab rows."""
    ids = torch.tensor([vm.to_model(prompt + completion)])  # (1, L)
    logits = model(ids).logits[0, len(prompt) - 1 : -1, : len(vm)]  # (T, V_real)
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None])[:, 0]


def _check_mask(c, window):
    if c.budget_forced:
        assert c.ids[window : window + len(FORCED)] == FORCED
        assert c.sampled == [1] * window + [0] * len(FORCED) + [1] * (len(c.ids) - window - len(FORCED))
    else:
        assert c.sampled == [1] * len(c.ids)


def test_greedy_forcing_is_phase1_plus_inserted_plus_phase2(engine, fitted):
    _, model, vm = fitted
    cap = 4
    window = cap + HEAD
    [[c]] = engine.generate([PROMPT], temperature=0.0, analysis_caps=[cap])
    # Each phase reproduced on its own, through the engine's plain token-in/token-out API.
    [[phase1]] = engine.generate([PROMPT], temperature=0.0, max_tokens=window)
    [[phase2]] = engine.generate([PROMPT + phase1.ids + FORCED], temperature=0.0,
                                 max_tokens=MAX_TOKENS - window - len(FORCED))
    assert c.budget_forced and phase1.finish_reason == "length"
    assert c.ids == phase1.ids + FORCED + phase2.ids
    assert c.sampled == [1] * window + [0] * len(FORCED) + [1] * len(phase2.ids)
    assert c.logprobs == phase1.logprobs + [0.0] * len(FORCED) + phase2.logprobs
    assert c.finish_reason == phase2.finish_reason == "stop"
    t = harmony.parse_completion(c.ids)
    assert t.format_ok and t.final == "133" and t.analysis_tokens == cap, t
    # What the learner recomputes on the spliced sequence matches the engine at every sampled id.
    ref = _hf_logprobs(model, vm, PROMPT, c.ids)
    sampled = torch.tensor(c.sampled).bool()
    assert (ref - torch.tensor(c.logprobs))[sampled].abs().max() < 1e-3
    sample = to_sample(TASK, "high", PROMPT, c)  # what WorkerPool.rollout hands the train loop
    assert sample.loss_mask == c.sampled and sample.budget_forced and sample.transcript.final == "133"


def test_seeded_sampling_caps_reproduces_and_leaves_timely_analyses_alone(engine, fitted):
    _, model, vm = fitted
    caps, n = [4, 60], 4  # 60: the fitted analysis (47 tokens) ends in time
    prompts = [PROMPT, PROMPT]
    out = engine.generate(prompts, n=n, temperature=1.0, seed=5, analysis_caps=caps)
    assert [[x.ids for x in s] for s in engine.generate(prompts, n=n, temperature=1.0, seed=5,
                                                        analysis_caps=caps)] == [[x.ids for x in s] for s in out]
    plain = engine.generate(prompts, n=n, temperature=1.0, seed=5)
    forced = timely = 0
    for cap, samples, unforced in zip(caps, out, plain):
        window = cap + HEAD
        for c, u in zip(samples, unforced):
            assert harmony.channel_token_counts(c.ids).get("analysis", 0) <= cap
            assert len(c.ids) <= MAX_TOKENS and len(c.ids) == len(c.logprobs) == len(c.sampled)
            _check_mask(c, window)
            if c.budget_forced:
                forced += 1
                assert c.ids[:window] == u.ids[:window]  # phase 1 is the request's own draw
                t = harmony.parse_completion(c.ids)
                assert t.final is not None and t.analysis_tokens <= cap, t
            elif c.finish_reason == "stop" and len(c.ids) <= window:
                timely += 1
                assert c.ids == u.ids  # stopped inside phase 1: exactly what an unforced call samples
            ref = _hf_logprobs(model, vm, PROMPT, c.ids)
            sampled = torch.tensor(c.sampled).bool()
            assert (ref - torch.tensor(c.logprobs))[sampled].abs().max() < 1e-3
    assert forced >= n and timely >= 1  # every cap-4 sample of a policy that thinks for ~47 tokens
    assert engine.health()["budget_forced"] >= forced
