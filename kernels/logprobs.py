"""Chunked selective log-softmax and entropy that never materialise (B, T, V) logits.

What: from hidden states h (B, T, H), the unembedding W (V, H) and target ids (B, T):
    z = h W^T / temperature,  logprob = z[target] - logsumexp(z),  entropy = logsumexp(z) - sum_v p_v z_v
both (B, T), with gradients for h and W.

How: tiles of `chunk_size` tokens x `vocab_chunk` vocabulary rows. The forward runs an online
log-sum-exp over vocabulary tiles (running max m, sum exp(z - m), sum exp(z - m) z) and keeps only
three numbers per token (lse, entropy, the target logit). The backward (`_ChunkedLogprobs`)
recomputes each tile's logits, loops vocabulary tiles outside and token tiles inside so every dW tile
is finished before the next one starts, and uses
    d logprob / dz = onehot(target) - p,      d entropy / dz = -p (z - lse + entropy).
Peak memory is O(chunk_size x vocab_chunk) plus the (N, H) input gradient and the weight-sized dW,
independent of T and V. `logprobs_and_entropy_ref` is the plain full-logits twin.

Run: `kernels.logprobs.selective_log_softmax(h, W, targets, temperature=, chunk_size=)` (the learner's
call); `peak_bytes()` is the allocation counter the tests and bench/bench_kernels.py measure with.
Tests: tests/kernels/test_logprobs.py.

Departure from the usual recipe (log_softmax over full logits): statistics in fp32 whatever the
input dtype; targets must be valid ids (no ignore index; mask the result instead).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DEFAULT_CHUNK = 1024  # tokens per tile
DEFAULT_VOCAB_CHUNK = 4096  # vocabulary rows per tile: a 1024 x 4096 fp32 tile is 16 MiB


def logprobs_and_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-logits twin: (B, T, H), (V, H), (B, T) -> logprobs (B, T), entropy (B, T)."""
    logits = (hidden @ weight.t()).to(_acc(hidden.dtype)) / temperature  # (B, T, V)
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_logits(h: torch.Tensor, w: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """(n, H) x (v, H) -> (n, v) logits of one tile in the statistics dtype."""
    return (h @ w.t()).to(_acc(h.dtype)).mul_(inv_temp)


def _target_logit(z: torch.Tensor, tgt: torch.Tensor, v0: int) -> torch.Tensor:
    """z[i, tgt_i - v0] where the target falls inside the tile [v0, v0 + v), else 0. (n,)"""
    local = tgt - v0
    inside = (local >= 0) & (local < z.shape[1])
    return z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1) * inside


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, inv_temp, chunk, vchunk):
        # h (N, H), weight (V, H), targets (N,)
        N, V = h.shape[0], weight.shape[0]
        acc = _acc(h.dtype)
        lse, ent, lp = (torch.empty(N, device=h.device, dtype=acc) for _ in range(3))
        for a in range(0, N, chunk):
            hc, tc = h[a:a + chunk], targets[a:a + chunk]
            m = torch.full((hc.shape[0],), -torch.inf, device=h.device, dtype=acc)  # running max
            s = torch.zeros_like(m)  # sum exp(z - m)
            t = torch.zeros_like(m)  # sum exp(z - m) z
            zt = torch.zeros_like(m)  # target logit
            for v0 in range(0, V, vchunk):
                z = _tile_logits(hc, weight[v0:v0 + vchunk], inv_temp)  # (n, v)
                zt += _target_logit(z, tc, v0)
                m_new = torch.maximum(m, z.amax(1))
                rescale = torch.exp(m - m_new)
                z.sub_(m_new[:, None])  # (n, v) z - m: two tiles alive at most
                e = torch.exp(z)
                e_sum = e.sum(1)
                # sum e z = sum e (z - m) + m sum e
                t = t * rescale + torch.linalg.vecdot(e, z) + m_new * e_sum
                s = s * rescale + e_sum
                m = m_new
                del z, e
            lse[a:a + chunk] = m + s.log()
            ent[a:a + chunk] = lse[a:a + chunk] - t / s
            lp[a:a + chunk] = zt - lse[a:a + chunk]
        ctx.save_for_backward(h, weight, targets, lse, ent)
        ctx.inv_temp, ctx.chunk, ctx.vchunk = inv_temp, chunk, vchunk
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, weight, targets, lse, ent = ctx.saved_tensors
        inv_temp, chunk, vchunk = ctx.inv_temp, ctx.chunk, ctx.vchunk
        need_h, need_w = ctx.needs_input_grad[:2]
        N, V, acc = h.shape[0], weight.shape[0], lse.dtype
        g_lp = torch.zeros(N, device=h.device, dtype=acc) if g_lp is None else g_lp.to(acc)
        g_ent = torch.zeros(N, device=h.device, dtype=acc) if g_ent is None else g_ent.to(acc)
        dh = torch.zeros(h.shape, device=h.device, dtype=acc) if need_h else None  # (N, H)
        dw = torch.empty_like(weight) if need_w else None  # (V, H)
        for v0 in range(0, V, vchunk):
            wc = weight[v0:v0 + vchunk]  # (v, H)
            dwc = torch.zeros(wc.shape, device=h.device, dtype=acc) if need_w else None
            for a in range(0, N, chunk):
                hc, sl = h[a:a + chunk], slice(a, a + chunk)
                logp = _tile_logits(hc, wc, inv_temp).sub_(lse[sl, None])  # (n, v) log p
                p = torch.exp(logp)
                # gz = -p (g_lp + g_ent (log p + entropy)) + g_lp onehot, times 1/temperature
                gz = logp.add_(ent[sl, None]).mul_(g_ent[sl, None]).add_(g_lp[sl, None]).mul_(p).neg_()
                del p
                local = targets[sl] - v0
                inside = ((local >= 0) & (local < wc.shape[0])).nonzero().squeeze(1)
                gz[inside, local[inside]] += g_lp[sl][inside]
                gz = gz.mul_(inv_temp).to(h.dtype)
                if need_h:
                    dh[sl] += (gz @ wc).to(acc)
                if need_w:
                    dwc += (gz.t() @ hc).to(acc)
                del gz
            if need_w:
                dw[v0:v0 + vchunk] = dwc
        return (dh.to(h.dtype) if need_h else None), dw, None, None, None, None


def logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
                         vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, H), weight (V, H), targets (B, T) ids in [0, V) -> logprobs (B, T), entropy (B, T), fp32."""
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"expected hidden (B, T, H), weight (V, H), targets (B, T); got {tuple(hidden.shape)=}, "
                         f"{tuple(weight.shape)=}, {tuple(targets.shape)=}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be ids in [0, {weight.shape[0]}); got [{int(targets.min())}, "
                         f"{int(targets.max())}] (mask ignored positions after the call instead)")
    if temperature <= 0 or chunk_size < 1 or vocab_chunk < 1:
        raise ValueError(f"need temperature > 0, chunk sizes >= 1; got {temperature=}, {chunk_size=}, {vocab_chunk=}")
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    lp, ent = _ChunkedLogprobs.apply(h, w, targets.reshape(-1), 1.0 / temperature, chunk_size, vocab_chunk)
    return lp.view(lead), ent.view(lead)


def selective_log_softmax(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
                          vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> torch.Tensor:
    """log p(target) under softmax(h W^T / temperature): (B, T, H), (V, H), (B, T) -> (B, T) fp32."""
    return logprobs_and_entropy(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
                                vocab_chunk=vocab_chunk)[0]


# ---- allocation counter --------------------------------------------------------------------------
@dataclass
class PeakBytes:
    peak: int = 0  # most bytes of tensor storage alive at once, counting only storages made inside
    current: int = 0


class _StorageCounter(TorchDispatchMode):
    """Counts storages created by non-aliasing ops (views and in-place results are not new memory)."""

    def __init__(self, result: PeakBytes):
        super().__init__()
        self.result, self.live = result, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        if not any(r.alias_info is not None for r in func._schema.returns):
            from torch.multiprocessing.reductions import StorageWeakRef

            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref.cdata not in self.live:
                        self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                        self.result.current += self.live[ref.cdata][1]
            self.result.peak = max(self.result.peak, self.result.current)
        return out

    def _sweep(self):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.result.current -= self.live.pop(key)[1]


@contextlib.contextmanager
def peak_bytes():
    """`with peak_bytes() as r: ...` -> r.peak: most bytes held at once by tensors created inside
    (autograd's saved tensors and backward buffers included; inputs and weights made outside are not)."""
    result = PeakBytes()
    with _StorageCounter(result):
        yield result
