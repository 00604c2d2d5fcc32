"""MXFP4 checkpoints: our bytes against transformers' dequantiser, save/load round trip, interop."""

import json

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from kernels.mxfp4 import dequantize
from kernels.mxfp4_checkpoint import (
    QUANTIZATION_CONFIG,
    load_mxfp4_checkpoint,
    pack_state_dict,
    read_state_dict,
    save_mxfp4_checkpoint,
    unpack_state_dict,
)

E, H, I = 4, 128, 128  # experts, hidden, expert intermediate


def _tiny_model() -> GptOssForCausalLM:
    torch.manual_seed(0)
    config = GptOssConfig(
        head_dim=64, hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2,
        num_hidden_layers=2, vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return GptOssForCausalLM(config).eval()


def _experts(sd):
    return {k: v for k, v in sd.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}


def test_packed_names_and_shapes_follow_the_release():
    packed = pack_state_dict(_tiny_model().state_dict())
    prefix = "model.layers.0.mlp.experts."
    assert packed[prefix + "gate_up_proj_blocks"].shape == (E, 2 * I, H // 32, 16)
    assert packed[prefix + "gate_up_proj_scales"].shape == (E, 2 * I, H // 32)
    assert packed[prefix + "down_proj_blocks"].shape == (E, H, I // 32, 16)
    assert packed[prefix + "down_proj_scales"].shape == (E, H, I // 32)
    assert packed[prefix + "gate_up_proj_bias"].shape == (E, 2 * I)
    assert prefix + "gate_up_proj" not in packed and prefix + "down_proj" not in packed


@pytest.mark.parametrize("scale_rule", ["floor", "ceil"])
def test_transformers_dequantiser_reads_our_bytes_bit_for_bit(scale_rule):
    w = torch.randn(E, H, 2 * I) * 0.02  # gate_up_proj layout [E, in, out]
    blocks, scales = pack_state_dict({"mlp.experts.gate_up_proj": w}, scale_rule=scale_rule).values()
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # -> [E, in, out]
    ours = dequantize(blocks, scales, torch.bfloat16).transpose(1, 2)
    assert theirs.shape == w.shape
    assert torch.equal(theirs.view(torch.int16), ours.view(torch.int16))


def test_unpack_inverts_pack_on_quantised_weights():
    sd = _tiny_model().state_dict()
    once = unpack_state_dict(pack_state_dict(sd), torch.float32)
    twice = unpack_state_dict(pack_state_dict(once), torch.float32)
    assert once.keys() == sd.keys()
    for key, value in _experts(once).items():
        assert value.shape == sd[key].shape
        assert torch.equal(twice[key], value)  # quantised weights are a fixed point
        assert (value - sd[key]).abs().max() < sd[key].abs().max() / 4  # and close to the originals


def test_save_load_round_trip(tmp_path):
    model = _tiny_model()
    save_mxfp4_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    assert config["architectures"] == ["GptOssForCausalLM"] and config["dtype"] == "bfloat16"

    expected = _experts(unpack_state_dict(pack_state_dict(model.state_dict()), torch.float32))
    loaded = load_mxfp4_checkpoint(tmp_path, dtype=torch.float32)
    assert not hasattr(loaded.config, "quantization_config")
    got = loaded.state_dict()
    for key, value in expected.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], value), key
    for key, value in model.state_dict().items():  # the rest went through bf16
        if key not in expected:
            torch.testing.assert_close(got[key], value.to(torch.bfloat16).float(), rtol=0, atol=0)
    tokens = torch.randint(0, 512, (1, 12))
    assert torch.isfinite(loaded(tokens).logits).all()

    again = tmp_path / "again"  # saving the loaded model reproduces the same bytes
    save_mxfp4_checkpoint(loaded, again)
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_from_pretrained_loads_our_checkpoint(tmp_path, dtype):
    save_mxfp4_checkpoint(_tiny_model(), tmp_path)
    ours = load_mxfp4_checkpoint(tmp_path, dtype=dtype)
    hf = GptOssForCausalLM.from_pretrained(tmp_path, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype)
    theirs = hf.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for key, value in ours.state_dict().items():
        assert value.dtype == dtype
        assert torch.equal(value, theirs[key].to(dtype)), key  # transformers leaves experts in bf16
    for layer in hf.model.layers:
        layer.mlp.experts.to(dtype)  # not hf.to(dtype): that would also cast the rotary buffers
    tokens = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, hf(tokens).logits, rtol=0, atol=0)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    """max_shard_size writes the released layout (shards + index); ours and transformers read it."""
    model = _tiny_model()
    save_mxfp4_checkpoint(model, tmp_path / "one")
    save_mxfp4_checkpoint(model, tmp_path / "many", max_shard_size="200KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "many" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "many").glob("model-*.safetensors")) == shards
    one, many = read_state_dict(tmp_path / "one"), read_state_dict(tmp_path / "many")
    assert one.keys() == many.keys() == index["weight_map"].keys()
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    ours = load_mxfp4_checkpoint(tmp_path / "many", dtype=torch.float32)
    hf = GptOssForCausalLM.from_pretrained(tmp_path / "many", quantization_config=Mxfp4Config(dequantize=True),
                                           dtype=torch.float32)
    theirs = hf.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key].to(torch.float32)), key

    save_mxfp4_checkpoint(ours, tmp_path / "many")  # re-saved unsharded: no stale shard or index remains
    assert sorted(p.name for p in (tmp_path / "many").glob("model*")) == ["model.safetensors"]


def test_sharded_checkpoint_errors_name_the_missing_part(tmp_path):
    save_mxfp4_checkpoint(_tiny_model(), tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).rename(tmp_path / "moved.bin")
    with pytest.raises(FileNotFoundError, match=victim):
        read_state_dict(tmp_path)
    (tmp_path / "moved.bin").rename(tmp_path / victim)
    index["weight_map"]["model.layers.0.mlp.not_there"] = victim
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match="not_there"):
        read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        read_state_dict(tmp_path / "nowhere")


