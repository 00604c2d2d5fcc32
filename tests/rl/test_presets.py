"""Real-scale presets: gpt-oss-20b/120b model nodes against the released configs (built on the meta
device, counted against the model card), the experiment presets (compose, refused at start until
their issue sections land, fit their GPUs by rl/memory_plan.py, plans quoted verbatim in their YAML and
the README), the memory arithmetic, and `model.path` resolution."""
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from rl.config import ConfigError, compose, require_implemented
from rl.memory_plan import (GIB, layer_activation_bytes, lora_params, memory_plan, param_counts,
                            released_weight_bytes)
from rl.model import ARCHITECTURE_FIELDS, gpt_oss_config, meta_model, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["gpt_oss_20b_lora_1gpu", "gpt_oss_20b_full_8gpu", "gpt_oss_120b_multinode"]
# Model card (arXiv:2508.10925) and /work/shared/reference/gpt-oss.md: billions of parameters, GiB on disk.
CARD = {"gpt_oss_20b": dict(total=20.91, mlp=19.12, attention=0.64, embed_unembed=1.16, layers=24, experts=32,
                            checkpoint_gib=12.8),
        "gpt_oss_120b": dict(total=116.83, mlp=114.71, attention=0.96, embed_unembed=1.16, layers=36, experts=128,
                             checkpoint_gib=60.8)}


