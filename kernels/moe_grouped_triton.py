"""gpt-oss MoE experts as grouped GEMMs in Triton: gathers, bias and SwiGLU fused, no host sync.

What: the same function as `kernels.moe.grouped_experts` (dense weights in transformers' layout,
W1 (E, H, 2I) interleaved gate/linear columns, W2 (E, I, H)), forward and backward, for CUDA tensors.
The CPU/torch path in kernels/moe.py loops over active experts from Python and gathers tokens into
separate buffers before each matmul; here every step is one launch over all experts:

    forward   u = x[tok] @ W1_e + b1_e, y = w * swiglu(u)    `_up_swiglu_kernel`   (gather in the A load)
              z = y @ W2_e                                  `_grouped_mm_kernel`  (sorted rows)
              out = R @ b2 + sum_k z[pair]                  torch (deterministic gather-sum, no atomics)
    backward  g = grad[tok] @ W2_e^T, fused SwiGLU backward  `_grouped_mm_kernel`  (gather + epilogue:
              -> du, w * y, partial g . y                    du, w*y and the routing-weight grad)
              dW2_e = (w y)^T grad[tok]                     `_expert_outer_kernel` (gather in the G load)
              dx = sum_k (du @ W1_e^T)[pair]                `_grouped_mm_kernel` + torch gather-sum
              dW1_e = x[tok]^T du, db1_e = colsum du         `_expert_outer_kernel` (gather + column sums)

Schedule: pairs are sorted by expert (stable argsort) and cut into row tiles of BLOCK_M that never
straddle two experts; the tile table (expert, first row) is built on the device with a static upper
bound of cdiv(S, BLOCK_M) + E tiles, so nothing waits on the host (the torch path's `bincount().tolist()`
is a device sync per layer). Tiles past the real count exit at once; idle experts get no row tile and
their weight gradients are written as zeros by `_expert_outer_kernel` (an empty reduction).

Numerics: fp32 operands use `input_precision="ieee"` (no TF32) so the result matches the CPU fp32 path;
bf16/fp16 operands accumulate in fp32. The SwiGLU is computed from u as stored (rounded to the storage
dtype), exactly what the backward recomputes from, as in the C and torch twins. Reference twin: the
torch/C path `kernels.moe._GroupedExperts`; tests/kernels/test_moe.py runs this file under
TRITON_INTERPRET=1 against it (values and every gradient) and compiles the kernels for sm_90.

Not here: MXFP4 weights (kernels/moe.py decodes those one active expert at a time) and block-size
autotuning (the fixed BLOCK_* below are untuned: no GPU was available to tune them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Untuned defaults (see module docstring). BLOCK_M is also the schedule's row-tile size.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def _row_tile(tile_expert_ptr, tile_row0_ptr, offsets_ptr, BLOCK_M: tl.constexpr):
    """This program's row tile: its expert (-1: past the real tiles), sorted rows and their mask."""
    pid = tl.program_id(0)
    e = tl.load(tile_expert_ptr + pid)
    rows = tl.load(tile_row0_ptr + pid) + tl.arange(0, BLOCK_M)
    return e, rows, rows < tl.load(offsets_ptr + tl.maximum(e, 0) + 1)


