"""GRPO math on hand-computed cases."""
import math

import pytest
import torch

from rl.algorithms import (
    aggregate,
    dr_grpo_advantages,
    get_advantage_fn,
    grpo_advantages,
    informative_groups,
    kl_k3,
    policy_loss,
)


def test_grpo_advantages_hand_computed():
    # group a: [1, 0] mean .5 std .5 -> [1, -1]; group b: [2, 2, 2] constant -> 0
    r = torch.tensor([1.0, 0.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(r, ["a", "a", "b", "b", "b"], eps=0.0 + 1e-12)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0]))


def test_groups_are_task_and_effort():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = [("t", "low"), ("t", "low"), ("t", "high"), ("t", "high")]
    adv = dr_grpo_advantages(r, groups)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_dr_grpo_keeps_scale():
    r = torch.tensor([0.1, 0.0])  # near-uniform group: GRPO blows it up to ±1, Dr.GRPO keeps ±.05
    torch.testing.assert_close(dr_grpo_advantages(r, [0, 0]), torch.tensor([0.05, -0.05]))
    torch.testing.assert_close(grpo_advantages(r, [0, 0]), torch.tensor([1.0, -1.0]), atol=1e-4, rtol=0)


def test_unknown_advantage_lists_valid_names():
    with pytest.raises(KeyError, match="dr_grpo"):
        get_advantage_fn("ppo")


def test_policy_loss_on_policy_equals_minus_advantage():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = policy_loss(lp, lp.clone(), torch.tensor([2.0]), mask)
    assert loss.item() == pytest.approx(-2.0)  # ratio 1 -> -A averaged over 2 tokens
    assert m["clip_frac"] == 0.0


def test_policy_loss_clips_and_clip_higher():
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(1.5))  # ratio 1.5
    mask = torch.ones(1, 1)
    # A>0: clipped at 1.2 (symmetric) or 1.28 (DAPO clip-higher)
    loss, m = policy_loss(new, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert m["clip_frac"] == 1.0
    loss, _ = policy_loss(new, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.28)
    # A<0: min picks the unclipped (more pessimistic) term -> -(1.5 * -1) = 1.5
    loss, _ = policy_loss(new, old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx(1.5)


def test_policy_loss_gradient_zero_when_clipped():
    new = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, _ = policy_loss(new, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert new.grad.abs().item() == 0.0


def test_aggregations_hand_computed():
    v = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(v, mask, "token_mean").item() == pytest.approx(8 / 5)
    assert aggregate(v, mask, "seq_mean_token_mean").item() == pytest.approx((1 + 4) / 2)
    assert aggregate(v, mask, "seq_mean_token_sum_norm", max_tokens=8).item() == pytest.approx(8 / 16)
    with pytest.raises(KeyError, match="token_mean"):
        aggregate(v, mask, "mean")


def test_kl_k3_zero_at_equality_and_positive():
    a = torch.tensor([-1.0, -2.0])
    assert kl_k3(a, a).abs().max().item() == 0.0
    assert (kl_k3(a, a + torch.tensor([0.5, -0.5])) > 0).all()


def test_kl_term_added():
    lp = torch.zeros(1, 2)
    ref = torch.full((1, 2), -1.0)
    loss, m = policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.5)
    expected = 0.5 * (math.exp(-1) + 1 - 1)
    assert loss.item() == pytest.approx(expected)
    assert m["kl_ref"] == pytest.approx(math.exp(-1))


def test_entropy_term_hand_computed():
    """loss = -A * ratio (0 here) - coef * mean H; the logged entropy is the masked token mean."""
    lp = torch.zeros(1, 3)
    ent = torch.tensor([[0.5, 1.5, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = policy_loss(lp, lp, torch.tensor([0.0]), mask, entropy=ent, entropy_coef=-0.2)
    assert loss.item() == pytest.approx(0.2 * 1.0)  # minimising: + 0.2 * mean(0.5, 1.5)
    assert m["entropy"] == pytest.approx(1.0)
    bonus, _ = policy_loss(lp, lp, torch.tensor([0.0]), mask, entropy=ent, entropy_coef=0.2)
    assert bonus.item() == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="entropy.shape"):
        policy_loss(lp, lp, torch.tensor([0.0]), mask, entropy=ent[:, :2], entropy_coef=0.1)


def test_shape_errors_name_shapes():
    with pytest.raises(ValueError, match="advantages.shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


def test_dapo_filter_keeps_only_groups_whose_rewards_differ():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.3, 0.3])
    keep = informative_groups(r, ["a", "a", "b", "b", "c", "c"])
    assert keep.tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages])
@pytest.mark.parametrize("value, n", [(1.2, 8), (0.1, 3), (1.0 + 0.2 * 0.7, 7), (-3.3, 5)])
def test_constant_group_advantage_is_exactly_zero(fn, value, n):
    """All-equal rewards are a constant group: advantage exactly 0, never a rounding step / (step + eps)
    (a float32 mean of 8 x 1.2 is one step off and used to give every sample +0.107)."""
    r = torch.full((n,), value, dtype=torch.float32)
    assert fn(r, ["g"] * n).abs().max().item() == 0.0


def test_dr_grpo_normaliser_is_required():
    values, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(values, mask, "seq_mean_token_sum_norm", None)
    # a constant normaliser: padding the tensors wider does not change the loss
    wide = torch.nn.functional.pad(values, (0, 5)), torch.nn.functional.pad(mask, (0, 5))
    assert aggregate(values, mask, "seq_mean_token_sum_norm", 10) == aggregate(*wide, "seq_mean_token_sum_norm", 10)


def test_masked_positions_cannot_reach_the_loss_ratios_or_gradient():
    """Positions with mask 0 (padding, ids inserted by budget forcing) hold placeholder old/ref
    log-probs; no value there, however extreme, changes the loss, its gradient or the metrics."""
    g = torch.Generator().manual_seed(0)
    lp0 = -torch.rand(2, 6, generator=g) * 3  # (B, T)
    old = lp0 + 0.1 * torch.randn(2, 6, generator=g)
    ref = lp0 + 0.1 * torch.randn(2, 6, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1], [1, 0, 0, 1, 1, 0]])
    runs = []
    for placeholder in (0.0, -1e4, 1e4):  # exp(lp - old) overflows to inf at -1e4 if it is ever taken
        o, r = old.masked_fill(mask == 0, placeholder), ref.masked_fill(mask == 0, placeholder)
        lp = lp0.clone().requires_grad_(True)
        loss, m = policy_loss(lp, o, torch.tensor([1.0, -0.5]), mask, clip_low=0.2, clip_high=0.28,
                              ref_logprobs=r, kl_coef=0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        assert (lp.grad[mask == 0] == 0).all()
        runs.append((loss.item(), lp.grad, m))
    for loss, grad, m in runs[1:]:
        assert loss == runs[0][0] and torch.equal(grad, runs[0][1]) and m == runs[0][2]
