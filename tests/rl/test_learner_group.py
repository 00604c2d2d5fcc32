"""The FSDP2 learner group on CPU: 2 gloo ranks (torch.multiprocessing) against the one-process learner.

One spawn runs every scenario (`_rank_main`); the tests compare what rank 0 recorded with `Learner`
steps taken here. The Ray side (`LearnerGroup`: actors, rendezvous, the driver's split) is the slow test.
"""
import shutil
import socket

import pytest
import torch

from envs import harmony
from envs.types import Sample, Transcript
from rl.batch import TrainBatch, collate
from rl.config import AlgoConfig, LearnerConfig, LrScale
from rl.learner import Learner
from rl.model import VocabMap

WORLD = 2
# micro-batches of 2 (gradient accumulation), frozen router (before sharding) and embedding (lr_scale 0,
# after), a mismatch correction on placeholder behaviour log-probs
CFG_A = dict(lr=1e-3, micro_batch_size=2, freeze_router=True, lr_scale=[LrScale("embed_tokens", 0.0)],
             sync_bucket_mb=0.1)
ALGO_A = dict(correction="tis")
# 2 mini-batches x 2 epochs drawn over the whole batch (ranks get unequal rows: blank passes), sequence-mean
# loss (row normaliser), a KL reference sharded too, activation checkpointing under FSDP, mini-batches of
# whole prompt groups (2 rows a prompt, on different ranks: a group's learner never shares prompts)
CFG_B = dict(lr=1e-3, micro_batch_size=1, gradient_checkpointing=True)
ALGO_B = dict(mini_batches=2, ppo_epochs=2, kl_coef=0.05, loss_agg="seq_mean_token_mean", mini_batch_split="groups")


def _cfg(**kw) -> LearnerConfig:
    return LearnerConfig(kernels="deliberate", device="cpu", num_threads=1, **kw)


def _batch(policy, seed: int) -> TrainBatch:
    """6 samples of unequal lengths and advantages (seeded), two per prompt; behaviour log-probs near the
    untrained policy's (about -log 2300), so the TIS weights are near 1."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(6):
        prompt = harmony.render_prompt(f"Compute {i // 2}+{i // 2 + seed}.", "high")
        done = harmony.render_completion(" ".join(["3+4=7."] * (1 + 2 * i)), str(i))
        behaviour = (-7.7 + 0.3 * torch.randn(len(done), generator=g)).tolist()
        samples.append(Sample("t", "math", "high", prompt, done, [1] * len(done), behaviour, Transcript()))
    return collate(samples, torch.randn(6, generator=g), VocabMap.load(policy))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _rank_main(rank: int, master: str, policy: str, out: str) -> None:
    from pathlib import Path

    import torch.distributed as dist

    from rl.learner_group import LearnerRank, split_batch

    torch.set_num_threads(1)
    out, res = Path(out), {}

    def start(cfg, algo, path=policy):
        r = LearnerRank()
        r.start(rank, WORLD, master, str(path), _cfg(**cfg), AlgoConfig(**algo), seed=0)
        return r

    def step(r, seed):
        return r.train_step(split_batch(_batch(policy, seed), WORLD)[rank])

    def weights(r):
        return {k: v for b in r.buckets() for k, v in b.items()}

    a = start(CFG_A, ALGO_A)
    res["A0_w"] = weights(a)  # as read: each rank its rows of each tensor
    res["A1"], res["A1_grads"] = step(a, 1), _grads(a.learner.model)
    res["A1_buckets"] = list(a.buckets())
    res["A1_w"] = {k: v for b in res["A1_buckets"] for k, v in b.items()}
    res["A1_logprobs"] = a.logprobs(split_batch(_batch(policy, 2), WORLD)[rank])
    a.save(out / "ck")
    res["A2"], res["A2_w"] = step(a, 2), weights(a)
    b = start(CFG_A, ALGO_A)  # a resumed run: built from the initial policy, then loaded
    b.load(out / "ck")
    res["R2"], res["R2_w"] = step(b, 2), weights(b)
    b.export(out / "mxfp4", mxfp4=True, shard_bytes=200_000)  # several files + index, as released
    res["M_w"] = weights(start(CFG_A, ALGO_A, out / "mxfp4"))  # a released-style folder, experts decoded per rank
    res["Q_w"] = weights(start(dict(CFG_A, sync_mxfp4=True), ALGO_A))  # experts as an MXFP4 engine serves them
    c = start(CFG_B, ALGO_B)
    res["B1"], res["B1_grads"], res["B1_w"] = step(c, 1), _grads(c.learner.model), weights(c)
    all_logprobs = [None] * WORLD
    dist.all_gather_object(all_logprobs, res.pop("A1_logprobs"))
    res["A1_logprobs"] = all_logprobs
    if rank == 0:
        torch.save(res, out / "res.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def group(policy, tmp_path_factory):
    """What rank 0 of a 2-rank gloo group recorded (scenarios in `_rank_main`) and its folder."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("group")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master = f"127.0.0.1:{s.getsockname()[1]}"
    mp.spawn(_rank_main, args=(master, str(policy), str(out)), nprocs=WORLD)
    return torch.load(out / "res.pt", weights_only=False), out


