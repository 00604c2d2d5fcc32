"""Triton twins of the MXFP4 reference in kernels/mxfp4.py (call them through `mxfp4.quantize` /
`mxfp4.dequantize` with backend="triton").

How: one program handles BLOCK_G groups of 32. Quantise loads the group as (BLOCK_G, 16, 2) so the
two nibbles of a byte sit on the last axis, takes amax on the fp32 bit patterns (integer max of
|x| bits: exact, and NaN's bits sort above inf so a NaN is never lost), derives the E8M0 byte with
integer arithmetic and rounds by comparing |x| / scale against the E2M1 midpoints (ties go to the
even code: `>` at midpoints above an even code, `>=` above an odd one). Stochastic rounding takes the
uniform draws as an input tensor, so it matches the reference draw for draw. Dequantise decodes each
nibble arithmetically and multiplies by the scale in fp32.

Kernels are plain functions compiled on first use: `triton.jit` for CUDA tensors, the Triton
interpreter (`InterpretedFunction`) for CPU tensors or when TRITON_INTERPRET=1. Keeping both in one
process lets the CPU equivalence tests and the native GPU test share a session. They therefore call
no @triton.jit helpers (an interpreted kernel cannot call a compiled one), and spell the format
constants of kernels/mxfp4.py as literals (E8M0 bias 127, NaN byte 255, max finite 254; E2M1 grid
midpoints 0.25 .. 5.0), which the equivalence tests pin to the reference.

Known interpreter gap: it emulates fp32 <-> bf16 casts without subnormals, so bf16 outputs below
2^-126 (scale bytes 0 and 1) and subnormal bf16 inputs are only checked by the native GPU test.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.mxfp4 import BYTES_PER_GROUP, GROUP_SIZE

# tl.max would be a compiled helper; tl.reduce with the standard combine function works in both modes
# (the interpreter recognises it and uses numpy).
_max = tl.standard._elementwise_max

QUANT_BLOCK_G = 64  # groups per program
DEQUANT_BLOCK_G = 64


def _quantize_kernel(
    x_ptr, noise_ptr, blocks_ptr, scales_ptr, n_groups,
    CEIL: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    g = (tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.int64)  # (BLOCK_G,)
    j = tl.arange(0, 16)
    k = tl.arange(0, 2)
    offs = g[:, None, None] * 32 + j[None, :, None] * 2 + k[None, None, :]  # (BLOCK_G, 16, 2)
    mask = (g < n_groups)[:, None, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # Scale byte from the bits of amax: biased exponent e, mantissa bits mant.
    abs_bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    amax = tl.reduce(tl.reduce(abs_bits, 2, _max), 1, _max)  # (BLOCK_G,) bits of max |x|
    e = amax >> 23
    s = e - 2  # floor(log2 amax) - 2
    if CEIL:
        s += ((amax & 0x7FFFFF) > 0x400000).to(tl.int32)  # mantissa > 1.5: 6 * 2^(e-2) < amax, go one up
    s = tl.minimum(tl.maximum(s, 0), 254)
    s = tl.where(amax == 0, 127, s)
    s = tl.where(e == 255, 255, s)
    inv_scale = ((254 - tl.minimum(s, 253)) << 23).to(tl.float32, bitcast=True)  # 2^(127-s), normal

    q = x * inv_scale[:, None, None]
    m = tl.minimum(tl.abs(q), 6.0)
    if STOCHASTIC:
        u = tl.load(noise_ptr + offs, mask=mask, other=0.0)
        lo_code = ((m >= 0.5).to(tl.int32) + (m >= 1.0).to(tl.int32) + (m >= 1.5).to(tl.int32)
                   + (m >= 2.0).to(tl.int32) + (m >= 3.0).to(tl.int32) + (m >= 4.0).to(tl.int32)
                   + (m >= 6.0).to(tl.int32))  # fmt: skip
        lo = tl.where(lo_code < 4, 0.5 * lo_code, tl.where(lo_code < 6, lo_code - 2.0, 2.0 * lo_code - 8.0))
        step = tl.where(lo_code < 4, 0.5, tl.where(lo_code < 6, 1.0, tl.where(lo_code == 6, 2.0, 0.0)))
        code = lo_code + (u * step < m - lo).to(tl.int32)
    else:
        code = ((m > 0.25).to(tl.int32) + (m >= 0.75).to(tl.int32) + (m > 1.25).to(tl.int32)
                + (m >= 1.75).to(tl.int32) + (m > 2.5).to(tl.int32) + (m >= 3.5).to(tl.int32)
                + (m > 5.0).to(tl.int32))  # fmt: skip
    code = code | ((x.to(tl.int32, bitcast=True) < 0).to(tl.int32) << 3)  # copy the sign bit
    code = tl.where((s == 255)[:, None, None], 0, code)
    lo, hi = tl.split(code)  # (BLOCK_G, 16) each: elements 2j and 2j+1
    byte = lo | (hi << 4)

    bmask = g[:, None] < n_groups
    tl.store(blocks_ptr + g[:, None] * 16 + j[None, :], byte.to(tl.uint8), mask=bmask)
    tl.store(scales_ptr + g, s.to(tl.uint8), mask=g < n_groups)


def _dequantize_kernel(blocks_ptr, scales_ptr, out_ptr, n_groups, BLOCK_G: tl.constexpr):
    g = (tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.int64)  # (BLOCK_G,)
    c = tl.arange(0, 32)
    gmask = g < n_groups
    mask = gmask[:, None]
    byte = tl.load(blocks_ptr + g[:, None] * 16 + (c // 2)[None, :], mask=mask, other=0)  # (BLOCK_G, 32)
    nib = ((byte.to(tl.int32) >> ((c & 1) * 4)[None, :]) & 0xF)
    mag_code = nib & 7
    mag = tl.where(mag_code < 4, 0.5 * mag_code, tl.where(mag_code < 6, mag_code - 2.0, 2.0 * mag_code - 8.0))
    value = tl.where(nib >= 8, -mag, mag)

    s = tl.load(scales_ptr + g, mask=gmask, other=127).to(tl.int32)
    scale_bits = tl.where(s == 0, 0x00400000, tl.where(s == 255, 0x7FC00000, s << 23))  # 2^-127 | NaN | 2^(s-127)
    scale = scale_bits.to(tl.float32, bitcast=True)
    out = value * scale[:, None]
    tl.store(out_ptr + g[:, None] * 32 + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _compiled(fn, interpret: bool):
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn)


def _interpret(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" or bool(triton.knobs.runtime.interpret)


def quantize(
    w: torch.Tensor, *, scale_rule: str, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] -> blocks [..., K/32, 16], scales [..., K/32]; inputs checked by mxfp4.quantize."""
    *lead, k = w.shape
    x = w.contiguous()
    n_groups = x.numel() // GROUP_SIZE
    blocks = torch.empty(*lead, k // GROUP_SIZE, BYTES_PER_GROUP, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*lead, k // GROUP_SIZE, dtype=torch.uint8, device=w.device)
    if n_groups == 0:
        return blocks, scales
    noise_arg = noise.contiguous() if noise is not None else x  # unused when STOCHASTIC is False
    kernel = _compiled(_quantize_kernel, _interpret(w))
    grid = (triton.cdiv(n_groups, QUANT_BLOCK_G),)
    kernel[grid](
        x, noise_arg, blocks, scales, n_groups,
        CEIL=scale_rule == "ceil", STOCHASTIC=noise is not None, BLOCK_G=QUANT_BLOCK_G,
    )  # fmt: skip
    return blocks, scales


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., G, 16] + scales [..., G] -> [..., G * 32]; inputs checked by mxfp4.dequantize."""
    *lead, n_group_cols, _ = blocks.shape
    out = torch.empty(*lead, n_group_cols * GROUP_SIZE, dtype=dtype, device=blocks.device)
    n_groups = scales.numel()
    if n_groups == 0:
        return out
    kernel = _compiled(_dequantize_kernel, _interpret(blocks))
    grid = (triton.cdiv(n_groups, DEQUANT_BLOCK_G),)
    kernel[grid](blocks.contiguous(), scales.contiguous(), out, n_groups, BLOCK_G=DEQUANT_BLOCK_G)
    return out

