"""Shared prompts (learner.share_prompts, kernels.attention.PrefixKV): a GRPO group's prompt runs once and its
completions attend to its keys; log-probs, entropies, gradients and whole learner steps are those of one padded
row per completion."""
import random

import pytest
import torch

from envs import harmony
from envs.types import Sample, Transcript
from rl.batch import collate
from rl.config import AlgoConfig, ConfigError, LearnerConfig, compose
from rl.learner import Learner, token_logprobs
from rl.model import VocabMap


def _samples(seed: int = 0, empty: bool = False) -> list[Sample]:
    """Three prompts of different lengths (longer than the test model's sliding window of 16), three
    completions each of different lengths, in an interleaved order; `empty`: one completion has no tokens."""
    rng = random.Random(seed)
    out = []
    for q, effort in [("Compute 3+4+5+6.", "low"), ("Compute 3+4+5.", "high"), ("Compute 6+5+4+3.", "medium")]:
        prompt = harmony.render_prompt(q, effort)
        for _ in range(3):
            c = harmony.render_completion("3+4=7." * rng.randint(1, 4), str(rng.randint(10, 19)))
            out.append(Sample("t", "math", effort, prompt, c, [1] * len(c), [-0.5] * len(c), Transcript()))
    rng.shuffle(out)
    if empty:
        out[4].completion_ids, out[4].loss_mask, out[4].behavior_logprobs = [], [], []
    return out


def _batch(policy, seed=0, empty=False):
    samples = _samples(seed, empty)
    rng = random.Random(seed + 1)
    return collate(samples, [rng.uniform(-1, 1) for _ in samples], VocabMap.load(policy))


def _learner(policy, share, algo=None, **cfg):
    cfg = {"kernels": "deliberate", "device": "cpu", "lr": 1e-3, "micro_batch_size": 16, **cfg}
    return Learner(str(policy), LearnerConfig(share_prompts=share, **cfg), AlgoConfig(**(algo or {})), seed=0)


def test_split_holds_each_prompt_once_left_padded_and_every_completion():
    ids = torch.tensor([[5, 6, 7, 1, 0], [9, 7, 2, 3, 0], [5, 6, 7, 4, 4], [9, 7, 8, 0, 0]])
    lengths = torch.tensor([4, 4, 5, 3])
    from rl.batch import TrainBatch

    attn = (torch.arange(5)[None] < lengths[:, None]).long()
    comp = torch.zeros(4, 5, dtype=torch.bool)
    for r, (s, e) in enumerate([(3, 4), (2, 4), (3, 5), (2, 3)]):
        comp[r, s:e] = True
    z = torch.zeros(4, 5)
    batch = TrainBatch(ids, attn, comp, comp.float(), z, torch.zeros(4))
    sp = batch.split_prompts()
    assert sp.rows.tolist() == [0, 1, 0, 1]
    assert sp.prompt_ids.tolist() == [[5, 6, 7], [0, 9, 7]] and sp.prompt_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert sp.prompt_positions.tolist() == [[0, 1, 2], [0, 0, 1]]
    assert sp.completion_ids.tolist() == [[1, 0], [2, 3], [4, 4], [8, 0]]
    assert sp.completion_mask.int().tolist() == [[1, 0], [1, 1], [1, 1], [1, 0]]
    assert sp.completion_positions.tolist() == [[3, 4], [2, 3], [3, 4], [2, 3]]
    # every row its own prompt: nothing to share
    assert TrainBatch(*(t[[0, 1]] for t in batch)).split_prompts() is None


