"""Shared toy objects for the rl tests: a 2-layer tiny gpt-oss built once per session."""
import pytest

TINY = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=16, max_position_embeddings=512, initializer_range=0.02)


@pytest.fixture(scope="session")
def policy(tmp_path_factory):
    from envs.math_tasks import vocabulary_corpus
    from rl.model import build_tiny_model

    return build_tiny_model(TINY, vocabulary_corpus(30), tmp_path_factory.mktemp("p") / "tiny")


@pytest.fixture(scope="session")
def tiny_cfg():
    """The `model` config node of the tiny test policy."""
    return dict(TINY)
