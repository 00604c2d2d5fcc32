"""Fused clamped SwiGLU for gpt-oss experts in Triton, forward and backward.

What: y = min(g, L) * sigmoid(alpha * min(g, L)) * (clamp(l, -L, L) + 1) for each (gate g, linear l)
pair of the expert up-projection, and its gradient, one pass over memory each way (fp32 math, output
in the input dtype). Reference twin: `kernels.moe.swiglu` / `swiglu_backward` (interleaved layout,
exactly transformers' `GptOssExperts._apply_gate`).

Layouts: `interleaved=True` reads the checkpoint/transformers order [g0, l0, g1, l1, ...];
`interleaved=False` reads the split order [g0, g1, ... | l0, l1, ...] that `kernels.moe` uses
internally. Clamp gradients pass where the input lies in the closed interval, as torch's clamp.

Run: used by `kernels.moe` on CUDA tensors. On CPU only under Triton's interpreter, switched on before
triton is imported: tests/kernels/test_moe.py runs its Triton checks in a subprocess with
TRITON_INTERPRET=1 and compiles both kernels for sm_90 without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _swiglu_fwd_kernel(u_ptr, y_ptr, n_cols, u_row_stride, y_row_stride, col_stride, lin_offset,
                       alpha, limit, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = j < n_cols
    base = u_ptr + row * u_row_stride + j * col_stride
    g = tl.load(base, mask=m, other=0.0).to(tl.float32)
    lin = tl.load(base + lin_offset, mask=m, other=0.0).to(tl.float32)
    g = tl.minimum(g, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    y = g * tl.sigmoid(alpha * g) * (lin + 1.0)
    tl.store(y_ptr + row * y_row_stride + j, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(u_ptr, dy_ptr, du_ptr, y_ptr, n_cols, u_row_stride, dy_row_stride, y_row_stride,
                       col_stride, lin_offset, alpha, limit, STORE_Y: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = j < n_cols
    off = row * u_row_stride + j * col_stride
    g_raw = tl.load(u_ptr + off, mask=m, other=0.0).to(tl.float32)
    l_raw = tl.load(u_ptr + off + lin_offset, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * dy_row_stride + j, mask=m, other=0.0).to(tl.float32)
    g = tl.minimum(g_raw, limit)
    lin1 = tl.minimum(tl.maximum(l_raw, -limit), limit) + 1.0
    s = tl.sigmoid(alpha * g)
    glu = g * s
    dg = dy * lin1 * (s + alpha * glu * (1.0 - s))
    dg = tl.where(g_raw <= limit, dg, 0.0)
    dl = tl.where((l_raw >= -limit) & (l_raw <= limit), dy * glu, 0.0)
    tl.store(du_ptr + off, dg.to(du_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + off + lin_offset, dl.to(du_ptr.dtype.element_ty), mask=m)
    if STORE_Y:
        tl.store(y_ptr + row * y_row_stride + j, (glu * lin1).to(y_ptr.dtype.element_ty), mask=m)


def _layout(u: torch.Tensor, interleaved: bool) -> tuple[int, int, int]:
    """(I, column stride, offset of the linear half) for a (n, 2I) pre-activation."""
    if u.dim() != 2 or u.shape[1] % 2 or u.stride(1) != 1:
        raise ValueError(f"expected a row-major (n, 2I) pre-activation, got {tuple(u.shape)=} {u.stride()=}")
    half = u.shape[1] // 2
    return (half, 2, 1) if interleaved else (half, 1, half)


def swiglu_triton(u: torch.Tensor, alpha: float, limit: float, interleaved: bool = True) -> torch.Tensor:
    """(n, 2I) pre-activation -> (n, I) activation."""
    half, col_stride, lin_offset = _layout(u, interleaved)
    y = u.new_empty(u.shape[0], half)  # (n, I)
    if y.numel():
        grid = (u.shape[0], triton.cdiv(half, BLOCK))
        _swiglu_fwd_kernel[grid](u, y, half, u.stride(0), y.stride(0), col_stride, lin_offset,
                                 float(alpha), float(limit), BLOCK=BLOCK)
    return y


def swiglu_backward_triton(u: torch.Tensor, dy: torch.Tensor, alpha: float, limit: float,
                           interleaved: bool = True, return_y: bool = False):
    """(n, 2I) pre-activation, (n, I) grad -> (n, 2I) grad in u's layout [, (n, I) recomputed activation]."""
    half, col_stride, lin_offset = _layout(u, interleaved)
    if dy.shape != (u.shape[0], half):
        raise ValueError(f"{tuple(dy.shape)=} should be {(u.shape[0], half)} for {tuple(u.shape)=}")
    dy = dy.contiguous()
    du = torch.empty_like(u)  # (n, 2I)
    y = u.new_empty(u.shape[0], half) if return_y else du  # (n, I); du is a dummy pointer otherwise
    if du.numel():
        grid = (u.shape[0], triton.cdiv(half, BLOCK))
        _swiglu_bwd_kernel[grid](u, dy, du, y, half, u.stride(0), dy.stride(0), y.stride(0), col_stride,
                                 lin_offset, float(alpha), float(limit), STORE_Y=return_y, BLOCK=BLOCK)
    return (y, du) if return_y else du
