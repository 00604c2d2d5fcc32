"""Metrics sinks and console progress for the SFT and RL stages.

`MetricsLogger(run_dir, cfg.logging, config)` fans each `log(metrics, step)` out to:

- `<run_dir>/metrics.jsonl`: one JSON object per call, `{"step": step, **metrics}`, appended and
  flushed at once (a crash keeps every line logged before it; a resumed run appends after them);
- TensorBoard scalars in `<run_dir>/tensorboard` when `logging.tensorboard`
  (`tensorboard --logdir <run_dir>`); a key `a/b` shows as chart `b` in section `a`;
- Weights & Biases when `logging.wandb` (`pip install .[wandb]`): project `logging.wandb_project`,
  mode `logging.wandb_mode`, files under `<run_dir>/wandb`. `offline` never touches the network and
  needs no login (no system-stats sampler, which probes cloud metadata endpoints); upload later with
  `wandb sync <run_dir>/wandb/offline-run-*`.

`progress_line` formats the one-line console progress both stages print (step/total, metrics,
elapsed, ETA), and `quiet_progress_bars()` silences the tqdm bars of datasets / transformers /
huggingface_hub (dataset maps, "Writing model shards") inside a block.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from rl.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Scalars per step to metrics.jsonl, TensorBoard and W&B (see the module docstring).

    Use as a context manager, or call `close()` (idempotent) when done."""

    def __init__(self, run_dir: str | os.PathLike, cfg: LoggingConfig, config: dict | None = None,
                 *, name: str | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # W&B first: it is the sink most likely to fail (package missing), and nothing is open yet.
        self._wandb = _wandb_run(self.run_dir, cfg, config, name) if cfg.wandb else None
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record `metrics` (numbers: floats, ints, 0-d tensors) at `step`."""
        if self._jsonl is None:
            raise RuntimeError(f"MetricsLogger({self.run_dir}) is closed")
        values = {key: float(value) for key, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            # finish() returns before wandb-core has written the run file (offline: often only its
            # 7-byte header); teardown waits for the service to flush and exit, so after close()
            # the run folder is complete. The next MetricsLogger starts a new service (~1 s).
            wandb.teardown()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wandb_run(run_dir: Path, cfg: LoggingConfig, config: dict | None, name: str | None):
    """A W&B run writing under `run_dir`; offline mode is network-free (see the module docstring)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("logging.wandb=true needs the wandb package: pip install .[wandb] "
                          "(or set logging.wandb=false)") from None
    offline = cfg.wandb_mode != "online"
    settings = wandb.Settings(
        silent=True,  # we print the one line that matters (where the run went)
        console="off",  # metrics only: no stdout capture fighting Ray's and our console output
        x_disable_stats=offline,  # the stats sampler probes cloud metadata endpoints over the network
    )
    run = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir), config=config,
                     name=name, settings=settings)
    if cfg.wandb_mode != "disabled":
        where = run.url if not offline else f"{Path(run.dir).parent} (upload: wandb sync <that folder>)"
        print(f"W&B {cfg.wandb_mode} run: {where}", flush=True)
    return run


def _clock(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _number(value: Any) -> str:
    """Up to 4 decimals in [1e-3, 1e4) (trailing zeros dropped), 3 significant digits outside."""
    if not isinstance(value, float):
        return str(value)
    if value != 0 and not 1e-3 <= abs(value) < 1e4:  # also nan/inf
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".") or "0"


def progress_line(stage: str, step: int, total: int, elapsed_s: float, metrics: dict[str, Any],
                  eta_s: float | None = None) -> str:
    """One readable console line: stage, step/total, metrics, elapsed and ETA (`eta_s`, else linear
    in steps from `elapsed_s`).

    >>> progress_line("sft", 25, 100, 30.0, {"loss": 1.23456, "lr": 0.001})
    'sft  step 25/100 (25%)  loss 1.2346  lr 0.001  elapsed 0:30  eta 1:30'
    """
    if eta_s is None:
        eta_s = elapsed_s / step * (total - step) if step > 0 else float("nan")
    parts = [f"{stage}  step {step}/{total} ({100 * step // max(total, 1)}%)"]
    parts += [f"{key} {_number(value)}" for key, value in metrics.items()]
    parts += [f"elapsed {_clock(elapsed_s)}", f"eta {_clock(eta_s) if math.isfinite(eta_s) else '?'}"]
    return "  ".join(parts)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Inside the block, no tqdm bars from datasets (map/filter "examples/s"), transformers ("Writing
    model shards" in `save_pretrained`) or huggingface_hub; their previous settings come back after."""
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    was = (datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled(),
           hub.are_progress_bars_disabled())
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            datasets.enable_progress_bars()
        if was[1]:
            hf_logging.enable_progress_bar()
        if not was[2]:
            hub.enable_progress_bars()
