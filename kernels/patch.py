"""Switch a transformers gpt-oss model to our MoE and attention kernels, in place, and back.

What: `apply_kernels(model, moe=True, attention=True)` registers
  - `kernels.moe.grouped_experts_forward` as experts implementation "deliberate_grouped"
    (transformers' `ExpertsInterface`), and
  - `kernels.attention.sink_attention_forward` + `sink_attention_mask` as attention implementation
    "deliberate_sink" (`AttentionInterface` + `AttentionMaskInterface`),
then selects them through transformers' own `set_experts_implementation` / `set_attn_implementation`.
No module is replaced and no parameter is touched, so the state dict, `save_pretrained` output, PEFT
wrapping and optimizer state are unchanged. `remove_kernels(model)` restores the implementations the
model had before; `set_kernels(model, "deliberate" | "stock")` is the config switch the learner uses
(`learner.kernels`).

The name `kernels`: Hugging Face also ships a package called `kernels`, which transformers probes at
import (`is_kernels_available()` in transformers.utils.import_utils, then `from kernels import ...` in
transformers/integrations/hub_kernels.py). Our package shadows the name. The probe resolves the version
through the distribution that owns the top-level name - here `deliberate` 0.1.0 - and only accepts
0.17 <= version < 0.18, so it answers False and transformers never imports from us. This holds while the
project version stays outside [0.17, 0.18); tests/kernels/test_patch.py checks it in a fresh interpreter,
and `check_hub_kernels_probe()` raises if it ever flips.

Run: `from kernels.patch import apply_kernels; apply_kernels(model)`. Tests: tests/kernels/test_patch.py.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

EXPERTS_IMPL = "deliberate_grouped"
QAT_EXPERTS_IMPL = "deliberate_grouped_qat"  # the same on fake-quantised MXFP4 expert weights (STE)
ATTENTION_IMPL = "deliberate_sink"
_STOCK_ATTR = "_deliberate_stock_impl"  # stored on the model: implementations before apply_kernels


def check_hub_kernels_probe() -> None:
    """Raise if transformers believes the Hugging Face `kernels` hub package is importable (it is us)."""
    from transformers.utils.import_utils import is_kernels_available

    if is_kernels_available():
        import kernels

        if not hasattr(kernels, "get_kernel"):
            raise RuntimeError(
                "transformers thinks the Hugging Face `kernels` package is installed, but `import kernels` is this "
                f"project ({kernels.__file__}); keep the `deliberate` version outside [0.17, 0.18) or rename our package")


def register() -> None:
    """Register our implementations with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.masking_utils import AttentionMaskInterface

    from kernels.attention import sink_attention_forward, sink_attention_mask
    from kernels.moe import grouped_experts_forward

    check_hub_kernels_probe()
    AttentionInterface.register(ATTENTION_IMPL, sink_attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPL, sink_attention_mask)
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPL, grouped_experts_forward)
    from kernels.qat import grouped_experts_qat_forward

    ALL_EXPERTS_FUNCTIONS.register(QAT_EXPERTS_IMPL, grouped_experts_qat_forward)


def _base(model: torch.nn.Module):
    """The transformers `PreTrainedModel` inside a PEFT wrapper (or the model itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "set_attn_implementation") or not hasattr(base, "set_experts_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel (nor a PEFT wrapper of one)")
    if getattr(base.config, "model_type", None) != "gpt_oss":
        raise TypeError(f"our kernels implement gpt-oss; got model_type={getattr(base.config, 'model_type', None)!r}")
    return base


def apply_kernels(model: torch.nn.Module, *, moe: bool = True, attention: bool = True,
                  qat: bool = False) -> torch.nn.Module:
    """Switch `model` (GptOssForCausalLM, or a PEFT wrapper of one) to our kernels in place; returns it.

    `qat=True` runs the experts on fake-quantised MXFP4 weights with straight-through gradients."""
    if qat and not moe:
        raise ValueError("qat=True needs moe=True: QAT runs inside our grouped experts")
    base = _base(model)
    register()
    cfg = base.config
    if not hasattr(base, _STOCK_ATTR):
        setattr(base, _STOCK_ATTR, {"attn": cfg._attn_implementation, "experts": cfg._experts_implementation})
    stock = getattr(base, _STOCK_ATTR)
    base.set_attn_implementation(ATTENTION_IMPL if attention else stock["attn"])
    base.set_experts_implementation((QAT_EXPERTS_IMPL if qat else EXPERTS_IMPL) if moe else stock["experts"])
    return model


def remove_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_kernels`: back to the implementations the model had before (no-op if never applied)."""
    base = _base(model)
    stock = getattr(base, _STOCK_ATTR, None)
    if stock is not None:
        base.set_attn_implementation(stock["attn"])
        base.set_experts_implementation(stock["experts"])
        delattr(base, _STOCK_ATTR)
    return model


def kernels_in_use(model: torch.nn.Module) -> dict[str, bool]:
    """{"moe": ..., "attention": ...}: which of our kernels the model currently dispatches to."""
    cfg = _base(model).config
    return {"moe": cfg._experts_implementation in (EXPERTS_IMPL, QAT_EXPERTS_IMPL),
            "qat": cfg._experts_implementation == QAT_EXPERTS_IMPL,
            "attention": cfg._attn_implementation == ATTENTION_IMPL}


KERNEL_MODES: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "deliberate": apply_kernels,
    "stock": remove_kernels,
}


def set_kernels(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """`learner.kernels` switch: "deliberate" -> apply_kernels, "stock" -> transformers' own modules."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernels mode {mode!r}; valid: {sorted(KERNEL_MODES)}")
    return KERNEL_MODES[mode](model)
