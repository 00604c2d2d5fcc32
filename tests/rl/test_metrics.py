"""rl/metrics.py: what was logged is what metrics.jsonl, TensorBoard and an offline W&B run hold."""
import json
import struct
import sys

import pytest

from rl.config import LoggingConfig
from rl.metrics import MetricsLogger, progress_line, quiet_progress_bars

LOGGED = [({"loss": 1.5, "reward/mean": 0.25}, 1), ({"loss": 1.0, "reward/mean": 0.5}, 2)]


def test_jsonl_and_tensorboard_hold_what_was_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=True, wandb=False)) as log:
        for metrics, step in LOGGED:
            log.log(metrics, step)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": step, **metrics} for metrics, step in LOGGED]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "reward/mean"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(s, m[key]) for m, s in LOGGED]


def test_a_resumed_run_appends_and_close_is_idempotent(tmp_path):
    cfg = LoggingConfig(tensorboard=False, wandb=False)
    for metrics, step in LOGGED:
        log = MetricsLogger(tmp_path, cfg)
        log.log(metrics, step)
        log.close()
        log.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(RuntimeError, match="closed"):
        log.log({"loss": 0.0}, 3)


def _wandb_records(path):
    """Records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header, then leveldb-log
    framing in 32 KiB blocks (crc u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", "not a W&B transaction log"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pb.Record.FromString(part)
            part = b""


def _items(items) -> dict:
    """{key: value} of W&B history/config items (a key is `key` or the `nested_key` path)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_offline_wandb_run_lands_under_run_dir_with_the_logged_keys(tmp_path, capsys):
    cfg = LoggingConfig(tensorboard=False, wandb=True, wandb_project="t", wandb_mode="offline")
    with MetricsLogger(tmp_path, cfg, config={"algo": {"group_size": 8}}) as log:
        for metrics, step in LOGGED:
            log.log(metrics, step)
    assert "W&B offline run" in capsys.readouterr().out
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(_wandb_records(run_file))
    kinds = [r.WhichOneof("record_type") for r in records]
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [{k: h.get(k) for k in ("_step", "loss", "reward/mean")} for h in history] == \
        [{"_step": step, **metrics} for metrics, step in LOGGED], kinds
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "t"
    assert _items(run.config.update)["algo"] == {"group_size": 8}


def test_missing_wandb_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"pip install \.\[wandb\]"):
        MetricsLogger(tmp_path, LoggingConfig(wandb=True))
    assert not (tmp_path / "metrics.jsonl").exists(), "nothing is opened before the failing sink"


def test_progress_line_reads_as_one_line():
    line = progress_line("sft", 30, 120, 60.0, {"loss": 0.51234, "lr": 2e-5})
    assert line == "sft  step 30/120 (25%)  loss 0.5123  lr 2e-05  elapsed 1:00  eta 3:00"


def test_quiet_progress_bars_restores_the_previous_settings():
    import datasets
    from transformers.utils import logging as hf_logging

    before = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    with quiet_progress_bars():
        assert not datasets.is_progress_bar_enabled() and not hf_logging.is_progress_bar_enabled()
    assert (datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()) == before
