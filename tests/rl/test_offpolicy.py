"""Policy objectives, rollout/learner mismatch corrections and masks on hand-computed cases: every
expected number below is written from the formula in its function's docstring, not from the code."""
import math

import pytest
import torch

from rl.algorithms import (
    CORRECTIONS,
    OBJECTIVES,
    ObjectiveParams,
    loss_options,
    mismatch_metrics,
    offpolicy_sequence_mask,
    policy_loss,
    quantiles,
)
from rl.config import AlgoConfig


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


L = math.log
# Two sequences, ratios r = exp(lp - old) with old = 0. Row 0: A = +1, three live tokens. Row 1: A = -1,
# two live tokens and a masked one holding a ratio (9) that must not matter.
R = [[1.5, 0.5, 1.1], [1.5, 0.5, 9.0]]
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
P = ObjectiveParams(clip_low=0.2, clip_high=0.28, cispo_cap=1.2, sapo_tau_pos=1.0, sapo_tau_neg=1.05)
G0, G1 = (1.5 * 0.5 * 1.1) ** (1 / 3), (1.5 * 0.5) ** (1 / 2)  # GSPO: geometric means of the live ratios

OBJECTIVE_TABLE = {
    # -min(r A, clip(r, 0.8, 1.28) A)
    "ppo": [[-1.28, -0.5, -1.1], [1.5, 0.8, None]],
    # the same on the sequence's geometric-mean ratio, on every token of the sequence
    "gspo": [[-G0] * 3, [G1, G1, None]],
    # -min(r, 1.2) A log r
    "cispo": [[-1.2 * L(1.5), -0.5 * L(0.5), -1.1 * L(1.1)], [1.2 * L(1.5), 0.5 * L(0.5), None]],
    # -sigmoid(tau (r - 1)) 4 / tau A, tau = 1 for A > 0, 1.05 otherwise
    "sapo": [[-4 * sig(0.5), -4 * sig(-0.5), -4 * sig(0.1)],
             [4 / 1.05 * sig(1.05 * 0.5), 4 / 1.05 * sig(-1.05 * 0.5), None]],
}
CLIPPED_TABLE = {  # where the objective's ratio was clipped (what clip_frac counts)
    "ppo": [[True, True, False], [True, True]],
    "gspo": [[False] * 3, [False, False]],
    "cispo": [[True, False, False], [True, False]],
    "sapo": [[False] * 3, [False, False]],
}


def _inputs(dtype=torch.float64):
    lp = torch.tensor(R, dtype=dtype).log()
    old = torch.zeros_like(lp)
    return lp, old


@pytest.mark.parametrize("name", sorted(OBJECTIVE_TABLE))
def test_objective_per_token_table(name):
    lp, old = _inputs()
    live = MASK.bool()
    log_ratio = torch.where(live, lp - old, torch.zeros_like(lp))
    per_token, clipped, _ = OBJECTIVES[name](lp, log_ratio, ADV.double().unsqueeze(-1), live, P)
    for row, want in enumerate(OBJECTIVE_TABLE[name]):
        for t, value in enumerate(want):
            if value is not None:
                assert per_token[row, t].item() == pytest.approx(value, rel=1e-12, abs=1e-12), (row, t)
    assert [clipped[0].tolist(), clipped[1, :2].tolist()] == CLIPPED_TABLE[name]


@pytest.mark.parametrize("name", sorted(OBJECTIVE_TABLE))
def test_objective_loss_is_the_token_mean_of_the_table(name):
    lp, old = _inputs()
    loss, m = policy_loss(lp, old, ADV.double(), MASK, objective=name, clip_low=0.2, clip_high=0.28,
                          cispo_cap=1.2)
    want = [v for row in OBJECTIVE_TABLE[name] for v in row if v is not None]
    assert loss.item() == pytest.approx(sum(want) / 5, rel=1e-12)
    assert m["clip_frac"] == pytest.approx(sum(sum(r) for r in CLIPPED_TABLE[name]) / 5)