def test_unpack_reports_scales_without_blocks():
    packed = pack_state_dict({"model.layers.0.mlp.experts.down_proj": torch.randn(2, 64, 32)})
    del packed["model.layers.0.mlp.experts.down_proj_blocks"]
    with pytest.raises(KeyError, match="scales without blocks"):
        unpack_state_dict(packed)


def test_unpack_reports_missing_scales():
    packed = pack_state_dict({"model.layers.0.mlp.experts.down_proj": torch.randn(2, 64, 32)})
    del packed["model.layers.0.mlp.experts.down_proj_scales"]
    with pytest.raises(KeyError, match="down_proj_blocks has no matching .*down_proj_scales"):
        unpack_state_dict(packed)


def test_load_rejects_unquantised_checkpoint(tmp_path):
    _tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no quantization_config"):
        load_mxfp4_checkpoint(tmp_path)


def test_weight_files_from_pieces_of_unknown_count_replace_an_earlier_save(tmp_path):
    """A generator of pieces (count unknown up front, as rl/lora.py streams merged weights): shard names
    and the index follow the count; an earlier save's extra shards go; a wrong count leaves no temp files."""
    from safetensors.torch import load_file

    from kernels.mxfp4_checkpoint import INDEX_NAME, WEIGHTS_NAME, write_weight_files

    pieces = [{"a": torch.zeros(2)}, {"b": torch.ones(3)}, {"c": torch.full((1,), 2.0)}]
    write_weight_files(tmp_path, iter(pieces))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "b": "model-00002-of-00003.safetensors",
                                   "c": "model-00003-of-00003.safetensors"}
    assert index["metadata"]["total_size"] == 6 * 4
    write_weight_files(tmp_path, iter([{"a": torch.ones(2), "b": torch.ones(3)}]))  # now one file
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]
    assert torch.equal(load_file(tmp_path / WEIGHTS_NAME)["a"], torch.ones(2))
    with pytest.raises(ValueError, match="got 2 pieces, expected 3"):
        write_weight_files(tmp_path, iter(pieces[:2]), n_shards=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]  # the earlier save untouched