@triton.jit
def _up_swiglu_kernel(x_ptr, tok_ptr, w1_ptr, b1_ptr, ws_ptr, u_ptr, y_ptr,
                      tile_expert_ptr, tile_row0_ptr, offsets_ptr,
                      H, I, stride_xm, stride_w1e, stride_w1k, stride_b1e, stride_um, stride_ym,
                      alpha, limit, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """u[rows] = x[tok[rows]] @ W1_e + b1_e (interleaved), y[rows] = w * swiglu(u) for one row tile
    and BLOCK_N gate/linear column pairs. Gate and linear columns are two accumulators."""
    e, rows, m_row = _row_tile(tile_expert_ptr, tile_row0_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    pid_n = tl.program_id(1)
    src = tl.load(tok_ptr + rows, mask=m_row, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_col = cols < I
    w_base = w1_ptr + e.to(tl.int64) * stride_w1e
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m_k = ks < H
        a = tl.load(x_ptr + src[:, None] * stride_xm + ks[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
        b_ptrs = w_base + ks[:, None] * stride_w1k + 2 * cols[None, :]
        m_b = m_k[:, None] & m_col[None, :]
        acc_g = tl.dot(a, tl.load(b_ptrs, mask=m_b, other=0.0), acc_g, input_precision=PRECISION)
        acc_l = tl.dot(a, tl.load(b_ptrs + 1, mask=m_b, other=0.0), acc_l, input_precision=PRECISION)
    b_base = b1_ptr + e.to(tl.int64) * stride_b1e + 2 * cols
    out_t = u_ptr.dtype.element_ty
    g_raw = (acc_g + tl.load(b_base, mask=m_col, other=0.0).to(tl.float32)[None, :]).to(out_t)
    l_raw = (acc_l + tl.load(b_base + 1, mask=m_col, other=0.0).to(tl.float32)[None, :]).to(out_t)
    rows64 = rows.to(tl.int64)
    m = m_row[:, None] & m_col[None, :]
    u_ptrs = u_ptr + rows64[:, None] * stride_um + 2 * cols[None, :]
    tl.store(u_ptrs, g_raw, mask=m)
    tl.store(u_ptrs + 1, l_raw, mask=m)
    g = tl.minimum(g_raw.to(tl.float32), limit)
    lin = tl.minimum(tl.maximum(l_raw.to(tl.float32), -limit), limit)
    w = tl.load(ws_ptr + rows, mask=m_row, other=0.0).to(tl.float32)
    y = w[:, None] * (g * tl.sigmoid(alpha * g) * (lin + 1.0))
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _grouped_mm_kernel(a_ptr, a_idx_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_row0_ptr, offsets_ptr,
                       K, N, stride_am, stride_be, stride_bk, stride_bn, stride_cm,
                       u_ptr, ws_ptr, du_ptr, gy_ptr, stride_um, n_blocks, alpha, limit,
                       GATHER: tl.constexpr, SWIGLU_BWD: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[rows] = a[rows or a_idx[rows]] @ B_e for one row tile, B_e any (K, N) strided view of expert e.

    SWIGLU_BWD: the product is g = d/d(w y); instead of g the epilogue stores w * y in c (recomputed
    from u), du (interleaved, for dy = w g) and the partial sums of g . y over this column block in
    gy[rows, pid_n] (the routing-weight gradient, summed over blocks by the caller).
    """
    e, rows, m_row = _row_tile(tile_expert_ptr, tile_row0_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    pid_n = tl.program_id(1)
    if GATHER:
        src = tl.load(a_idx_ptr + rows, mask=m_row, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_col = cols < N
    b_base = b_ptr + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m_k = ks < K
        a = tl.load(a_ptr + src[:, None] * stride_am + ks[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=m_k[:, None] & m_col[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    rows64 = rows.to(tl.int64)
    m = m_row[:, None] & m_col[None, :]
    if SWIGLU_BWD:
        out_t = du_ptr.dtype.element_ty
        g_in = acc.to(c_ptr.dtype.element_ty).to(tl.float32)  # g as the torch path holds it (storage dtype)
        u_ptrs = u_ptr + rows64[:, None] * stride_um + 2 * cols[None, :]
        g_raw = tl.load(u_ptrs, mask=m, other=0.0).to(tl.float32)
        l_raw = tl.load(u_ptrs + 1, mask=m, other=0.0).to(tl.float32)
        w = tl.load(ws_ptr + rows, mask=m_row, other=0.0).to(tl.float32)
        g = tl.minimum(g_raw, limit)
        lin1 = tl.minimum(tl.maximum(l_raw, -limit), limit) + 1.0
        s = tl.sigmoid(alpha * g)
        glu = g * s
        y = glu * lin1
        dy = g_in * w[:, None]
        dg = tl.where(g_raw <= limit, dy * lin1 * (s + alpha * glu * (1.0 - s)), 0.0)
        dl = tl.where((l_raw >= -limit) & (l_raw <= limit), dy * glu, 0.0)
        du_ptrs = du_ptr + rows64[:, None] * stride_um + 2 * cols[None, :]
        tl.store(du_ptrs, dg.to(out_t), mask=m)
        tl.store(du_ptrs + 1, dl.to(out_t), mask=m)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], (w[:, None] * y).to(out_t), mask=m)
        tl.store(gy_ptr + rows64 * n_blocks + pid_n, tl.sum(tl.where(m, g_in * y, 0.0), axis=1), mask=m_row)
    else:
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=m)


@triton.jit
def _expert_outer_kernel(a_ptr, a_idx_ptr, g_ptr, g_idx_ptr, d_ptr, colsum_ptr, offsets_ptr,
                         P, Q, stride_am, stride_gm, stride_de, stride_dp,
                         A_GATHER: tl.constexpr, G_GATHER: tl.constexpr, COLSUM: tl.constexpr,
                         PRECISION: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """D_e = a[rows_e]^T @ g[rows_e] over the rows of expert e (a or g rows optionally gathered);
    COLSUM also writes the column sums of g[rows_e] (fp32, from the first P block). Idle experts: zeros."""
    e, pid_p, pid_q = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_p, m_q = ps < P, qs < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    csum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m_r = rows < end
        if A_GATHER:
            a_rows = tl.load(a_idx_ptr + rows, mask=m_r, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if G_GATHER:
            g_rows = tl.load(g_idx_ptr + rows, mask=m_r, other=0).to(tl.int64)
        else:
            g_rows = rows.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ps[None, :], mask=m_r[:, None] & m_p[None, :], other=0.0)
        g = tl.load(g_ptr + g_rows[:, None] * stride_gm + qs[None, :], mask=m_r[:, None] & m_q[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
        if COLSUM:
            csum += tl.sum(g.to(tl.float32), axis=0)
    d_ptrs = d_ptr + e.to(tl.int64) * stride_de + ps[:, None] * stride_dp + qs[None, :]
    tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=m_p[:, None] & m_q[None, :])
    if COLSUM:
        if pid_p == 0:
            tl.store(colsum_ptr + e * Q + qs, csum, mask=m_q)


# ---- host side -----------------------------------------------------------------------------------
def expert_schedule(top_k_index: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """Pairs sorted by expert and the row-tile table, all on the device (no host sync).

    Returns order (S,) sorted pair ids, tok (S,) int32 owning token per sorted pair, inv (S,) the
    inverse permutation (sorted position of pair t*k + j), offsets (E+1,) int32 expert row bounds,
    tile_expert / tile_row0 (cdiv(S, block_m) + E,) int32: the expert and first sorted row of each
    tile, expert -1 for the unused tail of the table.
    """
    flat = top_k_index.reshape(-1)
    S, k, E, dev = flat.numel(), top_k_index.shape[-1], num_experts, flat.device
    order = torch.argsort(flat, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(S, device=dev)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    offsets[1:] = counts.cumsum(0)
    tiles = (counts + block_m - 1) // block_m
    tiles_end = tiles.cumsum(0)  # inclusive: tiles of experts 0..e
    p = torch.arange(triton.cdiv(S, block_m) + E, device=dev)
    e = torch.searchsorted(tiles_end, p, right=True)  # expert of tile p; E past the last real tile
    ec = e.clamp(max=E - 1)
    row0 = offsets[ec] + (p - (tiles_end[ec] - tiles[ec])) * block_m
    tile_expert = torch.where(e < E, ec, -1).to(torch.int32)
    return (order, (order // k).to(torch.int32), inv, offsets.to(torch.int32), tile_expert,
            row0.to(torch.int32))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _pair_sum(z: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """(S, H) rows in sorted order -> (N, H) sum over each token's k pairs (fp32 accumulation)."""
    return z.index_select(0, inv).view(-1, k, z.shape[1]).sum(1, dtype=torch.float32)


class _TritonGroupedExperts(torch.autograd.Function):
    """Same contract as `kernels.moe._GroupedExperts` with dense weights (inputs already in one dtype)."""

    @staticmethod
    def forward(ctx, x, routing_weights, b1, b2, w1, w2, top_k_index, alpha, limit):
        N, H = x.shape
        E, two_i = b1.shape
        I, k = two_i // 2, top_k_index.shape[-1]
        order, tok, inv, offsets, tile_expert, tile_row0 = expert_schedule(top_k_index, E)
        S, n_tiles, prec = order.numel(), tile_expert.numel(), _precision(x.dtype)
        x, w1, w2, b1 = x.contiguous(), w1.contiguous(), w2.contiguous(), b1.contiguous()
        ws = routing_weights.reshape(-1)[order].to(x.dtype).contiguous()  # (S,)
        u, y, z = x.new_empty(S, two_i), x.new_empty(S, I), x.new_empty(S, H)
        _up_swiglu_kernel[(n_tiles, triton.cdiv(I, BLOCK_N))](
            x, tok, w1, b1, ws, u, y, tile_expert, tile_row0, offsets, H, I, x.stride(0), w1.stride(0),
            w1.stride(1), b1.stride(0), u.stride(0), y.stride(0), float(alpha), float(limit),
            PRECISION=prec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        _grouped_mm_kernel[(n_tiles, triton.cdiv(H, BLOCK_N))](
            y, tok, w2, z, tile_expert, tile_row0, offsets, I, H, y.stride(0), w2.stride(0), w2.stride(1),
            w2.stride(2), z.stride(0), u, ws, u, ws, 0, 1, 0.0, 0.0,
            GATHER=False, SWIGLU_BWD=False, PRECISION=prec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        R = x.new_zeros(N, E).scatter_(1, top_k_index, routing_weights.to(x.dtype))  # dense routing weights
        out = (R.float() @ b2.float() + _pair_sum(z, inv, k)).to(x.dtype)
        ctx.save_for_backward(x, u, ws, tok, inv, offsets, tile_expert, tile_row0, b2, R, top_k_index, w1, w2)
        ctx.alpha, ctx.limit, ctx.rw_shape, ctx.rw_dtype = alpha, limit, routing_weights.shape, routing_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, u, ws, tok, inv, offsets, tile_expert, tile_row0, b2, R, top_k_index, w1, w2 = ctx.saved_tensors
        need_x, need_rw, need_b1, need_b2, need_w1, need_w2 = ctx.needs_input_grad[:6]
        grad_out = grad_out.contiguous().to(x.dtype)
        (S, two_i), (N, H), E, k = u.shape, x.shape, b2.shape[0], top_k_index.shape[-1]
        I, n_tiles, prec = two_i // 2, tile_expert.numel(), _precision(x.dtype)
        blocks = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        outer = dict(PRECISION=prec, BLOCK_P=BLOCK_N, BLOCK_Q=BLOCK_N, BLOCK_R=BLOCK_K)
        # g = grad[tok] @ W2_e^T with the SwiGLU backward fused: wy = w * y, du, partial g . y
        nb = triton.cdiv(I, BLOCK_N)
        wy, du = x.new_empty(S, I), torch.empty_like(u)
        gy = torch.empty(S, nb, dtype=torch.float32, device=x.device)
        _grouped_mm_kernel[(n_tiles, nb)](
            grad_out, tok, w2, wy, tile_expert, tile_row0, offsets, H, I, grad_out.stride(0), w2.stride(0),
            w2.stride(2), w2.stride(1), wy.stride(0), u, ws, du, gy, u.stride(0), nb, float(ctx.alpha),
            float(ctx.limit), GATHER=True, SWIGLU_BWD=True, PRECISION=prec, **blocks)
        dx = dw1 = dw2 = db1 = db2 = drw = None
        if need_w2:  # dW2_e = (w y)^T grad[tok]: (E, I, H)
            dw2 = torch.empty_like(w2)
            _expert_outer_kernel[(E, triton.cdiv(I, BLOCK_N), triton.cdiv(H, BLOCK_N))](
                wy, tok, grad_out, tok, dw2, dw2, offsets, I, H, wy.stride(0), grad_out.stride(0),
                dw2.stride(0), dw2.stride(1), A_GATHER=False, G_GATHER=True, COLSUM=False, **outer)
        if need_x:  # dx = sum over pairs of du @ W1_e^T
            dxs = x.new_empty(S, H)
            _grouped_mm_kernel[(n_tiles, triton.cdiv(H, BLOCK_N))](
                du, tok, w1, dxs, tile_expert, tile_row0, offsets, two_i, H, du.stride(0), w1.stride(0),
                w1.stride(2), w1.stride(1), dxs.stride(0), u, ws, du, gy, u.stride(0), 1, 0.0, 0.0,
                GATHER=False, SWIGLU_BWD=False, PRECISION=prec, **blocks)
            dx = _pair_sum(dxs, inv, k).to(x.dtype)
        if need_w1 or need_b1:  # dW1_e = x[tok]^T du and db1_e = column sums of du
            dw1 = torch.empty_like(w1)
            colsum = torch.empty(E, two_i, dtype=torch.float32, device=x.device)
            _expert_outer_kernel[(E, triton.cdiv(H, BLOCK_N), triton.cdiv(two_i, BLOCK_N))](
                x, tok, du, tok, dw1, colsum, offsets, H, two_i, x.stride(0), du.stride(0), dw1.stride(0),
                dw1.stride(1), A_GATHER=True, G_GATHER=False, COLSUM=True, **outer)
            db1 = colsum.to(b2.dtype) if need_b1 else None
            dw1 = dw1 if need_w1 else None
        if need_b2:
            db2 = (R.t().float() @ grad_out.float()).to(b2.dtype)  # (E, H); idle experts have R = 0
        if need_rw:  # g . y per pair, plus the b2 term d(R @ b2)/dR at the chosen experts
            dws = gy.sum(1)
            drw = dws.index_select(0, inv).view(ctx.rw_shape)
            drw = (drw + (grad_out.float() @ b2.float().t()).gather(1, top_k_index)).to(ctx.rw_dtype)
        return dx, drw, db1, db2, dw1, dw2, None, None, None


def grouped_experts_triton(x, top_k_index, routing_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                           down_proj_bias, alpha, limit):
    """x (N, H) in the weights' dtype, top_k_index/routing_weights (N, k), transformers-layout dense
    weights -> (N, H). Shapes are checked by the caller (`kernels.moe.grouped_experts`)."""
    return _TritonGroupedExperts.apply(x, routing_weights, gate_up_proj_bias, down_proj_bias, gate_up_proj,
                                       down_proj, top_k_index, alpha, limit)
