"""Router metrics (rl/router_metrics.py): exact values on hand-set routers, padding excluded, every token of
a learner step counted once."""
import math

import pytest
import torch
from torch import nn
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

from rl.config import AlgoConfig, LearnerConfig
from rl.learner import Learner
from rl.router_metrics import RouterStats
from tests.rl.test_learner import _batch

E, K, H = 8, 2, 4


class _Net(nn.Module):
    """Two routers named as in gpt-oss (`model.layers.{i}.mlp.router`)."""

    def __init__(self, bias0, bias1):
        super().__init__()
        cfg = type("C", (), {"num_experts_per_tok": K, "num_local_experts": E, "hidden_size": H})()
        self.layers = nn.ModuleList()
        for bias in (bias0, bias1):
            layer = nn.Module()
            layer.mlp = nn.Module()
            layer.mlp.router = GptOssTopKRouter(cfg)
            with torch.no_grad():
                layer.mlp.router.bias.copy_(torch.tensor(bias, dtype=torch.float32))
            self.layers.append(layer)

    def forward(self, x):  # (B, L, H)
        for layer in self.layers:
            layer.mlp.router(x.reshape(-1, H))


def test_uniform_and_collapsed_routers_give_their_exact_values():
    collapsed = [20.0, 20.0] + [0.0] * (E - 2)  # every token picks experts 0 and 1, with p ~ 1/2 each
    net = _Net([0.0] * E, collapsed)
    stats = RouterStats(net)
    assert len(stats) == 2 and stats.layers == [0, 1]
    with stats.record(torch.ones(2, 3)):
        net(torch.zeros(2, 3, H))
    m = stats.collect()
    # uniform: every softmax is 1/E, so the entropy is ln E and the balance is E sum_e f_e / E = 1
    assert m["router/layer0/entropy"] == pytest.approx(math.log(E))
    assert m["router/layer0/balance"] == pytest.approx(1.0)
    p = 1.0 / (2.0 + (E - 2) * math.exp(-20.0))  # softmax of experts 0 and 1
    assert m["router/layer1/max_load"] == pytest.approx(E / 2)  # f = (1/2, 1/2, 0, ...)
    assert m["router/layer1/unused"] == pytest.approx((E - 2) / E)
    assert m["router/layer1/balance"] == pytest.approx(E * p, rel=1e-6)
    assert m["router/layer1/entropy"] == pytest.approx(-2 * p * math.log(p) - (E - 2) * (1 - 2 * p) / (E - 2)
                                                       * math.log((1 - 2 * p) / (E - 2)), abs=1e-6)
    assert m["router/balance"] == pytest.approx((1.0 + E * p) / 2)
    assert stats.collect() == {"router/skipped_passes": 0.0}  # reset after collecting


def test_padding_is_not_counted_and_unarmed_passes_are_ignored():
    net = _Net([0.0] * E, [0.0] * E)
    with torch.no_grad():  # layer 1 routes by the input: token rows of +1 go to experts 0-1, of -1 to 2-3
        net.layers[1].mlp.router.weight.zero_()
        net.layers[1].mlp.router.weight[:2, 0] = 5.0
        net.layers[1].mlp.router.weight[2:4, 0] = -5.0
    stats = RouterStats(net)
    x = torch.zeros(1, 4, H)
    x[0, :3, 0], x[0, 3, 0] = 1.0, -1.0  # the last position, padding, would pick experts 2-3
    net(x)  # not recording
    with stats.record(torch.tensor([[1, 1, 1, 0]])):
        net(x)
    m = stats.collect()
    assert m["router/layer1/max_load"] == pytest.approx(E / 2) and m["router/layer1/unused"] == pytest.approx(0.75)


def test_a_pass_that_does_not_match_its_mask_is_skipped_not_fatal():
    net = _Net([0.0] * E, [0.0] * E)
    stats = RouterStats(net)
    with stats.record(torch.ones(1, 5)):
        net(torch.zeros(1, 3, H))  # 3 router rows for a 5-token mask
    assert stats.collect() == {"router/skipped_passes": 2.0}


def test_a_learner_step_counts_every_real_token_once(policy):
    """Two epochs of two mini-batches, a KL reference pass and recomputed old log-probs: the step's router metrics are
    those of one forward over the batch's real tokens."""
    algo = AlgoConfig(mini_batches=2, ppo_epochs=2, old_logprobs="recompute", kl_coef=0.1)
    learner = Learner(str(policy), LearnerConfig(lr=0.0, device="cpu", micro_batch_size=1, share_prompts=False),
                      algo, seed=0)
    batch = _batch([1.0, -1.0, 0.5, -0.5], policy)
    m = learner.train_step(batch)
    with learner.router.record(batch.attention_mask):
        learner.logprobs(batch)
    want = learner.router.collect()
    n_layers = learner.model.config.num_hidden_layers
    assert {k for k in m if k.startswith("router/layer")} == \
        {f"router/layer{i}/{s}" for i in range(n_layers) for s in ("max_load", "balance", "entropy", "unused")}
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-6), k
    assert m["router/tokens"] == float(batch.attention_mask.sum())  # once: not in the recompute or KL passes
    n_exp = learner.model.config.num_local_experts
    assert 1.0 <= m["router/max_load"] <= n_exp and 0.0 < m["router/entropy"] <= math.log(n_exp)


def test_shared_prompts_route_each_prompt_once(policy):
    """With learner.share_prompts the step's two passes (prompts, completions) are counted with their own masks:
    a group's prompt once, every completion token once, nothing skipped."""
    learner = Learner(str(policy), LearnerConfig(lr=0.0, device="cpu", micro_batch_size=4, share_prompts=True),
                      AlgoConfig(), seed=0)
    batch = _batch([1.0, -1.0, 0.5, -0.5], policy)  # one prompt, four completions
    split = batch.split_prompts()
    assert split is not None and split.prompt_ids.shape[0] == 1
    m = learner.train_step(batch)
    assert m["router/skipped_passes"] == 0.0
    assert m["router/tokens"] == float(split.prompt_mask.sum() + split.completion_mask.sum())
    with learner.router.record(split.masks()):
        learner.logprobs(batch)
    for k, v in learner.router.collect().items():
        assert m[k] == pytest.approx(v, rel=1e-6), k
