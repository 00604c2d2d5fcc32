"""gpt-oss MoE experts as grouped GEMMs in Triton: gathers, bias and SwiGLU fused, no host sync.

What: the same function as `kernels.moe.grouped_experts` (dense weights in transformers' layout,
W1 (E, H, 2I) interleaved gate/linear columns, W2 (E, I, H)) and `kernels.moe.mxfp4_experts` (frozen
MXFP4 checkpoint tensors), forward and backward, for CUDA tensors.
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

Frozen MXFP4 experts (`mxfp4_experts_triton`, checkpoint layout `*_blocks` / `*_scales`): the same
launches with the 4-bit weights decoded inside the B loads (`_b_tile`: e2m1 nibble and E8M0 scale to
fp32, then the compute dtype), so no dense copy of any expert exists; the backward skips the weight
gradients and gives x, the routing weights and the biases theirs (LoRA elsewhere trains on top).

Not here: block-size autotuning (the fixed BLOCK_* below are untuned: no GPU was available to tune
them) and TMA / warp-specialised loads; the first GPU session should benchmark and tune.
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
def _b_tile(b_ptr, s_ptr, e, kk, nn, mask, stride_be, stride_bk, stride_bn, stride_se, stride_so,
            MX: tl.constexpr):
    """B[kk, nn] of expert e for index tensors kk (BLOCK_K, 1), nn (1, BLOCK_N).

    MX == 0: dense, element strides (stride_be, stride_bk, stride_bn). MXFP4 (checkpoint layout: blocks
    (E, out, in/32, 16) uint8, element 2j in the low nibble, scales (E, out, in/32) E8M0): MX == 1 when B
    is the stored (out, in) matrix transposed (B[k, n] = M[n, k]), MX == 2 when B = M. Then stride_bk is
    the bytes per stored row (in/2) and stride_se / stride_so the scales' strides. Decoded in fp32,
    exactly `kernels.mxfp4.dequantize` (scale 0 -> 2^-127, 255 -> NaN).
    """
    if MX == 0:
        tile = tl.load(b_ptr + e.to(tl.int64) * stride_be + kk * stride_bk + nn * stride_bn, mask=mask, other=0.0)
    else:
        if MX == 1:
            o, i = nn, kk
        else:
            o, i = kk, nn
        byte = tl.load(b_ptr + e.to(tl.int64) * stride_be + o * stride_bk + i // 2, mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((i % 2) * 4)) & 0xF
        mag = nib & 7
        half_steps = (2 + (mag & 1)) << tl.maximum((mag >> 1) - 1, 0)  # e2m1 magnitude x 2 for mag >= 2
        val = tl.where(mag < 2, mag, half_steps).to(tl.float32) * 0.5
        val = tl.where(nib >= 8, -val, val)
        sc = tl.load(s_ptr + e.to(tl.int64) * stride_se + o * stride_so + i // 32, mask=mask, other=127).to(tl.int32)
        bits = tl.where(sc == 0, 0x00400000, tl.where(sc == 255, 0x7FC00000, sc << 23))
        tile = val * bits.to(tl.float32, bitcast=True)
    return tile


@triton.jit
def _up_swiglu_kernel(x_ptr, tok_ptr, w1_ptr, s1_ptr, b1_ptr, ws_ptr, u_ptr, y_ptr,
                      tile_expert_ptr, tile_row0_ptr, offsets_ptr,
                      H, I, stride_xm, stride_w1e, stride_w1k, stride_s1e, stride_s1o, stride_b1e, stride_um,
                      stride_ym, alpha, limit, MX: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """u[rows] = x[tok[rows]] @ W1_e + b1_e (interleaved), y[rows] = w * swiglu(u) for one row tile
    and BLOCK_N gate/linear column pairs. Gate and linear columns are two accumulators. W1 dense
    (E, H, 2I) (MX = 0) or MXFP4 blocks/scales of W1^T (MX = 1, see `_b_tile`)."""
    e, rows, m_row = _row_tile(tile_expert_ptr, tile_row0_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    pid_n = tl.program_id(1)
    src = tl.load(tok_ptr + rows, mask=m_row, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_col = cols < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m_k = ks < H
        a = tl.load(x_ptr + src[:, None] * stride_xm + ks[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
        m_b = m_k[:, None] & m_col[None, :]
        b_g = _b_tile(w1_ptr, s1_ptr, e, ks[:, None], 2 * cols[None, :], m_b, stride_w1e, stride_w1k, 1,
                      stride_s1e, stride_s1o, MX)
        b_l = _b_tile(w1_ptr, s1_ptr, e, ks[:, None], 2 * cols[None, :] + 1, m_b, stride_w1e, stride_w1k, 1,
                      stride_s1e, stride_s1o, MX)
        acc_g = tl.dot(a, b_g.to(a.dtype), acc_g, input_precision=PRECISION)
        acc_l = tl.dot(a, b_l.to(a.dtype), acc_l, input_precision=PRECISION)
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
def _grouped_mm_kernel(a_ptr, a_idx_ptr, b_ptr, s_ptr, c_ptr, tile_expert_ptr, tile_row0_ptr, offsets_ptr,
                       K, N, stride_am, stride_be, stride_bk, stride_bn, stride_se, stride_so, stride_cm,
                       u_ptr, ws_ptr, du_ptr, gy_ptr, stride_um, n_blocks, alpha, limit,
                       GATHER: tl.constexpr, SWIGLU_BWD: tl.constexpr, MX: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[rows] = a[rows or a_idx[rows]] @ B_e for one row tile, B_e any (K, N) strided view of expert e
    (MX = 0) or an MXFP4 expert matrix decoded in the load (MX = 1, 2: `_b_tile`).

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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m_k = ks < K
        a = tl.load(a_ptr + src[:, None] * stride_am + ks[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
        b = _b_tile(b_ptr, s_ptr, e, ks[:, None], cols[None, :], m_k[:, None] & m_col[None, :], stride_be,
                    stride_bk, stride_bn, stride_se, stride_so, MX)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
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


class _Operands:
    """The B operands of the four expert GEMMs as kernel arguments: dense transformers-layout W1 (E, H, 2I)
    and W2 (E, I, H), or MXFP4 checkpoint blocks/scales of W1^T (E, 2I, H/32, 16) / (E, 2I, H/32) and
    W2^T (E, H, I/32, 16) / (E, H, I/32), decoded inside the GEMM loads (never materialised dense)."""

    def __init__(self, w1=None, w2=None, mx=None):
        self.w1, self.w2 = w1, w2
        self.mx = None if mx is None else tuple(t.contiguous() for t in mx)

    def up(self) -> tuple:  # `_up_swiglu_kernel`: w1_ptr, s1_ptr, stride_w1e, stride_w1k, stride_s1e, stride_s1o, MX
        if self.mx is None:
            return self.w1, self.w1, self.w1.stride(0), self.w1.stride(1), 0, 0, 0
        b, sc = self.mx[0], self.mx[1]
        return b, sc, b.stride(0), b.stride(1), sc.stride(0), sc.stride(1), 1

    def b(self, which: str) -> tuple:
        """`_grouped_mm_kernel` B: "down" = W2_e (I, H), "down_t" = W2_e^T (H, I), "up_t" = W1_e^T (2I, H).
        Returns b_ptr, s_ptr, stride_be, stride_bk, stride_bn, stride_se, stride_so, MX."""
        w, transposed = {"down": (self.w2, False), "down_t": (self.w2, True), "up_t": (self.w1, True)}[which]
        if self.mx is None:
            sk, sn = (w.stride(2), w.stride(1)) if transposed else (w.stride(1), w.stride(2))
            return w, w, w.stride(0), sk, sn, 0, 0, 0
        b, sc = self.mx[2:] if which.startswith("down") else self.mx[:2]  # stored (out, in) = W^T
        return b, sc, b.stride(0), b.stride(1), 0, sc.stride(0), sc.stride(1), 2 if transposed else 1


class _TritonGroupedExperts(torch.autograd.Function):
    """Same contract as `kernels.moe._GroupedExperts` (inputs already in one dtype): dense weights get
    every gradient; MXFP4 weights (`mx`, frozen) give gradients to x, routing weights and biases only."""

    @staticmethod
    def forward(ctx, x, routing_weights, b1, b2, w1, w2, top_k_index, alpha, limit, mx):
        N, H = x.shape
        E, two_i = b1.shape
        I, k = two_i // 2, top_k_index.shape[-1]
        order, tok, inv, offsets, tile_expert, tile_row0 = expert_schedule(top_k_index, E)
        S, n_tiles, prec = order.numel(), tile_expert.numel(), _precision(x.dtype)
        x, b1 = x.contiguous(), b1.contiguous()
        ops = _Operands(None if w1 is None else w1.contiguous(), None if w2 is None else w2.contiguous(), mx)
        ws = routing_weights.reshape(-1)[order].to(x.dtype).contiguous()  # (S,)
        u, y, z = x.new_empty(S, two_i), x.new_empty(S, I), x.new_empty(S, H)
        w1_ptr, s1_ptr, sw1e, sw1k, ss1e, ss1o, mx1 = ops.up()
        _up_swiglu_kernel[(n_tiles, triton.cdiv(I, BLOCK_N))](
            x, tok, w1_ptr, s1_ptr, b1, ws, u, y, tile_expert, tile_row0, offsets, H, I, x.stride(0), sw1e, sw1k,
            ss1e, ss1o, b1.stride(0), u.stride(0), y.stride(0), float(alpha), float(limit),
            MX=mx1, PRECISION=prec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        b_ptr, s_ptr, *b_strides, mx2 = ops.b("down")
        _grouped_mm_kernel[(n_tiles, triton.cdiv(H, BLOCK_N))](
            y, tok, b_ptr, s_ptr, z, tile_expert, tile_row0, offsets, I, H, y.stride(0), *b_strides, z.stride(0),
            u, ws, u, ws, 0,
            1, 0.0, 0.0, GATHER=False, SWIGLU_BWD=False, MX=mx2, PRECISION=prec,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        R = x.new_zeros(N, E).scatter_add_(1, top_k_index, routing_weights.to(x.dtype))  # dense routing weights
        out = (R.float() @ b2.float() + _pair_sum(z, inv, k)).to(x.dtype)
        ctx.save_for_backward(x, u, ws, tok, inv, offsets, tile_expert, tile_row0, b2, R, top_k_index)
        ctx.ops, ctx.alpha, ctx.limit = ops, alpha, limit
        ctx.rw_shape, ctx.rw_dtype = routing_weights.shape, routing_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, u, ws, tok, inv, offsets, tile_expert, tile_row0, b2, R, top_k_index = ctx.saved_tensors
        ops = ctx.ops
        need_x, need_rw, need_b1, need_b2, need_w1, need_w2 = ctx.needs_input_grad[:6]
        grad_out = grad_out.contiguous().to(x.dtype)
        (S, two_i), (N, H), E, k = u.shape, x.shape, b2.shape[0], top_k_index.shape[-1]
        I, n_tiles, prec = two_i // 2, tile_expert.numel(), _precision(x.dtype)
        blocks = dict(PRECISION=prec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        outer = dict(PRECISION=prec, BLOCK_P=BLOCK_N, BLOCK_Q=BLOCK_N, BLOCK_R=BLOCK_K)
        # g = grad[tok] @ W2_e^T with the SwiGLU backward fused: wy = w * y, du, partial g . y
        nb = triton.cdiv(I, BLOCK_N)
        wy, du = x.new_empty(S, I), torch.empty_like(u)
        gy = torch.empty(S, nb, dtype=torch.float32, device=x.device)
        b_ptr, s_ptr, *b_strides, mx = ops.b("down_t")
        _grouped_mm_kernel[(n_tiles, nb)](
            grad_out, tok, b_ptr, s_ptr, wy, tile_expert, tile_row0, offsets, H, I, grad_out.stride(0), *b_strides,
            wy.stride(0),
            u, ws, du, gy, u.stride(0), nb, float(ctx.alpha), float(ctx.limit),
            GATHER=True, SWIGLU_BWD=True, MX=mx, **blocks)
        dx = dw1 = dw2 = db1 = db2 = drw = None
        if need_w2:  # dW2_e = (w y)^T grad[tok]: (E, I, H)
            dw2 = torch.empty_like(ops.w2)
            _expert_outer_kernel[(E, triton.cdiv(I, BLOCK_N), triton.cdiv(H, BLOCK_N))](
                wy, tok, grad_out, tok, dw2, dw2, offsets, I, H, wy.stride(0), grad_out.stride(0),
                dw2.stride(0), dw2.stride(1), A_GATHER=False, G_GATHER=True, COLSUM=False, **outer)
        if need_x:  # dx = sum over pairs of du @ W1_e^T
            dxs = x.new_empty(S, H)
            b_ptr, s_ptr, *b_strides, mx = ops.b("up_t")
            _grouped_mm_kernel[(n_tiles, triton.cdiv(H, BLOCK_N))](
                du, tok, b_ptr, s_ptr, dxs, tile_expert, tile_row0, offsets, two_i, H, du.stride(0), *b_strides,
                dxs.stride(0),
                u, ws, du, gy, u.stride(0), 1, 0.0, 0.0, GATHER=False, SWIGLU_BWD=False, MX=mx, **blocks)
            dx = _pair_sum(dxs, inv, k).to(x.dtype)
        if need_w1:  # dW1_e = x[tok]^T du and db1_e = column sums of du
            dw1 = torch.empty_like(ops.w1)
            colsum = torch.empty(E, two_i, dtype=torch.float32, device=x.device)
            _expert_outer_kernel[(E, triton.cdiv(H, BLOCK_N), triton.cdiv(two_i, BLOCK_N))](
                x, tok, du, tok, dw1, colsum, offsets, H, two_i, x.stride(0), du.stride(0), dw1.stride(0),
                dw1.stride(1), A_GATHER=True, G_GATHER=False, COLSUM=True, **outer)
            db1 = colsum.to(b2.dtype) if need_b1 else None
        elif need_b1:  # frozen weights, trainable biases: column sums of du per expert
            expert = torch.repeat_interleave(torch.arange(E, device=x.device), offsets.diff(), output_size=S)
            db1 = torch.zeros(E, two_i, dtype=torch.float32, device=x.device).index_add_(0, expert, du.float())
            db1 = db1.to(b2.dtype)
        if need_b2:
            db2 = (R.t().float() @ grad_out.float()).to(b2.dtype)  # (E, H); idle experts have R = 0
        if need_rw:  # g . y per pair, plus the b2 term d(R @ b2)/dR at the chosen experts
            drw = gy.sum(1).index_select(0, inv).view(ctx.rw_shape)
            drw = (drw + (grad_out.float() @ b2.float().t()).gather(1, top_k_index)).to(ctx.rw_dtype)
        return dx, drw, db1, db2, dw1, dw2, None, None, None, None


def grouped_experts_triton(x, top_k_index, routing_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                           down_proj_bias, alpha, limit):
    """x (N, H) in the weights' dtype, top_k_index/routing_weights (N, k), transformers-layout dense
    weights -> (N, H). Shapes are checked by the caller (`kernels.moe.grouped_experts`)."""
    return _TritonGroupedExperts.apply(x, routing_weights, gate_up_proj_bias, down_proj_bias, gate_up_proj,
                                       down_proj, top_k_index, alpha, limit, None)


def mxfp4_experts_triton(x, top_k_index, routing_weights, gate_up_proj_blocks, gate_up_proj_scales,
                         gate_up_proj_bias, down_proj_blocks, down_proj_scales, down_proj_bias, alpha, limit):
    """Frozen MXFP4 experts in the checkpoint layout (`kernels.moe.mxfp4_experts`, which checks shapes),
    decoded inside the GEMMs; x and the biases in the compute dtype. Gradients: x, routing weights, biases."""
    mx = (gate_up_proj_blocks, gate_up_proj_scales, down_proj_blocks, down_proj_scales)
    return _TritonGroupedExperts.apply(x, routing_weights, gate_up_proj_bias, down_proj_bias, None, None,
                                       top_k_index, alpha, limit, mx)