@pytest.mark.parametrize("name", sorted(CARD))
def test_model_preset_matches_the_released_config_and_the_card(name):
    m = compose([f"model={name}"]).model
    card = CARD[name]
    assert (m.num_hidden_layers, m.num_local_experts, m.num_experts_per_tok) == (card["layers"], card["experts"], 4)
    assert (m.hidden_size, m.intermediate_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim) == \
        (2880, 2880, 64, 8, 64)
    assert (m.vocab_size, m.sliding_window, m.max_position_embeddings) == (201088, 128, 131072)
    hf = gpt_oss_config(asdict(m))
    assert hf.rope_parameters == {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                  "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False}
    assert hf.rms_norm_eps == 1e-5 and hf.swiglu_limit == 7.0 and hf.swiglu_alpha == 1.702
    assert hf.layer_types[:2] == ["sliding_attention", "full_attention"] and not hf.tie_word_embeddings
    built = sum(p.numel() for p in meta_model(m).parameters())  # no memory: meta tensors
    counts = param_counts(m)
    assert built == counts["total"]
    assert round(built / 1e9, 2) == card["total"]
    assert round((counts["experts"] + counts["router"]) / 1e9, 2) == card["mlp"]
    assert round(counts["attention"] / 1e9, 2) == card["attention"]
    assert round((counts["embed"] + counts["unembed"]) / 1e9, 2) == card["embed_unembed"]
    assert round(released_weight_bytes(m) / GIB, 1) == card["checkpoint_gib"]


def test_the_120b_preset_is_transformers_default_gpt_oss_config():
    """transformers' GptOssConfig() defaults are gpt-oss-120b's released config: ours must agree."""
    from transformers import GptOssConfig

    ours, theirs = gpt_oss_config(asdict(compose(["model=gpt_oss_120b"]).model)), GptOssConfig()
    for key in ARCHITECTURE_FIELDS + ("max_position_embeddings", "rope_parameters", "layer_types"):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_param_counts_match_a_meta_build_of_the_tiny_shape(tiny_cfg):
    m = compose([f"model.{k}={v}" for k, v in tiny_cfg.items()] + ["model.vocab_size=1216"]).model
    assert sum(p.numel() for p in meta_model(m).parameters()) == param_counts(m)["total"]


# ---- experiment presets --------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_experiment_preset_composes_fits_and_is_refused_until_its_section_lands(preset):
    cfg = compose([f"experiment={preset}"])
    assert cfg.model.name.startswith("gpt_oss_") and cfg.learner.device == "cuda"
    plan = memory_plan(cfg)
    assert len(plan.budgets) == 2 and all(b.fits for b in plan.budgets), plan.table()
    plan.check()
    if not (cfg.learner.lora.rank > 0 and cfg.learner.world_size > 1):  # one-rank LoRA (§3), full FSDP2 (§2)
        require_implemented(cfg)
        return
    with pytest.raises(ConfigError, match="issue 17 §2 \\+ §3"):  # LoRA inside the FSDP2 group is not built yet
        require_implemented(cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_plan_in_the_preset_and_the_readme_is_the_computed_one(preset):
    table = memory_plan(compose([f"experiment={preset}"])).table()
    yaml_text = (ROOT / "conf" / "experiment" / f"{preset}.yaml").read_text()
    quoted = "\n".join(re.sub(r"^#( {3})?", "", line) for line in yaml_text.splitlines() if line.startswith("#"))
    assert table in quoted, f"conf/experiment/{preset}.yaml: re-run python -m rl.memory_plan experiment={preset}"
    assert table in (ROOT / "README.md").read_text(), f"README: paste python -m rl.memory_plan experiment={preset}"


def test_a_plan_that_does_not_fit_names_the_gpu():
    cfg = compose(["experiment=gpt_oss_20b_full_8gpu", "learner.world_size=3"])  # 104 GiB of states a rank
    with pytest.raises(ValueError, match=r"learner rank \(1 of 3\): \d+\.\d GiB of 79.0"):
        memory_plan(cfg).check()


@pytest.mark.parametrize("overrides, message", [
    (["experiment=gpt_oss_20b_lora_1gpu", "cluster.gpu_memory_gib=0"], "set cluster.gpu_memory_gib"),
    (["cluster.gpu_memory_gib=80", "learner.num_gpus=1"], "model.vocab_size is null"),
])
def test_memory_plan_needs_a_gpu_size_and_a_real_model(overrides, message):
    with pytest.raises(ValueError, match=message):
        memory_plan(compose(overrides))


# ---- the arithmetic -------------------------------------------------------------------------------
def test_memory_arithmetic_by_hand():
    m = compose(["model=gpt_oss_20b"]).model
    # KV: 24 layers x (K, V) x 8 heads x 64 x 2 B = 48 KiB a token
    cfg = compose(["model=gpt_oss_20b", "cluster.gpu_memory_gib=80", "rollout.num_gpus=1", "rollout.max_num_seqs=2",
                   "rollout.max_model_len=1024", "rollout.max_tokens=512", "rollout.dtype=bfloat16"])
    kv = dict((n, b) for n, b, _ in memory_plan(cfg).budgets[0].items)["KV cache"]
    assert kv == 2 * 1024 * 24 * 2 * 8 * 64 * 2
    # one token, one layer, bf16 everywhere: norms 4 x 2880 x 2, attention 2 x (3 x 4096 + 3 x 512) + 4 x 64 heads,
    # MoE 4 x 32 router logits + 2 x (2 x 2880 + 4 experts x 5760)
    want = 4 * 2880 * 2 + 2 * (3 * 4096 + 3 * 512) + 256 + 128 + 2 * (5760 + 4 * 5760)
    assert layer_activation_bytes(m, 2, 2) == want
    # LoRA r=16 on q/k/v/o: 16 x ((2880 + 4096) + 2 x (2880 + 512) + (4096 + 2880)) per layer
    assert lora_params(m, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]) == 24 * 16 * (2 * 6976 + 2 * 3392)
    with pytest.raises(ValueError, match="unknown; valid"):
        lora_params(m, 16, ["qkv"])


def test_full_training_on_one_gpu_counts_sixteen_bytes_a_parameter_and_the_autocast_copies():
    cfg = compose(["model=gpt_oss_20b", "cluster.gpu_memory_gib=80", "learner.num_gpus=1"])
    items = dict((n, b) for n, b, _ in memory_plan(cfg).budgets[0].items)
    P = param_counts(cfg.model)["total"]
    assert items["weights"] == items["grads"] == 4 * P and items["AdamW moments"] == 8 * P
    assert items["gathered / autocast bf16 weights"] == 2 * P  # every weight's bf16 copy, no checkpointing


def test_docstring_examples():
    import doctest

    import rl.memory_plan

    assert doctest.testmod(rl.memory_plan).failed == 0


# ---- model.path -----------------------------------------------------------------------------------
def _released_folder(tmp_path, **changes):
    m = compose(["model=gpt_oss_20b"]).model
    cfg = {k: getattr(m, k) for k in ARCHITECTURE_FIELDS} | {"model_type": "gpt_oss"} | changes
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_a_local_released_folder_is_used_as_is(tmp_path):
    folder = _released_folder(tmp_path)
    assert resolve_checkpoint(compose(["model=gpt_oss_20b", f"model.path={folder}"]).model) == folder


def test_a_folder_of_another_model_is_refused_naming_the_fields(tmp_path):
    folder = _released_folder(tmp_path, num_hidden_layers=36, num_local_experts=128)
    with pytest.raises(ValueError, match="model.num_hidden_layers=24 but config.json says 36.*num_local_experts"):
        resolve_checkpoint(compose(["model=gpt_oss_20b", f"model.path={folder}"]).model)


def test_a_hub_id_is_fetched_into_the_cache(tmp_path, monkeypatch):
    folder = _released_folder(tmp_path)
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id: calls.append(repo_id) or str(folder))
    assert resolve_checkpoint(compose(["model=gpt_oss_20b"]).model) == folder
    assert calls == ["openai/gpt-oss-20b"]


def test_an_unreachable_hub_says_what_to_do(monkeypatch):
    def offline(repo_id):
        raise OSError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="download the released folder where every node sees it"):
        resolve_checkpoint(compose(["model=gpt_oss_120b"]).model)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_checkpoint(compose(["model.path=/no/such/folder"]).model)
