"""MXFP4 format: hand-computed bytes, rounding rules, backend equivalence, error messages.

The Triton kernels run under the Triton interpreter here (CPU tensors); `test_triton_compiles_for_cuda`
builds them for an sm_90 target without a GPU, and the `gpu` test runs them natively.
"""

import doctest

import pytest
import torch

from kernels import mxfp4, mxfp4_cpu
from kernels.mxfp4 import BACKENDS, FP4_VALUES, dequantize, dequantize_ref, quantize, quantize_ref

GRID = torch.tensor(FP4_VALUES)


def _group(*values: float) -> torch.Tensor:
    """One group of 32 (fp32): the given values followed by zeros."""
    return torch.tensor(list(values) + [0.0] * (32 - len(values)))


def _assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _mixed_weights(dtype: torch.dtype, shape=(3, 4, 96)) -> torch.Tensor:
    """Normal draws over 12 decades, plus an all-zero group, exact ties and a saturating group."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-6, 6, shape[1])[None, :, None]
    w[0, 0, :32] = 0.0
    w[1, 0, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4) * torch.tensor([1.0, -1.0] * 16)
    w[2, 0, :32] = torch.linspace(-7.9, 7.9, 32)
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------
# Hand-computed cases


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_every_code_packs_to_known_bytes(backend):
    w = torch.tensor(FP4_VALUES * 2)[None]  # amax 6 -> scale byte 127 under both rules, codes 0..15
    for rule in ("floor", "ceil"):
        blocks, scales = quantize(w, scale_rule=rule, backend=backend)
        assert scales.tolist() == [[127]]
        # element 2j in the low nibble, 2j+1 in the high nibble
        assert blocks[0, 0].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2


@pytest.mark.parametrize(
    ("values", "rule", "scale_byte", "first_byte"),
    [
        ((1.0,), "floor", 125, 0x06),  # floor(log2 1) - 2 = -2; 1 / 0.25 = 4 -> code 6
        ((0.0, 1.0), "floor", 125, 0x60),  # same value in the high nibble
        ((1.0,), "ceil", 125, 0x06),  # ceil(log2(1/6)) = -2
        ((7.0,), "floor", 127, 0x07),  # scale 1: 7 saturates to 6 (code 7)
        ((7.0,), "ceil", 128, 0x06),  # scale 2: 3.5 is a tie -> 4 (code 6, even)
        ((-3.0, 0.75), "floor", 126, 0x3F),  # scale 0.5: -3 -> -6 (0xF), 0.75 -> 1.5 (3) in the high nibble
    ],
)
def test_hand_computed_scale_and_byte(values, rule, scale_byte, first_byte):
    blocks, scales = quantize(_group(*values)[None], scale_rule=rule)
    assert scales[0, 0].item() == scale_byte
    assert blocks[0, 0, 0].item() == first_byte


def test_dequantize_known_bytes():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x7A  # low nibble 0xA -> -1.0, high nibble 0x7 -> 6.0
    scales = torch.tensor([[128]], dtype=torch.uint8)  # x2
    out = dequantize(blocks, scales, torch.float32)
    assert out.shape == (1, 32)
    assert out[0, :2].tolist() == [-2.0, 12.0]
    assert out[0, 2:].abs().sum() == 0


@pytest.mark.parametrize(
    ("x", "expected"),
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),  # ties -> even code
     (0.26, 0.5), (0.74, 0.5), (2.51, 3.0), (4.99, 4.0), (5.01, 6.0)],
)  # fmt: skip
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_round_to_nearest_even(x, expected, backend):
    w = torch.stack([_group(6.0, x, -x)])  # amax 6 pins the scale to 1
    out = dequantize(*quantize(w, backend=backend), torch.float32, backend=backend)
    assert out[0, 1].item() == expected and out[0, 2].item() == -expected


def test_floor_rule_saturates_and_ceil_rule_never_clips():
    w = _group(*torch.linspace(-7.9, 7.9, 32).tolist())[None]
    floor = dequantize(*quantize(w, scale_rule="floor"), torch.float32)
    assert floor.abs().max() == 6.0  # scale 1: everything above 6 clips to 6
    ceil = dequantize(*quantize(w, scale_rule="ceil"), torch.float32)
    assert ceil.abs().max() == 8.0  # scale 2: 7.9 -> 8


def test_error_within_half_step_with_ceil_rule():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    blocks, scales = quantize(w, scale_rule="ceil")
    err = (dequantize(blocks, scales, torch.float32) - w).abs().view(64, 8, 32)
    scale = torch.pow(2.0, scales.float() - 127)[..., None]
    assert (err <= scale).all()  # largest grid step is 2 -> half step is one scale unit


def test_zero_and_nonfinite_groups():
    w = torch.stack([_group(), _group(1.0, float("nan")), _group(float("inf")), _group(-0.5)]).view(1, 128)
    for backend in ("torch", "cpu", "triton"):
        blocks, scales = quantize(w, backend=backend)
        assert scales.tolist() == [[127, 255, 255, 124]], backend  # zero group: unit scale; NaN/inf: E8M0 NaN
        assert blocks[0, 1:3].eq(0).all()
        out = dequantize(blocks, scales, torch.float32, backend=backend)
        assert out[0, :32].eq(0).all() and out[0, 32:96].isnan().all()
        assert out[0, 96].item() == -0.5


def test_negative_zero_keeps_sign():
    blocks, _ = quantize(_group(4.0, -0.0, -0.01)[None])
    assert blocks[0, 0, 0].item() == 0x86 and blocks[0, 0, 1].item() == 0x08


def test_quantize_is_idempotent_on_its_output():
    w = _mixed_weights(torch.float32)[1:]
    for rule in ("floor", "ceil"):
        once = dequantize(*quantize(w, scale_rule=rule), torch.float32)
        twice = dequantize(*quantize(once, scale_rule=rule), torch.float32)
        _assert_bits_equal(twice, once)


# ------------------------------------------------------------------------------------------------
# Stochastic rounding


def test_stochastic_rounding_is_unbiased():
    x = torch.tensor([0.1, 0.3, 0.6, 1.1, 1.9, 2.2, 2.7, 3.3, 4.5, 5.5, -0.4, -2.9, -5.2])
    w = _group(6.0, *x.tolist())[None].expand(4000, 32).contiguous()  # 4000 independent draws
    g = torch.Generator().manual_seed(0)
    out = dequantize(*quantize(w, stochastic=True, generator=g), torch.float32)
    vals = out[:, 1 : 1 + len(x)]
    lo = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, -0.5, -3.0, -6.0])
    hi = torch.tensor([0.5, 0.5, 1.0, 1.5, 2.0, 3.0, 3.0, 4.0, 6.0, 6.0, 0.0, -2.0, -4.0])
    assert ((vals == lo) | (vals == hi)).all()  # only the two neighbours
    # std of the mean over 4000 draws is at most step / (2 sqrt(4000)) = 0.016 for step 2
    torch.testing.assert_close(vals.mean(0), x, rtol=0, atol=0.05)
    assert out[:, 0].eq(6.0).all()  # grid points stay put


def test_stochastic_rounding_is_reproducible():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    a = quantize(w, stochastic=True, generator=torch.Generator().manual_seed(7))
    b = quantize(w, stochastic=True, generator=torch.Generator().manual_seed(7))
    c = quantize(w, stochastic=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ------------------------------------------------------------------------------------------------
# Backend equivalence (Triton under the interpreter on CPU tensors)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_rule", ["floor", "ceil"])
def test_quantize_backends_match_reference(backend, dtype, scale_rule):
    w = _mixed_weights(dtype)
    ref = quantize_ref(w, scale_rule=scale_rule)
    got = quantize(w, scale_rule=scale_rule, backend=backend)
    _assert_bits_equal(got[1], ref[1])
    _assert_bits_equal(got[0], ref[0])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_rule", ["floor", "ceil"])
def test_stochastic_backends_match_reference(backend, dtype, scale_rule):
    w = _mixed_weights(dtype)

    def draw(name):  # same seed -> same uniforms on every backend
        g = torch.Generator().manual_seed(5)
        return quantize(w, scale_rule=scale_rule, stochastic=True, generator=g, backend=name)

    ref, got = draw("torch"), draw(backend)
    _assert_bits_equal(got[0], ref[0])
    _assert_bits_equal(got[1], ref[1])


def test_cpu_backend_splits_work_across_threads():
    w = _mixed_weights(torch.bfloat16, shape=(4, 40, 1664))  # 8320 groups: three threads' worth
    assert w.numel() // 32 >= 2 * mxfp4_cpu._MIN_GROUPS_PER_THREAD
    ref = quantize_ref(w)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # uneven split on purpose
    try:
        got = quantize(w, backend="cpu")
        out = dequantize(*got, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    _assert_bits_equal(got[0], ref[0])
    _assert_bits_equal(out, dequantize_ref(*ref))


def test_cpu_backend_without_a_compiler_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(mxfp4_cpu, "_library", lambda: None)
    w = _mixed_weights(torch.float32)
    blocks, scales = quantize(w, backend="cpu")
    _assert_bits_equal(blocks, quantize_ref(w)[0])
    _assert_bits_equal(dequantize(blocks, scales, backend="cpu"), dequantize_ref(blocks, scales))


def _all_bytes_all_scales(scale_lo: int = 0, scale_hi: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block byte under every scale byte in [scale_lo, scale_hi): blocks (S, 16, 16), scales (S, 16)."""
    n = scale_hi - scale_lo
    blocks = torch.arange(256, dtype=torch.uint8).repeat(n, 1).view(n, 16, 16)
    scales = torch.arange(scale_lo, scale_hi, dtype=torch.uint8)[:, None].expand(n, 16).contiguous()
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_dequantize_matches_reference_on_every_byte_and_scale(dtype):
    blocks, scales = _all_bytes_all_scales()  # includes subnormal outputs and the NaN scale
    ref = dequantize_ref(blocks, scales, dtype)
    _assert_bits_equal(dequantize(blocks, scales, dtype, backend="cpu"), ref)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 6 * 2^127 is inf, as in the reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dequantize_matches_reference(dtype):
    # The interpreter emulates fp32 -> bf16 casts and flushes subnormal results, so scales 0 and 1
    # (subnormal bf16 outputs) are left to the native GPU test.
    blocks, scales = _all_bytes_all_scales(2, 256)
    got = dequantize(blocks, scales, dtype, backend="triton")
    _assert_bits_equal(got, dequantize_ref(blocks, scales, dtype))


