"""vLLM rollout engine: log-probs match transformers, in-place weight sync, stops, n, Ray actor.

One in-process engine for the module (plus one inside a Ray actor for the actor test). The
reference is transformers' eager `GptOssForCausalLM` in fp32 on the same model ids, with padded
vocabulary rows excluded (the engine masks them; see rl/engine.py).
"""
import pytest
import torch
import yaml

from envs import harmony
from rl.config import RolloutConfig
from rl.engine import Completion
from rl.vllm_weights import hf_to_vllm

CORPUS = ["Compute 47*86+12.", "0123456789 carry Check so"]
CFG = RolloutConfig(max_model_len=512, kv_cache_gib=1)


def _prompts():
    """Three Harmony prompts of equal length (75 ids: longer than the 64-token sliding window)."""
    return [harmony.render_prompt("Compute 47*86+12.", e) for e in harmony.EFFORTS]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from rl.model import build_tiny_model

    cfg = yaml.safe_load(open("conf/model/tiny.yaml"))
    return build_tiny_model(cfg, CORPUS, tmp_path_factory.mktemp("rollout") / "tiny")


@pytest.fixture(scope="module")
def engine(ckpt):
    from rl.engine import RolloutEngine

    eng = RolloutEngine(ckpt, CFG, seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf(ckpt):
    """(model, vocab map): the reference policy; tests that change it restore it."""
    from rl.model import load_policy

    model, vm = load_policy(ckpt)
    return model.eval(), vm


@torch.no_grad()
def _hf_logprobs(model, vm, prompt, completion, temperature):
    """log_softmax(logits / T) of each completion id, over the real (unpadded) vocab rows."""
    ids = torch.tensor([vm.to_model(prompt + completion)])
    logits = model(ids).logits[0, len(prompt) - 1 : -1, : len(vm)] / temperature  # (T, V_real)
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None])[:, 0]


@torch.no_grad()
def _hf_greedy(model, vm, prompts, steps):
    """Argmax continuation by full forwards (what the learner computes), batched; canonical ids."""
    ids = torch.tensor([vm.to_model(p) for p in prompts])  # (B, L): prompts share a length
    for _ in range(steps):
        nxt = model(ids).logits[:, -1, : len(vm)].argmax(-1)  # (B,)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return [vm.to_canonical(row[len(prompts[0]) :].tolist()) for row in ids]


def _vllm_greedy(eng, prompts, steps):
    return [c[0].ids for c in eng.generate(prompts, temperature=0.0, max_tokens=steps, stop=False)]


# ---- pure conversion (no engine) ----------------------------------------------------------


