"""Sink attention vs transformers' eager gpt-oss attention: outputs and grads of q, k, v, sinks.

The Triton twin runs under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 has to be set
before triton is imported) and is compiled for sm_90 without a GPU; the `gpu` test runs it natively.
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.masking_utils import causal_mask_function, eager_mask, sliding_window_causal_mask_function
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from kernels.attention import sink_attention, sink_attention_forward, sink_attention_mask, sink_attention_ref

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(code: str) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (must precede `import triton`)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def _qkv(B=2, Hq=4, Hkv=2, T=37, Tk=None, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = Tk or T
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype).requires_grad_()
    sinks = torch.randn(Hq, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, sinks


def _padding(kind: str, B: int, T: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        mask[0, -5:] = False
    else:  # left padding: the first queries of row 0 see only padding (output 0, all mass on the sink)
        mask[0, :6] = False
    return mask


def _eager(q, k, v, sinks, window, pad):
    """transformers' eager gpt-oss attention with its own 4D mask."""
    B, Hq, T, D = q.shape
    module = types.SimpleNamespace(num_key_value_groups=Hq // k.shape[1], sinks=sinks, training=False)
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    mask = eager_mask(batch_size=B, q_length=T, kv_length=T, mask_function=fn, attention_mask=pad, dtype=q.dtype)
    return eager_attention_forward(module, q, k, v, mask, scaling=D**-0.5)[0]


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
@pytest.mark.parametrize(("Hq", "Hkv", "block"), [(4, 2, 8), (2, 2, 16), (4, 1, 128)])
def test_matches_transformers_eager(window, pad, Hq, Hkv, block):
    q, k, v, sinks = _qkv(Hq=Hq, Hkv=Hkv)
    mask = _padding(pad, 2, 37)
    ref = _eager(q, k, v, sinks, window, mask)
    dy = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v, sinks), dy)
    out = sink_attention(q, k, v, sinks, 16**-0.5, window, key_padding_mask=mask, block=block)
    g = torch.autograd.grad(out, (q, k, v, sinks), dy)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("q k v sinks".split(), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_fp32_matches_eager():
    q, k, v, sinks = (t.detach().float().requires_grad_() for t in _qkv(T=70, D=64))
    ref = _eager(q, k, v, sinks, 16, None)
    out = sink_attention(q, k, v, sinks, 64**-0.5, 16, block=32)
    dy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), dy), torch.autograd.grad(ref, (q, k, v, sinks), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sink_gradient_is_minus_p_sink_times_do_dot_o():
    q, k, v, sinks = _qkv()
    out = sink_attention(q, k, v, sinks, 0.25, 8)  # (B, T, Hq, D)
    dy = torch.randn_like(out)
    (d_sinks,) = torch.autograd.grad(out, sinks, dy)
    s = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25  # (B, Hq, T, T)
    s = s.masked_fill(~_band(37, 8), -torch.inf)
    lse = torch.logsumexp(torch.cat([s, sinks.view(1, -1, 1, 1).expand(2, 4, 37, 1)], -1), -1)  # (B, Hq, T)
    p_sink = torch.exp(sinks.view(1, -1, 1) - lse)
    expected = -(p_sink * (dy * out).sum(-1).transpose(1, 2)).sum(dim=(0, 2))
    torch.testing.assert_close(d_sinks, expected.detach())


def _band(T, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & (j > i - window)


class _LargestMatmul(TorchDispatchMode):
    """Records the largest last-two-dims product of any matmul output."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm, torch.ops.aten.matmul):
            self.largest = max(self.largest, out.shape[-1] * out.shape[-2])
        return out


def test_sliding_layers_stay_block_local():
    T, window, block = 512, 16, 32
    q, k, v, sinks = (t.detach().float().requires_grad_() for t in _qkv(B=1, T=T))
    with _LargestMatmul() as probe:
        out = sink_attention(q, k, v, sinks, 0.25, window, block=block)
        out.sum().backward()
    G = 2  # query heads per KV head share one matmul
    assert probe.largest <= G * block * (block + window - 1)  # never a T x T score matrix (262144)


def test_kv_offset_queries_match_reference():
    q, k, v, sinks = _qkv(T=9, Tk=30)  # queries are the last 9 of 30 positions (KV cache)
    for window in (None, 8):
        ref = sink_attention_ref(q, k, v, sinks, 0.25, window)
        out = sink_attention(q, k, v, sinks, 0.25, window, block=4)
        torch.testing.assert_close(out, ref)
        dy = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), dy), torch.autograd.grad(ref, (q, k, v, sinks), dy)):
            torch.testing.assert_close(a, b)


def test_interface_function_falls_back_to_4d_mask():
    """Packed sequences / custom masks arrive as transformers' 4D eager mask and use the dense path."""
    q, k, v, sinks = _qkv(T=20)
    doc = torch.tensor([0] * 8 + [1] * 12)
    keep = (doc[:, None] == doc[None, :]) & _band(20, 20)  # block-diagonal causal
    mask = torch.zeros(1, 1, 20, 20, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    module = types.SimpleNamespace(num_key_value_groups=2, sinks=sinks, training=True)
    ref = eager_attention_forward(module, q, k, v, mask, scaling=0.25)[0]
    out, weights = sink_attention_forward(module, q, k, v, mask, scaling=0.25, s_aux=sinks)
    assert weights is None
    torch.testing.assert_close(out, ref)


def test_mask_function_hands_over_none_padding_or_4d():
    pad = torch.ones(2, 12, dtype=torch.bool)
    assert sink_attention_mask(2, 12, 12, attention_mask=None) is None
    assert sink_attention_mask(2, 12, 12, attention_mask=pad) is None
    pad[1, -3:] = False
    torch.testing.assert_close(sink_attention_mask(2, 12, 12, attention_mask=pad), pad)
    mask = sink_attention_mask(2, 1, 12, q_offset=11, attention_mask=pad, dtype=torch.float32)  # cached decode
    assert mask.shape == (2, 1, 1, 12) and mask.dtype == torch.float32
    custom = sink_attention_mask(2, 12, 12, attention_mask=None, allow_is_causal_skip=False, dtype=torch.float32)
    assert custom.shape == (2, 1, 12, 12)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 4, 8, 16), (2, 3, 8, 16), (2, 3, 8, 16), (4,)), r"Hq % Hkv == 0"),
        (((2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16), (2,)), r"tuple\(sinks.shape\)=\(2,\) should be \(4,\)"),
        (((2, 4, 8, 16), (2, 2, 5, 16), (2, 2, 5, 16), (4,)), r"Tk=5 >= T=8"),
    ],
)
def test_shape_errors_name_the_shapes(shapes, message):
    with pytest.raises(ValueError, match=message):
        sink_attention(*(torch.zeros(s) for s in shapes), 0.25)


