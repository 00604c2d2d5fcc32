"""Quantisation-aware training for MXFP4 experts: fake quantisation with a straight-through estimator.

What: `fake_quantize_mxfp4(w)` returns dequantize(quantize(w)) in w's dtype, so the forward pass sees
exactly the weights an MXFP4 rollout engine will serve; the backward pass hands the incoming gradient
to the master weight unchanged (straight-through estimator). `quantized_expert_weights(model)` returns
those exact weights for every expert projection, to ship to the rollout engine (or compare with what
`kernels.mxfp4_checkpoint.save_mxfp4_checkpoint` writes: same bytes, same rule).

How to use in a training step:
    w_q = fake_quantize_mxfp4(experts.gate_up_proj, dim=EXPERT_GROUP_DIM)  # [E, H, 2I], grads flow to master
    # after each optimizer step, ship quantized_expert_weights(model) to the rollout engine

Departures: plain STE, no gradient mask where the "floor" rule clips to +-6 (some QAT papers zero
those gradients); stochastic rounding is available but off by default.
"""

from __future__ import annotations

import torch

from kernels.mxfp4 import dequantize, quantize
from kernels.mxfp4_checkpoint import EXPERT_WEIGHTS

# transformers keeps expert weights as [E, in, out]; MXFP4 groups run along the input dimension.
EXPERT_GROUP_DIM = -2


def _fake_quantize(w, dim, scale_rule, stochastic, generator):
    x = w.movedim(dim, -1)  # groups of 32 along the last dim
    blocks, scales = quantize(x, scale_rule=scale_rule, stochastic=stochastic, generator=generator)
    return dequantize(blocks, scales, w.dtype).movedim(-1, dim).contiguous()


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, dim, scale_rule, stochastic, generator):
        return _fake_quantize(w, dim, scale_rule, stochastic, generator)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None, None, None, None  # straight through to the master weight


def fake_quantize_mxfp4(
    w: torch.Tensor,
    *,
    dim: int = -1,
    scale_rule: str = "floor",
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MXFP4 round trip of `w` along `dim` (size a multiple of 32) in w's dtype; gradient = identity."""
    return _FakeQuantizeSTE.apply(w, dim, scale_rule, stochastic, generator)


@torch.no_grad()
def quantized_expert_weight(w: torch.Tensor, *, scale_rule: str = "floor") -> torch.Tensor:
    """The exact dequantised MXFP4 weight of one expert projection `w` [E, in, out] (same layout and dtype)."""
    return _fake_quantize(w, EXPERT_GROUP_DIM, scale_rule, False, None)


@torch.no_grad()
def quantized_expert_weights(model: torch.nn.Module, *, scale_rule: str = "floor") -> dict[str, torch.Tensor]:
    """{parameter name: exact dequantised MXFP4 weight} for every expert projection of a gpt-oss model.

    Same layout and dtype as the parameters ([E, in, out]); other parameters are not included.
    """
    out = {
        name: quantized_expert_weight(param, scale_rule=scale_rule)
        for name, param in model.named_parameters()
        if name.endswith(EXPERT_WEIGHTS)
    }
    if not out:
        raise ValueError(f"no parameter of {type(model).__name__} ends with {EXPERT_WEIGHTS}: not a gpt-oss MoE?")
    return out


def grouped_experts_qat_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """`ExpertsInterface` function for QAT: the grouped experts on fake-quantised MXFP4 weights.

    The forward sees exactly the weights a checkpoint (and the rollout engine) gets; the gradient goes
    straight through to the fp32/bf16 master parameters, which keep their names and shapes.
    """
    from kernels.moe import grouped_experts

    return grouped_experts(
        hidden_states, top_k_index, top_k_weights,
        fake_quantize_mxfp4(self.gate_up_proj, dim=EXPERT_GROUP_DIM), self.gate_up_proj_bias,
        fake_quantize_mxfp4(self.down_proj, dim=EXPERT_GROUP_DIM), self.down_proj_bias,
        self.alpha, self.limit)
