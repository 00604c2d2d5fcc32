"""apply_kernels on a whole tiny GptOssForCausalLM: same loss and gradients as stock, state dict unchanged,
and transformers' probe for the Hugging Face `kernels` hub package is not fooled by our `kernels`."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from kernels.patch import apply_kernels, kernels_in_use, remove_kernels, set_kernels

REPO = Path(__file__).resolve().parents[2]


def tiny_config(**overrides) -> GptOssConfig:
    """The tiny gpt-oss of the brief: one sliding (window 8) and one full layer, 4 experts top-2."""
    kwargs = dict(head_dim=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  sliding_window=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=128,
                  vocab_size=512, layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")
    return GptOssConfig(**(kwargs | overrides))


def _model(seed=0) -> GptOssForCausalLM:
    torch.manual_seed(seed)
    model = GptOssForCausalLM(tiny_config())
    with torch.no_grad():  # larger than the init so sinks, router and clamps all matter
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    return model


def _loss_and_grads(model, ids, attention_mask):
    model.zero_grad()
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_tiny_model_same_loss_and_grads_as_stock(padding):
    model = _model()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = None
    if padding != "none":
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, -9:] = 0 if padding == "right" else 1
        mask[1, :9] = 0 if padding == "left" else 1
    loss_ref, grads_ref = _loss_and_grads(model, ids, mask)
    apply_kernels(model)
    assert kernels_in_use(model) == {"moe": True, "qat": False, "attention": True}
    loss, grads = _loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()), msg=name)


def test_state_dict_unchanged_and_switch_is_reversible():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stock = (model.config._attn_implementation, model.config._experts_implementation)
    set_kernels(model, "deliberate")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    set_kernels(model, "stock")
    assert (model.config._attn_implementation, model.config._experts_implementation) == stock
    assert kernels_in_use(model) == {"moe": False, "qat": False, "attention": False}
    apply_kernels(model, moe=True, attention=False)
    assert kernels_in_use(model) == {"moe": True, "qat": False, "attention": False}
    apply_kernels(model, moe=False, attention=True)
    assert kernels_in_use(model) == {"moe": False, "qat": False, "attention": True}
    remove_kernels(model)
    with pytest.raises(ValueError, match=r"valid: \['deliberate', 'stock'\]"):
        set_kernels(model, "fast")


def test_generate_with_kv_cache_matches_stock():
    """Decoding with a cache goes through the 4D-mask fallback; greedy tokens must not change."""
    model = _model().eval()
    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, **kwargs)
    apply_kernels(model)
    torch.testing.assert_close(model.generate(prompt, **kwargs), ref)


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    apply_kernels(model)
    assert kernels_in_use(model) == {"moe": True, "qat": False, "attention": True}
    ids = torch.randint(0, 512, (1, 20))
    model(input_ids=ids, labels=ids).loss.backward()


def test_rejects_other_models():
    with pytest.raises(TypeError, match="not a transformers PreTrainedModel"):
        apply_kernels(torch.nn.Linear(2, 2))


def test_transformers_does_not_mistake_us_for_the_hf_kernels_package():
    """Fresh interpreter with our `kernels` importable: transformers must not see the hub package."""
    code = textwrap.dedent("""
        import sys, torch
        import transformers
        from transformers import GptOssConfig, GptOssForCausalLM
        from transformers.utils.import_utils import is_kernels_available
        from transformers.integrations import hub_kernels
        import kernels
        assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__
        assert not is_kernels_available()
        assert not hasattr(hub_kernels, "get_kernel") or hub_kernels.get_kernel.__module__ != "kernels"
        cfg = GptOssConfig(head_dim=16, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                           num_hidden_layers=2, num_local_experts=2, num_experts_per_tok=1, intermediate_size=32,
                           vocab_size=64, layer_types=["sliding_attention", "full_attention"], sliding_window=4)
        model = GptOssForCausalLM(cfg)
        from kernels.patch import apply_kernels
        apply_kernels(model)
        model(input_ids=torch.zeros(1, 5, dtype=torch.long))
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code, str(REPO / "kernels")], cwd="/", env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
