"""Grouped MoE experts vs transformers' GptOssMLP/GptOssExperts: forward, gradients, MXFP4 frozen base.

The Triton SwiGLU runs under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 has to be set
before triton is imported) and is compiled for sm_90 without a GPU; the `gpu` test runs it natively.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssMLP

from kernels.moe import (
    ExpertLora,
    FrozenMxfp4Experts,
    GroupedExperts,
    _row_bucket,
    _sort_by_expert,
    _act,
    _act_backward,
    grouped_experts,
    grouped_experts_forward,
    mxfp4_experts,
    swiglu,
    swiglu_backward,
)
from kernels.mxfp4 import dequantize

REPO = Path(__file__).resolve().parents[2]


def _mlp(H=64, I=32, E=4, k=2, impl="eager", std=0.3, seed=0) -> GptOssMLP:
    config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    config._experts_implementation = impl
    torch.manual_seed(seed)
    mlp = GptOssMLP(config)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=std)  # std 0.3 on H=64 puts many pre-activations past the +-7 clamps
    return mlp


def _close(actual, expected, rtol=1e-5, msg=None):
    """fp32 equivalence with the tolerance scaled to the tensor's magnitude (sums over tokens)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()), msg=msg)


def _pre_activation(n=64, two_i=48, seed=0) -> torch.Tensor:
    """Gate/linear values across the clamps, with exact +-7 boundaries (gradient passes there)."""
    u = torch.randn(n, two_i, generator=torch.Generator().manual_seed(seed)) * 6
    u[0, :6] = torch.tensor([7.0, 7.0, 7.0, -7.0, 8.0, 9.0])
    return u


