"""MXFP4 quantise / dequantise in the gpt-oss checkpoint layout.

What: `quantize(w)` turns a float tensor [..., K] into `(blocks, scales)`: uint8 blocks [..., K/32, 16]
holding two E2M1 codes per byte (element 2j in the low nibble, 2j+1 in the high nibble) and uint8
E8M0 scales [..., K/32] (byte s means 2^(s-127)). `dequantize(blocks, scales)` is the inverse:
value = FP4_VALUES[code] * 2^(s-127), exact in bf16. Groups of 32 run along the LAST dimension; the
checkpoint code (kernels/mxfp4_checkpoint.py) moves the input dimension last before calling us.

How: one plain-torch reference (`quantize_ref` / `dequantize_ref`, written for clarity) and faster
twins chosen by `backend=` through the `BACKENDS` registry:
  "torch"  - the reference, any device;
  "cpu"    - fast CPU path (kernels/mxfp4_cpu.py: small C loops; dequantise is one table load per byte);
  "triton" - Triton kernels (kernels/mxfp4_triton.py); runs natively on CUDA tensors and under the
             Triton interpreter on CPU tensors (that is how CPU tests validate it).
`backend=None` picks "triton" for CUDA tensors and "cpu" otherwise. All backends give identical bytes.

Scale rules (amax = max |x| over the group):
  "floor" - OCP MX: 2^(floor(log2 amax) - 2); the top values of a group can clip to +-6.
  "ceil"  - triton_kernels' default: 2^ceil(log2(amax / 6)); never clips.
Elements are divided by the scale, rounded to nearest (ties to the even code) on the E2M1 grid and
saturated at +-6; or, with `stochastic=True`, rounded up with probability (x - lo) / (hi - lo) using
uniform draws from an explicit `torch.Generator` (same generator state -> same bytes on every backend).

Where we depart from / pin down the specs:
  - an all-zero group gets scale byte 127 (2^0) instead of the -inf exponent the formula gives;
  - a group holding inf or NaN gets scale byte 255 (E8M0 NaN) and dequantises to NaN (transformers'
    `convert_moe_packed_tensors` decodes byte 255 as 2^128 instead);
  - a NaN group's codes are all 0; finite scale bytes are clamped to [0, 254];
  - the sign bit is copied, so -0.0 and negatives that round to zero give code 8 (-0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

GROUP_SIZE = 32  # elements sharing one E8M0 scale
BYTES_PER_GROUP = GROUP_SIZE // 2  # two 4-bit codes per byte
# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0
E2M1_EMAX = 2  # exponent of FP4_MAX's leading bit: the OCP floor rule subtracts it
E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_MAX_FINITE = 254
ZERO_GROUP_SCALE = E8M0_BIAS  # scale byte for an all-zero group: 2^0
SCALE_RULES = ("floor", "ceil")


# ----------------------------------------------------------------------------------------------
# Input checks (shared by every backend)


def check_quantize_input(w: torch.Tensor, scale_rule: str) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        what = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"quantize expects a floating-point tensor, got {what}")
    if w.ndim == 0 or w.shape[-1] % GROUP_SIZE != 0:
        raise ValueError(
            f"{w.shape=}: the last dimension must be a multiple of {GROUP_SIZE} "
            "(MXFP4 groups run along it); pad or transpose first"
        )
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"{scale_rule=} is not one of {SCALE_RULES}")


def check_dequantize_input(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
    if blocks.dtype != torch.uint8:
        raise TypeError(f"{blocks.dtype=} must be torch.uint8 (two E2M1 codes per byte)")
    if scales.dtype != torch.uint8:
        raise TypeError(f"{scales.dtype=} must be torch.uint8 (E8M0 exponent bytes)")
    if blocks.ndim < 2 or blocks.shape[-1] != BYTES_PER_GROUP:
        raise ValueError(f"{blocks.shape=} must be [..., K/32, {BYTES_PER_GROUP}]")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"{blocks.shape=} does not match {scales.shape=}: need scales.shape == blocks.shape[:-1]")
    if blocks.device != scales.device:
        raise ValueError(f"{blocks.device=} differs from {scales.device=}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dequantize needs a floating-point output dtype, got {dtype=}")


def e8m0_values(device: torch.device | str = "cpu") -> torch.Tensor:
    """(256,) float64: E8M0 byte -> 2^(s-127), byte 255 -> NaN. Every entry is exact in fp32 and bf16."""
    values = [math.ldexp(1.0, s - E8M0_BIAS) for s in range(E8M0_NAN)] + [math.nan]
    return torch.tensor(values, dtype=torch.float64, device=device)


def uniform_noise(w: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) draws, one per element of `w` (fp32), for stochastic rounding on any backend."""
    return torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Plain-torch reference


def _scale_exponent_ref(amax: torch.Tensor, scale_rule: str) -> torch.Tensor:
    """E8M0 byte per group from the group amax (any float dtype) -> int64, same shape."""
    amax64 = amax.double()  # float64 so amax / 6 is exact enough to take its ceil-log2 honestly
    if scale_rule == "floor":
        _, e = torch.frexp(amax64)  # amax = m * 2^e, m in [0.5, 1) -> floor(log2 amax) = e - 1
        k = e.long() - 1 - E2M1_EMAX
    else:
        m, e = torch.frexp(amax64 / FP4_MAX)  # ceil(log2 d) = e - 1 exactly when m == 0.5
        k = e.long() - (m == 0.5).long()
    s = (k + E8M0_BIAS).clamp(0, E8M0_MAX_FINITE)
    s = torch.where(amax64 == 0, ZERO_GROUP_SCALE, s)
    return torch.where(torch.isfinite(amax64), s, E8M0_NAN)