def _single(policy, cfg, algo) -> Learner:
    # a group's ranks never share prompts (learner.share_prompts): the one-process learner runs every row too
    return Learner(str(policy), _cfg(share_prompts=False, **cfg), AlgoConfig(**algo), seed=0)


METRICS = ("loss", "grad_norm", "clip_frac", "ratio_mean", "entropy", "tokens", "rollout_kl", "is_weight_mean")


@pytest.mark.parametrize("cfg, algo, run", [(CFG_A, ALGO_A, "A1"), (CFG_B, ALGO_B, "B1")])
def test_two_ranks_take_the_one_process_step(policy, group, cfg, algo, run):
    res, _ = group
    one = _single(policy, cfg, algo)
    m = one.train_step(_batch(policy, 1))
    for k in METRICS + (("kl_ref",) if algo.get("kl_coef") else ()):
        if k in m:
            assert res[run][k] == pytest.approx(m[k], rel=1e-5, abs=1e-7), k
    assert res[run]["optimizer_steps"] == m["optimizer_steps"]
    routers = [k for k in m if k.startswith("router/")]
    assert "router/layer0/entropy" in routers  # summed over the ranks: the whole batch's routing
    for k in routers:
        assert res[run][k] == pytest.approx(m[k], rel=1e-6, abs=1e-9), k
    for n, g in _grads(one.model).items():  # the last optimizer step's gradients
        torch.testing.assert_close(res[f"{run}_grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)
    assert set(res[f"{run}_grads"]) == set(_grads(one.model))  # frozen stay frozen
    # Adam's first steps move a weight by lr * g / (|g| + 1e-8): where |g| is ~1e-8 a 1% gradient
    # difference (float summation order) shows as ~1e-5 lr; elsewhere updates agree to ~1e-7.
    for n, p in one.model.state_dict().items():
        torch.testing.assert_close(res[f"{run}_w"][n], p, rtol=1e-5, atol=1e-2 * cfg["lr"], msg=n)


def test_logprobs_of_the_shares_are_the_one_process_ones(policy, group):
    res, _ = group
    one = _single(policy, CFG_A, ALGO_A)
    one.train_step(_batch(policy, 1))
    batch = _batch(policy, 2)
    want = one.logprobs(batch)
    from rl.learner_group import split_batch

    for share, lp in zip(split_batch(batch, WORLD), res["A1_logprobs"]):
        torch.testing.assert_close(lp, want[share.rows, : lp.shape[1]], rtol=1e-5, atol=1e-6)


def test_sharded_save_then_resume_takes_the_uninterrupted_step_exactly(group):
    res, _ = group
    assert res["R2"] == res["A2"]
    for n, w in res["A2_w"].items():
        assert torch.equal(res["R2_w"][n], w), n


def test_buckets_are_the_gathered_state_dict_and_the_checkpoint_holds_it(policy, group, tmp_path):
    """Bounded buckets (never splitting q/k/v of a layer or one module), together the whole state dict,
    equal to what the checkpoint's HF folder holds; that folder loads and commits as a checkpoint."""
    from kernels.mxfp4_checkpoint import read_state_dict
    from rl import checkpoint
    from rl.model import load_policy
    from rl.vllm_weights import sync_unit

    res, out = group
    buckets = res["A1_buckets"]
    names = [n for b in buckets for n in b]
    on_disk = read_state_dict(out / "ck")
    assert len(buckets) > 3 and sorted(names) == sorted(on_disk) and len(names) == len(set(names))
    limit = CFG_A["sync_bucket_mb"] * 2**20
    for b in buckets:
        size = sum(t.numel() * t.element_size() for t in b.values())
        assert size <= limit or len({sync_unit(n) for n in b}) == 1, list(b)
    where: dict[str, set[int]] = {}
    for i, b in enumerate(buckets):
        for n in b:
            where.setdefault(sync_unit(n), set()).add(i)
    assert all(len(i) == 1 for i in where.values())  # a unit lies in one bucket
    for b in buckets:
        for n, t in b.items():
            assert torch.equal(on_disk[n], t), n
    model, _ = load_policy(out / "ck")  # transformers reads the group's HF folder
    for n, p in model.state_dict().items():
        assert torch.equal(p, on_disk[n]), n
    shutil.copytree(out / "ck", tmp_path / "policy")
    committed = checkpoint.save(tmp_path / "run", 1, lambda p: shutil.copytree(tmp_path / "policy", p), {"cursor": 0})
    checkpoint.verify(committed)


def test_each_rank_reads_its_rows_of_the_policy_dense_or_mxfp4(policy, group):
    from rl.model import load_policy

    res, out = group
    for source, key in ((policy, "A0_w"), (out / "mxfp4", "M_w")):
        want = load_policy(source)[0].state_dict()
        assert sorted(res[key]) == sorted(want)
        for n, t in want.items():
            assert torch.equal(res[key][n], t), (source, n)


def test_mxfp4_sync_buckets_hold_the_quantised_experts_the_one_process_learner_sends(policy, group):
    res, _ = group
    want = _single(policy, dict(CFG_A, sync_mxfp4=True), ALGO_A).state_for_sync()
    assert sorted(res["Q_w"]) == sorted(want)
    for n, t in want.items():
        assert torch.equal(res["Q_w"][n], t), n


def test_mxfp4_export_is_the_released_layout_of_the_same_weights(group, tmp_path):
    from kernels.mxfp4_checkpoint import read_state_dict, save_mxfp4_checkpoint
    from rl.model import is_mxfp4_checkpoint, load_policy

    res, out = group
    model, _ = load_policy(out / "ck")
    model.load_state_dict(res["R2_w"])
    save_mxfp4_checkpoint(model, tmp_path / "want")
    got, want = read_state_dict(out / "mxfp4"), read_state_dict(tmp_path / "want")
    assert is_mxfp4_checkpoint(out / "mxfp4") and sorted(got) == sorted(want)
    assert (out / "mxfp4" / "model.safetensors.index.json").exists()
    assert any(k.endswith("_blocks") for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    load_policy(out / "mxfp4")  # loads back through the MXFP4 reader


def test_a_batch_smaller_than_the_group_and_a_group_checkpoint_in_one_process_are_refused(policy, group):
    from rl.learner_group import split_batch

    with pytest.raises(ValueError, match="every rank needs a row"):
        split_batch(_batch(policy, 1).select([0]), WORLD)
    with pytest.raises(RuntimeError, match="2-rank learner group: resume it with learner.world_size=2"):
        _single(policy, CFG_A, ALGO_A).load(group[1] / "ck")


@pytest.mark.slow
def test_ray_group_steps_and_its_buckets_give_vllm_the_weights_transformers_reads(policy, tmp_path):
    """`LearnerGroup` on Ray (2 rank actors): the one-process step; its bucketed sync into a vLLM worker
    pool, then the engine's greedy output equals transformers' on the group's HF export."""
    import ray

    from rl.cluster import init_ray
    from rl.config import ClusterConfig, RolloutConfig
    from rl.learner_group import LearnerGroup
    from rl.model import load_policy
    from rl.workers import WorkerPool

    init_ray(ClusterConfig(num_cpus=4))
    group = pool = None
    try:
        group = LearnerGroup(str(policy), _cfg(world_size=WORLD, **CFG_A), AlgoConfig(**ALGO_A), seed=0)
        m = group.train_step(_batch(policy, 1))
        want = _single(policy, CFG_A, ALGO_A).train_step(_batch(policy, 1))
        assert m["loss"] == pytest.approx(want["loss"], rel=1e-5) and group.get_step() == 1
        assert m["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        pool = WorkerPool(str(policy), RolloutConfig(max_tokens=24, max_model_len=512, kv_cache_gib=1), seed=0)
        pool.update_weights(group.weights(), version=1)
        group.export(tmp_path / "hf")
        model, vmap = load_policy(tmp_path / "hf")
        prompts = [harmony.render_prompt(f"Compute {i}+{i}.", "low") for i in (3, 4)]
        got = [c[0].ids for c in pool.generate(prompts, 1, temperature=0.0, seed=None)]
        with torch.no_grad():
            for prompt, ids in zip(prompts, got):
                x = torch.tensor([vmap.to_model(prompt)])
                for _ in range(len(ids)):
                    x = torch.cat([x, model(x).logits[:, -1, : len(vmap)].argmax(-1, keepdim=True)], 1)
                assert vmap.to_canonical(x[0, len(prompt):].tolist()) == ids
        assert all(h["weights_version"] == 1 for h in pool.health())  # one update, all buckets in it
    finally:
        if pool is not None:
            pool.close()
        if group is not None:
            group.close()
        ray.shutdown()


@pytest.mark.slow
def test_train_with_a_group_checkpoints_and_resumes_exactly(policy, tiny_cfg, tmp_path):
    """`rl.train` with `learner.world_size=2` builds the group (Ray); 3 steps straight and 2 steps then
    `resume=true` give the same third step and weights, through rl/checkpoint.py's commit and verify."""
    import json
    import sys
    from pathlib import Path

    import ray
    from safetensors.torch import load_file

    from rl.cluster import init_ray
    from rl.config import ClusterConfig, validate
    from rl.train import train

    sys.path.insert(0, str(Path(__file__).parent))
    from fakes import FakePool

    def cfg(run, steps, resume=False):
        return validate({"run_dir": str(run), "resume": resume, "model": tiny_cfg, "algo": {"group_size": 4},
                         "env": {"efforts": ["low", "high"], "train_size": 40, "families": ["add"]},
                         "learner": {"lr": 1e-3, "micro_batch_size": 4, "num_threads": 1, "world_size": WORLD},
                         "train": {"steps": steps, "tasks_per_step": 2, "checkpoint_every": 2},
                         "logging": {"tensorboard": False}})

    init_ray(ClusterConfig(num_cpus=4))
    try:
        train(cfg(tmp_path / "a", 3), str(policy), make_pool=FakePool)
        train(cfg(tmp_path / "b", 2), str(policy), make_pool=FakePool)
        train(cfg(tmp_path / "b", 3, resume=True), str(policy), make_pool=FakePool)
    finally:
        ray.shutdown()
    a, b = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    for key in ("loss", "grad_norm", "reward"):
        assert a[2][key] == b[2][key], key
    wa, wb = (load_file(str(tmp_path / r / "checkpoints" / "step_000003" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_docstring_examples():
    import doctest

    import rl.learner_group
    import rl.vllm_weights

    assert doctest.testmod(rl.learner_group).failed == 0 and doctest.testmod(rl.vllm_weights).failed == 0
