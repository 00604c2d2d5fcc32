"""The rollout engine on released-style MXFP4 checkpoints (experts as `*_blocks`/`*_scales`).

Reference: transformers' eager `GptOssForCausalLM` with the same experts decoded
(`kernels.mxfp4_checkpoint.load_mxfp4_checkpoint`). One engine for the module, started from a
sharded MXFP4 export (tests/rl/test_rollout.py's engine is shut down by then: one per process).
"""
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from envs import harmony
from rl.config import RolloutConfig

CFG = RolloutConfig(max_model_len=512, kv_cache_gib=1)
STEPS = 40

pytestmark = pytest.mark.slow


def _prompts():
    return [harmony.render_prompt("Compute 47*86+12.", e) for e in harmony.EFFORTS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(dense tiny checkpoint, its MXFP4 export sharded with an index)."""
    from rl.model import build_tiny_model, export_mxfp4

    root = tmp_path_factory.mktemp("rollout_mxfp4")
    cfg = yaml.safe_load(open("conf/model/tiny.yaml"))
    dense = build_tiny_model(cfg, ["Compute 47*86+12.", "0123456789 carry Check so"], root / "tiny")
    return dense, export_mxfp4(dense, root / "mxfp4", max_shard_size="1MB")


@pytest.fixture(scope="module")
def engine(folders):
    from rl.engine import RolloutEngine

    eng = RolloutEngine(folders[1], CFG, seed=0)
    yield eng
    copy = eng._dense_folder
    eng.shutdown()
    assert copy is not None and not copy.exists(), "shutdown should remove the decoded copy"


@torch.no_grad()
def _hf_greedy(folder, prompts, steps=STEPS):
    from rl.model import load_policy

    model, vm = load_policy(folder)
    ids = torch.tensor([vm.to_model(p) for p in prompts])  # prompts share a length
    for _ in range(steps):
        ids = torch.cat([ids, model.eval()(ids).logits[:, -1, : len(vm)].argmax(-1)[:, None]], 1)
    return [vm.to_canonical(row[len(prompts[0]):].tolist()) for row in ids]


def _greedy(eng, prompts, steps=STEPS):
    return [c[0].ids for c in eng.generate(prompts, temperature=0.0, max_tokens=steps, stop=False)]


def test_engine_starts_from_an_mxfp4_folder_with_the_decoded_experts(engine, folders):
    from kernels.mxfp4_checkpoint import INDEX_NAME

    dense, mxfp4 = folders
    assert (mxfp4 / INDEX_NAME).exists() and len(list(mxfp4.glob("*.safetensors"))) > 1
    prompts = _prompts()
    assert _greedy(engine, prompts) == _hf_greedy(mxfp4, prompts)
    assert engine.checkpoint == str(mxfp4) and engine.health()["ok"]
    assert engine._dense_folder is not None and (engine._dense_folder / "vocab_map.json").exists()


def test_update_from_path_reads_only_the_indexed_shards(engine, folders, tmp_path):
    dense, mxfp4 = folders
    prompts = _prompts()
    target_dense, target_mxfp4 = _hf_greedy(dense, prompts), _hf_greedy(mxfp4, prompts)
    assert target_dense != target_mxfp4, "4-bit experts should change the greedy output of the tiny model"
    # An earlier save's leftover beside the shards: same tensor names, other values, not in the index.
    first = sorted(mxfp4.glob("model-*.safetensors"))[0]
    stale = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in load_file(first).items()}
    save_file(stale, mxfp4 / "model-stale.safetensors")
    try:
        engine.update_weights_from_path(dense)
        assert _greedy(engine, prompts) == target_dense
        engine.update_weights_from_path(mxfp4)  # decoded on the way in
        assert _greedy(engine, prompts) == target_mxfp4
    finally:
        (mxfp4 / "model-stale.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        engine.update_weights_from_path(tmp_path)  # no checkpoint there
    other = tmp_path / "other-vocab"
    shutil.copytree(dense, other)
    vm = json.loads((other / "vocab_map.json").read_text())
    vm["canonical_ids"] = vm["canonical_ids"][::-1]
    (other / "vocab_map.json").write_text(json.dumps(vm))
    with pytest.raises(ValueError, match="vocabulary map differs"):
        engine.update_weights_from_path(other)
    assert _greedy(engine, prompts) == target_mxfp4, "a failed update leaves the weights as they were"