def test_objective_gradients_hand_computed():
    """d loss_t / d lp_t, one token each, A = +1 (r = 1.5 unless said)."""
    def grad(name, r=1.5, adv=1.0, **kw):
        lp = torch.tensor([[math.log(r)]], dtype=torch.float64, requires_grad=True)
        loss, _ = policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                              torch.ones(1, 1), objective=name, **kw)
        loss.backward()
        return lp.grad.item()

    assert grad("ppo") == 0.0  # clipped at 1.2: no gradient
    assert grad("ppo", r=1.1) == pytest.approx(-1.1)  # d(-r)/d lp = -r
    assert grad("cispo", cispo_cap=1.2) == pytest.approx(-1.2)  # the weight is detached: -min(r, cap) A
    assert grad("cispo", r=0.5, adv=-2.0) == pytest.approx(1.0)  # -0.5 * -2
    assert grad("sapo", r=1.0) == pytest.approx(-1.0)  # sigmoid'(0) * 4 * r = 1: the unclipped gradient at r = 1
    assert grad("sapo") == pytest.approx(-4 * sig(0.5) * (1 - sig(0.5)) * 1.5)
    assert grad("gspo", r=1.1) == pytest.approx(-1.1)  # one token: s = r


def test_gspo_gradient_spreads_the_sequence_ratio_over_its_tokens():
    """d s / d lp_t = s / |y| for every live token (GSPO's own gradient), 0 on masked ones."""
    lp = torch.tensor([[L(1.5), L(0.5), L(1.1)]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros_like(lp), torch.tensor([1.0], dtype=torch.float64),
                          torch.tensor([[1, 1, 0]]), objective="gspo", loss_agg="seq_mean_token_mean")
    loss.backward()
    s = math.sqrt(0.75)
    torch.testing.assert_close(lp.grad, torch.tensor([[-s / 2, -s / 2, 0.0]], dtype=torch.float64))


RHO = [0.1, 0.5, 1.0, 1.9, 2.5, 30.0, 1e6]  # the last position is masked (live False)
CORRECTION_TABLE = {  # cap 2: (weights on the live positions, dropped, truncated)
    "none": ([1.0] * 6, [0] * 6, [0] * 6),
    "tis": ([0.1, 0.5, 1.0, 1.9, 2.0, 2.0], [0] * 6, [0, 0, 0, 0, 1, 1]),
    "mis": ([0.1, 0.5, 1.0, 1.9, 0.0, 0.0], [0, 0, 0, 0, 1, 1], [0] * 6),
    "icepop": ([0.0, 0.5, 1.0, 1.9, 0.0, 0.0], [1, 0, 0, 0, 1, 1], [0] * 6),  # band [0.5, 2]
}


@pytest.mark.parametrize("name", sorted(CORRECTION_TABLE))
def test_correction_weight_table(name):
    rho = torch.tensor([RHO], dtype=torch.float64)
    live = torch.tensor([[True] * 6 + [False]])
    weight, dropped, truncated = CORRECTIONS[name](rho, live, 2.0)
    want_w, want_d, want_t = CORRECTION_TABLE[name]
    assert weight[0, :6].tolist() == pytest.approx(want_w)
    assert dropped[0].int().tolist() == want_d + [0] and truncated[0].int().tolist() == want_t + [0]


@pytest.mark.parametrize("name", ["tis", "mis", "icepop"])
def test_correction_reweights_the_loss_and_drops_gradients(name):
    """On-policy PPO (old = lp): loss_t = -A w_t, so the token-mean loss is -mean(w) and a dropped
    token has no gradient; behaviour log-probs at masked positions never matter."""
    rho = torch.tensor([RHO[:6]], dtype=torch.float64)
    lp = torch.full((1, 6), -1.0, dtype=torch.float64, requires_grad=True)
    behaviour = lp.detach() - rho.log()  # rho = exp(old - behaviour), old = lp
    mask = torch.ones(1, 6)
    runs = []
    for placeholder in (0.0, 1e4):
        wide_lp = torch.nn.functional.pad(lp, (0, 1), value=-1.0)
        wide_b = torch.nn.functional.pad(behaviour, (0, 1), value=placeholder)
        loss, m = policy_loss(wide_lp, wide_lp.detach(), torch.tensor([1.0], dtype=torch.float64),
                              torch.nn.functional.pad(mask, (0, 1)), behavior_logprobs=wide_b,
                              correction=name, correction_cap=2.0)
        (g,) = torch.autograd.grad(loss, lp)
        runs.append((loss.item(), g))
    want_w = CORRECTION_TABLE[name][0]
    assert runs[0][0] == pytest.approx(-sum(want_w) / 6) and runs[1][0] == runs[0][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert [x == 0.0 for x in runs[0][1][0].tolist()] == [w == 0.0 for w in want_w]
    assert m["is_weight_mean"] == pytest.approx(sum(want_w) / 6)


def test_offpolicy_sequence_mask_table():
    """keep_i = A_i >= 0 or mean_t(behaviour - lp) <= delta (0.5)."""
    lp = torch.full((4, 2), -1.0)
    behaviour = torch.tensor([[0.0, 0.0],  # KL 1.0, A < 0: dropped
                              [-0.8, -0.8],  # KL 0.2, A < 0: kept
                              [2.0, 2.0],  # KL 3.0, A > 0: kept
                              [2.0, 9e9]])  # KL 3.0 on its live token, A = 0: kept
    live = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]]).bool()
    keep = offpolicy_sequence_mask(lp, behaviour, torch.tensor([-1.0, -1.0, 2.0, 0.0]), live, 0.5)
    assert keep.tolist() == [0.0, 1.0, 1.0, 1.0]
    loss, m = policy_loss(lp, lp, torch.tensor([-1.0, -1.0, 2.0, 0.0]), live, behavior_logprobs=behaviour,
                          offpolicy_mask=0.5)
    assert m["offpolicy_masked"] == 0.25
    assert loss.item() == pytest.approx((1.0 * 2 - 2.0 * 2) / 7)  # on-policy: -A per live token, row 0 dropped


