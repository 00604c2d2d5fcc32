"""LoRA over the frozen base (rl/lora.py): only adapters train, the base never moves, B = 0 starts exactly
at the base, the KL reference is the base with adapters off, merged sync weights are base + (alpha/r) B A,
save -> resume is exact, checkpoints are HF folders of the merged model; on a dense and an MXFP4 base."""
import json

import pytest
import torch

from rl.config import ConfigError, LoraConfig, compose
from rl.lora import ExpertsLora, adapters_disabled, merged_state

from test_learner import _batch, _learner  # noqa: E402 (rootdir-relative, as test_device does)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
EXPERTS = ["gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def mxfp4_policy(policy, tmp_path_factory):
    """The tiny policy as a released-style MXFP4 folder (experts packed 4-bit, the rest bf16)."""
    from rl.model import export_mxfp4

    return export_mxfp4(policy, tmp_path_factory.mktemp("mx") / "tiny-mxfp4")


def _lora(policy, targets=ALL, algo=None, rank=4, **cfg):
    cfg.setdefault("lr", 1e-2)
    return _learner(policy, algo, lora=LoraConfig(rank=rank, alpha=8.0, target_modules=list(targets)), **cfg)


def _base_state(learner) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in learner.model.state_dict().items() if "lora_" not in n}


@pytest.mark.parametrize("base", ["dense", "mxfp4"])
def test_only_adapters_are_in_the_optimizer_and_the_base_never_moves(policy, mxfp4_policy, base):
    learner = _lora(policy if base == "dense" else mxfp4_policy)
    lora = {p for n, p in learner.model.named_parameters() if "lora_" in n}
    in_opt = {p for g in learner.opt.param_groups for p in g["params"]}
    assert in_opt == lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in learner.model.named_parameters() if "lora_" not in n)
    if base == "mxfp4":  # the experts stay 4-bit: no dense expert weight anywhere in the learner
        names = dict(learner.model.named_parameters()) | dict(learner.model.named_buffers())
        assert not any(n.endswith(("experts.base_layer.gate_up_proj", "experts.gate_up_proj")) for n in names)
        assert names["model.layers.0.mlp.experts.base_layer.gate_up_proj_blocks"].dtype == torch.uint8
    before = _base_state(learner)
    adapters = {n: p.clone() for n, p in learner.model.named_parameters() if "lora_" in n}
    for _ in range(2):
        metrics = learner.train_step(_batch([1.0, -1.0], policy))
    assert metrics["grad_norm"] > 0
    for n, t in _base_state(learner).items():
        assert torch.equal(t, before[n]), n
    moved = [n for n, p in learner.model.named_parameters() if "lora_" in n and not torch.equal(p, adapters[n])]
    assert len(moved) == len(adapters)  # every A and B (B first, then A once B is non-zero)


def test_a_step_moves_log_probs_the_way_the_advantages_say(policy):
    learner = _lora(policy)
    batch = _batch([1.0, -1.0], policy)
    before = learner.logprobs(batch).sum(-1)
    for _ in range(3):
        learner.train_step(batch)
    after = learner.logprobs(batch).sum(-1)
    assert after[0] > before[0] and after[1] < before[1]


@pytest.mark.parametrize("base", ["dense", "mxfp4"])
def test_at_init_the_lora_policy_is_the_base_exactly(policy, mxfp4_policy, base):
    """B = 0: every adapter adds exact zeros, so the log-probs are the base's bit for bit (the full
    learner on the same folder; the MXFP4 one decodes its experts to the same fp32 values)."""
    path = policy if base == "dense" else mxfp4_policy
    batch = _batch([1.0, -1.0], policy)
    lp = _lora(path).logprobs(batch)
    ref = _learner(path, lr=0.0).logprobs(batch)
    torch.testing.assert_close(lp, ref, rtol=0, atol=0 if base == "dense" else 1e-6)


