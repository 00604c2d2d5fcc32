"""Learner: a GRPO step moves log-probs the way the advantages say; kernels match stock; save/load."""
import pytest
import torch

from envs import harmony
from envs.types import Sample, Transcript
from rl.batch import TrainBatch, collate
from rl.config import AlgoConfig, LearnerConfig, LrScale
from rl.learner import Learner
from rl.model import VocabMap

VMAP: dict = {}


def _learner(policy, algo=None, **cfg):
    cfg.setdefault("kernels", "deliberate")
    cfg.setdefault("device", "cpu")  # these tests compare CPU numbers; tests/rl/test_device.py covers CUDA
    return Learner(str(policy), LearnerConfig(**cfg), AlgoConfig(**(algo or {})), seed=0)


def _samples(adv, behavior=None):
    prompt = harmony.render_prompt("Compute 3+4+5+6.", "high")
    good = harmony.render_completion("3+4=7.", "18")
    bad = harmony.render_completion("3+4=8.", "19")
    out = []
    for i, c in enumerate([good, bad] * (len(adv) // 2)):
        lp = [0.0] * len(c) if behavior is None else behavior[i]
        out.append(Sample("t", "math", "high", prompt, c, [1] * len(c), lp, Transcript()))
    return out


def _batch(adv, policy=None, behavior=None, samples=None) -> TrainBatch:
    vmap = VMAP.setdefault("v", VocabMap.load(policy)) if policy is not None else VMAP["v"]
    return collate(samples or _samples(adv, behavior), adv, vmap)


def _sums(lp: torch.Tensor) -> list[float]:
    return lp.sum(-1).tolist()


@pytest.mark.parametrize("kernels", ["deliberate", "stock"])
def test_step_raises_positive_and_lowers_negative_advantage(policy, kernels):
    learner = _learner(policy, lr=1e-3, kernels=kernels)
    batch = _batch([1.0, -1.0], policy)
    before = _sums(learner.logprobs(batch))
    for _ in range(3):
        metrics = learner.train_step(batch)
    after = _sums(learner.logprobs(batch))
    assert after[0] > before[0] and after[1] < before[1]
    assert metrics["grad_norm"] > 0 and learner.step == 3


def test_deliberate_kernels_match_stock_logprobs_and_grads(policy):
    a = _learner(policy, lr=0.0, kernels="deliberate")
    b = _learner(policy, lr=0.0, kernels="stock")
    batch = _batch([1.0, -0.5], policy)
    torch.testing.assert_close(a.logprobs(batch), b.logprobs(batch), rtol=1e-4, atol=1e-5)
    a.train_step(batch)
    b.train_step(batch)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("chunked", [True, False])
def test_logprobs_on_positions_equal_the_full_pass_there(policy, chunked):
    """Scoring only the completion rows gives the full pass' values (and gradients) there, 0 elsewhere."""
    from rl.learner import token_logprobs

    learner = _learner(policy, lr=0.0, kernels="deliberate" if chunked else "stock")
    samples = _samples([1.0, -1.0])
    s1 = samples[1]  # unequal lengths: padding in row 1
    s1.completion_ids, s1.loss_mask, s1.behavior_logprobs = (x[:-3] for x in (s1.completion_ids, s1.loss_mask,
                                                                               s1.behavior_logprobs))
    batch = _batch([1.0, -1.0], policy, samples=samples)
    ids, attn, pos = batch.input_ids, batch.attention_mask, batch.completion_mask
    assert pos.sum() == sum(len(x.completion_ids) for x in samples) and not pos[:, 0].any()
    runs = []
    for positions in (None, pos):
        learner.model.zero_grad(set_to_none=True)
        lp, ent = token_logprobs(learner.model, ids, attn, chunked=chunked, positions=positions,
                                 n_vocab=learner.n_vocab, with_entropy=True)
        ((lp * pos).sum() + (ent * pos).sum()).backward()
        runs.append((lp, ent, [p.grad.clone() for p in learner.model.parameters()]))
    (lp_full, ent_full, g_full), (lp_sel, ent_sel, g_sel) = runs
    torch.testing.assert_close(lp_sel, lp_full * pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent_sel, ent_full * pos, rtol=1e-5, atol=1e-6)
    assert (lp_sel[~pos] == 0).all() and (ent_sel[~pos] == 0).all()
    for a, b in zip(g_sel, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_save_load_restores_optimizer_and_step(policy, tmp_path):
    a = _learner(policy, lr=1e-3)
    a.train_step(_batch([1.0, -1.0], policy))
    a.save(tmp_path / "ck")
    b = _learner(policy, lr=1e-3)  # built from the initial policy, as a resumed run does
    b.load(tmp_path / "ck")
    assert b.step == 1
    ma, mb = a.train_step(_batch([0.5, -0.5])), b.train_step(_batch([0.5, -0.5]))
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q)


def _batch4(policy=None, behavior=None):
    return _batch([1.0, -1.0, 0.5, -0.5], policy, behavior)


@pytest.mark.parametrize("source", ["recompute", "behavior"])
def test_mini_batches_align_old_logprobs_with_tokens(policy, source):
    """lr 0: every mini-batch step is on-policy, so a correctly placed old log-prob gives ratio 1 exactly
    (one token of misalignment would not)."""
    learner = _learner(policy, {"mini_batches": 2, "ppo_epochs": 2, "old_logprobs": source}, lr=0.0)
    batch = _batch4(policy)
    batch = batch._replace(behavior_logprobs=learner.logprobs(batch))
    m = learner.train_step(batch)
    assert m["optimizer_steps"] == 4 and learner.step == 1
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["clip_frac"] == 0.0


def test_ppo_epochs_go_off_policy_and_the_clip_engages(policy):
    learner = _learner(policy, {"mini_batches": 2, "ppo_epochs": 3, "clip_low": 0.1, "clip_high": 0.1}, lr=3e-3)
    batch = _batch4(policy)
    before = _sums(learner.logprobs(batch))
    m = learner.train_step(batch)
    after = _sums(learner.logprobs(batch))
    assert m["optimizer_steps"] == 6 and m["clip_frac"] > 0 and m["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert after[0] - after[1] > before[0] - before[1] + 0.5  # the margin of good over bad widens


def test_collate_refuses_samples_without_behaviour_logprobs_for_every_token(policy):
    samples = _samples([1.0, -1.0])
    samples[0].behavior_logprobs = samples[0].behavior_logprobs[:-1]
    with pytest.raises(ValueError, match="behaviour log-probs"):
        _batch([1.0, -1.0], policy, samples=samples)


def test_lr_warms_up_per_optimizer_step_and_resumes(policy, tmp_path):
    a = _learner(policy, {"mini_batches": 2}, lr=1e-3, warmup_steps=4)
    assert a.train_step(_batch4(policy))["lr"] == pytest.approx(1e-3 * (1 + 2) / 4 / 2)  # steps 1 and 2 of 4
    a.save(tmp_path / "ck")
    b = _learner(policy, {"mini_batches": 2}, lr=1e-3, warmup_steps=4)
    b.load(tmp_path / "ck")
    assert b.train_step(_batch4())["lr"] == pytest.approx(1e-3 * (3 / 4 + 1) / 2)  # steps 3 and 4 (full)


@pytest.mark.parametrize("kernels", ["deliberate", "stock"])
def test_entropy_minimisation_lowers_entropy(policy, kernels):
    """Zero advantages: only the entropy term acts, and a negative coefficient sharpens the policy."""
    learner = _learner(policy, {"entropy_coef": -1.0}, lr=1e-3, kernels=kernels)
    batch = _batch([0.0, 0.0], policy)
    first = learner.train_step(batch)["entropy"]
    for _ in range(3):
        last = learner.train_step(batch)["entropy"]
    assert last < first


def test_lr_scale_freezes_scales_and_leaves_the_rest(policy):
    """learner.lr_scale: 0 freezes (no change, no grad), a multiplier scales Adam's step (first step
    is a sign step of size lr x multiplier), unmatched parameters keep the base lr."""
    rules = [LrScale(r"^model\.(embed_tokens|layers)\.", 0.0), LrScale(r"^model\.norm\.", 0.5)]
    learner = _learner(policy, lr=1e-3, lr_scale=rules)
    start = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.train_step(_batch([1.0, -1.0], policy))
    for n, p in learner.model.named_parameters():
        step = (p.detach() - start[n]).abs()
        if n.startswith(("model.embed_tokens.", "model.layers.")):
            assert not p.requires_grad and p.grad is None and step.max() == 0, n
        elif n.startswith("model.norm."):
            assert step.max() == pytest.approx(0.5e-3, rel=1e-3), n
        else:  # lm_head at the base lr (rows outside the vocab map get no gradient)
            assert step.max() == pytest.approx(1e-3, rel=1e-3), n
    assert {id(p) for p in learner.trainable} == {id(p) for n, p in learner.model.named_parameters()
                                                  if not n.startswith(("model.embed_tokens.", "model.layers."))}


@pytest.mark.parametrize("pattern, scale, message", [
    ("^no_such_param", 0.0, "match no parameter"),
    (".", 0.0, "freezes every parameter"),
    ("lm_head", -1.0, ">= 0"),
    ("(", 1.0, "not a regular expression"),
])
def test_lr_scale_bad_values_name_the_problem(policy, pattern, scale, message):
    with pytest.raises(ValueError, match=message):
        _learner(policy, lr=1e-3, lr_scale=[LrScale(pattern, scale)])


def test_kl_reference_stays_the_initial_policy_after_load(policy, tmp_path):
    """A resumed run loads a checkpoint into a learner built from the initial policy: the KL term must
    still measure the distance to the initial policy (so it is > 0 right after the load)."""
    a = _learner(policy, {"kl_coef": 0.1}, lr=1e-2)
    for _ in range(3):
        a.train_step(_batch([1.0, -1.0], policy))
    a.save(tmp_path / "ck")
    b = _learner(policy, {"kl_coef": 0.1}, lr=0.0)
    b.load(tmp_path / "ck")
    kl_after_load = b.train_step(_batch([1.0, -1.0]))["kl_ref"]
    assert kl_after_load > 1e-6  # a reference rebuilt from the checkpoint would give exactly 0
    fresh = _learner(policy, {"kl_coef": 0.1}, lr=0.0)
    assert fresh.train_step(_batch([1.0, -1.0]))["kl_ref"] == pytest.approx(0.0, abs=1e-7)


def test_load_reads_a_sharded_checkpoint(policy, tmp_path):
    """A checkpoint saved as shards + model.safetensors.index.json (how large models are saved)."""
    a = _learner(policy, lr=1e-2)
    a.train_step(_batch([1.0, -1.0], policy))
    a.save(tmp_path / "ck")
    a.model.save_pretrained(tmp_path / "ck", max_shard_size="200KB")  # replaces the single file
    (tmp_path / "ck" / "model.safetensors").unlink(missing_ok=True)
    assert (tmp_path / "ck" / "model.safetensors.index.json").exists()
    b = _learner(policy, lr=1e-2)
    b.load(tmp_path / "ck")
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n


def test_dr_grpo_gradient_does_not_depend_on_micro_batch_size(policy):
    """seq_mean_token_sum_norm divides by a constant (algo.max_tokens): the gradient is the same
    whatever the micro-batching (a per-micro-batch padded width would change it)."""
    grads = []
    for mb in (1, 4):
        learner = _learner(policy, {"advantage": "dr_grpo", "loss_agg": "seq_mean_token_sum_norm",
                                    "max_tokens": 64}, lr=0.0, micro_batch_size=mb)
        samples = _samples([1.0, -1.0, 0.5, -0.5])
        samples[1].completion_ids = samples[1].completion_ids[:-4]  # unequal lengths
        samples[1].loss_mask, samples[1].behavior_logprobs = samples[1].loss_mask[:-4], samples[1].behavior_logprobs[:-4]
        learner.train_step(_batch([1.0, -1.0, 0.5, -0.5], policy, samples=samples))
        grads.append({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7, msg=n)


def test_budget_forced_ids_carry_no_loss_whatever_their_placeholder(policy):
    """A budget-forced sample (rl/forcing.py): the inserted final header has loss mask 0 and a
    placeholder behaviour log-prob. With the engine's log-probs as the PPO old log-probs, the
    learner's steps are the same whatever that placeholder holds (even values whose ratio would
    overflow), and the inserted ids are not counted as loss tokens."""
    prompt = harmony.render_prompt("Compute 3+4+5+6.", "high")
    forced = list(harmony.forced_final_header())
    samples = []
    for final in ("18", "19"):
        ids = [*harmony.analysis_header(), *harmony.encode("3+4=7. 7+5")]
        tail = harmony.encode(final) + [harmony.RETURN]
        mask = [1] * len(ids) + [0] * len(forced) + [1] * len(tail)
        samples.append(Sample("t", "math", "high", prompt, ids + forced + tail, mask, [0.0] * len(mask),
                              Transcript(), budget_forced=True))
    algo = {"mini_batches": 2, "ppo_epochs": 2, "old_logprobs": "behavior"}
    probe = _learner(policy, algo, lr=0.0)
    base = _batch([1.0, -1.0], policy, samples=samples)
    behaviour = probe.logprobs(base)  # (B, L): what the engine would have reported at sampled ids
    inserted = base.completion_mask & (base.loss_mask == 0)  # (B, L)
    assert int(inserted.sum()) == 2 * len(forced)
    weights, metrics = [], []
    for placeholder in (0.0, -1e4, 1e4):
        learner = _learner(policy, algo, lr=1e-3)
        batch = base._replace(behavior_logprobs=behaviour.masked_fill(inserted, placeholder))
        metrics.append(learner.train_step(batch))
        weights.append([p.detach().clone() for p in learner.model.parameters()])
    assert metrics[0]["tokens"] == sum(sum(s.loss_mask) for s in samples)
    for m, w in zip(metrics[1:], weights[1:]):
        assert m == metrics[0]
        assert all(torch.equal(a, b) for a, b in zip(w, weights[0]))
    assert all(torch.isfinite(p).all() for p in weights[0])


def test_weights_are_whole_first_then_only_the_trained_sync_units(policy):
    from rl.config import LoraConfig
    from rl.learner import syncs_trained_only
    from rl.vllm_weights import TrainedWeights

    rules = [LrScale(r"norm\.weight$", 1.0), LrScale(r"layers\.0\.self_attn\.k_proj\.weight$", 1.0), LrScale(".", 0.0)]
    learner = _learner(policy, lr_scale=rules)
    full = learner.weights()
    assert isinstance(full, dict) and full.keys() == learner.model.state_dict().keys()
    part = learner.weights()
    assert isinstance(part, TrainedWeights)
    norms = {n for n in full if n.endswith("norm.weight")}
    qkv = {f"model.layers.0.self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")}
    assert part.tensors.keys() == norms | qkv  # k trains: q and v travel with it (vLLM fuses them)
    for name, t in part.tensors.items():
        assert torch.equal(t, learner.model.state_dict()[name])
    assert isinstance(learner.weights(), TrainedWeights)

    whole = _learner(policy, lr_scale=rules, sync_trained_only=False)
    assert all(isinstance(whole.weights(), dict) for _ in range(2))
    assert not syncs_trained_only(LearnerConfig(lora=LoraConfig(rank=4)))
    assert not syncs_trained_only(LearnerConfig(qat=True)) and syncs_trained_only(LearnerConfig())


def test_weights_after_load_are_whole_again(policy, tmp_path):
    from rl.vllm_weights import TrainedWeights

    learner = _learner(policy, lr_scale=[LrScale(r"norm\.weight$", 1.0), LrScale(".", 0.0)])
    learner.weights()
    assert isinstance(learner.weights(), TrainedWeights)
    learner.save(tmp_path)
    learner.load(tmp_path)
    assert isinstance(learner.weights(), dict)  # the engines may hold anything: the next sync is whole
