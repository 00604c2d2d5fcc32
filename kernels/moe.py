"""Grouped MoE experts for gpt-oss: forward and hand-written backward, dense or frozen MXFP4 base.

What: the expert half of gpt-oss' MoE block (the router stays transformers' `GptOssTopKRouter`).
For each token t and each of its top-k experts e with routing weight w_te:

    u = x_t @ W1_e + b1_e              W1 = gate_up_proj (E, H, 2I): columns INTERLEAVED, even = gate, odd = linear
    a = min(u[::2], 7); l = clamp(u[1::2], -7, 7)
    y = a * sigmoid(1.702 a) * (l + 1)  clamped SwiGLU with the +1
    z = y @ W2_e + b2_e                W2 = down_proj (E, I, H); the down bias sits inside the weighted sum
    out_t = sum_e w_te z

How: the (token, expert) pairs are sorted by expert (stable argsort of the top-k assignment), the
per-expert counts come from one `bincount`, and the loop runs over ACTIVE experts only, one `addmm`
per expert and projection straight into row slices of preallocated buffers. The backward is written by
hand (`_GroupedExperts`): it keeps only the pre-activation `u` (S, 2I), recomputes the SwiGLU from it,
re-gathers the tokens from `x`, and gets the routing-weight gradient from a row-dot with the
unweighted down-projection gradient, so no (S, H) expert output is stored.

Frozen MXFP4 base: `FrozenMxfp4Experts` holds the checkpoint tensors (`gate_up_proj_blocks`,
`gate_up_proj_scales`, ... exactly the names and layouts of the gpt-oss safetensors) and dequantises
each ACTIVE expert on the fly, forward and again in backward (nothing dense is kept). Its backward
gives gradients to the activations, the routing weights and the (bf16) biases if they require grad,
never to the 4-bit weights, so adapters elsewhere (PEFT LoRA on attention, router, ...) train on top.
Decoding is `kernels.mxfp4.dequantize`; the format is not re-implemented here.

Use: `kernels.patch.apply_kernels(model)` switches a `GptOssForCausalLM` to `grouped_experts_forward`
through transformers' `ExpertsInterface`; `GroupedExperts` is the same thing as a stand-alone module
(parameter names of `GptOssExperts`, so state dicts load unchanged). Tests: tests/kernels/test_moe.py.

Departures from transformers: no expert-parallel sentinels; no (S, H) gather of biases; on CUDA the
SwiGLU runs as the fused Triton kernel in `kernels/moe_triton.py` (fwd + bwd), elsewhere in torch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


# ---- clamped SwiGLU (reference twin of kernels/moe_triton.py) ------------------------------------
def swiglu(gate_up: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """(..., 2I) interleaved [gate, linear] -> (..., I), as `GptOssExperts._apply_gate`."""
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def swiglu_backward(gate_up: torch.Tensor, grad_y: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                    limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """d swiglu / d gate_up: (..., 2I) pre-activation, (..., I) grad -> (..., 2I) interleaved grad.

    Clamp gradients follow torch: they pass where the input lies inside the closed interval.
    """
    g_raw, u_raw = gate_up[..., ::2], gate_up[..., 1::2]
    g = g_raw.clamp(max=limit)
    u = u_raw.clamp(min=-limit, max=limit)
    s = torch.sigmoid(alpha * g)
    glu = g * s
    d_g = grad_y * (u + 1) * (s + alpha * glu * (1 - s)) * (g_raw <= limit)
    d_u = grad_y * glu * ((u_raw >= -limit) & (u_raw <= limit))
    return torch.stack((d_g, d_u), dim=-1).flatten(-2)  # (..., I, 2) -> (..., 2I)


def _to_split(t: torch.Tensor) -> torch.Tensor:
    """(..., 2I) interleaved [g0, l0, g1, l1, ...] -> (..., 2I) split [g0, g1, ... | l0, l1, ...] (a copy)."""
    return t.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def _to_interleaved(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `_to_split`."""
    return t.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


