"""Fast CPU MXFP4 path (backend="cpu" of kernels/mxfp4.py; the reference there is the spec).

Dequantise: a (scale byte, block byte) -> (value of low nibble, value of high nibble) table, 256 x 256
entries of two output elements stored as one 2x-wide integer (256 KiB for bf16: it lives in L2). Each
block byte costs one table load and one store, the scale multiply is folded into the table, and every
case the reference covers (subnormals, NaN scale 255) is exact by construction. numba runs the loop
over groups in parallel; without numba a chunked `index_select` over the same table does the work.

Quantise (round-to-nearest-even): integer-only per group, on the raw bit patterns of bf16 or fp32
input: amax = max of |x| bits, the scale byte from its exponent/mantissa fields, and the code of each
element = how many of the seven E2M1 midpoints (pre-scaled by 2^(s-127), pre-adjusted for the
tie-to-even rule, and stored as bit patterns) its |x| bits exceed. Other input dtypes are cast to
fp32 first. Stochastic rounding and machines without numba use the torch reference.
"""

from __future__ import annotations

import functools

import torch

from kernels.mxfp4 import (
    BYTES_PER_GROUP,
    E8M0_NAN,
    FP4_VALUES,
    GROUP_SIZE,
    dequantize_ref,
    e8m0_values,
    quantize_ref,
)

try:
    import numba
except ImportError:  # the torch fallbacks below cover it
    numba = None

# Midpoints between neighbouring E2M1 magnitudes; a tie goes to the even code, so at midpoint i the
# comparison is `>` when code i is even and `>=` when it is odd.
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_PAIR_INT = {1: torch.int16, 2: torch.int32, 4: torch.int64}  # output itemsize -> two-element integer
_LUT_CHUNK_GROUPS = 1 << 14  # torch fallback: ~1 MiB of bf16 output per chunk, stays in cache
# Bit layout of the formats quantise reads natively: (exponent shift, mantissa mask, mantissa of 1.5).
_BIT_FORMATS = {torch.bfloat16: (torch.int16, 7, 0x7F, 0x40), torch.float32: (torch.int32, 23, 0x7FFFFF, 0x400000)}


@functools.cache
def _dequant_table(dtype: torch.dtype) -> torch.Tensor:
    """(256 scale bytes, 256 block bytes) -> two `dtype` values packed in one integer."""
    values = torch.tensor(FP4_VALUES, dtype=torch.float64)
    byte = torch.arange(256)
    pair = torch.stack([values[byte & 0x0F], values[byte >> 4]], dim=-1)  # (256, 2): low nibble first
    table = (pair[None] * e8m0_values()[:, None, None]).to(dtype)  # (256, 256, 2); exact products
    return table.contiguous().view(_PAIR_INT[dtype.itemsize]).squeeze(-1)  # (256, 256)


@functools.cache
def _quant_thresholds(dtype: torch.dtype) -> torch.Tensor:
    """(256, 7) int32: bits of midpoint_i * 2^(s-127) in `dtype`, minus one where the tie goes up."""
    mids = torch.tensor(E2M1_MIDPOINTS, dtype=torch.float64)
    # (255, 7): exact in bf16/fp32; the few that overflow to inf sit above any |x| those scales see.
    scaled = (mids[None] * e8m0_values()[:E8M0_NAN, None]).to(dtype)
    bits = scaled.view(_BIT_FORMATS[dtype][0]).to(torch.int32)
    bits -= torch.tensor([0, 1, 0, 1, 0, 1, 0], dtype=torch.int32)  # odd code below -> `>=`
    return torch.cat([bits, torch.full((1, 7), torch.iinfo(torch.int32).max, dtype=torch.int32)])