def test_mismatch_metrics_hand_computed():
    """rho = exp(learner - behaviour) = (1, e, 1/e): k3 = rho - 1 - log rho; linear quantiles of the
    sorted (1/e, 1, e); cap 2 truncates or drops e (and icepop also 1/e, below 1/2)."""
    learner, behaviour = torch.tensor([-1.0, -1.0, -2.0]), torch.tensor([-1.0, -2.0, -1.0])
    e = math.e
    m = mismatch_metrics(learner, behaviour, correction="icepop", correction_cap=2.0)
    assert m["mismatch/kl"] == pytest.approx((0 + (e - 2) + 1 / e) / 3)
    assert m["mismatch/ratio_p50"] == pytest.approx(1.0)
    assert m["mismatch/ratio_p1"] == pytest.approx(1 / e + 0.02 * (1 - 1 / e))
    assert m["mismatch/ratio_p99"] == pytest.approx(1 + 0.98 * (e - 1))
    assert (m["mismatch/masked"], m["mismatch/truncated"]) == (pytest.approx(2 / 3), 0.0)
    tis = mismatch_metrics(learner, behaviour, correction="tis", correction_cap=2.0)
    assert (tis["mismatch/masked"], tis["mismatch/truncated"]) == (0.0, pytest.approx(1 / 3))
    assert mismatch_metrics(torch.zeros(0), torch.zeros(0))["mismatch/kl"] == 0.0
    assert quantiles(torch.arange(101.0), (0.0, 0.01, 0.5, 1.0)) == [0.0, 1.0, 50.0, 100.0]


def test_defaults_are_todays_loss_bit_for_bit():
    """The schema's defaults (ppo, no correction, no sequence mask) give the loss, gradient and
    metrics of the plain call, whatever the behaviour log-probs hold."""
    g = torch.Generator().manual_seed(0)
    lp0 = -torch.rand(3, 5, generator=g) * 2
    old = lp0 + 0.3 * torch.randn(3, 5, generator=g)
    adv, mask = torch.tensor([1.0, -0.5, 0.25]), (torch.rand(3, 5, generator=g) > 0.3).int()
    results = []
    for kw in ({}, {"behavior_logprobs": old + 5.0, **loss_options(AlgoConfig(max_tokens=None))}):
        lp = lp0.clone().requires_grad_(True)
        loss, m = policy_loss(lp, old, adv, mask, **kw)
        loss.backward()
        results.append((loss, lp.grad, m))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("correction", sorted(CORRECTIONS))
