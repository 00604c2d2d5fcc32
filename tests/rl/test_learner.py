"""Learner: a GRPO step moves log-probs the way the advantages say; kernels match stock; save/load."""
import pytest
import torch

from envs import harmony
from rl.learner import Learner



def _batch(adv):
    prompt = harmony.render_prompt("Compute 3+4+5+6.", "high")
    good = harmony.render_completion("3+4=7.", "18")
    bad = harmony.render_completion("3+4=8.", "19")
    return [{"prompt_ids": prompt, "completion_ids": c, "loss_mask": [1] * len(c), "advantage": a}
            for c, a in zip([good, bad], adv)]


@pytest.mark.parametrize("kernels", ["deliberate", "stock"])
def test_step_raises_positive_and_lowers_negative_advantage(policy, kernels):
    learner = Learner(str(policy), {"lr": 1e-3, "kernels": kernels}, {}, seed=0)
    batch = _batch([1.0, -1.0])
    before = [sum(x) for x in learner.logprobs(batch)]
    for _ in range(3):
        metrics = learner.train_step(batch)
    after = [sum(x) for x in learner.logprobs(batch)]
    assert after[0] > before[0] and after[1] < before[1]
    assert metrics["grad_norm"] > 0 and learner.step == 3


def test_deliberate_kernels_match_stock_logprobs_and_grads(policy):
    a = Learner(str(policy), {"lr": 0.0, "kernels": "deliberate"}, {}, seed=0)
    b = Learner(str(policy), {"lr": 0.0, "kernels": "stock"}, {}, seed=0)
    batch = _batch([1.0, -0.5])
    for x, y in zip(a.logprobs(batch), b.logprobs(batch)):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=1e-4, atol=1e-5)
    a.train_step(batch)
    b.train_step(batch)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("chunked", [True, False])
def test_logprobs_on_positions_equal_the_full_pass_there(policy, chunked):
    """Scoring only the completion rows gives the full pass' values (and gradients) there, 0 elsewhere."""
    from rl.learner import token_logprobs

    learner = Learner(str(policy), {"lr": 0.0, "kernels": "deliberate" if chunked else "stock"}, {}, seed=0)
    batch = _batch([1.0, -1.0])
    batch[1]["completion_ids"] = batch[1]["completion_ids"][:-3]  # unequal lengths: padding in row 1
    batch[1]["loss_mask"] = batch[1]["loss_mask"][:-3]
    ids, attn, lmask, _, _ = learner._tensors(batch)
    pos = learner._completion_positions(batch, lmask)
    assert pos.sum() == sum(len(b["completion_ids"]) for b in batch) and not pos[:, 0].any()
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
    a = Learner(str(policy), {"lr": 1e-3, "kernels": "deliberate"}, {}, seed=0)
    a.train_step(_batch([1.0, -1.0]))
    a.save(tmp_path / "ck")
    b = Learner(str(tmp_path / "ck"), {"lr": 1e-3, "kernels": "deliberate"}, {}, seed=0)
    b.load(tmp_path / "ck")
    assert b.step == 1
    ma, mb = a.train_step(_batch([0.5, -0.5])), b.train_step(_batch([0.5, -0.5]))
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q)


def _batch4():
    return _batch([1.0, -1.0]) + _batch([0.5, -0.5])


@pytest.mark.parametrize("source", ["recompute", "behavior"])
def test_mini_batches_align_old_logprobs_with_tokens(policy, source):
    """lr 0: every mini-batch step is on-policy, so a correctly placed old log-prob gives ratio 1 exactly
    (one token of misalignment would not)."""
    learner = Learner(str(policy), {"lr": 0.0, "kernels": "deliberate"},
                      {"mini_batches": 2, "ppo_epochs": 2, "old_logprobs": source}, seed=0)
    batch = _batch4()
    for b, lp in zip(batch, learner.logprobs(batch)):
        b["behavior_logprobs"] = lp
    m = learner.train_step(batch)
    assert m["optimizer_steps"] == 4 and learner.step == 1
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["clip_frac"] == 0.0


def test_ppo_epochs_go_off_policy_and_the_clip_engages(policy):
    learner = Learner(str(policy), {"lr": 3e-3, "kernels": "deliberate"},
                      {"mini_batches": 2, "ppo_epochs": 3, "clip_low": 0.1, "clip_high": 0.1}, seed=0)
    batch = _batch4()
    before = [sum(x) for x in learner.logprobs(batch)]
    m = learner.train_step(batch)
    after = [sum(x) for x in learner.logprobs(batch)]
    assert m["optimizer_steps"] == 6 and m["clip_frac"] > 0 and m["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert after[0] - after[1] > before[0] - before[1] + 0.5  # the margin of good over bad widens


def test_behavior_old_logprobs_must_cover_every_token(policy):
    learner = Learner(str(policy), {"lr": 1e-3, "kernels": "deliberate"},
                      {"mini_batches": 2, "old_logprobs": "behavior"}, seed=0)
    with pytest.raises(ValueError, match="behavior_logprobs"):
        learner.train_step(_batch4())


def test_lr_warms_up_per_optimizer_step_and_resumes(policy, tmp_path):
    cfg = {"lr": 1e-3, "kernels": "deliberate", "warmup_steps": 4}
    a = Learner(str(policy), cfg, {"mini_batches": 2}, seed=0)
    assert a.train_step(_batch4())["lr"] == pytest.approx(1e-3 * (1 + 2) / 4 / 2)  # steps 1 and 2 of 4
    a.save(tmp_path / "ck")
    b = Learner(str(tmp_path / "ck"), cfg, {"mini_batches": 2}, seed=0)
    b.load(tmp_path / "ck")
    assert b.train_step(_batch4())["lr"] == pytest.approx(1e-3 * (3 / 4 + 1) / 2)  # steps 3 and 4 (full)


@pytest.mark.parametrize("kernels", ["deliberate", "stock"])
def test_entropy_minimisation_lowers_entropy(policy, kernels):
    """Zero advantages: only the entropy term acts, and a negative coefficient sharpens the policy."""
    learner = Learner(str(policy), {"lr": 1e-3, "kernels": kernels}, {"entropy_coef": -1.0}, seed=0)
    batch = _batch([0.0, 0.0])
    first = learner.train_step(batch)["entropy"]
    for _ in range(3):
        last = learner.train_step(batch)["entropy"]
    assert last < first


def test_lr_scale_freezes_scales_and_leaves_the_rest(policy):
    """learner.lr_scale: 0 freezes (no change, no grad), a multiplier scales Adam's step (first step
    is a sign step of size lr x multiplier), unmatched parameters keep the base lr."""
    cfg = {"lr": 1e-3, "kernels": "deliberate",
           "lr_scale": {r"^model\.(embed_tokens|layers)\.": 0.0, r"^model\.norm\.": 0.5}}
    learner = Learner(str(policy), cfg, {}, seed=0)
    start = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.train_step(_batch([1.0, -1.0]))
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


@pytest.mark.parametrize("lr_scale, message", [
    ({"^no_such_param": 0.0}, "match no parameter"),
    ({".": 0.0}, "freezes every parameter"),
    ({"lm_head": -1.0}, ">= 0"),
    ({"(": 1.0}, "not a regular expression"),
])
def test_lr_scale_bad_values_name_the_problem(policy, lr_scale, message):
    with pytest.raises(ValueError, match=message):
        Learner(str(policy), {"lr": 1e-3, "kernels": "deliberate", "lr_scale": lr_scale}, {}, seed=0)