if numba is not None:

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _dequantize_numba(blocks, scales, table, out):  # (G, 16) u8, (G,) u8, (256, 256), (G, 16)
        for g in numba.prange(blocks.shape[0]):
            row = table[scales[g]]
            for j in range(16):
                out[g, j] = row[blocks[g, j]]

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _quantize_numba(bits, thresholds, exp_shift, mant_mask, mant_half, ceil, blocks, scales):
        # bits (G, 32) int16/int32 raw patterns; thresholds (256, 7) int32; blocks (G, 16); scales (G,)
        abs_mask = (1 << (exp_shift + 8)) - 1
        for g in numba.prange(bits.shape[0]):
            amax = 0
            for i in range(32):
                amax = max(amax, bits[g, i] & abs_mask)
            e = amax >> exp_shift
            s = e - 2
            if ceil and (amax & mant_mask) > mant_half:
                s += 1
            s = min(max(s, 0), 254)
            if amax == 0:
                s = 127
            if e == 255:  # inf or NaN in the group: E8M0 NaN, no codes
                s = 255
            scales[g] = s
            thr = thresholds[s]
            for j in range(16):
                byte = 0
                for half in range(2):
                    x = bits[g, 2 * j + half]
                    a = x & abs_mask
                    code = 0
                    for t in range(7):
                        code += a > thr[t]
                    if x < 0 and s != 255:
                        code += 8
                    byte |= code << (4 * half)
                blocks[g, j] = byte


def _numba_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def dequantize_lut(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Torch-only table path: chunked `index_select` of (scale << 8 | byte) into the pair table."""
    *lead, n_group_cols, _ = blocks.shape
    out = torch.empty(*lead, n_group_cols * GROUP_SIZE, dtype=dtype)
    table = _dequant_table(dtype).reshape(-1)  # (65536,)
    b = blocks.reshape(-1, BYTES_PER_GROUP)  # (G, 16)
    s = scales.reshape(-1)  # (G,)
    o = out.view(_PAIR_INT[dtype.itemsize]).view(-1, BYTES_PER_GROUP)  # (G, 16) value pairs
    for g0 in range(0, s.numel(), _LUT_CHUNK_GROUPS):
        g1 = min(g0 + _LUT_CHUNK_GROUPS, s.numel())
        idx = b[g0:g1].to(torch.int32)
        idx += s[g0:g1, None].to(torch.int32) << 8
        torch.index_select(table, 0, idx.view(-1), out=o[g0:g1].view(-1))
    return out


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., G, 16] + scales [..., G] -> [..., G * 32]; inputs checked by mxfp4.dequantize."""
    if dtype.itemsize not in _PAIR_INT:
        return dequantize_ref(blocks, scales, dtype)
    blocks, scales = blocks.contiguous(), scales.contiguous()
    if numba is None:
        return dequantize_lut(blocks, scales, dtype)
    *lead, n_group_cols, _ = blocks.shape
    out = torch.empty(*lead, n_group_cols * GROUP_SIZE, dtype=dtype)
    if scales.numel():
        _numba_threads()
        pairs = out.view(_PAIR_INT[dtype.itemsize]).view(-1, BYTES_PER_GROUP)  # (G, 16)
        _dequantize_numba(
            blocks.view(-1, BYTES_PER_GROUP).numpy(), scales.view(-1).numpy(),
            _dequant_table(dtype).numpy(), pairs.numpy(),
        )  # fmt: skip
    return out


def quantize(w: torch.Tensor, *, scale_rule: str, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] -> blocks [..., K/32, 16], scales [..., K/32]; inputs checked by mxfp4.quantize."""
    if numba is None or noise is not None:
        return quantize_ref(w, scale_rule=scale_rule, noise=noise)
    if w.dtype not in _BIT_FORMATS:
        w = w.float()
    int_dtype, exp_shift, mant_mask, mant_half = _BIT_FORMATS[w.dtype]
    *lead, k = w.shape
    blocks = torch.empty(*lead, k // GROUP_SIZE, BYTES_PER_GROUP, dtype=torch.uint8)
    scales = torch.empty(*lead, k // GROUP_SIZE, dtype=torch.uint8)
    if scales.numel():
        _numba_threads()
        _quantize_numba(
            w.contiguous().view(int_dtype).view(-1, GROUP_SIZE).numpy(), _quant_thresholds(w.dtype).numpy(),
            exp_shift, mant_mask, mant_half, scale_rule == "ceil",
            blocks.view(-1, BYTES_PER_GROUP).numpy(), scales.view(-1).numpy(),
        )  # fmt: skip
    return blocks, scales
