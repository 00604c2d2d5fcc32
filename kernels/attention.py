"""Attention with learned sinks, sliding window and GQA for gpt-oss: forward and backward.

What: per query head h, P_k = exp(s_k) / (sum_j exp(s_j) + exp(S_h)), o = sum_k P_k v_k, with
s = q.k * scale, causal, optionally a sliding window (query i sees keys i-W+1 .. i) and key padding.
The sink S_h takes probability mass but has no value. Gradients for q, k, v and the sinks; the sink
gradient is dL/dS_h = -sum_q P_sink(q) (dO_q . O_q).

How: `sink_attention` is flash-style in plain torch. Queries go in blocks; each block only meets the
keys it can see (block-causal for full layers, the window band for sliding ones), so a sliding layer
never builds a T x T score matrix and a full layer builds at most a (block x T) slice. The forward
keeps the per-row log-sum-exp (sink included) and the backward recomputes each block's
probabilities from it (`_SinkAttention`). GQA: the G query heads of one KV head are stacked into the
row dimension of one matmul, so K and V are never repeated. `sink_attention_ref` is the dense plain
autograd twin (transformers' eager maths); `kernels/attention_triton.py` is the Triton twin.

transformers: `sink_attention_forward` has the signature of an `AttentionInterface` function and
`sink_attention_mask` the one of an `AttentionMaskInterface` function; `kernels.patch.apply_kernels`
registers both under "deliberate_sink". The mask function hands over None (plain causal/sliding) or
the 2D key-padding mask, which the blocked path handles natively; anything else (packed sequences,
custom mask functions, KV-cache offsets) gets transformers' 4D eager mask and the dense reference.

Departures from transformers' eager: no max-subtraction over the concatenated sink logit (we
subtract the running max, same result), softmax statistics in fp32 for every input dtype, dropout is
not supported natively (falls back to transformers' eager). Tests: tests/kernels/test_attention.py.
"""
from __future__ import annotations

import math

import torch

DEFAULT_BLOCK = 64  # query rows per block (per query head); measured best on CPU for T 512..4096
SMALL_WINDOW_BLOCK = 32  # windows below DEFAULT_BLOCK: smaller blocks waste fewer masked scores


