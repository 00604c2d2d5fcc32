"""Where the learner computes: `learner.device` resolved to a torch device, and the autocast it runs under.

    device = resolve_device(cfg.device)                # "auto" | "cpu" | "cuda"
    dtype = autocast_dtype(device, cfg.autocast, cfg.dtype)   # None: no autocast
    with autocast(device, dtype): ...                  # forward passes only; backward outside

`auto` is CUDA when torch sees a device and, inside a Ray actor, Ray assigned this actor a GPU
(`learner.num_gpus`). The second condition matters: Ray 2.60 no longer hides GPUs from an actor that
asked for none (CUDA_VISIBLE_DEVICES is left as the node has it, ray-project/ray#54868), so an actor
with `num_gpus=0` would otherwise put the learner on GPU 0 behind Ray's back, next to whatever vLLM
engine Ray placed there. `cuda` asked for explicitly in an actor without a GPU is an error saying so.

Autocast (`learner.autocast`): `auto` = bf16 autocast on CUDA when the master weights are fp32 (the
usual mixed precision: fp32 weights, gradients and AdamW states; matmuls in bf16), none on CPU, so the
CPU learner computes exactly what it did before this option existed. `bfloat16` asks for it on either
device; `off` never. fp16 is not offered: it needs a loss scaler, bf16 does not.
"""
from __future__ import annotations

import contextlib

import torch

DEVICES = ("auto", "cpu", "cuda")
AUTOCAST = ("auto", "off", "bfloat16")


def _ray_actor_gpus() -> list | None:
    """GPU ids Ray assigned to this process if it is a Ray actor, else None (not under Ray)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency; kept for a learner used without it
        return None
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return list(ray.get_gpu_ids())


def resolve_device(name: str, *, cuda_available: bool | None = None, ray_gpus: list | None = ...) -> torch.device:
    """`learner.device` -> torch.device. `cuda_available` / `ray_gpus` default to what this process
    sees (tests pass them); `ray_gpus` None means "not inside a Ray actor".

    >>> resolve_device("auto", cuda_available=False, ray_gpus=None)
    device(type='cpu')
    >>> resolve_device("auto", cuda_available=True, ray_gpus=[])   # a Ray actor with num_gpus=0
    device(type='cpu')
    >>> resolve_device("auto", cuda_available=True, ray_gpus=[0])
    device(type='cuda')
    """
    if name not in DEVICES:
        raise ValueError(f"learner.device={name!r}: must be one of {list(DEVICES)}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if ray_gpus is ...:
        ray_gpus = _ray_actor_gpus()
    if name == "cpu":
        return torch.device("cpu")
    usable = cuda_available and (ray_gpus is None or len(ray_gpus) > 0)
    if name == "auto":
        return torch.device("cuda" if usable else "cpu")
    if not cuda_available:
        raise RuntimeError(f"learner.device=cuda but torch sees no CUDA device (torch {torch.__version__}, "
                           f"CUDA build {torch.version.cuda}); install a CUDA torch or use learner.device=cpu")
    if ray_gpus is not None and not ray_gpus:
        raise RuntimeError("learner.device=cuda but Ray gave the learner actor no GPU: set learner.num_gpus "
                           "(e.g. 1, or 0.5 to share one GPU with a rollout worker)")
    return torch.device("cuda")


def autocast_dtype(device: torch.device, mode: str, weights_dtype: str) -> torch.dtype | None:
    """The autocast dtype for `learner.autocast=mode` with master weights `learner.dtype`; None = none.

    >>> autocast_dtype(torch.device("cpu"), "auto", "float32") is None
    True
    >>> autocast_dtype(torch.device("cuda"), "auto", "float32")
    torch.bfloat16
    >>> autocast_dtype(torch.device("cuda"), "auto", "bfloat16") is None   # bf16 weights: nothing to cast
    True
    """
    if mode not in AUTOCAST:
        raise ValueError(f"learner.autocast={mode!r}: must be one of {list(AUTOCAST)}")
    if mode == "off" or (mode == "auto" and (device.type != "cuda" or weights_dtype != "float32")):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` on `device` in `dtype`, or a no-op context when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
