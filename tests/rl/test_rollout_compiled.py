"""The rollout engine with `rollout.enforce_eager=false` (vLLM's torch.compile path; on CPU: traced once, inductor).

A compiled graph could hold on to what a weight update replaces (a packed weight, a constant folded in): the
eager engine's tests (tests/rl/test_rollout.py) run here again on a compiled engine, collected in this module so
its `engine` fixture is the one they get: log-probs match transformers', full and trained-only in-place updates
reach the samples. Its own module: one compiled engine (inductor builds it in tens of seconds on 2 cores).
"""
import dataclasses

import pytest

from tests.rl.test_rollout import (CFG, ckpt, hf, test_a_trained_only_update_loads_its_tensors_and_keeps_the_rest,  # noqa: F401
                                   test_behaviour_logprobs_match_transformers,
                                   test_update_weights_in_place_matches_transformers_greedy)

COMPILED = dataclasses.replace(CFG, enforce_eager=False)


@pytest.fixture(scope="module")
def engine(ckpt):  # noqa: F811
    from rl.engine import RolloutEngine

    eng = RolloutEngine(ckpt, COMPILED, seed=0)
    yield eng
    eng.shutdown()


@pytest.mark.slow
def test_the_engine_here_is_compiled(engine):
    assert not engine.llm.llm_engine.vllm_config.model_config.enforce_eager