def _swiglu_split(u: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """`swiglu` on the split layout (n, 2I) = [gate | linear], in few contiguous passes (CPU hot path)."""
    if u.is_cuda:
        from kernels.moe_triton import swiglu_triton

        return swiglu_triton(u, alpha, limit, interleaved=False)
    half = u.shape[-1] // 2
    y = u[:, :half].clamp(max=limit)  # (n, I) gate
    s = torch.mul(y, alpha).sigmoid_()
    y.mul_(s)  # glu
    torch.clamp(u[:, half:], -limit, limit, out=s)
    return y.addcmul_(y, s)  # glu * (lin + 1)


def _swiglu_split_backward(u: torch.Tensor, dy: torch.Tensor, alpha: float,
                           limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Recomputed `y` and d gate_up on the split layout: (n, 2I), (n, I) -> (n, I), (n, 2I) [d gate | d lin].

    One sigmoid for both; masks as float 0/1 (bool-valued compares are ~5x slower on CPU).
    """
    if u.is_cuda:
        from kernels.moe_triton import swiglu_backward_triton

        return swiglu_backward_triton(u, dy, alpha, limit, interleaved=False, return_y=True)
    half = u.shape[-1] // 2
    ug, ul = u[:, :half], u[:, half:]
    du = torch.empty_like(u)
    dg, dl = du[:, :half], du[:, half:]
    g = ug.clamp(max=limit)
    s = torch.mul(g, alpha).sigmoid_()
    glu = g.mul_(s)
    lin1 = ul.clamp(min=-limit, max=limit).add_(1)
    y = glu * lin1
    # d gate = dy (lin + 1) (s + alpha glu (1 - s)) [gate <= limit]; d lin = dy glu [|lin| <= limit]
    torch.addcmul(glu, glu, s, value=-1, out=dg).mul_(alpha).add_(s).mul_(lin1).mul_(dy)
    dg.mul_(torch.le(ug, limit, out=s))
    torch.mul(glu, dy, out=dl).mul_(torch.abs(ul, out=lin1).le_(limit))
    return y, du


# ---- weights: dense parameters or frozen MXFP4 blocks --------------------------------------------
class _DenseWeights:
    """Per-expert weights of transformers' layout W1 (E, H, 2I), W2 (E, I, H); `up` returns split columns."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor):
        self.w1, self.w2 = w1, w2

    def up(self, e: int) -> torch.Tensor:  # (H, 2I) split [gate | linear] (copy: E*H*2I per step in all)
        return _to_split(self.w1[e])

    def down(self, e: int) -> torch.Tensor:  # (I, H)
        return self.w2[e]


class _Mxfp4Weights:
    """Checkpoint-layout MXFP4 experts, decoded one active expert at a time (never kept dense).

    blocks1 (E, 2I, H/32, 16) + scales1 (E, 2I, H/32) decode to (2I, H) = W1_e^T (rows interleaved);
    blocks2 (E, H, I/32, 16) + scales2 (E, H, I/32) decode to (H, I) = W2_e^T.
    """

    def __init__(self, blocks1, scales1, blocks2, scales2, dtype: torch.dtype, dequantize: Callable | None = None):
        if dequantize is None:
            from kernels.mxfp4 import dequantize
        self.b1, self.s1, self.b2, self.s2 = blocks1, scales1, blocks2, scales2
        self.dtype, self.dequantize = dtype, dequantize

    def up(self, e: int) -> torch.Tensor:  # (H, 2I) split, as a transposed view of the decoded rows
        w = self.dequantize(self.b1[e], self.s1[e], self.dtype)  # (2I, H)
        return w.unflatten(0, (-1, 2)).transpose(0, 1).flatten(0, 1).t()  # (2I, H) rows split -> (H, 2I)

    def down(self, e: int) -> torch.Tensor:  # (I, H)
        return self.dequantize(self.b2[e], self.s2[e], self.dtype).t()


# ---- routing bookkeeping -------------------------------------------------------------------------
def _sort_by_expert(top_k_index: torch.Tensor, num_experts: int, tile: int):
    """Sorted pair order, owning token of each sorted pair, and row tiles (e, start, end) of active experts."""
    flat = top_k_index.reshape(-1)  # (S,) S = N * k
    order = torch.argsort(flat, stable=True)  # (S,)
    tok = order // top_k_index.shape[-1]  # (S,)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync
    tiles, start = [], 0
    for e, n in enumerate(counts):
        tiles += [(e, r, min(r + tile, start + n)) for r in range(start, start + n, tile)]
        start += n
    return order, tok, tiles


# Rows per tile on CPU: a tile's (rows, 2I) pre-activation should stay in L2 while the SwiGLU and the
# down projection read it (elementwise work on L2-resident tiles is ~5x faster than on whole arrays).
CPU_ROW_TILE = 512


class _GroupedExperts(torch.autograd.Function):
    """out = sum_k w_k * expert_k(x); gradients for x, routing weights, biases and (dense) weights.

    Saved: x, the split-layout pre-activation u (S, 2I), routing weights in pair order and the
    permutation; the SwiGLU, the gathered tokens and the per-expert weights are recomputed.
    """

    @staticmethod
    def forward(ctx, x, routing_weights, b1, b2, w1, w2, top_k_index, weights, alpha, limit):
        # x (N, H); routing_weights (N, k); b1 (E, 2I); b2 (E, H); w1/w2 only carry autograd for dense
        N, H = x.shape
        tile = top_k_index.numel() if x.is_cuda else CPU_ROW_TILE
        order, tok, tiles = _sort_by_expert(top_k_index, b1.shape[0], tile)
        ws = routing_weights.reshape(-1)[order].to(x.dtype)  # (S,)
        b1s = _to_split(b1)  # (E, 2I)
        u = x.new_empty(order.shape[0], b1.shape[1])  # (S, 2I) split layout
        out = x.new_zeros(N, H)  # (N, H)
        e_prev = -1
        for e, s, t in tiles:
            if e != e_prev:
                w_up, w_down, e_prev = weights.up(e), weights.down(e), e
            ut = torch.addmm(b1s[e], x.index_select(0, tok[s:t]), w_up, out=u[s:t])  # (n, 2I)
            z = torch.addmm(b2[e], _swiglu_split(ut, alpha, limit), w_down)  # (n, H)
            out.index_add_(0, tok[s:t], z.mul_(ws[s:t, None]))
        ctx.save_for_backward(x, u, ws, order, tok, b2)
        ctx.tiles, ctx.weights, ctx.alpha, ctx.limit = tiles, weights, alpha, limit
        ctx.rw_shape, ctx.rw_dtype = routing_weights.shape, routing_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, u, ws, order, tok, b2 = ctx.saved_tensors
        tiles, weights, alpha, limit = ctx.tiles, ctx.weights, ctx.alpha, ctx.limit
        need_x, need_rw, need_b1, need_b2, need_w1, need_w2 = ctx.needs_input_grad[:6]
        grad_out = grad_out.contiguous().to(x.dtype)
        E, two_i = b2.shape[0], u.shape[1]
        dx = torch.zeros_like(x) if need_x else None
        dws = ws.new_empty(ws.shape)  # (S,)
        dw1 = x.new_zeros(E, x.shape[1], two_i) if need_w1 else None  # split columns until the end
        dw2 = torch.zeros_like(weights.w2) if need_w2 else None
        db1 = x.new_zeros(E, two_i) if need_b1 else None
        db2 = torch.zeros_like(b2) if need_b2 else None
        e_prev = -1
        for e, s, t in tiles:
            if e != e_prev:
                w_up, w_down, e_prev = weights.up(e), weights.down(e), e
            idx, ut, wt = tok[s:t], u[s:t], ws[s:t, None]
            go = grad_out.index_select(0, idx)  # (n, H) output grad of this pair, before the weight
            g = go @ w_down.t()  # (n, I) output grad through W2, before the weight
            y, du = _swiglu_split_backward(ut, g * wt, alpha, limit)  # (n, I), (n, 2I); y recomputed
            # d w = go . z = go . (y W2 + b2) = g . y + go . b2
            torch.add(torch.linalg.vecdot(g, y), go @ b2[e], out=dws[s:t])
            go.mul_(wt)
            if need_w2:
                dw2[e].addmm_(y.t(), go)
            if need_b2:
                db2[e] += go.sum(0)
            if need_b1:
                db1[e] += du.sum(0)
            if need_x:
                dx.index_add_(0, idx, du @ w_up.t())
            if need_w1:
                dw1[e].addmm_(x.index_select(0, idx).t(), du)
        drw = None
        if need_rw:
            drw = torch.empty_like(dws)
            drw[order] = dws
            drw = drw.reshape(ctx.rw_shape).to(ctx.rw_dtype)
        dw1 = _to_interleaved(dw1) if need_w1 else None
        db1 = _to_interleaved(db1) if need_b1 else None
        return dx, drw, db1, db2, dw1, dw2, None, None, None, None


def _check_shapes(x, top_k_index, routing_weights, b1, b2):
    if x.dim() != 2 or top_k_index.shape != routing_weights.shape or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (N, H), top_k_index and routing weights (N, k); got {tuple(x.shape)=}, "
                         f"{tuple(top_k_index.shape)=}, {tuple(routing_weights.shape)=}")
    if b1.shape[0] != b2.shape[0] or b2.shape[1] != x.shape[1] or b1.shape[1] % 2:
        raise ValueError(f"biases do not match: {tuple(b1.shape)=} should be (E, 2I), "
                         f"{tuple(b2.shape)=} should be (E, {x.shape[1]})")


def grouped_experts(x: torch.Tensor, top_k_index: torch.Tensor, routing_weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor, down_proj: torch.Tensor,
                    down_proj_bias: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                    limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """Dense experts in transformers' layout. x (N, H), top_k_index/routing_weights (N, k),
    gate_up_proj (E, H, 2I), gate_up_proj_bias (E, 2I), down_proj (E, I, H), down_proj_bias (E, H) -> (N, H)."""
    _check_shapes(x, top_k_index, routing_weights, gate_up_proj_bias, down_proj_bias)
    if gate_up_proj.shape != (gate_up_proj_bias.shape[0], x.shape[1], gate_up_proj_bias.shape[1]):
        raise ValueError(f"{tuple(gate_up_proj.shape)=} should be (E, H, 2I) = "
                         f"{(gate_up_proj_bias.shape[0], x.shape[1], gate_up_proj_bias.shape[1])}")
    x_in = x.to(gate_up_proj.dtype)
    out = _GroupedExperts.apply(x_in, routing_weights, gate_up_proj_bias.to(x_in.dtype),
                                down_proj_bias.to(x_in.dtype), gate_up_proj, down_proj, top_k_index,
                                _DenseWeights(gate_up_proj, down_proj), alpha, limit)
    return out.to(x.dtype)


def mxfp4_experts(x: torch.Tensor, top_k_index: torch.Tensor, routing_weights: torch.Tensor,
                  gate_up_proj_blocks: torch.Tensor, gate_up_proj_scales: torch.Tensor,
                  gate_up_proj_bias: torch.Tensor, down_proj_blocks: torch.Tensor,
                  down_proj_scales: torch.Tensor, down_proj_bias: torch.Tensor, *, alpha: float = SWIGLU_ALPHA,
                  limit: float = SWIGLU_LIMIT, compute_dtype: torch.dtype | None = None,
                  dequantize: Callable | None = None) -> torch.Tensor:
    """Frozen MXFP4 experts in the checkpoint layout: gate_up_proj_blocks (E, 2I, H/32, 16) uint8,
    gate_up_proj_scales (E, 2I, H/32) uint8, down_proj_blocks (E, H, I/32, 16), down_proj_scales (E, H, I/32).
    Gradients reach x, the routing weights and the biases, never the 4-bit weights."""
    _check_shapes(x, top_k_index, routing_weights, gate_up_proj_bias, down_proj_bias)
    E, two_i = gate_up_proj_bias.shape
    H = x.shape[1]
    want = {"gate_up_proj_blocks": (E, two_i, H // 32, 16), "gate_up_proj_scales": (E, two_i, H // 32),
            "down_proj_blocks": (E, H, two_i // 64, 16), "down_proj_scales": (E, H, two_i // 64)}
    got = {"gate_up_proj_blocks": gate_up_proj_blocks, "gate_up_proj_scales": gate_up_proj_scales,
           "down_proj_blocks": down_proj_blocks, "down_proj_scales": down_proj_scales}
    for name, shape in want.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(f"{name}.shape={tuple(got[name].shape)} but x (N, {H}) and bias (E, 2I)=({E}, {two_i}) "
                             f"need {shape}; H and I must be multiples of 32")
    dtype = compute_dtype or x.dtype
    weights = _Mxfp4Weights(gate_up_proj_blocks, gate_up_proj_scales, down_proj_blocks, down_proj_scales,
                            dtype, dequantize)
    out = _GroupedExperts.apply(x.to(dtype), routing_weights, gate_up_proj_bias.to(dtype),
                                down_proj_bias.to(dtype), None, None, top_k_index, weights, alpha, limit)
    return out.to(x.dtype)


# ---- transformers integration --------------------------------------------------------------------
def grouped_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """`ExpertsInterface` function: `self` is a transformers `GptOssExperts` (parameters unchanged)."""
    return grouped_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.gate_up_proj_bias,
                           self.down_proj, self.down_proj_bias, self.alpha, self.limit)


class GroupedExperts(nn.Module):
    """Drop-in for `GptOssExperts`: same parameter names and shapes, grouped forward/backward."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.alpha, self.limit = alpha, limit

    @classmethod
    def from_stock(cls, experts: nn.Module) -> GroupedExperts:
        """Wrap a transformers `GptOssExperts`, sharing (not copying) its parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_experts, new.hidden_size = experts.num_experts, experts.hidden_size
        new.intermediate_size, new.alpha, new.limit = experts.intermediate_size, experts.alpha, experts.limit
        for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            setattr(new, name, getattr(experts, name))
        return new

    def forward(self, hidden_states, router_indices, routing_weights):  # (N, H), (N, k), (N, k) -> (N, H)
        return grouped_experts_forward(self, hidden_states, router_indices, routing_weights)


class FrozenMxfp4Experts(nn.Module):
    """Frozen MXFP4 base experts (checkpoint tensor names), forward/backward to activations only.

    Drop in as `layer.mlp.experts`; the blocks/scales are buffers (no grad), the biases are parameters
    with `requires_grad=False` by default (flip them on to train the biases).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if hidden_size % 32 or intermediate_size % 32:
            raise ValueError(f"MXFP4 groups are 32 wide: {hidden_size=} and {intermediate_size=} must be multiples of 32")
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.alpha, self.limit, self.compute_dtype = alpha, limit, compute_dtype
        u8 = torch.uint8
        self.register_buffer("gate_up_proj_blocks", torch.zeros(E, 2 * I, H // 32, 16, dtype=u8))
        self.register_buffer("gate_up_proj_scales", torch.full((E, 2 * I, H // 32), 127, dtype=u8))
        self.register_buffer("down_proj_blocks", torch.zeros(E, H, I // 32, 16, dtype=u8))
        self.register_buffer("down_proj_scales", torch.full((E, H, I // 32), 127, dtype=u8))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I, dtype=compute_dtype), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H, dtype=compute_dtype), requires_grad=False)

    def forward(self, hidden_states, router_indices, routing_weights):  # (N, H), (N, k), (N, k) -> (N, H)
        return mxfp4_experts(hidden_states, router_indices, routing_weights, self.gate_up_proj_blocks,
                             self.gate_up_proj_scales, self.gate_up_proj_bias, self.down_proj_blocks,
                             self.down_proj_scales, self.down_proj_bias, alpha=self.alpha, limit=self.limit,
                             compute_dtype=self.compute_dtype)