@pytest.mark.parametrize("empty", [False, True])
def test_shared_pass_gives_the_padded_pass_values_and_gradients(policy, empty):
    learner = _learner(policy, share=True, lr=0.0)
    batch = _batch(policy, empty=empty)
    split = batch.split_prompts()
    assert split.prompt_ids.shape[0] == 3 and split.prompt_mask.shape[1] > 16  # prompts longer than the window
    assert not split.prompt_mask.all()  # prompts of different lengths: left padding
    runs = []
    for sp in (None, split):
        learner.model.zero_grad(set_to_none=True)
        lp, ent = token_logprobs(learner.model, batch.input_ids, batch.attention_mask, chunked=True,
                                 positions=batch.completion_mask, n_vocab=learner.n_vocab, with_entropy=True, split=sp)
        (lp * torch.linspace(-1, 1, lp.shape[1])).sum().add(ent.sum()).backward()
        runs.append((lp, ent, {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}))
    (lp0, ent0, g0), (lp1, ent1, g1) = runs
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)
    assert (lp1[~batch.completion_mask] == 0).all() and (lp1[batch.completion_mask] != 0).all()
    assert set(g1) == set(g0) and any(".sinks" in n for n in g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_learner_steps_are_the_same_with_and_without_sharing(policy):
    """Two mini-batches, micro-batches of 4 rows, a KL reference: the step metrics and the last optimizer step's
    gradients match (the micro-batches differ, so up to float summation order). lr=0: Adam's first steps are
    sign steps that would blow float noise in near-zero gradients up to a full lr."""
    algo = {"mini_batches": 2, "kl_coef": 0.05}
    runs = []
    for share in (False, True):
        learner = _learner(policy, share, algo, micro_batch_size=4, lr=0.0)
        m = learner.train_step(_batch(policy))
        runs.append((m, {n: p.grad for n, p in learner.model.named_parameters() if p.grad is not None}))
    (m0, g0), (m1, g1) = runs
    for k in ("loss", "grad_norm", "kl_ref", "entropy", "rollout_logprob_diff", "mismatch/kl", "tokens"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-7), k
    assert m1["router/tokens"] < m0["router/tokens"]  # prompts routed once per micro-batch, not once per row
    assert set(g1) == set(g0) and g0
    for n, g in g0.items():
        torch.testing.assert_close(g1[n], g, rtol=1e-3, atol=1e-5 * float(g.abs().max()), msg=n)


def test_sharing_defaults_on_cpu_with_our_kernels_and_refuses_stock(policy):
    assert _learner(policy, None).share_prompts
    assert not _learner(policy, None, kernels="stock").share_prompts
    with pytest.raises(ValueError, match="share_prompts"):
        _learner(policy, True, kernels="stock")
    with pytest.raises(ConfigError, match="learner.share_prompts"):
        compose(["learner.share_prompts=true", "learner.kernels=stock"])


def test_stock_attention_cannot_run_a_split(policy):
    learner = _learner(policy, False, kernels="stock")
    batch = _batch(policy)
    with pytest.raises(ValueError, match="deliberate"):
        token_logprobs(learner.model, batch.input_ids, batch.attention_mask, chunked=False,
                       positions=batch.completion_mask, split=batch.split_prompts())


def test_prefix_reader_before_the_prefix_pass_names_the_problem():
    from kernels.attention import PrefixKV

    with pytest.raises(KeyError, match="prefix pass first"):
        PrefixKV().extend(torch.tensor([0]))(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))


def test_group_mini_batches_hold_whole_prompts_and_every_row_once():
    from rl.learner import mini_batches

    prompts = torch.tensor([3, 0, 1, 3, 2, 0, 1, 2, 4])
    torch.manual_seed(1)
    parts = mini_batches(len(prompts), 3, prompts)
    assert len(parts) == 3 and sorted(torch.cat(parts).tolist()) == list(range(9))
    seen = [set(prompts[p].tolist()) for p in parts]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])  # a prompt in one mini-batch only
    assert len(mini_batches(4, 3, torch.tensor([0, 0, 1, 1]))) == 2  # fewer prompts than mini-batches
    torch.manual_seed(1)
    rows = mini_batches(9, 3)
    torch.manual_seed(1)
    assert [r.tolist() for r in rows] == [r.tolist() for r in torch.tensor_split(torch.randperm(9), 3)]


def test_group_mini_batches_train_with_shared_prompts(policy):
    learner = _learner(policy, True, {"mini_batches": 3, "mini_batch_split": "groups"}, micro_batch_size=16)
    batch = _batch(policy)
    before = learner.logprobs(batch)
    m = learner.train_step(batch)
    assert m["optimizer_steps"] == 3.0 and m["router/skipped_passes"] == 0.0
    split = batch.split_prompts()  # every prompt routed once over the step: each in one mini-batch
    assert m["router/tokens"] == float(split.prompt_mask.sum() + split.completion_mask.sum())
    assert not torch.equal(learner.logprobs(batch), before)


def test_a_learner_group_refuses_shared_prompts():
    with pytest.raises(ConfigError, match="learner.share_prompts"):
        compose(["learner.share_prompts=true", "learner.world_size=2"])
    compose(["learner.world_size=2"])  # null: off in a group, nothing to refuse


def test_batches_collate_does_not_build_run_unshared():
    """A completion mask with a hole, unscored trailing tokens or left padding: no split, and the learner
    scores such a batch as it always did."""
    from rl.batch import TrainBatch

    ids = torch.tensor([[5, 6, 7, 1, 2], [5, 6, 7, 3, 4]])
    attn = torch.ones(2, 5, dtype=torch.long)
    comp = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    z = torch.zeros(2, 5)
    ok = TrainBatch(ids, attn, comp, comp.float(), z, torch.zeros(2))
    assert ok.split_prompts() is not None
    hole = comp.clone()
    hole[1, 3] = False  # row 1 scores only its last token: looks like a longer prompt, a different one
    assert TrainBatch(ids, attn, hole, hole.float(), z, torch.zeros(2)).split_prompts() is None
    short = comp.clone()
    short[0, 4] = False  # an unscored trailing token
    assert TrainBatch(ids, attn, short, short.float(), z, torch.zeros(2)).split_prompts() is None
    left = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert TrainBatch(ids, left, comp, comp.float(), z, torch.zeros(2)).split_prompts() is None
    no_prompt = torch.ones(2, 5, dtype=torch.bool)
    assert TrainBatch(ids, attn, no_prompt, no_prompt.float(), z, torch.zeros(2)).split_prompts() is None


def test_docstring_examples():
    import doctest

    import rl.batch
    import rl.learner

    assert doctest.testmod(rl.batch).failed == 0 and doctest.testmod(rl.learner).failed == 0