# ---- dense reference (plain autograd) ------------------------------------------------------------
def band_mask(q_len: int, k_len: int, window: int | None, q_offset: int = 0,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """(q_len, k_len) bool: key j visible from query i (at position q_offset + i) under causal + window."""
    qpos = torch.arange(q_len, device=device)[:, None] + q_offset
    kpos = torch.arange(k_len, device=device)[None, :]
    ok = kpos <= qpos
    if window is not None:
        ok &= kpos > qpos - window
    return ok


def sink_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                       window: int | None = None, key_padding_mask: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense twin. q (B, Hq, T, D), k/v (B, Hkv, Tk, D), sinks (Hq,) -> (B, T, Hq, D).

    `attn_mask`: optional 4D additive float (or bool, True = keep) mask (B or 1, 1 or Hq, T, Tk) that
    replaces the causal/window/padding rule (transformers' eager mask); otherwise causal + window with
    queries at the last T positions, and `key_padding_mask` (B, Tk) bool, True = real token.
    """
    B, Hq, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    k = k.repeat_interleave(G, dim=1)  # (B, Hq, Tk, D)
    v = v.repeat_interleave(G, dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale  # (B, Hq, T, Tk)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.to(acc)
    else:
        keep = band_mask(T, Tk, window, Tk - T, q.device)[None, None]  # (1, 1, T, Tk)
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[:, None, None, :].bool()
        s = s.masked_fill(~keep, -math.inf)
    sink = sinks.to(acc).reshape(1, Hq, 1, 1).expand(B, Hq, T, 1)
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]  # (B, Hq, T, Tk), sink dropped
    return torch.matmul(p.to(v.dtype), v).transpose(1, 2)  # (B, T, Hq, D)


# ---- blocked flash-style path --------------------------------------------------------------------
def _blocks(T: int, Tk: int, block: int, window: int | None, q_offset: int):
    """(q0, q1, k0, k1) per query block: the key range the block can see."""
    for q0 in range(0, T, block):
        q1 = min(T, q0 + block)
        k1 = min(Tk, q_offset + q1)
        k0 = 0 if window is None else max(0, q_offset + q0 - window + 1)
        yield q0, q1, k0, min(max(k0, k1), Tk)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias(q0, q1, k0, k1, window, q_offset, kpm, device, acc) -> torch.Tensor:
    """Additive bias (0 / -inf): (q1-q0, k1-k0), or (B, 1, 1, q1-q0, k1-k0) with key padding."""
    keep = band_mask(q1 - q0, k1 - k0, window, q_offset + q0 - k0, device)
    bias = torch.zeros(keep.shape, device=device, dtype=acc).masked_fill_(~keep, -math.inf)
    if kpm is not None:
        pad = torch.zeros(kpm.shape[0], k1 - k0, device=device, dtype=acc).masked_fill_(~kpm[:, k0:k1], -math.inf)
        bias = bias + pad[:, None, None, None, :]  # (B, 1, 1, nq, nk)
    return bias


def _scores(q5, k, q0, q1, k0, k1, scale, bias):
    """Block scores (B, Hkv, G, nq, nk) in the bias' dtype with the mask applied."""
    B, Hkv, G, _, D = q5.shape
    qb = q5[:, :, :, q0:q1].reshape(B, Hkv, G * (q1 - q0), D)  # (B, Hkv, G*nq, D)
    s = torch.matmul(qb, k[:, :, k0:k1].transpose(-1, -2)).to(bias.dtype)  # (B, Hkv, G*nq, nk)
    s = s.view(B, Hkv, G, q1 - q0, k1 - k0).mul_(scale)
    return s.add_(bias), qb


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, window, kpm, block, q_offset):
        B, Hq, T, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        q5 = q.view(B, Hkv, G, T, D)
        acc = _acc(q.dtype)
        sink = sinks.to(acc).view(1, Hkv, G, 1)
        out = q.new_empty(B, Hkv, G, T, D)  # (B, Hkv, G, T, D)
        lse = torch.empty(B, Hkv, G, T, device=q.device, dtype=acc)  # sink included
        for q0, q1, k0, k1 in _blocks(T, Tk, block, window, q_offset):
            bias = _bias(q0, q1, k0, k1, window, q_offset, kpm, q.device, acc)
            s, _ = _scores(q5, k, q0, q1, k0, k1, scale, bias)  # (B, Hkv, G, nq, nk)
            m = torch.maximum(s.amax(-1), sink)  # (B, Hkv, G, nq); finite thanks to the sink
            p = s.sub_(m[..., None]).exp_()
            denom = p.sum(-1).add_(torch.exp(sink - m))
            o = torch.matmul(p.to(v.dtype).view(B, Hkv, -1, k1 - k0), v[:, :, k0:k1])  # (B, Hkv, G*nq, D)
            out[:, :, :, q0:q1] = o.view(B, Hkv, G, q1 - q0, D) / denom[..., None]
            lse[:, :, :, q0:q1] = m + denom.log()
        ctx.save_for_backward(q, k, v, sinks, out, lse, kpm)
        ctx.scale, ctx.window, ctx.block, ctx.q_offset = scale, window, block, q_offset
        return out.view(B, Hq, T, D).transpose(1, 2)  # (B, T, Hq, D) view, as transformers expects

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, sinks, out, lse, kpm = ctx.saved_tensors
        scale, window, block, q_offset = ctx.scale, ctx.window, ctx.block, ctx.q_offset
        B, Hq, T, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        q5 = q.view(B, Hkv, G, T, D)
        do = d_out.transpose(1, 2).reshape(B, Hkv, G, T, D).to(q.dtype)  # (B, Hkv, G, T, D)
        acc = lse.dtype
        delta = (do.to(acc) * out.to(acc)).sum(-1)  # (B, Hkv, G, T) = dO . O
        sink = sinks.to(acc).view(1, Hkv, G, 1)
        dq = torch.zeros_like(q5)
        dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        for q0, q1, k0, k1 in _blocks(T, Tk, block, window, q_offset):
            bias = _bias(q0, q1, k0, k1, window, q_offset, kpm, q.device, acc)
            s, qb = _scores(q5, k, q0, q1, k0, k1, scale, bias)
            p = s.sub_(lse[:, :, :, q0:q1, None]).exp_()  # (B, Hkv, G, nq, nk)
            dob = do[:, :, :, q0:q1].reshape(B, Hkv, -1, D)  # (B, Hkv, G*nq, D)
            pf = p.view(B, Hkv, -1, k1 - k0)  # (B, Hkv, G*nq, nk)
            dv[:, :, k0:k1] += torch.matmul(pf.transpose(-1, -2).to(v.dtype), dob).to(acc)
            dp = torch.matmul(dob, v[:, :, k0:k1].transpose(-1, -2)).to(acc).view_as(p)
            ds = p.mul_(dp.sub_(delta[:, :, :, q0:q1, None])).mul_(scale)  # (B, Hkv, G, nq, nk)
            dsf = ds.view(B, Hkv, -1, k1 - k0).to(q.dtype)
            dq[:, :, :, q0:q1] = torch.matmul(dsf, k[:, :, k0:k1]).view(B, Hkv, G, q1 - q0, D)
            dk[:, :, k0:k1] += torch.matmul(dsf.transpose(-1, -2), qb).to(acc)
        p_sink = torch.exp(sink - lse)  # (B, Hkv, G, T)
        dsinks = -(p_sink * delta).sum(dim=(0, 3)).reshape(Hq).to(sinks.dtype)
        return (dq.view(B, Hq, T, D), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None, None, None, None)


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                   window: int | None = None, key_padding_mask: torch.Tensor | None = None,
                   block: int | None = None) -> torch.Tensor:
    """Blocked attention. q (B, Hq, T, D), k/v (B, Hkv, Tk, D) with Tk >= T (queries are the last T
    positions), sinks (Hq,), key_padding_mask (B, Tk) bool (True = real token) -> (B, T, Hq, D)."""
    B, Hq, T, D = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1]:
        raise ValueError(f"expected q (B, Hq, T, D), k = v (B, Hkv, Tk, D) with Hq % Hkv == 0; got "
                         f"{tuple(q.shape)=}, {tuple(k.shape)=}, {tuple(v.shape)=}")
    if sinks.shape != (Hq,) or k.shape[2] < T:
        raise ValueError(f"{tuple(sinks.shape)=} should be ({Hq},) and Tk={k.shape[2]} >= T={T}")
    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, k.shape[2]):
            raise ValueError(f"{tuple(key_padding_mask.shape)=} should be (B, Tk) = {(B, k.shape[2])}")
        kpm = key_padding_mask.bool()
    if block is None:
        block = SMALL_WINDOW_BLOCK if window is not None and window < DEFAULT_BLOCK else DEFAULT_BLOCK
    if q.is_cuda and kpm is None:
        from kernels.attention_triton import sink_attention_triton

        return sink_attention_triton(q, k, v, sinks, scale, window, q_offset=k.shape[2] - T)
    return _SinkAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), sinks, scale, window, kpm,
                                block, k.shape[2] - T)


