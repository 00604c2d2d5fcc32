"""Grouped MoE experts for gpt-oss: forward and hand-written backward, dense or frozen MXFP4 base.

What: the expert half of gpt-oss' MoE block (the router stays transformers' `GptOssTopKRouter`).
For each token t and each of its top-k experts e with routing weight w_te:

    u = x_t @ W1_e + b1_e              W1 = gate_up_proj (E, H, 2I): columns INTERLEAVED, even = gate, odd = linear
    a = min(u[::2], 7); l = clamp(u[1::2], -7, 7)
    y = a * sigmoid(1.702 a) * (l + 1)  clamped SwiGLU with the +1
    z = y @ W2_e + b2_e                W2 = down_proj (E, I, H); the down bias sits inside the weighted sum
    out_t = sum_e w_te z

How: the (token, expert) pairs are sorted by expert (stable argsort of the top-k assignment), the
per-expert counts come from one `bincount` (one host sync), and the loop runs over ACTIVE experts only,
in row tiles: gather the tile's tokens, `addmm` into a row slice of the saved pre-activation, SwiGLU
scaled by the routing weights in the same pass, `mm` down, `index_add_` back. The down biases of all
pairs are one small matmul, out = R @ b2 with R (N, E) the dense routing weights, so no per-tile bias
or weighting pass remains. On CPU a tile is at most `CPU_ROW_TILE` rows; on CUDA a whole expert. In
bf16/fp16 on CPU (oneDNN GEMMs, which build a kernel per new shape, ~10x the GEMM's own time here)
each active expert is one tile padded to a row bucket (`_row_bucket`: weight-0 rows that add exact
zeros), so a training run meets few shapes however the routing moves. The
backward is written by hand (`_GroupedExperts`): it keeps only the pre-activation `u` (S, 2I),
recomputes the SwiGLU from it fused with its own gradient (which also returns w * y for dW2, g . y for
the routing weights and the column sums of du for db1), re-gathers tokens from `x`, and takes
db2 = R^T grad and the b2 part of the routing-weight gradient (grad @ b2^T at the chosen experts) from
R, so no (S, H) expert output is stored. On CPU the activation's row blocks run on torch's own OpenMP
threads (C built with -fopenmp against the libgomp torch has loaded; a Python pool otherwise).

On CUDA, dense and frozen MXFP4 experts go to kernels/moe_grouped_triton.py instead
(`CUDA_TRITON_GEMMS`): the same function as one grouped-GEMM launch per step over all experts, gathers
and SwiGLU fused, MXFP4 weights decoded inside the GEMM loads, no host sync.

The activation has three twins: `swiglu` / `swiglu_backward` (plain torch, the reference, exactly
transformers' `_apply_gate`), a C loop for CPU tiles (below; built on first use, fp32/bf16) and the
Triton kernels in kernels/moe_triton.py for CUDA.

Frozen MXFP4 base: `FrozenMxfp4Experts` holds the checkpoint tensors (`gate_up_proj_blocks`,
`gate_up_proj_scales`, ... exactly the names and layouts of the gpt-oss safetensors) and dequantises
each ACTIVE expert on the fly, forward and again in backward (nothing dense is kept). Its backward
gives gradients to the activations, the routing weights and the (bf16) biases if they require grad,
never to the 4-bit weights, so adapters elsewhere (PEFT LoRA on attention, router, ...) train on top.
LoRA on the experts themselves (`ExpertLora`, over a dense or a 4-bit base) runs inside the same loop
in low-rank form: u += s (x A1) B1 before the SwiGLU, z += s (w y A2) B2 after it, and the backward
gives the adapters their gradients from the same tiles (s x^T (du B1^T), s (x A1)^T du, ...), so neither
a dense delta nor a dense weight gradient is formed (rl/lora.py wraps the experts with it).
`FrozenMxfp4Experts.from_dense(experts)` quantises a transformers `GptOssExperts` into that layout.
Decoding is `kernels.mxfp4.dequantize`; the format is not re-implemented here.

Use: `kernels.patch.apply_kernels(model)` switches a `GptOssForCausalLM` to `grouped_experts_forward`
through transformers' `ExpertsInterface`; `GroupedExperts` is the same thing as a stand-alone module
(parameter names of `GptOssExperts`, so state dicts load unchanged). Tests: tests/kernels/test_moe.py.

Departures from transformers: no expert-parallel sentinels; no (S, H) gathers of biases or weights;
accumulation order differs (fp32 sums agree to ~1e-6 relative); the C activation computes in fp32 and
rounds once for bf16 (transformers rounds after every bf16 op).
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import NamedTuple

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


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _act(u: torch.Tensor, w: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """One tile (n, 2I) interleaved -> w * swiglu(u) (n, I): the activation already scaled by the routing
    weights w (n,), so the down projection's output needs no extra pass. Triton on CUDA, C on CPU,
    torch otherwise."""
    if _cpu_kernel_ok(u) and w.dtype == u.dtype:
        w = w.contiguous()
        n, half = u.shape[0], u.shape[1] // 2
        y = u.new_empty(n, half)
        lib, es, ld = _cpu_lib(), u.element_size(), u.stride(0)
        if u.dtype in lib.fwd_par:
            lib.fwd_par[u.dtype](u.data_ptr(), w.data_ptr(), y.data_ptr(), n, half, ld, alpha, limit,
                                 len(_row_blocks(n)) - 1)
            return y
        fwd = lib.fwd[u.dtype]
        _over_rows(lambda r0, r1: fwd(u.data_ptr() + r0 * ld * es, w.data_ptr() + r0 * es,
                                      y.data_ptr() + r0 * half * es, r1 - r0, half, ld, alpha, limit), n)
        return y
    if u.is_cuda:
        from kernels.moe_triton import swiglu_triton

        return swiglu_triton(u, alpha, limit).mul_(w[:, None])
    # fp32 math, storage dtype out (as the kernels)
    return (swiglu(_upcast(u), alpha, limit) * _upcast(w)[:, None]).to(u.dtype)


def _act_backward(u: torch.Tensor, g: torch.Tensor, w: torch.Tensor, alpha: float, limit: float):
    """Backward of the weighted activation w * swiglu(u) for one tile, recomputing the activation.

    u (n, 2I) interleaved pre-activation, g (n, I) gradient of w * y divided by w, w (n,) routing weights
    -> w * y (n, I), du (n, 2I) interleaved for dy = w g, gy (n,) = sum_j g y (the routing-weight grad)
    and du summed over rows (2I,) in fp32 (the bias gradient).
    """
    if u.is_cuda:
        from kernels.moe_triton import swiglu_backward_triton

        y, du = swiglu_backward_triton(u, g * w[:, None], alpha, limit, return_y=True)
        return y * w[:, None], du, torch.linalg.vecdot(g, y), du.float().sum(0)
    if _cpu_kernel_ok(u) and g.dtype == u.dtype and w.dtype == u.dtype:
        g, w = g.contiguous(), w.contiguous()
        n, half = g.shape
        y, du, gy = u.new_empty(g.shape), torch.empty_like(u), u.new_empty(n)
        lib, es, ld = _cpu_lib(), u.element_size(), u.stride(0)
        blocks = _row_blocks(n)
        colsum = torch.zeros(len(blocks) - 1, 2 * half, dtype=torch.float32)  # one fp32 row per block
        if u.dtype in lib.bwd_par:
            lib.bwd_par[u.dtype](u.data_ptr(), g.data_ptr(), w.data_ptr(), y.data_ptr(), du.data_ptr(),
                                 gy.data_ptr(), colsum.data_ptr(), n, half, ld, alpha, limit, len(blocks) - 1)
            return y, du, gy, colsum.sum(0)
        bwd = lib.bwd[u.dtype]

        def rows(r0: int, r1: int) -> None:
            acc = colsum[blocks.index(r0)]
            bwd(u.data_ptr() + r0 * ld * es, g.data_ptr() + r0 * half * es, w.data_ptr() + r0 * es,
                y.data_ptr() + r0 * half * es, du.data_ptr() + r0 * 2 * half * es, gy.data_ptr() + r0 * es,
                acc.data_ptr(), r1 - r0, half, ld, alpha, limit)

        _over_rows(rows, n, blocks)
        return y, du, gy, colsum.sum(0)
    # fp32 math with storage-dtype outputs, as the C and Triton kernels: a bf16 chain loses ~1e-1 on g . y
    u32, g32, w32 = _upcast(u), _upcast(g), _upcast(w)[:, None]
    y = swiglu(u32, alpha, limit)
    du = swiglu_backward(u32, g32 * w32, alpha, limit)
    return (y * w32).to(u.dtype), du.to(u.dtype), torch.linalg.vecdot(g32, y).to(u.dtype), du.float().sum(0)


# ---- CPU activation kernel (C, built on first use) -----------------------------------------------
# The torch chain makes ~15 passes over strided halves of each tile; on CPU that costs more than the
# expert matmuls. One C loop per row (fp32 math, fp32/bf16 storage, expf vectorised through glibc's
# libmvec) is 5-8x faster. Built by kernels/cbuild.py (as kernels/mxfp4_cpu.py): system compiler, cached
# per source and CPU, the torch reference as fallback (with a warning) when no compiler is there.
_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef USE_MVEC
#pragma omp declare simd simdlen(16) notinbranch
extern float expf(float);
#endif
static inline float minf(float a, float b) { return a < b ? a : b; }  /* fminf is a call: blocks simd */
static inline float maxf(float a, float b) { return a > b ? a : b; }
static inline float bf16_load(const uint16_t* p) { uint32_t b = (uint32_t)*p << 16; float f; memcpy(&f, &b, 4); return f; }
static inline void bf16_store(uint16_t* p, float f) {
    uint32_t b; memcpy(&b, &f, 4);
    *p = (f != f) ? 0x7FC0 : (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);  /* round to nearest even */
}
static inline float f32_load(const float* p) { return *p; }
static inline void f32_store(float* p, float f) { *p = f; }

/* u rows hold interleaved (gate, linear) pairs: u[2j] gate, u[2j + 1] linear. fwd writes
   w_r * swiglu(u_r); bwd recomputes it and writes
   w_r * y, du (for dy = w_r g), gy_r = g . y and adds the column sums of du into acc (fp32, 2I). */
#define KERNELS(SUFFIX, T, LOAD, STORE)                                                                  \
void swiglu_fwd_##SUFFIX(const T* u, const T* w, T* y, int64_t n, int64_t I, int64_t ld, float alpha,    \
                         float limit) {                                                                \
    for (int64_t r = 0; r < n; r++) {                                                                  \
        const T* ur = u + r * ld; T* yr = y + r * I;                                                   \
        float wr = LOAD(w + r);                                                                        \
        _Pragma("omp simd")                                                                           \
        for (int64_t j = 0; j < I; j++) {                                                              \
            float g = minf(LOAD(ur + 2 * j), limit);                                                   \
            float l = minf(maxf(LOAD(ur + 2 * j + 1), -limit), limit);                                 \
            STORE(yr + j, wr * (g / (1.0f + expf(-alpha * g)) * (l + 1.0f)));                          \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
void swiglu_bwd_##SUFFIX(const T* u, const T* gr, const T* w, T* y, T* du, T* gy, float* acc, int64_t n, \
                         int64_t I, int64_t ld, float alpha, float limit) {                            \
    for (int64_t r = 0; r < n; r++) {                                                                  \
        const T* ur = u + r * ld; const T* g_r = gr + r * I; T* yr = y + r * I; T* dr = du + r * 2 * I;   \
        float wr = LOAD(w + r), dot = 0.0f;                                                            \
        _Pragma("omp simd reduction(+:dot)")                                                          \
        for (int64_t j = 0; j < I; j++) {                                                              \
            float graw = LOAD(ur + 2 * j), lraw = LOAD(ur + 2 * j + 1), gv = LOAD(g_r + j);            \
            float g = minf(graw, limit), l1 = minf(maxf(lraw, -limit), limit) + 1.0f;                  \
            float s = 1.0f / (1.0f + expf(-alpha * g)), glu = g * s, yv = glu * l1, dy = gv * wr;      \
            float dg = graw <= limit ? dy * l1 * (s + alpha * glu * (1.0f - s)) : 0.0f;                \
            float dl = (lraw >= -limit && lraw <= limit) ? dy * glu : 0.0f;                            \
            STORE(yr + j, wr * yv);                                                                    \
            dot += gv * yv;                                                                            \
            STORE(dr + 2 * j, dg);                                                                     \
            STORE(dr + 2 * j + 1, dl);                                                                 \
            acc[2 * j] += dg;                                                                          \
            acc[2 * j + 1] += dl;                                                                      \
        }                                                                                              \
        STORE(gy + r, dot);                                                                            \
    }                                                                                                  \
}
KERNELS(f32, float, f32_load, f32_store)
KERNELS(bf16, uint16_t, bf16_load, bf16_store)

#ifdef _OPENMP
/* The same kernels over nb row blocks [n b / nb, n (b + 1) / nb) on OpenMP threads. torch loads its
   libgomp.so.1 before this library, so these are torch's own threads, still spinning from the GEMM
   just before: no hand-off, and no second pool competing with them for the cores. */
#define PARALLEL(SUFFIX, T)                                                                              \
void swiglu_fwd_par_##SUFFIX(const T* u, const T* w, T* y, int64_t n, int64_t I, int64_t ld, float alpha,\
                             float limit, int64_t nb) {                                                \
    _Pragma("omp parallel for schedule(static) num_threads(nb)")                                      \
    for (int64_t b = 0; b < nb; b++) {                                                                 \
        int64_t r0 = n * b / nb, r1 = n * (b + 1) / nb;                                                \
        swiglu_fwd_##SUFFIX(u + r0 * ld, w + r0, y + r0 * I, r1 - r0, I, ld, alpha, limit);            \
    }                                                                                                  \
}                                                                                                      \
void swiglu_bwd_par_##SUFFIX(const T* u, const T* gr, const T* w, T* y, T* du, T* gy, float* acc,       \
                             int64_t n, int64_t I, int64_t ld, float alpha, float limit, int64_t nb) { \
    _Pragma("omp parallel for schedule(static) num_threads(nb)")                                      \
    for (int64_t b = 0; b < nb; b++) {                                                                 \
        int64_t r0 = n * b / nb, r1 = n * (b + 1) / nb;                                                \
        swiglu_bwd_##SUFFIX(u + r0 * ld, gr + r0 * I, w + r0, y + r0 * I, du + r0 * 2 * I, gy + r0,    \
                            acc + b * 2 * I, r1 - r0, I, ld, alpha, limit);                            \
    }                                                                                                  \
}
PARALLEL(f32, float)
PARALLEL(bf16, uint16_t)
#endif
"""