def _round_rne_ref(m: torch.Tensor) -> torch.Tensor:
    """|x| / scale (fp32, >= 0) -> E2M1 magnitude code 0..7, nearest with ties to the even code."""
    m = m.clamp(max=FP4_MAX)
    # Grid spacing is 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6]; torch.round is half-to-even and on each
    # segment an even multiple of the spacing is exactly an even code.
    v = torch.where(m < 2, torch.round(m * 2) / 2, torch.where(m < 4, torch.round(m), torch.round(m / 2) * 2))
    return torch.where(v < 2, v * 2, torch.where(v < 4, v + 2, v / 2 + 4)).long()


def _round_stochastic_ref(m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Round m >= 0 to the grid point below or above it; up with probability (m - lo) / (hi - lo)."""
    grid = torch.tensor(FP4_VALUES[:8], device=m.device)  # (8,)
    m = m.clamp(max=FP4_MAX)
    lo_code = torch.bucketize(m, grid[1:], right=True)  # number of grid points <= m, minus one
    lo = grid[lo_code]
    hi = grid[(lo_code + 1).clamp(max=7)]
    # (hi - lo) is a power of two and m - lo is exact, so this comparison is exact on every backend.
    return lo_code + (u * (hi - lo) < m - lo).long()


def quantize_ref(
    w: torch.Tensor, *, scale_rule: str = "floor", noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantiser. `noise` (same shape as w, fp32 in [0, 1)) switches on stochastic rounding."""
    *lead, k = w.shape
    x = w.float().reshape(*lead, k // GROUP_SIZE, GROUP_SIZE)  # (..., G, 32)
    s = _scale_exponent_ref(x.abs().amax(dim=-1), scale_rule)  # (..., G) int64; NaN in amax -> 255
    scale = e8m0_values(x.device)[s.clamp(max=E8M0_MAX_FINITE)].float()  # (..., G)
    q = x / scale.unsqueeze(-1)  # power-of-two divide: exact
    if noise is None:
        code = _round_rne_ref(q.abs())
    else:
        code = _round_stochastic_ref(q.abs(), noise.reshape(x.shape))
    code = code | (torch.signbit(q).long() << 3)  # (..., G, 32) in 0..15; -0.0 keeps its sign too
    code = torch.where((s == E8M0_NAN).unsqueeze(-1), 0, code)  # a NaN group carries no codes
    packed = code[..., 0::2] | (code[..., 1::2] << 4)  # (..., G, 16): element 2j low, 2j+1 high
    return packed.to(torch.uint8), s.to(torch.uint8)


def dequantize_ref(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference dequantiser: [..., G, 16] uint8 + [..., G] uint8 -> [..., G * 32] in `dtype`."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # (..., G, 16, 2)
    values = lut[codes].flatten(-2)  # (..., G, 32)
    scale = e8m0_values(blocks.device)[scales.long()].float()  # (..., G); 2^-127 is an fp32 subnormal
    return (values * scale.unsqueeze(-1)).flatten(-2).to(dtype)


# ----------------------------------------------------------------------------------------------
# Backend registry and public entry points


def _cpu_quantize(w, *, scale_rule, noise):
    from kernels import mxfp4_cpu

    return mxfp4_cpu.quantize(w, scale_rule=scale_rule, noise=noise)


def _triton_quantize(w, *, scale_rule, noise):
    from kernels import mxfp4_triton

    return mxfp4_triton.quantize(w, scale_rule=scale_rule, noise=noise)


def _cpu_dequantize(blocks, scales, dtype):
    from kernels import mxfp4_cpu

    return mxfp4_cpu.dequantize(blocks, scales, dtype)


def _triton_dequantize(blocks, scales, dtype):
    from kernels import mxfp4_triton

    return mxfp4_triton.dequantize(blocks, scales, dtype)


# name -> (quantize(w, scale_rule=, noise=), dequantize(blocks, scales, dtype)); inputs already checked.
BACKENDS: dict[str, tuple[Callable, Callable]] = {
    "torch": (quantize_ref, dequantize_ref),
    "cpu": (_cpu_quantize, _cpu_dequantize),
    "triton": (_triton_quantize, _triton_dequantize),
}


def _backend(name: str | None, device: torch.device) -> tuple[Callable, Callable]:
    if name is None:
        name = "triton" if device.type == "cuda" else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"unknown MXFP4 backend {name!r}; valid: {sorted(BACKENDS)}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {device=}; use 'triton' or 'torch'")
    return BACKENDS[name]


def quantize(
    w: torch.Tensor,
    *,
    scale_rule: str = "floor",
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise w [..., K] (K % 32 == 0) -> blocks [..., K/32, 16] uint8, scales [..., K/32] uint8.

    >>> blocks, scales = quantize(torch.tensor([[1.0, -0.5] + [0.0] * 30]))
    >>> hex(blocks[0, 0, 0].item()), scales[0, 0].item()  # 1.0 / 2^-2 = 4 -> code 6; -2 -> code 0xC
    ('0xc6', 125)
    """
    check_quantize_input(w, scale_rule)
    quantize_fn, _ = _backend(backend, w.device)
    noise = uniform_noise(w, generator) if stochastic else None
    return quantize_fn(w.detach(), scale_rule=scale_rule, noise=noise)


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *, backend: str | None = None
) -> torch.Tensor:
    """Dequantise blocks [..., G, 16] uint8 + scales [..., G] uint8 -> [..., G * 32] in `dtype`."""
    check_dequantize_input(blocks, scales, dtype)
    _, dequantize_fn = _backend(backend, blocks.device)
    return dequantize_fn(blocks, scales, dtype)
