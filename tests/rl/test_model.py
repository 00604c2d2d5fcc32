"""Tiny model: trimmed vocab map, HF round trip, architecture facts, config validation."""
import json

import pytest
import torch

from envs import harmony
from rl.config import ConfigError, validate
from rl.model import VocabMap, build_tiny_model, check_tiny_shapes, hf_tokenizer, load_policy

TINY = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    return build_tiny_model(TINY, ["Compute 47*86+12.", "So 4042."], out)


def test_vocab_map_round_trip_and_unknown_id_error():
    vm = VocabMap.from_ids([5, 200002, 17])
    assert vm.to_model([17, 5, 200002]) == [1, 0, 2]
    assert vm.to_canonical([1, 0, 2, 99]) == [17, 5, 200002, 199999]
    with pytest.raises(KeyError, match="token id 6 is not in the model's trimmed vocabulary"):
        vm.to_model([6])
    assert VocabMap.identity().to_model([6, 7]) == [6, 7]


def test_tiny_checkpoint_is_gpt_oss_with_map(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "gpt_oss"
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["rope_parameters"]["rope_type"] == "yarn"
    model, vm = load_policy(tiny)
    assert vm.covers(harmony.special_token_ids())
    assert vm.covers(harmony.render_prompt("Compute 47*86+12.", "high"))
    assert model.model.layers[0].self_attn.sinks.shape == (2,)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(vm)
    # forward on Harmony ids mapped to model ids
    ids = torch.tensor([vm.to_model(harmony.render_prompt("Compute 47*86+12.", "low"))])
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_tokenizer_decodes_trimmed_ids(tiny):
    vm = VocabMap.load(tiny)
    ids = harmony.render_training("Compute 47*86+12.", "So 4042.", "4042", "low")[0]
    assert hf_tokenizer(vm).decode(vm.to_model(ids)) == harmony.decode(ids)


def test_identity_map_without_file(tmp_path):
    assert VocabMap.load(tmp_path).canonical is None


def test_shape_rules():
    with pytest.raises(ValueError, match="head_dim"):
        check_tiny_shapes({**TINY, "head_dim": 16})
    with pytest.raises(ValueError, match="multiple of 32"):
        check_tiny_shapes({**TINY, "intermediate_size": 100})


def test_bad_config_fails_with_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="'algo.advantag'"):
        validate({"algo": {"advantag": "grpo"}})
    with pytest.raises(ConfigError, match="'train.steps'"):
        validate({"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="'rollout.max_tokens'"):
        validate({"rollout": {"max_tokens": 600, "max_model_len": 512}})
    with pytest.raises(ConfigError, match="'sft.betas'"):
        validate({"sft": {"betas": [0.9, 1.0]}})
    with pytest.raises(ConfigError, match="'learner.betas'"):
        validate({"learner": {"betas": [0.9]}})
    assert validate({}).algo.advantage == "grpo"


def test_tiny_model_round_trips_through_mxfp4_checkpoint(tiny, tmp_path):
    from kernels.qat import quantized_expert_weights
    from rl.model import export_mxfp4, is_mxfp4_checkpoint

    out = export_mxfp4(tiny, tmp_path / "mx")
    assert is_mxfp4_checkpoint(out) and not is_mxfp4_checkpoint(tiny)
    model, vm = load_policy(out)
    ref, _ = load_policy(tiny)
    assert vm == VocabMap.load(tiny)
    for name, w in quantized_expert_weights(ref).items():
        torch.testing.assert_close(model.get_parameter(name), w, rtol=0, atol=0)
    again, _ = load_policy(export_mxfp4(out, tmp_path / "mx2"))  # packing is idempotent
    for name, p in model.named_parameters():
        torch.testing.assert_close(again.get_parameter(name), p, rtol=0, atol=0)