@pytest.mark.parametrize("base", ["dense", "mxfp4"])
def test_kl_reference_is_the_base_with_adapters_disabled(policy, mxfp4_policy, base):
    """No second model: after training, the policy with adapters off scores exactly as the base, the KL
    term is positive, and the adapters still get gradients (their flags survive the reference pass)."""
    path = policy if base == "dense" else mxfp4_policy
    learner = _lora(path, algo={"kl_coef": 0.1})
    assert learner.ref is None
    batch = _batch([1.0, -1.0], policy)
    for _ in range(3):
        metrics = learner.train_step(batch)
    assert metrics["kl_ref"] > 1e-6 and metrics["grad_norm"] > 0
    assert all(p.grad is not None for g in learner.opt.param_groups for p in g["params"])
    with torch.no_grad(), learner._reference() as ref:
        on = batch.to(learner.device)
        ref_lp = learner._logprobs(ref, on, split=learner._split(on))  # as `logprobs` computes (shared prompts)
    base_lp = _learner(path, lr=0.0).logprobs(batch)
    torch.testing.assert_close(ref_lp, base_lp, rtol=0, atol=0 if base == "dense" else 1e-6)
    assert not torch.equal(learner.logprobs(batch), base_lp)  # the adapters are back on
    assert all(p.requires_grad for n, p in learner.model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("base", ["dense", "mxfp4"])
def test_merged_sync_weights_are_base_plus_scaled_b_a(policy, mxfp4_policy, base):
    from kernels.mxfp4 import dequantize

    learner = _lora(policy if base == "dense" else mxfp4_policy)
    for _ in range(2):
        learner.train_step(_batch([1.0, -1.0], policy))
    state, model, s = learner.state_for_sync(), learner.model, 8.0 / 4
    plain = dict(_learner(policy, lr=0.0).model.state_dict())
    assert state.keys() == plain.keys()  # the plain HF names the engines take
    assert all(state[n].shape == t.shape and state[n].device.type == "cpu" for n, t in plain.items())
    q = model.model.layers[1].self_attn.q_proj
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    torch.testing.assert_close(state["model.layers.1.self_attn.q_proj.weight"], q.base_layer.weight + s * b @ a,
                               rtol=1e-6, atol=1e-7)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, ExpertsLora)
    for proj in EXPERTS:
        a, b = experts.lora_A["default"][proj], experts.lora_B["default"][proj]
        inner = experts.base_layer
        w = (getattr(inner, proj) if base == "dense" else dequantize(
            getattr(inner, f"{proj}_blocks"), getattr(inner, f"{proj}_scales"), torch.float32).transpose(1, 2))
        assert float(b.detach().abs().max()) > 0
        torch.testing.assert_close(state[f"model.layers.1.mlp.experts.{proj}"], w + s * a @ b, rtol=1e-6, atol=1e-7)
    if base == "dense":  # untargeted weights go as they are
        assert torch.equal(state["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])


def test_expert_adapters_train_and_change_the_expert_outputs(policy):
    """Experts only: their adapters get non-zero gradients and, after a step, the layer's experts
    compute something else than the frozen base for the same routed tokens."""
    learner = _lora(policy, targets=EXPERTS)
    assert {n.split(".lora_")[0] for n, _ in learner.model.named_parameters() if "lora_" in n} == \
        {f"model.layers.{i}.mlp.experts" for i in range(2)}
    learner.train_step(_batch([1.0, -1.0], policy))
    grads = {n: float(p.grad.abs().max()) for n, p in learner.model.named_parameters() if "lora_B" in n}
    assert len(grads) == 4 and all(g > 0 for g in grads.values()), grads
    experts = learner.model.model.layers[0].mlp.experts
    x = torch.randn(12, 64)
    idx = torch.randint(0, 4, (12, 2))
    w = torch.full((12, 2), 0.5)
    with torch.no_grad():
        adapted = experts(x, idx, w)
        with adapters_disabled(learner.model):
            frozen = experts(x, idx, w)
    assert (adapted - frozen).abs().max() > 1e-6


@pytest.mark.parametrize("base", ["dense", "mxfp4"])
def test_save_then_resume_is_exact_and_the_checkpoint_is_the_merged_hf_model(policy, mxfp4_policy, base, tmp_path):
    from transformers import GptOssForCausalLM

    path = policy if base == "dense" else mxfp4_policy
    a = _lora(path)
    a.train_step(_batch([1.0, -1.0], policy))
    a.save(tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert "quantization_config" not in config  # merged experts are dense
    assert json.loads((tmp_path / "ck" / "adapter" / "adapter_config.json").read_text())["rank"] == 4
    b = _lora(path)  # built from the initial policy, as a resumed run does
    b.load(tmp_path / "ck")
    assert b.step == 1
    batch = _batch([0.5, -0.5])
    ma, mb = a.train_step(batch), b.train_step(batch)
    assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    # the folder is an ordinary HF model: transformers loads the merged weights (what rl.evaluate serves)
    merged = GptOssForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    ids = batch.input_ids[:1, :40]
    with torch.no_grad():
        want = _lora(path).model  # a fresh policy + the checkpoint's adapters, the live merged computation
        from rl.lora import load_adapters

        load_adapters(want, tmp_path / "ck")
        torch.testing.assert_close(merged(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_adapters_from_another_rank_are_refused(policy, tmp_path):
    a = _lora(policy, rank=4)
    a.save(tmp_path / "ck")
    with pytest.raises(RuntimeError, match="targets or rank differ"):
        _lora(policy, rank=2).load(tmp_path / "ck")


def test_merged_state_streams_one_parameter_at_a_time(policy):
    gen = merged_state(_lora(policy).model)
    name, t = next(gen)  # a generator: nothing else is merged yet
    assert isinstance(name, str) and t.device.type == "cpu"


@pytest.mark.parametrize("overrides, key", [
    (["learner.lora.rank=8", "learner.lora.dropout=0.1", "learner.lora.target_modules=[q_proj,gate_up_proj]"],
     "learner.lora.dropout"),
    (["learner.lora.rank=8", "learner.qat=true"], "learner.qat"),
    (["learner.lora.rank=8", "learner.lora.target_modules=[router]"], "learner.lora.target_modules"),
    (["learner.lora.rank=8", "learner.lora.target_modules=[]"], "learner.lora.target_modules"),
])
def test_bad_lora_settings_fail_at_start_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        compose(overrides)


def test_attention_only_lora_takes_dropout():
    cfg = compose(["learner.lora.rank=8", "learner.lora.dropout=0.1",
                   "learner.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.learner.lora.dropout == 0.1


def test_a_lora_run_through_the_loop_resumes_exactly(tmp_path, policy, tiny_cfg):
    """The real train loop (fake engines): checkpoints hold merged weights + adapters; a run cut after
    step 2 and resumed equals the straight one (metrics, merged weights, adapters)."""
    from safetensors.torch import load_file

    from fakes import FakePool
    from rl.learner import Learner
    from rl.train import train
    from test_loop import _cfg, _metrics

    lora = {"lr": 1e-2, "lora": {"rank": 4, "target_modules": ALL}}
    runs = {"a": [3], "b": [2, 3]}
    for name, steps in runs.items():
        for i, n in enumerate(steps):
            train(_cfg(tmp_path / name, tiny_cfg, steps=n, resume=i > 0, learner=lora), str(policy),
                  make_learner=Learner, make_pool=FakePool)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("reward", "loss", "grad_norm"):
        assert a[2][key] == b[2][key], key
    for file in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = (load_file(str(tmp_path / r / "checkpoints" / "step_000003" / file)) for r in "ab")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), file


def test_gradient_checkpointing_gives_the_same_adapter_step(mxfp4_policy, policy):
    """The 20b preset's setting: recomputed layers (frozen inputs, 4-bit experts) give the same update."""
    batch = _batch([1.0, -1.0], policy)
    runs = [_lora(mxfp4_policy, gradient_checkpointing=gc) for gc in (False, True)]
    metrics = [r.train_step(batch) for r in runs]
    assert metrics[0]["grad_norm"] == pytest.approx(metrics[1]["grad_norm"], rel=1e-5)
    for (n, p), q in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