def test_hf_to_vllm_names_and_layouts():
    E, H, I, D = 4, 8, 6, 2
    g = torch.Generator().manual_seed(0)
    sd = {
        "model.embed_tokens.weight": torch.randn(10, H, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4 * D, H, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(2 * D, H, generator=g),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(2 * D, H, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(4 * D, generator=g),
        "model.layers.0.self_attn.k_proj.bias": torch.randn(2 * D, generator=g),
        "model.layers.0.self_attn.v_proj.bias": torch.randn(2 * D, generator=g),
        "model.layers.0.self_attn.sinks": torch.randn(4, generator=g),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, H, 2 * I, generator=g),
        "model.layers.0.mlp.experts.down_proj": torch.randn(E, I, H, generator=g),
        "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(E, 2 * I, generator=g),
        "model.layers.0.mlp.router.weight": torch.randn(E, H, generator=g),
        "lm_head.weight": torch.randn(10, H, generator=g),
    }
    out = hf_to_vllm(sd)
    pre = "model.layers.0."
    assert torch.equal(out["model.embedding.weight"], sd["model.embed_tokens.weight"]) and "lm_head.weight" in out
    assert out[pre + "attn.qkv_proj.weight"].shape == (8 * D, H)
    assert torch.equal(out[pre + "attn.qkv_proj.bias"][4 * D : 6 * D], sd[pre + "self_attn.k_proj.bias"])
    w13 = out[pre + "mlp.experts.routed_experts.w13_weight"]  # (E, 2I, H), gate/linear interleaved
    assert w13.shape == (E, 2 * I, H)
    assert torch.equal(w13[1, 0::2], sd[pre + "mlp.experts.gate_up_proj"][1, :, ::2].T)  # gate rows
    assert out[pre + "mlp.experts.routed_experts.w2_weight"].shape == (E, H, I)
    assert pre + "attn.sinks" in out and pre + "mlp.router.weight" in out
    with pytest.raises(KeyError, match="need q, k and v"):
        hf_to_vllm({pre + "self_attn.q_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(KeyError, match="unknown gpt-oss tensor"):
        hf_to_vllm({"model.layers.0.mlp.shared.weight": torch.zeros(1)})
    with pytest.raises(NotImplementedError, match="MXFP4"):
        hf_to_vllm({pre + "mlp.experts.gate_up_proj_blocks": torch.zeros(1)})


# ---- engine -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_transformers(engine, hf, temperature):
    model, vm = hf
    prompts = _prompts()
    out = engine.generate(prompts, n=2, temperature=temperature, max_tokens=96, seed=11)
    worst = 0.0
    for prompt, samples in zip(prompts, out):
        for c in samples:
            ref = _hf_logprobs(model, vm, prompt, c.ids, temperature)
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < 1e-3, f"vLLM vs transformers log-prob max abs diff {worst:.2e}"


@pytest.mark.slow
def test_update_weights_in_place_matches_transformers_greedy(engine, hf, ckpt):
    model, vm = hf
    prompts, steps = _prompts(), 40
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = _vllm_greedy(engine, prompts, steps)
    assert before == _hf_greedy(model, vm, prompts, steps), "engine and transformers disagree before any update"

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter kind: embeddings, qkv/o, sinks, router, experts, norms, lm_head
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * max(p.std().item(), 0.05) * 0.5)
    target = _hf_greedy(model, vm, prompts, steps)
    assert _vllm_greedy(engine, prompts, steps) != target, "perturbation did not change the greedy output"

    info = engine.update_weights(model.state_dict())
    assert info["weights_version"] >= 1 and info["tensors"] > 0
    assert _vllm_greedy(engine, prompts, steps) == target

    # A full reload from the checkpoint folder brings the original policy back.
    engine.update_weights_from_path(ckpt)
    model.load_state_dict(original)
    assert _vllm_greedy(engine, prompts, steps) == before


@pytest.mark.slow
def test_a_trained_only_update_loads_its_tensors_and_keeps_the_rest(engine, hf, ckpt):
    from rl.vllm_weights import TrainedWeights, trained_units

    model, vm = hf
    prompts, steps = _prompts(), 40
    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    trained = [n for n in original if n.endswith("norm.weight") or ".0.self_attn.q_proj." in n]
    try:
        with torch.no_grad():
            for name in trained:
                p = model.get_parameter(name)
                p.add_(torch.randn(p.shape, generator=g) * max(p.std().item(), 0.05) * 0.5)
        target = _hf_greedy(model, vm, prompts, steps)
        assert _vllm_greedy(engine, prompts, steps) != target, "perturbation did not change the greedy output"
        part = trained_units(model.state_dict(), trained)
        assert len(part) < len(original)  # the rest stays as the engine holds it
        engine.update_weights(TrainedWeights(part))
        assert _vllm_greedy(engine, prompts, steps) == target
        q_only = {n: t for n, t in part.items() if "q_proj" in n}
        with pytest.raises(KeyError, match="need q, k and v together"):
            engine.update_weights(TrainedWeights(q_only))
    finally:
        engine.update_weights_from_path(ckpt)
        model.load_state_dict(original)


@pytest.mark.slow
def test_stops_n_samples_and_vocab(engine, hf):
    _, vm = hf
    prompts, n, max_tokens = _prompts(), 8, 128
    out = engine.generate(prompts, n=n, temperature=1.0, max_tokens=max_tokens, seed=5)
    assert len(out) == len(prompts) and all(len(s) == n for s in out)
    flat = [c for s in out for c in s]
    assert all(isinstance(c, Completion) for c in flat)
    assert len({tuple(c.ids) for c in flat}) == len(flat), "n samples should differ"
    stopped = [c for c in flat if c.finish_reason == "stop"]
    assert stopped, "expected some completions to end on <|return|>/<|call|> (seeded, deterministic)"
    for c in flat:
        assert len(c.ids) == len(c.logprobs) and all(lp <= 0 for lp in c.logprobs)
        assert vm.covers(c.ids)  # padded rows are never sampled: every id maps back
        inner = [t for t in c.ids[:-1] if t in harmony.STOP_TOKENS]
        assert not inner, "a stop token inside a completion"
        if c.finish_reason == "stop":
            assert c.ids[-1] in harmony.STOP_TOKENS
        else:
            assert c.finish_reason == "length" and len(c.ids) == max_tokens
    for c in stopped:  # the closing stop token ends the last message and adds nothing to the parse
        assert harmony.parse_completion(c.ids) == harmony.parse_completion(c.ids[:-1])
    # Seeded calls reproduce; stop=False samples exactly max_tokens.
    again = engine.generate(prompts, n=n, temperature=1.0, max_tokens=max_tokens, seed=5)
    assert [c.ids for s in again for c in s] == [c.ids for c in flat]
    full = engine.generate(prompts[:1], n=2, max_tokens=32, seed=5, stop=False)
    assert [len(c.ids) for c in full[0]] == [32, 32]
    with pytest.raises(KeyError, match="not in the model's trimmed vocabulary"):
        engine.generate([[5, 6, 7]])  # canonical ids the tiny vocab lacks
    health = engine.health()
    assert health["ok"] and health["tokens"] > 0


@pytest.mark.slow
def test_bad_update_is_rejected_before_any_copy(engine, hf):
    model, vm = hf
    prompts = _prompts()
    before = _vllm_greedy(engine, prompts, 16)
    state = {k: v + 1.0 for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.experts.down_proj"] = state["model.layers.1.mlp.experts.down_proj"][:, :-1]
    with pytest.raises(ValueError, match="layers.1.mlp.experts.routed_experts.w2_weight: got shape"):
        engine.update_weights(state)
    del state["model.norm.weight"]
    with pytest.raises(KeyError, match=r"missing \['model.norm.weight'\]"):
        engine.update_weights(state)
    assert _vllm_greedy(engine, prompts, 16) == before


@pytest.mark.slow
def test_ray_actor_generates_and_syncs(engine, hf, ckpt):
    import ray

    from rl.engine import RolloutWorker

    model, vm = hf
    prompts = _prompts()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        worker = RolloutWorker.options(num_cpus=1).remote(str(ckpt), CFG, 0)
        assert ray.get(worker.health.remote())["ok"]
        out = ray.get(worker.generate.remote(prompts, n=2, max_tokens=24, seed=3))
        assert [len(s) for s in out] == [2, 2, 2] and all(vm.covers(c.ids) for s in out for c in s)
        # The same HF state dict through Ray and in-process gives the same greedy output.
        state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
        ray.get(worker.update_weights.remote(state))
        engine.update_weights(state)
        remote = ray.get(worker.generate.remote(prompts, temperature=0.0, max_tokens=24, stop=False))
        assert [s[0].ids for s in remote] == _vllm_greedy(engine, prompts, 24)
        ray.get(worker.shutdown.remote())
    finally:
        engine.update_weights_from_path(ckpt)
        ray.shutdown()
