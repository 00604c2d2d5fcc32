"""Fast CPU MXFP4 path (backend="cpu" of kernels/mxfp4.py; the torch reference there is the spec).

How: a few C loops below, compiled on first use with the system C compiler (the one Triton already
needs) at -O3 -march=native by kernels/cbuild.py, cached under ~/.cache/deliberate (or
$DELIBERATE_KERNEL_CACHE), called through ctypes (which drops the GIL) from `torch.get_num_threads()`
Python threads, each on its own range of groups.

Dequantise: a (scale byte, block byte) -> (value of low nibble, value of high nibble) table, 256 x 256
entries of two output elements stored as one 2x-wide integer (256 KiB for bf16: it lives in L2). Each
block byte costs one table load and one store; the scale multiply is folded into the table, so every
case the reference covers (subnormals, NaN scale 255) is exact by construction. Large outputs are
allocated with a transparent-huge-page hint: first-touch page faults, not the loop, bound a fresh
dequantise.

Quantise (bf16 and fp32 read natively, other dtypes cast to fp32 first, as the reference does): on the
raw bit patterns. amax = max of |x| bits; the scale byte from its exponent/mantissa fields; dividing
by 2^(s-127) is an integer subtraction from the exponent field; the code is how many of the seven
E2M1 midpoints (as bit patterns, minus one where a tie rounds up to the even code) the result
exceeds. All of it vectorises (32 int16 lanes per bf16 group). Groups with s < 3 (|x| < 2^-122, where
subnormal inputs could matter) and NaN groups take an exact per-scale threshold table instead.
Stochastic rounding runs a float version of the same loop on the caller's uniform draws.

Without a C compiler (a warning says so) both fall back to the torch reference. (A torch-only table
path, chunked `index_select` of (scale << 8 | byte) into the same table, was measured and dropped:
under 1 GB/s here, no better than the reference once the box is busy.)
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

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

# Midpoints between neighbouring E2M1 magnitudes; a tie goes to the even code, so at midpoint i the
# comparison is `>` when code i is even and `>=` when it is odd (`> bits - 1` on bit patterns).
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_PAIR_INT = {2: torch.int32, 4: torch.int64}  # output itemsize -> integer holding two outputs
_BIT_INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32}  # input formats read as bits
_MIN_GROUPS_PER_THREAD = 1 << 12

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Bit patterns of the E2M1 midpoints 0.25 .. 5.0 in bf16; minus one where the tie rounds up. fp32 is <<16. */
#define MIDPOINTS(T, SHIFT) {(T)0x3E80 << SHIFT, ((T)0x3F40 << SHIFT) - 1, (T)0x3FA0 << SHIFT, \
    ((T)0x3FE0 << SHIFT) - 1, (T)0x4020 << SHIFT, ((T)0x4060 << SHIFT) - 1, (T)0x40A0 << SHIFT}

#define PREFETCH_GROUPS 32  /* ~2-4 KiB ahead: 4x quantise throughput once the input leaves L2 */

static inline int scale_byte(uint32_t amax, int exp_shift, uint32_t mant_mask, int ceil_rule) {
    int e = (int)(amax >> exp_shift);
    int s = e - 2;                                        /* floor(log2 amax) - 2 */
    if (ceil_rule && (amax & mant_mask) > (mant_mask + 1) / 2) s += 1;  /* amax > 1.5 * 2^e */
    s = s < 0 ? 0 : (s > 254 ? 254 : s);
    if (amax == 0) s = 127;
    if (e == 255) s = 255;                                /* inf / NaN: E8M0 NaN */
    return s;
}

/* E2M1 magnitude of code c (0..7) = 0, .5, 1, 1.5, 2, 3, 4, 6: piecewise linear and convex in c. */
#define MAXF(a, b) ((a) > (b) ? (a) : (b))  /* not fmaxf: that is a libm call without -ffast-math */
#define MINF(a, b) ((a) < (b) ? (a) : (b))
#define GRID_VALUE(c) MAXF(MAXF(0.5f * (c), (c) - 2.0f), 2.0f * (c) - 8.0f)

static inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* codes (uint16 x 32) -> 16 bytes, element 2j in the low nibble: read as uint32 pairs (little endian). */
static inline void pack(const uint16_t* code, uint8_t* restrict out) {
    uint32_t pairs[16];
    memcpy(pairs, code, sizeof pairs);
    for (int j = 0; j < 16; j++) out[j] = (uint8_t)(pairs[j] | (pairs[j] >> 12));
}

/* One MXFP4 quantiser per input format. T: signed int of the format's width, X2F: bits -> float. */
#define QUANTIZE(NAME, T, UT, EXP_SHIFT, SHIFT16, X2F)                                              \
void NAME(const T* restrict bits, const T* restrict thr, const float* restrict noise, int ceil_rule, \
          uint8_t* restrict blocks, uint8_t* restrict scales, int64_t g0, int64_t g1) {              \
    const T abs_mask = (T)(((UT)1 << (EXP_SHIFT + 8)) - 1);                                         \
    const T min_normal = (T)((UT)1 << EXP_SHIFT);                                                   \
    const T mid[7] = MIDPOINTS(T, SHIFT16);                                                         \
    for (int64_t g = g0; g < g1; g++) {                                                             \
        const T* restrict x = bits + g * 32;                                                        \
        __builtin_prefetch(x + PREFETCH_GROUPS * 32);  /* HW prefetch alone leaves it latency-bound */  \
        T amax = 0;                                                                                 \
        for (int i = 0; i < 32; i++) { T a = x[i] & abs_mask; amax = a > amax ? a : amax; }         \
        int s = scale_byte((uint32_t)amax, EXP_SHIFT, (uint32_t)(min_normal - 1), ceil_rule);      \
        scales[g] = (uint8_t)s;                                                                     \
        uint16_t code[32];                                                                          \
        if (noise) {                                    /* 128 B of draws per group: two lines */   \
            __builtin_prefetch(noise + (g + PREFETCH_GROUPS) * 32);                                 \
            __builtin_prefetch(noise + (g + PREFETCH_GROUPS) * 32 + 16);                            \
        }                                                                                           \
        if (s == 255) {                                                                             \
            memset(code, 0, sizeof code);                                                           \
        } else if (noise) {             /* stochastic: m = |x| / scale as a float, exact */         \
            float inv_scale = bits_to_float((uint32_t)(254 - s) << 23);                             \
            for (int i = 0; i < 32; i++) {                                                          \
                float m = MINF(X2F(x[i] & abs_mask) * inv_scale, 6.0f);                             \
                float lo = (float)((m >= 0.5f) + (m >= 1.0f) + (m >= 1.5f) + (m >= 2.0f)            \
                                   + (m >= 3.0f) + (m >= 4.0f) + (m >= 6.0f));  /* code at or below m */ \
                float hi = MINF(lo + 1.0f, 7.0f);                                                   \
                float lo_v = GRID_VALUE(lo), step = GRID_VALUE(hi) - lo_v;                          \
                int up = noise[g * 32 + i] * step < m - lo_v;  /* exact: step is a power of two */   \
                code[i] = (uint16_t)((int)lo + up + ((x[i] < 0) << 3));                             \
            }                                                                                       \
        } else if (s < 3) {             /* tiny scales: exact per-scale thresholds */               \
            const T* t = thr + s * 8;                                                               \
            for (int i = 0; i < 32; i++) {                                                          \
                T a = x[i] & abs_mask;                                                              \
                int c = 0;                                                                          \
                for (int k = 0; k < 7; k++) c += a > t[k];                                          \
                code[i] = (uint16_t)(c + ((x[i] < 0) << 3));                                        \
            }                                                                                       \
        } else {                        /* divide by 2^(s-127) in the exponent field */             \
            const T delta = (T)((s - 127) * (int64_t)min_normal);                                   \
            for (int i = 0; i < 32; i++) {                                                          \
                T a = x[i] & abs_mask;                                                              \
                T q = a - delta;                                                                    \
                q = (a < min_normal || q < 0) ? 0 : q;  /* zero, subnormal, underflow: below 0.25 */ \
                uint16_t c = (q > mid[0]) + (q > mid[1]) + (q > mid[2]) + (q > mid[3]) + (q > mid[4]) \
                           + (q > mid[5]) + (q > mid[6]);                                           \
                code[i] = c | (uint16_t)((x[i] < 0) << 3);                                          \
            }                                                                                       \
        }                                                                                           \
        pack(code, blocks + g * 16);                                                                \
    }                                                                                               \
}

#define BF16_TO_FLOAT(b) bits_to_float((uint32_t)(uint16_t)(b) << 16)
#define F32_TO_FLOAT(b) bits_to_float((uint32_t)(b))
QUANTIZE(quantize_bf16, int16_t, uint16_t, 7, 0, BF16_TO_FLOAT)
QUANTIZE(quantize_f32, int32_t, uint32_t, 23, 16, F32_TO_FLOAT)

/* out[g, j] = table[scales[g], blocks[g, j]]: two output elements per entry. */
#define DEQUANTIZE(NAME, P)                                                                          \
void NAME(const uint8_t* restrict blocks, const uint8_t* restrict scales, const P* restrict table,  \
          P* restrict out, int64_t g0, int64_t g1) {                                                \
    for (int64_t g = g0; g < g1; g++) {                                                             \
        const P* restrict row = table + ((uint32_t)scales[g] << 8);                                 \
        for (int j = 0; j < 16; j++) out[g * 16 + j] = row[blocks[g * 16 + j]];                     \
    }                                                                                               \
}
DEQUANTIZE(dequantize_pairs32, uint32_t)
DEQUANTIZE(dequantize_pairs64, uint64_t)
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Build (once per machine, cached) and load the C kernels; None if that is not possible."""
    from kernels import cbuild

    # -fno-trapping-math lets gcc turn float selects into vector blends; results are unchanged (no
    # fast-math: rounding stays IEEE and exact, which the equivalence tests check).
    lib = cbuild.load("mxfp4_cpu", _C_SOURCE, [cbuild.native_flags() + ["-fno-trapping-math", "-std=c11"]])
    if lib is None:
        return None
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for name in ("quantize_bf16", "quantize_f32"):  # bits, thresholds, noise|NULL, ceil, blocks, scales, g0, g1
        getattr(lib, name).argtypes = [ptr, ptr, ptr, i32, ptr, ptr, i64, i64]
    for name in ("dequantize_pairs32", "dequantize_pairs64"):
        getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, i64, i64]  # blocks, scales, table, out, g0, g1
    return lib


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def empty_hugepages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty whose 2 MiB-aligned interior is marked MADV_HUGEPAGE (Linux, THP in "madvise" mode).

    Writing a fresh 100 MB output is dominated by 4 KiB page faults; huge pages halve the time here.
    A hint only: where it is not available the tensor is an ordinary torch.empty.
    """
    out = torch.empty(shape, dtype=dtype)
    start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (out.data_ptr() + out.numel() * out.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    madvise = _madvise()
    if madvise is not None and end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)  # failure (no THP) just leaves small pages
    return out


@functools.cache
def _pool(n_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="mxfp4")


def _parallel_over_groups(fn, n_groups: int, *args) -> None:
    """fn(*args, g0, g1) on contiguous group ranges, one per thread (ctypes calls release the GIL)."""
    n = max(1, min(torch.get_num_threads(), n_groups // _MIN_GROUPS_PER_THREAD))
    if n == 1:
        fn(*args, 0, n_groups)
        return
    bounds = [n_groups * i // n for i in range(n + 1)]
    for future in [_pool(n).submit(fn, *args, g0, g1) for g0, g1 in zip(bounds, bounds[1:])]:
        future.result()


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
    """(256, 8) bit patterns (in `dtype`'s int type) of midpoint_i * 2^(s-127), minus one where the tie
    goes up; column 7 and row 255 are padding. Overflow to inf only happens at scales no |x| reaches."""
    mids = torch.tensor(E2M1_MIDPOINTS, dtype=torch.float64)
    scaled = (mids[None] * e8m0_values()[:E8M0_NAN, None]).to(dtype)  # (255, 7)
    bits = scaled.view(_BIT_INT[dtype]).to(torch.int64) - torch.tensor([0, 1, 0, 1, 0, 1, 0])
    table = torch.full((256, 8), torch.iinfo(_BIT_INT[dtype]).max, dtype=torch.int64)
    table[:E8M0_NAN, :7] = bits
    return table.to(_BIT_INT[dtype])


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., G, 16] + scales [..., G] -> [..., G * 32]; inputs checked by mxfp4.dequantize."""
    if dtype.itemsize not in _PAIR_INT:
        return dequantize_ref(blocks, scales, dtype)
    blocks, scales = blocks.contiguous(), scales.contiguous()
    lib = _library()
    if lib is None:
        return dequantize_ref(blocks, scales, dtype)
    *lead, n_group_cols, _ = blocks.shape
    out = empty_hugepages((*lead, n_group_cols * GROUP_SIZE), dtype)
    kernel = lib.dequantize_pairs32 if dtype.itemsize == 2 else lib.dequantize_pairs64
    table = _dequant_table(dtype)
    ptrs = (blocks.data_ptr(), scales.data_ptr(), table.data_ptr(), out.data_ptr())
    _parallel_over_groups(kernel, scales.numel(), *ptrs)
    return out


def quantize(w: torch.Tensor, *, scale_rule: str, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] -> blocks [..., K/32, 16], scales [..., K/32]; inputs checked by mxfp4.quantize."""
    lib = _library()
    if lib is None:
        return quantize_ref(w, scale_rule=scale_rule, noise=noise)
    x = (w if w.dtype in _BIT_INT else w.float()).contiguous()
    *lead, k = w.shape
    blocks = torch.empty(*lead, k // GROUP_SIZE, BYTES_PER_GROUP, dtype=torch.uint8)
    scales = torch.empty(*lead, k // GROUP_SIZE, dtype=torch.uint8)
    kernel = lib.quantize_bf16 if x.dtype == torch.bfloat16 else lib.quantize_f32
    thresholds = _quant_thresholds(x.dtype)
    noise = noise.contiguous() if noise is not None else None
    _parallel_over_groups(
        kernel, scales.numel(), x.data_ptr(), thresholds.data_ptr(), noise.data_ptr() if noise is not None else None,
        int(scale_rule == "ceil"), blocks.data_ptr(), scales.data_ptr(),
    )  # fmt: skip
    return blocks, scales