# ---- transformers integration --------------------------------------------------------------------
def sink_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, sliding_window: int | None = None,
                           s_aux: torch.Tensor | None = None, **kwargs):
    """`AttentionInterface` function. query (B, Hq, T, D), key/value (B, Hkv, Tk, D); returns
    ((B, T, Hq, D), None). `attention_mask` is what `sink_attention_mask` produced: None, a 2D key-padding
    mask (handled natively) or a 4D eager mask (dense reference)."""
    sinks = s_aux if s_aux is not None else module.sinks
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    prefix_kv = kwargs.pop("prefix_kv", None)
    if prefix_kv is not None:
        if dropout and module.training:
            raise ValueError("prefix_kv (shared prompts) with attention dropout is not supported")
        key, value = prefix_kv(module.layer_idx, key, value)
    if dropout and module.training:
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

        return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                       scaling=scale, sliding_window=sliding_window, s_aux=s_aux, **kwargs)
    if attention_mask is not None and attention_mask.dim() == 4:
        out = sink_attention_ref(query, key, value, sinks, scale, attn_mask=attention_mask[..., : key.shape[2]])
        return out.contiguous(), None
    out = sink_attention(query, key, value, sinks, scale, sliding_window, key_padding_mask=attention_mask)
    return out, None


class PrefixKV:
    """Keys and values of shared prefixes, handed to every layer's attention as the `prefix_kv` keyword
    (transformers passes unknown keywords of `model.model(...)` down to the attention function).

    A GRPO group is one prompt with several completions. Instead of running the prompt once per row, the
    learner runs the prompts once (a recording `PrefixKV()`: each layer's post-RoPE keys and values are
    kept, by `layer_idx`) and then the completions with `recorded.extend(rows)`: each layer's attention
    sees [the keys of prompt rows[b]] + [its own keys] for completion row b. Prompts are left-padded and
    completions right-padded, so a row's real tokens are contiguous and the index distance between two
    of them is their position distance: causal order, sliding windows and the key-padding mask of the
    blocked kernel apply unchanged (queries are the last T of the Tk keys). Autograd flows through the
    indexing back into the prompt pass, so each prompt's gradient is the sum over its completions: the
    same loss and gradients as one padded row per completion (tests/rl/test_prompt_sharing.py)."""

    def __init__(self, rows: torch.Tensor | None = None, kv: dict | None = None):
        self.rows = rows  # (B,) long: the prefix of each row; None = recording
        self.kv = {} if kv is None else kv  # layer_idx -> (keys, values) (G, Hkv, P, D)

    def extend(self, rows: torch.Tensor) -> "PrefixKV":
        """The reader for a pass whose row b continues prefix `rows[b]`."""
        return PrefixKV(rows, self.kv)

    def __call__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        if self.rows is None:  # recording (a gradient-checkpointing replay records the same tensors again)
            self.kv[layer_idx] = (key, value)
            return key, value
        if layer_idx not in self.kv:
            raise KeyError(f"no prefix recorded for layer {layer_idx}: run the prefix pass first")
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk[self.rows], key], dim=2), torch.cat([pv[self.rows], value], dim=2)


def sink_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                        mask_function=None, attention_mask: torch.Tensor | None = None,
                        allow_is_causal_skip: bool = True, use_vmap: bool = False, **kwargs):
    """`AttentionMaskInterface` function: None or the 2D padding mask when the pattern is plain causal /
    sliding (the attention computes it), else transformers' 4D eager mask."""
    from transformers.masking_utils import causal_mask_function, eager_mask

    plain = (allow_is_causal_skip and not use_vmap and isinstance(q_offset, int) and isinstance(kv_offset, int)
             and q_offset == 0 and kv_offset == 0 and q_length == kv_length)
    if plain:
        if attention_mask is None:
            return None
        pad = attention_mask[:, -kv_length:].bool()  # (B, Tk)
        return None if bool(pad.all()) else pad
    return eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                      kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                      attention_mask=attention_mask, use_vmap=use_vmap, **kwargs)