class _CpuLib:
    """fwd/bwd[dtype]: one row range; fwd_par/bwd_par[dtype]: row blocks on OpenMP threads (empty when
    the library was built without OpenMP: the blocks then go to a Python thread pool)."""

    def __init__(self, lib: ctypes.CDLL):
        p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self.fwd, self.bwd, self.fwd_par, self.bwd_par = {}, {}, {}, {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            fwd, bwd = getattr(lib, f"swiglu_fwd_{suffix}"), getattr(lib, f"swiglu_bwd_{suffix}")
            fwd.argtypes, bwd.argtypes = [p] * 3 + [i, i, i, f, f], [p] * 7 + [i, i, i, f, f]
            self.fwd[dtype], self.bwd[dtype] = fwd, bwd
            if hasattr(lib, f"swiglu_fwd_par_{suffix}"):
                fwd, bwd = getattr(lib, f"swiglu_fwd_par_{suffix}"), getattr(lib, f"swiglu_bwd_par_{suffix}")
                fwd.argtypes, bwd.argtypes = [p] * 3 + [i, i, i, f, f, i], [p] * 7 + [i, i, i, f, f, i]
                self.fwd_par[dtype], self.bwd_par[dtype] = fwd, bwd


@functools.cache
def _cpu_lib() -> _CpuLib | None:
    """Build (once per machine, cached) and load the C activation; None if that is not possible."""
    from kernels import cbuild

    base = cbuild.native_flags() + ["-fno-math-errno", "-fopenmp-simd"]
    mvec = ["-DUSE_MVEC", "-lmvec", "-lm"]  # glibc's libmvec vectorises expf
    omp = cbuild.openmp_flags()
    variants = [base + omp + mvec, base + omp + ["-lm"]] + ([base + mvec, base + ["-lm"]] if omp else [])
    lib = cbuild.load("moe_cpu", _C_SOURCE, variants)
    return None if lib is None else _CpuLib(lib)


USE_CPU_KERNEL = True  # tests flip it to run the torch reference path on the same inputs
# Experts on CUDA run as grouped Triton GEMMs (kernels/moe_grouped_triton.py: gathers, bias and SwiGLU
# fused, MXFP4 decoded in the loads, no host sync); False runs the per-expert loop below.
CUDA_TRITON_GEMMS = True
# Rows per thread below which the activation runs on the calling thread (a hand-off costs ~20 us).
CPU_MIN_ROWS_PER_THREAD = 128


@functools.cache
def _row_pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads - 1, thread_name_prefix="deliberate-moe")