def test_every_config_combination_runs_through_loss_options(objective, correction):
    algo = AlgoConfig(objective=objective, correction=correction, offpolicy_mask=0.5, max_tokens=8)
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach() + 0.1, torch.tensor([1.0, -1.0]), torch.ones(2, 3),
                          behavior_logprobs=torch.full((2, 3), -1.2), **loss_options(algo))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


def test_unknown_names_list_the_valid_ones():
    lp = torch.zeros(1, 1)
    with pytest.raises(KeyError, match="algo.objective='ppo2'.*cispo"):
        policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 1), objective="ppo2")
    with pytest.raises(KeyError, match="algo.correction='is'.*icepop"):
        policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 1), behavior_logprobs=lp, correction="is")
    with pytest.raises(ValueError, match="need behavior_logprobs"):
        policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 1), correction="tis")


def _learner_and_batch(policy, **algo):
    from envs import harmony
    from envs.types import Sample, Transcript
    from rl.batch import collate
    from rl.config import LearnerConfig
    from rl.learner import Learner
    from rl.model import VocabMap

    learner = Learner(str(policy), LearnerConfig(lr=1e-3, num_threads=1), AlgoConfig(**algo), seed=0)
    prompt = harmony.render_prompt("Compute 3+4+5+6.", "high")
    ids = [harmony.render_completion("3+4=7.", "18"), harmony.render_completion("3+4=8.", "19")]
    samples = [Sample("t", "math", "high", prompt, c, [1] * len(c), [0.0] * len(c), Transcript()) for c in ids]
    batch = collate(samples, [1.0, -1.0], VocabMap.load(policy))
    return learner, batch._replace(behavior_logprobs=learner.logprobs(batch))


def test_learner_logs_the_mismatch_and_icepop_drops_every_token_outside_its_band(policy):
    """Behaviour log-probs equal to the learner's: no mismatch. One nat below it on every token:
    rho = e > 2, so IcePop gives every token weight 0 and the step moves nothing."""
    learner, batch = _learner_and_batch(policy, objective="gspo", correction="icepop", correction_cap=2.0)
    m = learner.train_step(batch)
    assert m["mismatch/kl"] == pytest.approx(0.0, abs=1e-9) and m["mismatch/ratio_p50"] == pytest.approx(1.0)
    assert m["mismatch/masked"] == 0.0 and m["grad_norm"] > 0
    learner, batch = _learner_and_batch(policy, objective="gspo", correction="icepop", correction_cap=2.0)
    before = [p.detach().clone() for p in learner.model.parameters()]
    m = learner.train_step(batch._replace(behavior_logprobs=batch.behavior_logprobs - batch.loss_mask))
    assert m["mismatch/masked"] == 1.0 and m["mismatch/ratio_p1"] == pytest.approx(math.e, rel=1e-5)
    assert m["mismatch/kl"] == pytest.approx(math.e - 2, rel=1e-5) and m["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))


@pytest.mark.parametrize("raw, key", [
    ({"algo": {"correction": "tis", "mini_batches": 2, "old_logprobs": "behavior"}}, "algo.correction"),
    ({"algo": {"correction": "truncate"}}, "algo.correction"),
    ({"algo": {"objective": "grpo"}}, "algo.objective"),
    ({"algo": {"correction_cap": 1.0}}, "algo.correction_cap"),
    ({"algo": {"offpolicy_mask": -0.1}}, "algo.offpolicy_mask"),
    ({"train": {"max_staleness": 2}}, "train.max_staleness"),
    ({"rollout": {"groups_per_call": 0}}, "rollout.groups_per_call"),
])
def test_bad_offpolicy_config_names_the_key(raw, key):
    from rl.config import ConfigError, validate

    with pytest.raises(ConfigError, match=rf"'{key}'"):
        validate(raw)


@pytest.mark.parametrize("overrides", [
    ["algo=gspo"], ["algo=cispo"], ["algo=sapo", "algo.correction=tis"],
    ["experiment=tiny", "train.max_staleness=1"],
    ["algo.correction=icepop", "algo.mini_batches=4", "algo.old_logprobs=recompute", "algo.offpolicy_mask=0.5"],
])
def test_presets_compose(overrides):
    from rl.config import compose

    cfg = compose(overrides)
    assert cfg.algo.objective in OBJECTIVES and cfg.algo.correction in CORRECTIONS