_INTERPRETER_CHECK = """
import torch
from kernels.attention import sink_attention
from kernels.attention_triton import sink_attention_triton
g = torch.Generator().manual_seed(0)
for B, Hq, Hkv, T, Tk, D, window in [(2, 4, 2, 37, 37, 16, None), (2, 4, 2, 37, 37, 16, 8), (1, 2, 1, 20, 45, 32, 5)]:
    q = torch.randn(B, Hq, T, D, generator=g).requires_grad_()
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g).requires_grad_() for _ in range(2))
    sinks = torch.randn(Hq, generator=g).requires_grad_()
    ref = sink_attention(q, k, v, sinks, D ** -0.5, window, block=8)
    out = sink_attention_triton(q, k, v, sinks, D ** -0.5, window, block_m=16, block_n=16)
    dy = torch.randn(ref.shape, generator=g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), dy), torch.autograd.grad(ref, (q, k, v, sinks), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_triton_matches_torch_under_interpreter():
    run_interpreted(_INTERPRETER_CHECK)


def test_triton_attention_compiles_for_cuda():
    """Builds the three kernels for sm_90 in bf16 (no GPU needed): catches compiled-mode-only errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import attention_triton as at

    ints = {n: "i32" for n in ("T", "TK", "H", "G", "q_offset", "window")} | {"scale": "fp32"}
    consts = {"BM": 64, "BN": 64, "D": 64, "HAS_WINDOW": True}
    ptrs = {
        at._fwd_kernel: "Q K V SINK O LSE",
        at._bwd_dkdv_kernel: "Q K V DO LSE DELTA DK DV",
        at._bwd_dq_kernel: "Q K V DO LSE DELTA DQ",
    }
    for fn, names in ptrs.items():
        sig = {n: ("*fp32" if n in ("LSE", "DELTA", "DK", "DV") else "*bf16") for n in names.split()}
        sig |= ints | {n: "constexpr" for n in consts}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        assert "ptx" in compiled.asm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("window", [None, 128])
def test_triton_native_matches_reference(window):
    q, k, v, sinks = (t.detach().float() for t in _qkv(B=2, Hq=8, Hkv=2, T=300, D=64))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref = sink_attention(*ref_in, 0.125, window)
    dy = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, ref_in, dy)
    gpu_in = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v, sinks)]
    out = sink_attention(*gpu_in, 0.125, window)  # CUDA tensors dispatch to Triton
    g = torch.autograd.grad(out, gpu_in, dy.to("cuda", torch.bfloat16))
    torch.testing.assert_close(out.float().cpu(), ref, rtol=3e-2, atol=3e-2)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float().cpu(), b, rtol=5e-2, atol=5e-2 * float(b.abs().max()))
