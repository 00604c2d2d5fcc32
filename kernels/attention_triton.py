"""Flash-style attention with learned sinks, sliding window and GQA in Triton, forward and backward.

What: the Triton twin of `kernels.attention.sink_attention` (causal, optional sliding window, queries
at the last T of Tk key positions, no key padding). Online softmax whose running max and denominator
start at the sink (m = S_h, l = 1), so the sink sits in the denominator without a value; each query
block only visits the key blocks inside its causal window.

Backward: delta = rowsum(dO * O) and the sink gradient -sum_q exp(S_h - lse_q) delta_q in torch; one
kernel for dK/dV per query head (summed over the GQA group afterwards, no atomics) and one for dQ,
both recomputing probabilities from the saved log-sum-exp.

Run: used by `kernels.attention` for CUDA tensors. On CPU only under Triton's interpreter, which must
be switched on before triton is imported (the kernels use tl.max / tl.sum / tl.zeros, themselves jit
helpers), so tests/kernels/test_attention.py runs its Triton checks in a subprocess with
TRITON_INTERPRET=1 and separately compiles the kernels for sm_90 without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _keep(offs_m, offs_n, q_offset, TK, window, HAS_WINDOW: tl.constexpr):
    qpos = offs_m + q_offset
    keep = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] < TK)
    if HAS_WINDOW:
        keep = keep & (offs_n[None, :] > qpos[:, None] - window)
    return keep


@triton.jit
def _fwd_kernel(Q, K, V, SINK, O, LSE, T, TK, H, G, q_offset, window, scale,
                BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    HK = H // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q_base = Q + (b * H + h).to(tl.int64) * T * D
    kv_off = (b * HK + hk).to(tl.int64) * TK * D
    q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    sink = tl.load(SINK + h).to(tl.float32)
    m_i = tl.zeros([BM], dtype=tl.float32) + sink
    l_i = tl.zeros([BM], dtype=tl.float32) + 1.0
    acc = tl.zeros([BM, D], dtype=tl.float32)
    hi = tl.minimum(TK, q_offset + (pid_m + 1) * BM)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, q_offset + pid_m * BM - window + 1) // BN * BN
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = tl.load(K + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < TK, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(_keep(offs_m, offs_n, q_offset, TK, window, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < TK, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(O + (b * H + h).to(tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(LSE + (b * H + h).to(tl.int64) * T + offs_m, m_i + tl.log(l_i), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, T, TK, H, G, q_offset, window, scale,
                     BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    HK = H // G
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    kv_off = (b * HK + hk).to(tl.int64) * TK * D
    q_off = (b * H + h).to(tl.int64) * T * D
    k = tl.load(K + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < TK, other=0.0)
    v = tl.load(V + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < TK, other=0.0)
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    lo = tl.maximum(0, pid_n * BN - q_offset) // BM * BM
    hi = T
    if HAS_WINDOW:
        hi = tl.minimum(T, (pid_n + 1) * BN + window - 1 - q_offset)
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        row_ok = offs_m < T
        q = tl.load(Q + q_off + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_off + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + (b * H + h).to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + (b * H + h).to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        keep = _keep(offs_m, offs_n, q_offset, TK, window, HAS_WINDOW) & row_ok[:, None]
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    out = (b * H + h).to(tl.int64) * TK * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk * scale, mask=offs_n[:, None] < TK)
    tl.store(DV + out, dv, mask=offs_n[:, None] < TK)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, T, TK, H, G, q_offset, window, scale,
                   BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    HK = H // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q_off = (b * H + h).to(tl.int64) * T * D
    kv_off = (b * HK + hk).to(tl.int64) * TK * D
    q = tl.load(Q + q_off + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + (b * H + h).to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (b * H + h).to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BM, D], dtype=tl.float32)
    hi = tl.minimum(TK, q_offset + (pid_m + 1) * BM)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, q_offset + pid_m * BM - window + 1) // BN * BN
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = tl.load(K + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < TK, other=0.0)
        v = tl.load(V + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < TK, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        keep = _keep(offs_m, offs_n, q_offset, TK, window, HAS_WINDOW) & row_ok[:, None]
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_off + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


def _meta(q, k, window):
    B, H, T, D = q.shape
    HK, TK = k.shape[1], k.shape[2]
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton path, got {D}")
    return B, H, T, D, HK, TK, H // HK, (window or 0), window is not None


class _SinkAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, window, q_offset, block_m, block_n):
        B, H, T, D, HK, TK, G, w, has_w = _meta(q, k, window)
        o = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(T, block_m), B * H)
        _fwd_kernel[grid](q, k, v, sinks, o, lse, T, TK, H, G, q_offset, w, scale,
                          BM=block_m, BN=block_n, D=D, HAS_WINDOW=has_w)
        ctx.save_for_backward(q, k, v, sinks, o, lse)
        ctx.meta = (scale, window, q_offset, block_m, block_n)
        return o.transpose(1, 2)  # (B, T, H, D)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, sinks, o, lse = ctx.saved_tensors
        scale, window, q_offset, block_m, block_n = ctx.meta
        B, H, T, D, HK, TK, G, w, has_w = _meta(q, k, window)
        do = d_out.transpose(1, 2).contiguous().to(q.dtype)  # (B, H, T, D)
        delta = (do.float() * o.float()).sum(-1)  # (B, H, T)
        dq = torch.empty_like(q)
        dk = torch.empty(B, H, TK, D, device=q.device, dtype=torch.float32)  # per query head
        dv = torch.empty_like(dk)
        _bwd_dkdv_kernel[(triton.cdiv(TK, block_n), B * H)](q, k, v, do, lse, delta, dk, dv, T, TK, H, G, q_offset,
                                                           w, scale, BM=block_m, BN=block_n, D=D, HAS_WINDOW=has_w)
        _bwd_dq_kernel[(triton.cdiv(T, block_m), B * H)](q, k, v, do, lse, delta, dq, T, TK, H, G, q_offset, w,
                                                        scale, BM=block_m, BN=block_n, D=D, HAS_WINDOW=has_w)
        dk = dk.view(B, HK, G, TK, D).sum(2).to(k.dtype)  # (B, HK, TK, D)
        dv = dv.view(B, HK, G, TK, D).sum(2).to(v.dtype)
        p_sink = torch.exp(sinks.float().view(1, H, 1) - lse)  # (B, H, T)
        dsinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None


def sink_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                          window: int | None = None, q_offset: int | None = None, block_m: int = 64,
                          block_n: int = 64) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, Tk, D), sinks (Hq,) -> (B, T, Hq, D); queries at positions
    q_offset .. q_offset + T - 1 (default Tk - T)."""
    q_offset = k.shape[2] - q.shape[2] if q_offset is None else q_offset
    return _SinkAttentionTriton.apply(q.contiguous(), k.contiguous(), v.contiguous(), sinks.contiguous(), float(scale),
                                      window, int(q_offset), block_m, block_n)
