"""Atomic, verifiable checkpoints: what counts as complete, fallback on resume, pruning.

A fake `write_policy` writes the files the learner writes (weights, config, learner_state.pt), either
as one `model.safetensors` or as shards behind `model.safetensors.index.json`; no model is needed."""
import json
import logging
from pathlib import Path

import pytest

from rl import checkpoint
from rl.checkpoint import CheckpointError

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def single(folder: Path) -> None:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "config.json").write_text('{"model_type": "gpt_oss"}')
    (folder / "learner_state.pt").write_bytes(b"optimizer" * 10)


def sharded(folder: Path) -> None:
    folder.mkdir()
    for i, name in enumerate(SHARDS):
        (folder / name).write_bytes(bytes([i]) * 500)
    weight_map = {"embed.weight": SHARDS[0], "lm_head.weight": SHARDS[1]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "learner_state.pt").write_bytes(b"optimizer" * 10)
    (folder / "extra").mkdir()  # the manifest walks subfolders
    (folder / "extra" / "vocab_map.json").write_text("{}")


def names(run_dir) -> list[str]:
    return sorted(p.name for p in checkpoint.ckpt_root(run_dir).iterdir() if p.name.startswith("step_"))


def test_save_commits_trainer_state_manifest_and_pointer(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, sharded, {"cursor": step * 10}, keep=2)
    path = checkpoint.latest(tmp_path)
    assert path.name == "step_000003"
    assert checkpoint.trainer_state(path) == {"cursor": 30, "step": 3}
    assert names(tmp_path) == ["step_000002", "step_000003"]
    assert (checkpoint.ckpt_root(tmp_path) / "latest").read_text() == "step_000003"
    listed = json.loads((path / "MANIFEST.json").read_text())["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(listed) == on_disk and "extra/vocab_map.json" in listed


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = [  # (layout, file, damage, what the error says)
    (single, "model.safetensors", truncate, "bytes"),
    (single, "model.safetensors", flip, "checksum"),
    (single, "learner_state.pt", Path.unlink, "missing"),
    (single, "MANIFEST.json", Path.unlink, "missing"),
    (single, "trainer_state.json", lambda p: p.write_text('{"step": 2, "cur'), "does not parse"),
    (sharded, SHARDS[1], truncate, "bytes"),
    (sharded, SHARDS[0], flip, "checksum"),
    (sharded, "model.safetensors.index.json", Path.unlink, "missing"),
    (sharded, "extra/vocab_map.json", flip, "checksum"),
]


@pytest.mark.parametrize("layout, name, damage, says", DAMAGE)
def test_damaged_newest_is_skipped_for_the_previous_complete_one(tmp_path, caplog, layout, name, damage, says):
    checkpoint.save(tmp_path, 1, layout, {"cursor": 1})
    newest = checkpoint.save(tmp_path, 2, layout, {"cursor": 2})
    damage(newest / name)
    with pytest.raises(CheckpointError, match=says) as err:
        checkpoint.verify(newest)
    assert str(newest) in str(err.value) and name in str(err.value)
    with caplog.at_level(logging.WARNING, logger="rl.checkpoint"):
        assert checkpoint.latest(tmp_path).name == "step_000001"
    assert name in caplog.text and "step_000002" in caplog.text


def test_crash_inside_write_policy_leaves_previous_checkpoint(tmp_path):
    checkpoint.save(tmp_path, 1, single, {"cursor": 1})

    def crash(folder: Path):
        single(folder)
        truncate(folder / "model.safetensors")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, crash, {"cursor": 2})
    assert names(tmp_path) == ["step_000001", "step_000002.tmp"]
    assert checkpoint.latest(tmp_path).name == "step_000001"
    checkpoint.save(tmp_path, 3, single, {"cursor": 3})  # the next save clears the leftover
    assert names(tmp_path) == ["step_000001", "step_000003"]


@pytest.mark.parametrize("written, missing", [
    (lambda f: (f.mkdir(), (f / "learner_state.pt").write_bytes(b"x")), "model.safetensors"),
    (lambda f: (sharded(f), (f / SHARDS[1]).unlink()), SHARDS[1]),
    (lambda f: (single(f), (f / "learner_state.pt").unlink()), "learner_state.pt"),
])
def test_save_refuses_a_policy_without_its_weights(tmp_path, written, missing):
    checkpoint.save(tmp_path, 1, single, {"cursor": 1})
    with pytest.raises(CheckpointError, match=missing):
        checkpoint.save(tmp_path, 2, written, {"cursor": 2})
    assert checkpoint.latest(tmp_path).name == "step_000001"


@pytest.mark.parametrize("pointer", [None, "step_000009\n", "\xff garbage", "step_000001"])
def test_latest_scans_folders_whatever_the_pointer_says(tmp_path, pointer):
    checkpoint.save(tmp_path, 1, single, {"cursor": 1})
    checkpoint.save(tmp_path, 2, single, {"cursor": 2})
    link = checkpoint.ckpt_root(tmp_path) / "latest"
    link.unlink() if pointer is None else link.write_text(pointer)
    assert checkpoint.latest(tmp_path).name == "step_000002"


def test_latest_is_none_without_a_committed_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    (checkpoint.ckpt_root(tmp_path) / "step_000001.tmp").mkdir(parents=True)
    assert checkpoint.latest(tmp_path) is None


def test_latest_orders_by_step_number_not_name(tmp_path):
    checkpoint.save(tmp_path, 999_999, single, {"cursor": 1})
    checkpoint.save(tmp_path, 1_000_000, single, {"cursor": 2})
    assert checkpoint.latest(tmp_path).name == "step_1000000"
    assert names(tmp_path) == ["step_1000000", "step_999999"]


def test_prune_keeps_exactly_keep_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, single, {"cursor": step}, keep=3)
    truncate(checkpoint.ckpt_root(tmp_path) / "step_000003" / "model.safetensors")
    checkpoint.save(tmp_path, 4, single, {"cursor": 4}, keep=3)
    assert names(tmp_path) == ["step_000001", "step_000002", "step_000004"]  # the broken 3 does not count
    checkpoint.save(tmp_path, 5, single, {"cursor": 5}, keep=1)
    assert names(tmp_path) == ["step_000005"]


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (4, 5, 6):
        checkpoint.save(tmp_path, step, single, {"cursor": step}, keep=3)
    for step in (5, 6):  # both lost: resume goes back to 4 and training writes 5 and 6 again
        flip(checkpoint.ckpt_root(tmp_path) / f"step_00000{step}" / "model.safetensors")
    assert checkpoint.latest(tmp_path).name == "step_000004"
    (checkpoint.ckpt_root(tmp_path) / "step_000005").rename(checkpoint.ckpt_root(tmp_path) / "step_000007")
    checkpoint.save(tmp_path, 5, single, {"cursor": 55}, keep=1)
    assert names(tmp_path) == ["step_000005"]  # not the abandoned 6 and 7, which latest() would prefer
    assert checkpoint.trainer_state(checkpoint.latest(tmp_path))["cursor"] == 55


def test_trainer_state_error_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        checkpoint.trainer_state(tmp_path)
