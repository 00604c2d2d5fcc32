"""The rollout engine with `rollout.enforce_eager=false` (vLLM's torch.compile path; on CPU: traced once, inductor).

A compiled graph could hold on to what a weight update replaces (a packed weight, a constant folded in): these
tests check that the compiled engine still samples from transformers' distribution and follows in-place
updates, full and trained-only, exactly as the eager engine does (tests/rl/test_rollout.py, same references).
Its own module: one compiled engine (inductor builds it in tens of seconds on 2 cores), no eager one beside it.
"""
import dataclasses

import pytest
import torch

from tests.rl.test_rollout import CFG, _hf_greedy, _hf_logprobs, _prompts, _vllm_greedy, ckpt, hf  # noqa: F401

COMPILED = dataclasses.replace(CFG, enforce_eager=False)


@pytest.fixture(scope="module")
def engine(ckpt):  # noqa: F811
    from rl.engine import RolloutEngine

    eng = RolloutEngine(ckpt, COMPILED, seed=0)
    yield eng
    eng.shutdown()


@pytest.mark.slow
def test_compiled_engine_samples_transformers_distribution_and_follows_updates(engine, hf, ckpt):  # noqa: F811
    from rl.vllm_weights import TrainedWeights, trained_units

    assert not engine.llm.llm_engine.vllm_config.model_config.enforce_eager
    model, vm = hf
    prompts, steps = _prompts(), 40
    out = engine.generate(prompts, n=2, temperature=1.0, max_tokens=64, seed=11)
    worst = max((_hf_logprobs(model, vm, p, c.ids, 1.0) - torch.tensor(c.logprobs)).abs().max().item()
                for p, samples in zip(prompts, out) for c in samples)
    assert worst < 1e-3, f"compiled vLLM vs transformers log-prob max abs diff {worst:.2e}"

    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = _vllm_greedy(engine, prompts, steps)
    assert before == _hf_greedy(model, vm, prompts, steps)
    g = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():  # every parameter kind: a full update
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * max(p.std().item(), 0.05) * 0.5)
        target = _hf_greedy(model, vm, prompts, steps)
        assert target != before, "perturbation did not change the greedy output"
        engine.update_weights(model.state_dict())
        assert _vllm_greedy(engine, prompts, steps) == target

        trained = [n for n in original if n.endswith("norm.weight") or ".0.self_attn.q_proj." in n]
        with torch.no_grad():  # then a trained-only update on top of it
            for name in trained:
                p = model.get_parameter(name)
                p.add_(torch.randn(p.shape, generator=g) * max(p.std().item(), 0.05) * 0.5)
        target2 = _hf_greedy(model, vm, prompts, steps)
        assert target2 != target
        engine.update_weights(TrainedWeights(trained_units(model.state_dict(), trained)))
        assert _vllm_greedy(engine, prompts, steps) == target2
    finally:
        engine.update_weights_from_path(ckpt)
        model.load_state_dict(original)
    assert _vllm_greedy(engine, prompts, steps) == before