def _row_blocks(n: int) -> list[int]:
    """Block bounds [0, ..., n] over torch's intra-op thread count, at least CPU_MIN_ROWS_PER_THREAD rows each."""
    threads = max(1, min(torch.get_num_threads(), n // CPU_MIN_ROWS_PER_THREAD))
    return [n * i // threads for i in range(threads + 1)]


def _over_rows(fn: Callable[[int, int], None], n: int, blocks: list[int] | None = None) -> None:
    """fn(r0, r1) over row blocks of [0, n) (default `_row_blocks(n)`), in parallel on a Python pool: the
    fallback for a C activation built without OpenMP (ctypes releases the GIL, so the blocks run at
    once). With OpenMP the C code splits the same blocks over torch's own threads instead, measured 12%
    faster for the whole fp32 layer at 2 threads: the pool's thread competed for the cores with OpenMP
    threads still spinning after the GEMM before it."""
    blocks = blocks or _row_blocks(n)
    if len(blocks) == 2:
        fn(0, n)
        return
    futures = [_row_pool(len(blocks) - 1).submit(fn, blocks[i], blocks[i + 1]) for i in range(1, len(blocks) - 1)]
    fn(blocks[0], blocks[1])
    for f in futures:
        f.result()


def _cpu_kernel_ok(u: torch.Tensor) -> bool:
    return (USE_CPU_KERNEL and u.device.type == "cpu" and u.dtype in (torch.float32, torch.bfloat16)
            and u.stride(1) == 1 and _cpu_lib() is not None)


# ---- weights: dense parameters or frozen MXFP4 blocks --------------------------------------------
class _DenseWeights:
    """Per-expert views of transformers-layout expert weights: W1 (E, H, 2I), W2 (E, I, H)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor):
        self.w1, self.w2 = w1, w2

    def up(self, e: int) -> torch.Tensor:  # (H, 2I), columns interleaved
        return self.w1[e]

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

    def up(self, e: int) -> torch.Tensor:  # (H, 2I) as a transposed view of the decoded (2I, H)
        return self.dequantize(self.b1[e], self.s1[e], self.dtype).t()

    def down(self, e: int) -> torch.Tensor:  # (I, H)
        return self.dequantize(self.b2[e], self.s2[e], self.dtype).t()


# ---- routing bookkeeping -------------------------------------------------------------------------
def _row_bucket(n: int) -> int:
    """Row multiple an expert's segment is padded to on oneDNN dtypes: 32, or 1/16 of n's power of two
    above 512 (at most 16 shapes per octave, at most 6.25% padding)."""
    return max(32, 1 << max(0, n.bit_length() - 5))


def _sort_by_expert(top_k_index: torch.Tensor, num_experts: int, tile: int, pad: bool = False):
    """Sorted pair order, owning token of each sorted row, row tiles (e, start, end) of active experts,
    and `pos`: the row of each sorted pair (None = row i is pair i).

    pad=True gives each active expert one tile of `_row_bucket` rows, the rows past its pairs padding:
    their token is 0 and their routing weight 0, so they add exact zeros (the caller fills `ws` by
    `pos`). That is for CPU GEMMs that compile a kernel per new shape (oneDNN bf16/fp16: ~2 ms a
    shape on the 2-core box against ~0.2 ms for the GEMM); routing moves the per-expert counts every
    step, buckets keep the shapes few and cached."""
    flat = top_k_index.reshape(-1)  # (S,) S = N * k
    order = torch.argsort(flat, stable=True)  # (S,)
    tok = order // top_k_index.shape[-1]  # (S,)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync
    tiles, start = [], 0
    if pad:
        rows = [-(-n // _row_bucket(n)) * _row_bucket(n) for n in counts]
        shift, offset = [], 0  # padded start - unpadded start, per expert
        for e, (n, r) in enumerate(zip(counts, rows)):
            shift.append(start - offset)
            if n:
                tiles.append((e, start, start + r))
            start, offset = start + r, offset + n
        pos = torch.arange(flat.numel()) + torch.repeat_interleave(torch.tensor(shift), torch.tensor(counts))
        tok = tok.new_zeros(start).index_copy_(0, pos, tok)
        return order, tok, tiles, pos
    for e, n in enumerate(counts):
        parts = -(-n // tile)  # equal parts of at most `tile` rows: no tiny remainder tile
        tiles += [(e, start + n * i // parts, start + n * (i + 1) // parts) for i in range(parts)]
        start += n
    return order, tok, tiles, None


# Rows per tile on CPU in fp32/fp64 (an expert's rows in equal parts of at most this many; the
# CPU_PAD_DTYPES below run one padded tile per expert); None = one tile per active expert, the default:
# whole experts are faster for the fp32 layer (tiny shape, 1 thread: 52.6 vs 56.2 ms). The tile split
# sets the GEMMs' float summation order (dW sums over a tile's rows, then across tiles). The digit-sum
# world's SFT stage was chaotic in it (bench/RESULTS.md "The demo and the MoE tile split": whole-expert
# tiles gave a worse checkpoint there), which is why 1024-row tiles were the default until the walk
# world (issue 14), whose SFT forms the same circuit at every seed, thread count and split measured.
CPU_ROW_TILE: int | None = None
# CPU dtypes whose GEMMs go to oneDNN, which builds a kernel for every new shape: their experts are
# padded to `_row_bucket` rows, one tile each (`_sort_by_expert`). fp32 goes to MKL (no per-shape cost
# measured) and keeps the tiles above.
CPU_PAD_DTYPES = (torch.bfloat16, torch.float16)


class ExpertLora(NamedTuple):
    """Low-rank adapters of the expert projections in the experts' (E, in, out) layout: expert e computes
    with W1_e + scale * up_a[e] @ up_b[e] and W2_e + scale * down_a[e] @ down_b[e], in low-rank form
    (x @ A, then @ B), so no dense delta and no dense weight gradient is ever formed. A pair left None
    leaves that projection as it is."""

    up_a: torch.Tensor | None  # (E, H, r)
    up_b: torch.Tensor | None  # (E, r, 2I)
    down_a: torch.Tensor | None  # (E, I, r)
    down_b: torch.Tensor | None  # (E, r, H)
    scale: float

    def to(self, dtype: torch.dtype) -> ExpertLora:
        return ExpertLora(*(None if t is None else t.to(dtype) for t in self[:4]), self.scale)


_NO_LORA = ExpertLora(None, None, None, None, 0.0)


class _GroupedExperts(torch.autograd.Function):
    """out = sum_k w_k * expert_k(x); gradients for x, routing weights, biases and (dense) weights, and
    for the low-rank adapters when given (`ExpertLora`: frozen base + LoRA, the base dense or MXFP4).

    Saved: x, the pre-activation u (S, 2I), routing weights in pair order, the permutation and the dense
    routing weights R (N, E) with the top-k index (for the bias terms); the SwiGLU, the gathered tokens
    and the per-expert (decoded) weights are recomputed.
    """

    @staticmethod
    def forward(ctx, x, routing_weights, b1, b2, w1, w2, top_k_index, weights, alpha, limit,
                up_a, up_b, down_a, down_b, lora_scale):
        # x (N, H); routing_weights (N, k); b1 (E, 2I); b2 (E, H); w1/w2 only carry autograd for dense;
        # up_a (E, H, r), up_b (E, r, 2I), down_a (E, I, r), down_b (E, r, H) or None (ExpertLora)
        N, H = x.shape
        pad = not x.is_cuda and x.dtype in CPU_PAD_DTYPES
        tile = CPU_ROW_TILE if CPU_ROW_TILE and not x.is_cuda else max(1, top_k_index.numel())
        order, tok, tiles, pos = _sort_by_expert(top_k_index, b1.shape[0], tile, pad)
        ws = routing_weights.reshape(-1)[order].to(x.dtype)  # (S,) in pair order
        if pos is not None:  # padding rows: weight 0
            ws = ws.new_zeros(tok.shape[0]).index_copy_(0, pos, ws)
        # Down biases of all pairs at once: out = R @ b2 with R (N, E) the dense routing weights.
        R = x.new_zeros(N, b1.shape[0]).scatter_add_(1, top_k_index, routing_weights.to(x.dtype))
        u = x.new_empty(tok.shape[0], b1.shape[1])  # (S, 2I), S counting padding rows
        out = R @ b2  # (N, H)
        e_prev = -1
        for e, s, t in tiles:
            if e != e_prev:
                w_up, w_down, e_prev = weights.up(e), weights.down(e), e
            xt = x.index_select(0, tok[s:t])  # (n, H)
            ut = torch.addmm(b1[e], xt, w_up, out=u[s:t])  # (n, 2I)
            if up_a is not None:  # + scale (x A) B: adds exact zeros while B = 0
                ut.addmm_(xt @ up_a[e], up_b[e], alpha=lora_scale)
            yt = _act(ut, ws[s:t], alpha, limit)  # weighted (n, I)
            zt = yt @ w_down  # (n, H)
            if down_a is not None:
                zt.addmm_(yt @ down_a[e], down_b[e], alpha=lora_scale)
            out.index_add_(0, tok[s:t], zt)
        ctx.save_for_backward(x, u, ws, order, tok, b2, R, top_k_index, pos, up_a, up_b, down_a, down_b)
        ctx.tiles, ctx.weights, ctx.alpha, ctx.limit, ctx.lora_scale = tiles, weights, alpha, limit, lora_scale
        ctx.rw_shape, ctx.rw_dtype = routing_weights.shape, routing_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, u, ws, order, tok, b2, R, top_k_index, pos, up_a, up_b, down_a, down_b = ctx.saved_tensors
        tiles, weights, alpha, limit, scale = ctx.tiles, ctx.weights, ctx.alpha, ctx.limit, ctx.lora_scale
        need_x, need_rw, need_b1, need_b2, need_w1, need_w2 = ctx.needs_input_grad[:6]
        grad_out = grad_out.contiguous().to(x.dtype)
        E, two_i = b2.shape[0], u.shape[1]
        dx = torch.zeros_like(x) if need_x else None
        dws = ws.new_empty(ws.shape)  # (S,)
        # Per-expert gradients: the first tile of an expert writes, later tiles accumulate, idle experts get 0.
        dw1 = x.new_empty(E, x.shape[1], two_i) if need_w1 else None
        dw2 = torch.empty_like(weights.w2) if need_w2 else None
        db1 = torch.zeros(E, two_i, dtype=torch.float32, device=x.device) if need_b1 else None
        d_lora = [None if t is None else torch.zeros_like(t) for t in (up_a, up_b, down_a, down_b)]
        e_prev = -1
        for e, s, t in tiles:
            first = e != e_prev
            if first:
                w_up, w_down, e_prev = weights.up(e), weights.down(e), e
            idx = tok[s:t]
            go = grad_out.index_select(0, idx)  # (n, H) output grad of this pair, before the weight
            g = go @ w_down.t()  # (n, I) output grad through W2, before the weight
            if down_a is not None:  # ... and through scale A2 B2
                gb = go @ down_b[e].t()  # (n, r)
                g.addmm_(gb, down_a[e].t(), alpha=scale)
            wy, du, gy, du_sum = _act_backward(u[s:t], g, ws[s:t], alpha, limit)  # wy = w * y, recomputed
            dws[s:t] = gy  # d w = go . (y W2) = g . y; the b2 part comes from R below
            if down_a is not None:  # dA2 = s (w y)^T (go B2^T), dB2 = s (w y A2)^T go
                d_lora[2][e].addmm_(wy.t(), gb, alpha=scale)
                d_lora[3][e].addmm_((wy @ down_a[e]).t(), go, alpha=scale)
            if up_a is not None:  # dA1 = s x^T (du B1^T), dB1 = s (x A1)^T du
                xt, dub = x.index_select(0, idx), du @ up_b[e].t()  # (n, H), (n, r)
                d_lora[0][e].addmm_(xt.t(), dub, alpha=scale)
                d_lora[1][e].addmm_((xt @ up_a[e]).t(), du, alpha=scale)
            if need_w2:
                torch.mm(wy.t(), go, out=dw2[e]) if first else dw2[e].addmm_(wy.t(), go)
            if need_b1:
                db1[e] += du_sum
            if need_x:
                dxt = du @ w_up.t()  # (n, H)
                if up_a is not None:
                    dxt.addmm_(dub, up_a[e].t(), alpha=scale)
                dx.index_add_(0, idx, dxt)
            if need_w1:
                xs = x.index_select(0, idx).t()  # (H, n)
                torch.mm(xs, du, out=dw1[e]) if first else dw1[e].addmm_(xs, du)
        idle = sorted(set(range(E)) - {e for e, _, _ in tiles})
        for grad in (dw1, dw2):
            if grad is not None and idle:
                grad[idle] = 0
        db2 = R.t() @ grad_out if need_b2 else None  # (E, H); idle experts have R = 0
        drw = None
        if need_rw:
            if pos is not None:
                dws = dws[pos]  # drop the padding rows
            drw = torch.empty_like(dws)
            drw[order] = dws
            drw = drw.reshape(ctx.rw_shape) + (grad_out @ b2.t()).gather(1, top_k_index)  # + d(R @ b2)/dR
            drw = drw.to(ctx.rw_dtype)
        d_lora = [d if d is not None and need else None for d, need in zip(d_lora, ctx.needs_input_grad[10:14])]
        return (dx, drw, None if db1 is None else db1.to(b2.dtype), db2, dw1, dw2, None, None, None, None,
                *d_lora, None)


def _check_shapes(x, top_k_index, routing_weights, b1, b2):
    if x.dim() != 2 or top_k_index.shape != routing_weights.shape or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (N, H), top_k_index and routing weights (N, k); got {tuple(x.shape)=}, "
                         f"{tuple(top_k_index.shape)=}, {tuple(routing_weights.shape)=}")
    if b1.shape[0] != b2.shape[0] or b2.shape[1] != x.shape[1] or b1.shape[1] % 2:
        raise ValueError(f"biases do not match: {tuple(b1.shape)=} should be (E, 2I), "
                         f"{tuple(b2.shape)=} should be (E, {x.shape[1]})")


def expert_compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype dense experts compute in: the weights' own, as transformers' eager path does, except on
    CUDA under autocast, where they take the autocast dtype (the learner's bf16 autocast over fp32 master
    weights: bf16 grouped GEMMs with fp32 accumulation; the casts route gradients back to the fp32
    weights). CPU keeps the weights' dtype under autocast (TRL's bf16 SFT trains fp32 experts)."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return weight.dtype


def grouped_experts(x: torch.Tensor, top_k_index: torch.Tensor, routing_weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor, down_proj: torch.Tensor,
                    down_proj_bias: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                    limit: float = SWIGLU_LIMIT, *, lora: ExpertLora | None = None) -> torch.Tensor:
    """Dense experts in transformers' layout. x (N, H), top_k_index/routing_weights (N, k),
    gate_up_proj (E, H, 2I), gate_up_proj_bias (E, 2I), down_proj (E, I, H), down_proj_bias (E, H) -> (N, H).
    `lora`: adapters added in low-rank form (the per-expert loop; the Triton grouped GEMMs take none)."""
    _check_shapes(x, top_k_index, routing_weights, gate_up_proj_bias, down_proj_bias)
    if gate_up_proj.shape != (gate_up_proj_bias.shape[0], x.shape[1], gate_up_proj_bias.shape[1]):
        raise ValueError(f"{tuple(gate_up_proj.shape)=} should be (E, H, 2I) = "
                         f"{(gate_up_proj_bias.shape[0], x.shape[1], gate_up_proj_bias.shape[1])}")
    dtype = expert_compute_dtype(x, gate_up_proj)
    x_in, gate_up_proj, down_proj = x.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype)
    # Autocast (e.g. TRL's default bf16 on CPU) would recast the addmms inside the Function and break
    # its dtype bookkeeping: the experts compute in one dtype chosen above, with autocast off inside.
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.is_cuda and CUDA_TRITON_GEMMS and lora is None:
            from kernels.moe_grouped_triton import grouped_experts_triton

            out = grouped_experts_triton(x_in, top_k_index, routing_weights, gate_up_proj,
                                         gate_up_proj_bias.to(x_in.dtype), down_proj,
                                         down_proj_bias.to(x_in.dtype), alpha, limit)
            return out.to(x.dtype)
        out = _GroupedExperts.apply(x_in, routing_weights, gate_up_proj_bias.to(x_in.dtype),
                                    down_proj_bias.to(x_in.dtype), gate_up_proj, down_proj, top_k_index,
                                    _DenseWeights(gate_up_proj, down_proj), alpha, limit,
                                    *(lora or _NO_LORA).to(dtype))
    return out.to(x.dtype)


def mxfp4_experts(x: torch.Tensor, top_k_index: torch.Tensor, routing_weights: torch.Tensor,
                  gate_up_proj_blocks: torch.Tensor, gate_up_proj_scales: torch.Tensor,
                  gate_up_proj_bias: torch.Tensor, down_proj_blocks: torch.Tensor,
                  down_proj_scales: torch.Tensor, down_proj_bias: torch.Tensor, *, alpha: float = SWIGLU_ALPHA,
                  limit: float = SWIGLU_LIMIT, compute_dtype: torch.dtype | None = None,
                  dequantize: Callable | None = None, lora: ExpertLora | None = None) -> torch.Tensor:
    """Frozen MXFP4 experts in the checkpoint layout: gate_up_proj_blocks (E, 2I, H/32, 16) uint8,
    gate_up_proj_scales (E, 2I, H/32) uint8, down_proj_blocks (E, H, I/32, 16), down_proj_scales (E, H, I/32).
    Gradients reach x, the routing weights, the biases and `lora`'s adapters, never the 4-bit weights
    (LoRA runs in the per-expert loop, each expert decoded on the fly; the Triton grouped GEMMs take none)."""
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
    if x.is_cuda and CUDA_TRITON_GEMMS and dequantize is None and lora is None:  # decoded inside the GEMMs
        from kernels.moe_grouped_triton import mxfp4_experts_triton

        out = mxfp4_experts_triton(x.to(dtype), top_k_index, routing_weights, gate_up_proj_blocks,
                                   gate_up_proj_scales, gate_up_proj_bias.to(dtype), down_proj_blocks,
                                   down_proj_scales, down_proj_bias.to(dtype), alpha, limit)
        return out.to(x.dtype)
    weights = _Mxfp4Weights(gate_up_proj_blocks, gate_up_proj_scales, down_proj_blocks, down_proj_scales,
                            dtype, dequantize)
    out = _GroupedExperts.apply(x.to(dtype), routing_weights, gate_up_proj_bias.to(dtype),
                                down_proj_bias.to(dtype), None, None, top_k_index, weights, alpha, limit,
                                *(lora or _NO_LORA).to(dtype))
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

    @classmethod
    def from_dense(cls, experts: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                   scale_rule: str = "floor") -> FrozenMxfp4Experts:
        """Quantise a transformers `GptOssExperts` (W1 (E, H, 2I), W2 (E, I, H)) into the checkpoint layout."""
        from kernels.mxfp4 import quantize

        new = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, experts.alpha,
                  experts.limit, compute_dtype)
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(experts, name).detach().transpose(1, 2).contiguous()  # (E, out, in): groups along in
                blocks, scales = quantize(w, scale_rule=scale_rule)
                getattr(new, f"{name}_blocks").copy_(blocks)
                getattr(new, f"{name}_scales").copy_(scales)
                getattr(new, f"{name}_bias").copy_(getattr(experts, f"{name}_bias"))
        return new

    def forward(self, hidden_states, router_indices, routing_weights, lora: ExpertLora | None = None):
        # (N, H), (N, k), (N, k) -> (N, H); `lora`: adapters over the frozen 4-bit weights (rl/lora.py)
        return mxfp4_experts(hidden_states, router_indices, routing_weights, self.gate_up_proj_blocks,
                             self.gate_up_proj_scales, self.gate_up_proj_bias, self.down_proj_blocks,
                             self.down_proj_scales, self.down_proj_bias, alpha=self.alpha, limit=self.limit,
                             compute_dtype=self.compute_dtype, lora=lora)