# ---- activation ----------------------------------------------------------------------------------
def test_swiglu_matches_transformers_apply_gate():
    experts = GptOssExperts(GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=2))
    u = _pre_activation().requires_grad_()
    ref = experts._apply_gate(u)
    dy = torch.randn_like(ref)
    (du_ref,) = torch.autograd.grad(ref, u, dy)
    torch.testing.assert_close(swiglu(u.detach()), ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(swiglu_backward(u.detach(), dy), du_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("path", ["openmp", "pool", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_activation_paths_match_reference(path, dtype, threads, monkeypatch):
    """The C kernel (fp32/bf16; row blocks on torch's OpenMP threads or, built without OpenMP, on a
    Python pool) and the torch fallback, incl. the fused routing weight and g . y; with threads=3 the C
    kernel runs on three uneven row blocks at once (pointer offsets per block)."""
    from kernels import moe

    monkeypatch.setattr("kernels.moe.USE_CPU_KERNEL", path != "torch")
    monkeypatch.setattr("kernels.moe.CPU_MIN_ROWS_PER_THREAD", 1)
    if path == "openmp":
        from kernels import cbuild

        if not cbuild.openmp_flags():
            pytest.skip("torch does not run on GNU OpenMP here: the C activation uses the Python pool")
        assert moe._cpu_lib().fwd_par, "built without OpenMP although torch runs on libgomp"
    if path == "pool":
        monkeypatch.setattr(moe._cpu_lib(), "fwd_par", {})
        monkeypatch.setattr(moe._cpu_lib(), "bwd_par", {})
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_tile_activation(dtype)
    finally:
        torch.set_num_threads(old_threads)


def test_openmp_and_pool_row_blocks_give_identical_results(monkeypatch):
    """Same row blocks either way, so the bias-gradient partial sums add up in the same order."""
    from kernels import moe

    if not moe._cpu_lib().fwd_par:
        pytest.skip("torch does not run on GNU OpenMP here: the C activation has only the Python-pool path")
    rng = torch.Generator().manual_seed(2)
    u, g = torch.randn(1000, 48, generator=rng) * 4, torch.randn(1000, 24, generator=rng)
    w = torch.rand(1000, generator=rng)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert len(moe._row_blocks(1000)) == 4  # three uneven blocks
        omp = (_act(u, w, 1.702, 7.0), *_act_backward(u, g, w, 1.702, 7.0))
        monkeypatch.setattr(moe._cpu_lib(), "fwd_par", {})
        monkeypatch.setattr(moe._cpu_lib(), "bwd_par", {})
        pool = (_act(u, w, 1.702, 7.0), *_act_backward(u, g, w, 1.702, 7.0))
    finally:
        torch.set_num_threads(old_threads)
    for a, b in zip(omp, pool):
        assert torch.equal(a, b)


def _check_tile_activation(dtype):
    rng = torch.Generator().manual_seed(1)
    u, g, w = _pre_activation(), torch.randn(64, 24, generator=rng), torch.rand(64, generator=rng) + 0.5
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    ud, gd, wd = u.to(dtype), g.to(dtype), w.to(dtype)
    u_in = ud
    wy = _act(u_in, wd, 1.702, 7.0)
    y_ref = swiglu(u_in.float())
    torch.testing.assert_close(wy.float(), y_ref * wd.float()[:, None], **tol)
    wy, du, gy, du_sum = _act_backward(u_in, gd, wd, 1.702, 7.0)
    du_ref = swiglu_backward(u_in.float(), (gd * wd[:, None]).float())
    torch.testing.assert_close(wy.float(), y_ref * wd.float()[:, None], **tol)
    torch.testing.assert_close(du.float(), du_ref, **tol)
    torch.testing.assert_close(gy.float(), (gd.float() * y_ref).sum(-1), rtol=tol["rtol"], atol=tol["atol"] * 24)
    torch.testing.assert_close(du_sum, du_ref.sum(0), rtol=tol["rtol"], atol=tol["atol"] * 64)


def test_without_a_c_compiler_the_torch_path_runs(monkeypatch):
    from kernels import moe

    x, idx, weights, w1, b1, w2, b2 = _dense_inputs(dtype=torch.float32)
    w1.requires_grad_()
    ref = grouped_experts(x, idx, weights, w1, b1, w2, b2)
    (g_ref,) = torch.autograd.grad(ref.sum(), w1)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    moe._cpu_lib.cache_clear()
    try:
        with pytest.warns(UserWarning, match="using the torch path"):
            assert moe._cpu_lib() is None
        out = grouped_experts(x, idx, weights, w1, b1, w2, b2)
        (g,) = torch.autograd.grad(out.sum(), w1)
    finally:
        moe._cpu_lib.cache_clear()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _close(g, g_ref)


# ---- dense experts vs transformers ---------------------------------------------------------------
def _run(mlp: GptOssMLP, x: torch.Tensor, dy: torch.Tensor):
    mlp.zero_grad()
    x = x.clone().requires_grad_()
    y, _ = mlp(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in mlp.named_parameters()}


@pytest.mark.parametrize("stock", ["eager", "grouped_mm"])
@pytest.mark.parametrize(("H", "I", "E", "k", "N"), [(64, 32, 4, 2, 50), (32, 64, 8, 4, 7), (64, 32, 16, 2, 5)])
def test_grouped_experts_match_transformers(stock, H, I, E, k, N):
    mlp = _mlp(H, I, E, k, impl=stock)
    x, dy = torch.randn(2, N, H), torch.randn(2, N, H)
    y_ref, dx_ref, g_ref = _run(mlp, x, dy)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("deliberate_grouped", grouped_experts_forward)
    mlp.experts.config._experts_implementation = "deliberate_grouped"
    y, dx, g = _run(mlp, x, dy)
    _close(y, y_ref)
    _close(dx, dx_ref)
    for name in g_ref:  # router weight/bias and all four expert tensors
        _close(g[name], g_ref[name], msg=name)


def test_bf16_layer_tracks_fp32_transformers():
    """bf16 (the C activation's bf16 path) against transformers' fp32 experts on the same weights."""
    mlp = _mlp(64, 32, 4, 2, impl="eager", std=0.1)
    x, dy = torch.randn(1, 40, 64), torch.randn(1, 40, 64)
    y_ref, dx_ref, g_ref = _run(mlp, x, dy)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("deliberate_grouped", grouped_experts_forward)
    mlp = mlp.bfloat16()
    mlp.experts.config._experts_implementation = "deliberate_grouped"
    y, dx, g = _run(mlp, x.bfloat16(), dy.bfloat16())
    _close(y.float(), y_ref, rtol=3e-2)
    _close(dx.float(), dx_ref, rtol=3e-2)
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        _close(g[name].float(), g_ref[name], rtol=3e-2, msg=name)


def _dense_inputs(N=9, H=32, I=32, E=4, k=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=dtype)
    logits = torch.randn(N, E, generator=g, dtype=dtype)
    top, idx = logits.topk(k, dim=-1)
    weights = top.softmax(-1)
    w1 = torch.randn(E, H, 2 * I, generator=g, dtype=dtype) * 0.8
    b1 = torch.randn(E, 2 * I, generator=g, dtype=dtype)
    w2 = torch.randn(E, I, H, generator=g, dtype=dtype) * 0.3
    b2 = torch.randn(E, H, generator=g, dtype=dtype)
    return x, idx, weights, w1, b1, w2, b2


def test_hand_written_backward_passes_gradcheck(monkeypatch):
    monkeypatch.setattr("kernels.moe.CPU_ROW_TILE", 3)  # several tiles per expert
    x, idx, weights, w1, b1, w2, b2 = _dense_inputs(N=8, H=6, I=5, E=3)
    leaves = [t.requires_grad_() for t in (x, weights, w1, b1, w2, b2)]

    def f(x, weights, w1, b1, w2, b2):
        return grouped_experts(x, idx, weights, w1, b1, w2, b2)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_padded_experts_pass_gradcheck(monkeypatch):
    """The oneDNN-dtype layout (each expert padded to a row bucket, padding rows with weight 0) gives
    the same function and gradients: float64 sent down that path for gradcheck."""
    monkeypatch.setattr("kernels.moe.CPU_PAD_DTYPES", (torch.float64,))
    x, idx, weights, w1, b1, w2, b2 = _dense_inputs(N=8, H=6, I=5, E=3)
    leaves = [t.requires_grad_() for t in (x, weights, w1, b1, w2, b2)]

    def f(x, weights, w1, b1, w2, b2):
        return grouped_experts(x, idx, weights, w1, b1, w2, b2)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_padding_rows_bucket_expert_segments():
    idx = torch.tensor([[0, 2]] * 40 + [[2, 0]] * 3)  # expert 0: 43 pairs, expert 2: 43, expert 1 idle
    order, tok, tiles, pos = _sort_by_expert(idx, 3, 1024, pad=True)
    assert tiles == [(0, 0, 64), (2, 64, 128)]  # 43 -> 64 rows (32-row buckets), one tile per expert
    assert pos.tolist() == list(range(43)) + list(range(64, 107))
    assert torch.equal(tok[pos], order // 2) and tok[43:64].eq(0).all()
    assert [_row_bucket(n) for n in (1, 511, 512, 1023, 1024, 5000)] == [32, 32, 32, 32, 64, 256]


def test_only_active_experts_are_visited_and_idle_ones_get_zero_grads():
    x, _, weights, w1, b1, w2, b2 = _dense_inputs(E=6, dtype=torch.float32)
    idx = torch.tensor([[0, 3]] * 5 + [[3, 5]] * 4)  # experts 1, 2, 4 idle
    order, tok, tiles, pos = _sort_by_expert(idx, 6, idx.numel())
    assert [e for e, _, _ in tiles] == [0, 3, 5] and pos is None
    assert torch.equal(idx.reshape(-1)[order], idx.reshape(-1).sort(stable=True).values)
    params = [t.requires_grad_() for t in (w1, b1, w2, b2)]
    grouped_experts(x, idx, weights, *params).sum().backward()
    for p in params:
        assert p.grad[[1, 2, 4]].abs().max() == 0 and p.grad[[0, 3, 5]].abs().max() > 0


def test_a_token_routed_twice_to_one_expert_is_summed_twice():
    """Not what a top-k router gives, but a valid input: both weights count, incl. for the down bias."""
    x, idx, weights, w1, b1, w2, b2 = _dense_inputs(N=6, E=3, dtype=torch.float64)
    idx = idx.clone()
    idx[::2, 1] = idx[::2, 0]  # tokens 0, 2, 4 use one expert twice
    leaves = [t.requires_grad_() for t in (x, weights, w1, b1, w2, b2)]
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            z = weights[t, j] * (swiglu(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e])
            ref = ref.index_add(0, torch.tensor([t]), z[None])
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    ours = [t.detach().float().requires_grad_() for t in leaves]
    out = grouped_experts(ours[0], idx, *ours[1:])  # fp32: the C activation
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out, ours, dy.float()), ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_frozen_expert_weights_still_give_input_grads():
    x, idx, weights, w1, b1, w2, b2 = _dense_inputs(dtype=torch.float32)
    x.requires_grad_()
    out = grouped_experts(x, idx, weights, w1, b1, w2, b2)  # no weight requires grad
    (dx,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    grouped_experts(x_ref, idx, weights, w1.requires_grad_(), b1, w2, b2).sum().backward()
    torch.testing.assert_close(dx, x_ref.grad)


def test_drop_in_module_shares_parameters_and_state_dict():
    mlp = _mlp()
    stock = mlp.experts
    ours = GroupedExperts.from_stock(stock)
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert all(a is b for a, b in zip(ours.parameters(), stock.parameters()))
    x = torch.randn(11, 64)
    _, scores, idx = mlp.router(x)
    torch.testing.assert_close(ours(x, idx, scores), stock(x, idx, scores), rtol=1e-5, atol=1e-5)
    fresh = GroupedExperts(4, 64, 32)
    fresh.load_state_dict(stock.state_dict())
    torch.testing.assert_close(fresh(x, idx, scores), stock(x, idx, scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda a: (*a[:3], a[3][:, :16], *a[4:]), "should be (E, H, 2I)"),
        (lambda a: (a[0], a[1][:, :1], *a[2:]), "tuple(top_k_index.shape)=(9, 1)"),
        (lambda a: (*a[:6], a[6][:, :8]), "tuple(b2.shape)=(4, 8)"),
    ],
)
def test_shape_errors_name_the_shapes(args, message):
    x, idx, weights, w1, b1, w2, b2 = _dense_inputs()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grouped_experts(*args((x, idx, weights, w1, b1, w2, b2)))


# ---- frozen MXFP4 base ---------------------------------------------------------------------------
def _random_mxfp4(E, H, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    u8 = dict(dtype=torch.uint8)
    return {
        "gate_up_proj_blocks": torch.randint(0, 256, (E, 2 * I, H // 32, 16), generator=g, **u8),
        "gate_up_proj_scales": torch.randint(121, 125, (E, 2 * I, H // 32), generator=g, **u8),
        "down_proj_blocks": torch.randint(0, 256, (E, H, I // 32, 16), generator=g, **u8),
        "down_proj_scales": torch.randint(121, 125, (E, H, I // 32), generator=g, **u8),
        "gate_up_proj_bias": torch.randn(E, 2 * I, generator=g),
        "down_proj_bias": torch.randn(E, H, generator=g) * 0.1,
    }


def _mxfp4_module(E, H, I, seed=0) -> FrozenMxfp4Experts:
    mod = FrozenMxfp4Experts(E, H, I, compute_dtype=torch.float32)
    mod.load_state_dict(_random_mxfp4(E, H, I, seed))
    return mod


def _dense_from(mod: FrozenMxfp4Experts, config) -> GptOssExperts:
    """transformers experts holding the dequantised weights (checkpoint (out, in) -> (in, out))."""
    dense = GptOssExperts(config)
    with torch.no_grad():
        dense.gate_up_proj.copy_(dequantize(mod.gate_up_proj_blocks, mod.gate_up_proj_scales, torch.float32).transpose(1, 2))
        dense.down_proj.copy_(dequantize(mod.down_proj_blocks, mod.down_proj_scales, torch.float32).transpose(1, 2))
        dense.gate_up_proj_bias.copy_(mod.gate_up_proj_bias)
        dense.down_proj_bias.copy_(mod.down_proj_bias)
    return dense


def test_mxfp4_experts_match_dequantised_transformers_experts():
    E, H, I, N = 4, 64, 32, 23
    config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    mod = _mxfp4_module(E, H, I)
    dense = _dense_from(mod, config).requires_grad_(False)
    x = torch.randn(N, H, requires_grad=True)
    top, idx = torch.randn(N, E).topk(2, dim=-1)
    w = top.softmax(-1).requires_grad_()
    ref = dense(x, idx, w)
    dy = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (x, w), dy)
    out = mod(x, idx, w)
    g = torch.autograd.grad(out, (x, w), dy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert all(not b.requires_grad for b in mod.buffers())


def test_mxfp4_from_dense_round_trips_through_the_checkpoint_layout():
    mlp = _mlp(64, 32, 4, 2, std=0.1)
    frozen = FrozenMxfp4Experts.from_dense(mlp.experts, compute_dtype=torch.float32)
    dense = _dense_from(frozen, mlp.experts.config)  # what the 4-bit weights decode to
    err = (dense.gate_up_proj - mlp.experts.gate_up_proj).abs().max()
    assert 0 < err < 0.25 * mlp.experts.gate_up_proj.abs().max()  # quantised, close to the original
    x = torch.randn(9, 64)
    _, scores, idx = mlp.router(x)
    torch.testing.assert_close(frozen(x, idx, scores), dense(x, idx, scores), rtol=1e-5, atol=1e-5)


def test_mxfp4_shape_errors_name_the_shapes():
    m = _random_mxfp4(2, 64, 32)
    with pytest.raises(ValueError, match=r"down_proj_blocks.shape=\(2, 64, 2, 16\)"):
        mxfp4_experts(torch.randn(3, 64), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1),
                      m["gate_up_proj_blocks"], m["gate_up_proj_scales"], m["gate_up_proj_bias"],
                      m["down_proj_blocks"][:, :, :, :].repeat(1, 1, 2, 1), m["down_proj_scales"], m["down_proj_bias"])


def _tiny_model(seed=0) -> GptOssForCausalLM:
    config = GptOssConfig(head_dim=32, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
                          intermediate_size=64, vocab_size=128, layer_types=["sliding_attention", "full_attention"],
                          attn_implementation="eager")
    torch.manual_seed(seed)
    return GptOssForCausalLM(config)


def test_peft_lora_trains_on_frozen_mxfp4_experts():
    """LoRA on attention over a 4-bit MoE base: same LoRA grads as over the dequantised dense base."""
    peft = pytest.importorskip("peft")
    from kernels.patch import apply_kernels

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for quantised in (True, False):
        model = _tiny_model()
        for i, layer in enumerate(model.model.layers):
            mod = _mxfp4_module(4, 64, 64, seed=i)
            layer.mlp.experts = mod if quantised else _dense_from(mod, model.config)
        if quantised:
            apply_kernels(model)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lora(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in lora.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)



def _lora_factors(E, H, I, r=3, dtype=torch.float64, seed=1, zero_b=False):
    """(up_a (E, H, r), up_b (E, r, 2I), down_a (E, I, r), down_b (E, r, H)) as leaves."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(E, H, r), (E, r, 2 * I), (E, I, r), (E, r, H)]
    out = [torch.randn(*s, generator=g, dtype=dtype) * 0.3 for s in shapes]
    if zero_b:
        out[1].zero_(), out[3].zero_()
    return [t.requires_grad_() for t in out]


@pytest.mark.parametrize("pad", [False, True])
def test_lora_experts_pass_gradcheck(monkeypatch, pad):
    """Adapters on both projections over a dense base: x, routing weights and the four factors, with
    several tiles an expert (and the padded oneDNN layout)."""
    monkeypatch.setattr("kernels.moe.CPU_ROW_TILE", 3)
    if pad:
        monkeypatch.setattr("kernels.moe.CPU_PAD_DTYPES", (torch.float64,))
    x, idx, weights, w1, b1, w2, b2 = _dense_inputs(N=8, H=6, I=5, E=3)
    leaves = [x.requires_grad_(), weights.requires_grad_(), *_lora_factors(3, 6, 5)]

    def f(x, weights, ua, ub, da, db):
        return grouped_experts(x, idx, weights, w1, b1, w2, b2, lora=ExpertLora(ua, ub, da, db, 0.7))

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("projections", ["both", "up", "down"])
def test_lora_over_mxfp4_experts_equals_the_merged_dense_reference(projections):
    """Frozen 4-bit experts + adapters = transformers' experts on the decoded weights + scale A @ B, forward
    and gradients (x, routing weights, adapters); the 4-bit weights get none."""
    E, H, I, N, s = 4, 64, 32, 23, 0.5
    config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    mod = _mxfp4_module(E, H, I)
    dense = _dense_from(mod, config).requires_grad_(False)
    ua, ub, da, db = _lora_factors(E, H, I, dtype=torch.float32)
    if projections == "up":
        da = db = None
    if projections == "down":
        ua = ub = None
    factors = [t for t in (ua, ub, da, db) if t is not None]
    x = torch.randn(N, H, requires_grad=True)
    top, idx = torch.randn(N, E).topk(2, dim=-1)
    w = top.softmax(-1).requires_grad_()
    dy = torch.randn(N, H)
    base_up, base_down = dense.gate_up_proj.clone(), dense.down_proj.clone()
    del dense.gate_up_proj, dense.down_proj  # the reference reads plain tensors with the merged weights
    dense.gate_up_proj = base_up + (s * ua @ ub if ua is not None else 0)
    dense.down_proj = base_down + (s * da @ db if da is not None else 0)
    ref = dense(x, idx, w)
    g_ref = torch.autograd.grad(ref, (x, w, *factors), dy)
    out = mod(x, idx, w, lora=ExpertLora(ua, ub, da, db, s))
    g = torch.autograd.grad(out, (x, w, *factors), dy)
    _close(out.detach(), ref.detach(), rtol=1e-5)
    for a, b in zip(g, g_ref):
        _close(a, b, rtol=1e-4)


def test_lora_with_zero_b_leaves_the_experts_exactly_as_they_were():
    """LoRA's start (B = 0) adds exact zeros: the output is bit-identical to the base's."""
    E, H, I, N = 4, 64, 32, 23
    mod = _mxfp4_module(E, H, I)
    x = torch.randn(N, H)
    top, idx = torch.randn(N, E).topk(2, dim=-1)
    w = top.softmax(-1)
    lora = ExpertLora(*_lora_factors(E, H, I, dtype=torch.float32, zero_b=True), 2.0)
    torch.testing.assert_close(mod(x, idx, w, lora=lora), mod(x, idx, w), rtol=0, atol=0)


# ---- Triton --------------------------------------------------------------------------------------
_INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from kernels.moe import swiglu, swiglu_backward
    from kernels.moe_triton import swiglu_triton, swiglu_backward_triton
    u = torch.randn(19, 2 * 300) * 6
    u[0, :6] = torch.tensor([7.0, 7.0, 7.0, -7.0, 8.0, 9.0])
    dy = torch.randn(19, 300)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    close(swiglu_triton(u, 1.702, 7.0), swiglu(u))
    close(swiglu_backward_triton(u, dy, 1.702, 7.0), swiglu_backward(u, dy))
    split = lambda t: t.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)  # [g0 l0 g1 ..] -> [g0 g1 .. | l0 ..]
    us = split(u).contiguous()
    close(swiglu_triton(us, 1.702, 7.0, interleaved=False), swiglu(u))
    y, du = swiglu_backward_triton(us, dy, 1.702, 7.0, interleaved=False, return_y=True)
    close(y, swiglu(u))
    close(du, split(swiglu_backward(u, dy)))
    print("ok")
""")


def run_interpreted(code: str) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (must precede `import triton`)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_triton_swiglu_matches_reference_under_interpreter():
    run_interpreted(_INTERPRETER_CHECK)


def compile_for_sm90(fn, dtype: str, consts: dict):
    """triton.compile `fn` for sm_90 (no GPU needed): catches compiled-mode-only errors. The signature
    follows the kernels' naming: constexprs from `consts`, index/schedule pointers *i32, partial sums
    *fp32, MXFP4 blocks/scales *u8, other pointers *`dtype`, alpha/limit fp32, the rest i32."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("tok_ptr", "a_idx_ptr", "g_idx_ptr", "tile_expert_ptr", "tile_row0_ptr", "offsets_ptr"):
            sig[name] = "*i32"
        elif name in ("gy_ptr", "colsum_ptr"):
            sig[name] = "*fp32"
        elif name in ("s_ptr", "s1_ptr") or (name in ("b_ptr", "w1_ptr") and consts.get("MX")):
            sig[name] = "*u8"  # MXFP4 blocks / E8M0 scales
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32" if name in ("alpha", "limit") else "i32"
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))


def test_triton_swiglu_compiles_for_cuda():
    """Builds both kernels for sm_90 (no GPU needed): catches compiled-mode-only errors."""
    from kernels import moe_triton as mt

    for fn, consts in [(mt._swiglu_fwd_kernel, {"BLOCK": 256}), (mt._swiglu_bwd_kernel, {"BLOCK": 256, "STORE_Y": True})]:
        assert "ptx" in compile_for_sm90(fn, "bf16", consts).asm


# ---- grouped Triton GEMMs (kernels/moe_grouped_triton.py, the CUDA path for dense experts) --------
_GROUPED_INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from kernels.moe import grouped_experts
    from kernels.moe_grouped_triton import BLOCK_M, grouped_experts_triton

    def inputs(N, H, I, E, k, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, H, generator=g)
        logits = torch.randn(N, E, generator=g)
        logits[:, 3] = -1e9  # expert 3 gets no token
        top, idx = logits.topk(k, dim=-1)
        w1, w2 = torch.randn(E, H, 2 * I, generator=g) * 0.8, torch.randn(E, I, H, generator=g) * 0.3
        b1, b2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
        return [x, top.softmax(-1), w1, b1, w2, b2], idx

    def run(fn, tensors, idx, dy, trainable):
        leaves = [t.clone().requires_grad_(i in trainable) for i, t in enumerate(tensors)]
        out = fn(leaves[0], idx, *leaves[1:])
        return [out, *torch.autograd.grad(out, [leaves[i] for i in trainable], dy)]

    triton_fn = lambda x, idx, w, w1, b1, w2, b2: grouped_experts_triton(x, idx, w, w1, b1, w2, b2, 1.702, 7.0)
    all_six, frozen = [0, 1, 2, 3, 4, 5], [0, 1]  # frozen experts: norm tuning asks for x and w only
    # ragged H / I (not multiples of the blocks), several row tiles per expert, an idle expert, top-3
    for (N, H, I, E, k), trainable in [((150, 48, 40, 5, 2), all_six), ((37, 64, 32, 6, 3), all_six),
                                       ((150, 48, 40, 5, 2), frozen)]:
        tensors, idx = inputs(N, H, I, E, k)
        if N == 150:
            assert torch.bincount(idx.flatten()).max() > BLOCK_M
        dy = torch.randn(N, H)
        ours, ref = run(triton_fn, tensors, idx, dy, trainable), run(grouped_experts, tensors, idx, dy, trainable)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if 4 in trainable:  # dW2 is really computed (not all zeros on both sides)
            assert ours[1 + trainable.index(4)].abs().sum() > 0
    # 16-bit storage (fp16: the interpreter's bf16 tl.dot multiplies bit patterns, triton#11584) against
    # the fp32 path on the same rounded inputs
    tensors, idx = inputs(150, 48, 40, 5, 2)
    half = [t.half() for t in tensors]
    dy = torch.randn(150, 48)
    ours = run(triton_fn, half, idx, dy.half(), all_six)
    ref = run(grouped_experts, [t.float() for t in half], idx, dy, all_six)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float16
        assert (a.float() - b).norm() <= 1e-2 * b.norm() + 1e-3, ((a.float() - b).norm(), b.norm())
    print("ok")
""")

_MXFP4_INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from kernels.moe import mxfp4_experts
    from kernels.moe_grouped_triton import _grouped_mm_kernel, expert_schedule, mxfp4_experts_triton
    from kernels.mxfp4 import dequantize, quantize

    # the decode inside the GEMM loads is exactly kernels.mxfp4.dequantize: identity @ B = B for every
    # nibble code, both nibbles and the subnormal scale 0 (2^-127)
    K, n = 64, 96
    blocks = torch.arange(K * n // 2, dtype=torch.int32).remainder(256).to(torch.uint8).view(1, K, n // 32, 16)
    scales = torch.randint(120, 135, (1, K, n // 32), dtype=torch.uint8)
    scales[0, 0, 0] = 0
    order, tok, inv, offsets, tile_expert, tile_row0 = expert_schedule(torch.zeros(K, 1, dtype=torch.long), 1)
    eye, c = torch.eye(K), torch.empty(K, n)
    _grouped_mm_kernel[(tile_expert.numel(), 2)](
        eye, tok, blocks, scales, c, tile_expert, tile_row0, offsets, K, n, eye.stride(0), blocks.stride(0),
        blocks.stride(1), 0, scales.stride(0), scales.stride(1), c.stride(0), c, c, c, c, 0, 1, 0.0, 0.0,
        GATHER=False, SWIGLU_BWD=False, MX=2, PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    ref = dequantize(blocks, scales, torch.float32).view(K, n)
    assert ref[0, :32].ne(0).any() and ref[0, :32].abs().max() < 1e-37  # the subnormal group is in the check
    assert torch.equal(c, ref)

    # frozen MXFP4 experts: forward and the gradients to x, routing weights and both biases
    g = torch.Generator().manual_seed(0)
    N, H, I, E, k = 150, 64, 96, 5, 2
    x = torch.randn(N, H, generator=g)
    logits = torch.randn(N, E, generator=g)
    logits[:, 3] = -1e9
    top, idx = logits.topk(k, dim=-1)
    bl1, sc1 = quantize(torch.randn(E, 2 * I, H, generator=g) * 0.8)
    bl2, sc2 = quantize(torch.randn(E, H, I, generator=g) * 0.3)
    b1, b2, dy = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g), torch.randn(N, H, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, top.softmax(-1), b1, b2)]
        out = fn(leaves[0], idx, leaves[1], bl1, sc1, leaves[2], bl2, sc2, leaves[3])
        return [out, *torch.autograd.grad(out, leaves, dy)]

    ours = run(lambda *a: mxfp4_experts_triton(*a, 1.702, 7.0))
    ref = run(lambda *a: mxfp4_experts(*a, compute_dtype=torch.float32))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print("ok")
""")


def test_triton_mxfp4_experts_match_torch_path_under_interpreter():
    """Frozen MXFP4 experts decoded inside the grouped GEMMs: exact decode, values and gradients."""
    run_interpreted(_MXFP4_INTERPRETER_CHECK)


def test_triton_grouped_experts_match_torch_path_under_interpreter():
    """Values and all six gradients of the grouped Triton GEMMs against the CPU path."""
    run_interpreted(_GROUPED_INTERPRETER_CHECK)


def test_expert_schedule_tiles_cover_each_expert_once():
    from kernels.moe_grouped_triton import expert_schedule

    g = torch.Generator().manual_seed(0)
    E, k, block = 6, 2, 16
    idx = torch.randint(0, E, (100, k), generator=g)
    idx[idx == 4] = 5  # expert 4 idle
    order, tok, inv, offsets, tile_expert, tile_row0 = expert_schedule(idx, E, block)
    flat = idx.flatten()
    assert torch.equal(flat[order], flat.sort(stable=True).values) and torch.equal(tok.long(), order // k)
    assert torch.equal(order[inv], torch.arange(flat.numel()))
    assert torch.equal(offsets[1:].long(), torch.bincount(flat, minlength=E).cumsum(0))
    assert tile_expert.numel() == -(-flat.numel() // block) + E
    covered = torch.zeros(flat.numel(), dtype=torch.long)
    for e, r0 in zip(tile_expert.tolist(), tile_row0.tolist()):
        if e < 0:
            continue
        rows = torch.arange(r0, min(r0 + block, int(offsets[e + 1])))
        assert rows.numel() > 0 and r0 >= offsets[e]
        assert (flat[order[rows]] == e).all()  # a tile never straddles two experts
        covered[rows] += 1
    assert (covered == 1).all()
    assert 4 not in tile_expert.tolist()
    real = int((tile_expert >= 0).sum())
    assert (tile_expert[real:] == -1).all()  # real tiles first, then the unused tail


def test_triton_grouped_gemms_compile_for_cuda():
    """The three grouped kernels build for sm_90 in fp32 and bf16 (no GPU needed)."""
    from kernels import moe_grouped_triton as mg

    blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    for dtype, prec in (("fp32", "ieee"), ("bf16", "tf32")):
        for fn, consts in [(mg._up_swiglu_kernel, dict(MX=0, PRECISION=prec, **blocks)),
                           (mg._up_swiglu_kernel, dict(MX=1, PRECISION=prec, **blocks)),
                           (mg._grouped_mm_kernel, dict(GATHER=True, SWIGLU_BWD=True, MX=0, PRECISION=prec, **blocks)),
                           (mg._grouped_mm_kernel, dict(GATHER=True, SWIGLU_BWD=True, MX=2, PRECISION=prec, **blocks)),
                           (mg._grouped_mm_kernel, dict(GATHER=False, SWIGLU_BWD=False, MX=1, PRECISION=prec, **blocks)),
                           (mg._expert_outer_kernel, dict(A_GATHER=True, G_GATHER=False, COLSUM=True, PRECISION=prec,
                                                          BLOCK_P=64, BLOCK_Q=64, BLOCK_R=32))]:
            assert "ptx" in compile_for_sm90(fn, dtype, consts).asm, (fn.fn.__name__, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("triton_gemms", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_on_cuda_match_cpu(dtype, triton_gemms, monkeypatch):
    monkeypatch.setattr("kernels.moe.CUDA_TRITON_GEMMS", triton_gemms)
    x, idx, weights, w1, b1, w2, b2 = _dense_inputs(N=300, H=256, I=128, E=8, k=4, dtype=torch.float32)
    cpu = [t.requires_grad_() for t in (x, weights, w1, b1, w2, b2)]
    ref = grouped_experts(cpu[0], idx, *cpu[1:2], *cpu[2:])
    dy = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, cpu, dy)
    gpu = [t.detach().to("cuda", dtype).requires_grad_() for t in cpu]
    out = grouped_experts(gpu[0], idx.cuda(), *gpu[1:])
    g = torch.autograd.grad(out, gpu, dy.to("cuda", dtype))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.float().cpu(), ref, **tol)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float().cpu(), b, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("triton_gemms", [True, False])
def test_mxfp4_experts_on_cuda_match_cpu(triton_gemms, monkeypatch):
    from kernels.mxfp4 import quantize

    monkeypatch.setattr("kernels.moe.CUDA_TRITON_GEMMS", triton_gemms)
    g = torch.Generator().manual_seed(0)
    N, H, I, E, k = 300, 256, 128, 8, 4
    x, logits = torch.randn(N, H, generator=g), torch.randn(N, E, generator=g)
    top, idx = logits.topk(k, dim=-1)
    bl1, sc1 = quantize(torch.randn(E, 2 * I, H, generator=g) * 0.3)
    bl2, sc2 = quantize(torch.randn(E, H, I, generator=g) * 0.3)
    b1, b2, dy = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g), torch.randn(N, H, generator=g)

    def run(device, dtype):
        leaves = [t.to(device, dtype).requires_grad_() for t in (x, top.softmax(-1), b1, b2)]
        out = mxfp4_experts(leaves[0], idx.to(device), leaves[1], bl1.to(device), sc1.to(device), leaves[2],
                            bl2.to(device), sc2.to(device), leaves[3], compute_dtype=dtype)
        return [t.float().cpu() for t in (out, *torch.autograd.grad(out, leaves, dy.to(device, dtype)))]

    ref = run("cpu", torch.float32)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        for a, b in zip(run("cuda", dtype), ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_grouped_experts_under_bf16_autocast_matches_fp32():
    """TRL trains with bf16 autocast by default; the experts must keep computing in fp32."""
    from kernels.moe import grouped_experts

    torch.manual_seed(0)
    E, H, I, N = 4, 32, 32, 10
    x = torch.randn(N, H)
    idx = torch.randint(0, E, (N, 2))
    rw = torch.rand(N, 2)
    w1, b1 = torch.randn(E, H, 2 * I) * 0.1, torch.zeros(E, 2 * I)
    w2, b2 = torch.randn(E, I, H) * 0.1, torch.zeros(E, H)
    ref = grouped_experts(x, idx, rw, w1, b1, w2, b2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_experts(x, idx, rw, w1, b1, w2, b2)
    torch.testing.assert_close(out, ref)
