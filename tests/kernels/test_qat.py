"""QAT: fake quantisation lands on the MXFP4 grid, gradients pass straight through, and the weights
handed to the rollout engine are exactly the checkpoint's."""

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from kernels.mxfp4 import FP4_VALUES, dequantize, quantize
from kernels.mxfp4_checkpoint import load_mxfp4_checkpoint, save_mxfp4_checkpoint
from kernels.qat import EXPERT_GROUP_DIM, fake_quantize_mxfp4, quantized_expert_weights


def _tiny_model() -> GptOssForCausalLM:
    torch.manual_seed(0)
    config = GptOssConfig(
        head_dim=64, hidden_size=128, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return GptOssForCausalLM(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_rule", ["floor", "ceil"])
def test_forward_values_lie_on_the_mxfp4_grid(dtype, scale_rule):
    w = torch.randn(6, 128, dtype=dtype)
    y = fake_quantize_mxfp4(w, scale_rule=scale_rule)
    assert y.dtype == dtype and y.shape == w.shape
    _, scales = quantize(w, scale_rule=scale_rule)
    codes = y.float().view(6, 4, 32) / torch.pow(2.0, scales.float() - 127)[..., None]
    assert torch.isin(codes, torch.tensor(FP4_VALUES)).all()
    assert torch.equal(fake_quantize_mxfp4(y, scale_rule=scale_rule), y)  # a projection


def test_straight_through_gradient_is_identity():
    w = torch.randn(4, 64, 96, requires_grad=True)
    grad = torch.randn(4, 64, 96)
    y = fake_quantize_mxfp4(w, dim=EXPERT_GROUP_DIM)  # groups along dim 1 (size 64)
    (y * grad).sum().backward()
    assert torch.equal(w.grad, grad)


def test_dim_argument_groups_along_that_dim():
    w = torch.randn(3, 64, 5)
    y = fake_quantize_mxfp4(w, dim=1)
    expected = dequantize(*quantize(w.transpose(1, 2)), torch.float32).transpose(1, 2)
    assert torch.equal(y, expected)


def test_stochastic_fake_quantisation_is_reproducible():
    w = torch.randn(8, 64)
    a = fake_quantize_mxfp4(w, stochastic=True, generator=torch.Generator().manual_seed(0))
    b = fake_quantize_mxfp4(w, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_rollout_weights_equal_the_checkpoint(tmp_path):
    model = _tiny_model()
    weights = quantized_expert_weights(model)
    names = {f"model.layers.{i}.mlp.experts.{proj}" for i in range(2) for proj in ("gate_up_proj", "down_proj")}
    assert set(weights) == names
    save_mxfp4_checkpoint(model, tmp_path)
    loaded = load_mxfp4_checkpoint(tmp_path, dtype=torch.float32).state_dict()
    for name, value in weights.items():
        assert torch.equal(loaded[name], value), name


def test_quantized_expert_weights_rejects_non_moe_model():
    with pytest.raises(ValueError, match="not a gpt-oss MoE"):
        quantized_expert_weights(torch.nn.Linear(4, 4))


def test_qat_experts_forward_uses_quantised_weights_and_straight_through_grads():
    """apply_kernels(qat=True): the model equals the model whose experts were replaced by their MXFP4
    round trip, and the master weights get exactly that model's expert gradients."""
    import copy

    from transformers import GptOssConfig, GptOssForCausalLM

    from kernels.patch import apply_kernels, kernels_in_use
    from kernels.qat import quantized_expert_weights

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    qat = GptOssForCausalLM(cfg)
    ref = copy.deepcopy(qat)
    with torch.no_grad():
        for name, w in quantized_expert_weights(ref).items():
            ref.get_parameter(name).copy_(w)
    apply_kernels(qat, qat=True)
    apply_kernels(ref)
    assert kernels_in_use(qat)["qat"] and not kernels_in_use(ref)["qat"]
    ids = torch.randint(0, 128, (2, 12))
    lq, lr = qat(ids, labels=ids).loss, ref(ids, labels=ids).loss
    torch.testing.assert_close(lq, lr)
    lq.backward()
    lr.backward()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    torch.testing.assert_close(qat.get_parameter(name).grad, ref.get_parameter(name).grad)
    assert not torch.equal(qat.get_parameter(name), ref.get_parameter(name))  # masters stay full precision