def test_dequantize_keeps_leading_dims_and_handles_empty():
    blocks = torch.randint(0, 256, (2, 3, 4, 16), dtype=torch.uint8)
    scales = torch.randint(120, 130, (2, 3, 4), dtype=torch.uint8)
    assert dequantize(blocks, scales).shape == (2, 3, 128)
    empty = quantize(torch.zeros(5, 0))
    assert empty[0].shape == (5, 0, 16) and empty[1].shape == (5, 0)
    assert dequantize(*empty).shape == (5, 0)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
def test_triton_compiles_for_cuda():
    """Builds both kernels for sm_90 (no GPU needed): catches compiled-mode-only errors."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import mxfp4_triton as mt

    quant_sig = {"x_ptr": "*bf16", "noise_ptr": "*fp32", "blocks_ptr": "*u8", "scales_ptr": "*u8", "n_groups": "i32"}
    dequant_sig = {"blocks_ptr": "*u8", "scales_ptr": "*u8", "out_ptr": "*bf16", "n_groups": "i32"}
    for fn, sig, consts in [
        (mt._quantize_kernel, quant_sig, {"CEIL": True, "STOCHASTIC": True, "BLOCK_G": mt.QUANT_BLOCK_G}),
        (mt._dequantize_kernel, dequant_sig, {"BLOCK_G": mt.DEQUANT_BLOCK_G}),
    ]:
        sig = sig | {name: "constexpr" for name in consts}
        src = ASTSource(fn=triton.jit(fn), signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert "ptx" in compiled.asm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scale_rule", ["floor", "ceil"])
def test_triton_native_matches_reference(scale_rule):
    w = _mixed_weights(torch.bfloat16, shape=(8, 64, 2880)).cuda()
    blocks, scales = quantize(w, scale_rule=scale_rule)  # CUDA tensors dispatch to Triton
    ref_blocks, ref_scales = quantize_ref(w, scale_rule=scale_rule)
    _assert_bits_equal(scales, ref_scales)
    _assert_bits_equal(blocks, ref_blocks)
    g = torch.Generator(device="cuda")
    stoch = quantize(w, scale_rule=scale_rule, stochastic=True, generator=g.manual_seed(1))
    stoch_ref = quantize(w, scale_rule=scale_rule, stochastic=True, generator=g.manual_seed(1), backend="torch")
    _assert_bits_equal(stoch[0], stoch_ref[0])
    all_blocks, all_scales = _all_bytes_all_scales()
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize(all_blocks.cuda(), all_scales.cuda(), dtype)
        _assert_bits_equal(got.cpu(), dequantize_ref(all_blocks, all_scales, dtype))


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: quantize(torch.randn(4, 48)), ValueError, "w.shape=torch.Size([4, 48])"),
        (lambda: quantize(torch.ones(4, 32, dtype=torch.int32)), TypeError, "floating-point"),
        (lambda: quantize(torch.randn(32), scale_rule="round"), ValueError, "scale_rule='round'"),
        (lambda: quantize(torch.randn(32), backend="cuda"), ValueError, "valid: ['cpu', 'torch', 'triton']"),
        (lambda: dequantize(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8)), TypeError,
         "blocks.dtype=torch.int8"),
        (lambda: dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8)), ValueError,
         "blocks.shape=torch.Size([2, 3, 16]) does not match scales.shape=torch.Size([2, 4])"),
        (lambda: dequantize(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8)), ValueError,
         "blocks.shape=torch.Size([2, 8])"),
        (lambda: dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), torch.int32),
         TypeError, "dtype=torch.int32"),
    ],
)  # fmt: skip
def test_errors_name_the_problem(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_registry_lists_backends():
    assert set(BACKENDS) == {"torch", "cpu", "triton"}


def test_docstring_example():
    assert doctest.testmod(mxfp4).failed == 0
