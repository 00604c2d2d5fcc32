"""The learner's device and precision: `learner.device` resolution (Ray-aware), autocast choice, the
right-padding shortcut the CUDA attention relies on, gradient checkpointing, refused settings; the
CUDA learner itself runs under the `gpu` marker."""
import re

import pytest
import torch

from rl.config import AlgoConfig, ConfigError, LearnerConfig, compose, not_implemented, require_implemented
from rl.device import autocast_dtype, resolve_device
from rl.learner import Learner, token_logprobs

from test_learner import _batch, _samples  # noqa: E402 (rootdir-relative, as test_loop imports fakes)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("name, cuda, ray_gpus, want", [
    ("cpu", True, None, CPU),
    ("auto", False, None, CPU),  # no CUDA: the CPU box, unchanged
    ("auto", True, None, CUDA),  # in-process learner on a GPU machine
    ("auto", True, [], CPU),  # Ray actor with learner.num_gpus=0: Ray no longer hides the GPUs from it
    ("auto", True, [3], CUDA),  # Ray actor given a GPU (CUDA_VISIBLE_DEVICES makes it cuda:0)
    ("cuda", True, None, CUDA),
    ("cuda", True, [0], CUDA),
])
def test_resolve_device(name, cuda, ray_gpus, want):
    assert resolve_device(name, cuda_available=cuda, ray_gpus=ray_gpus) == want


@pytest.mark.parametrize("cuda, ray_gpus, message", [
    (False, None, "torch sees no CUDA device"),
    (True, [], "Ray gave the learner actor no GPU: set learner.num_gpus"),
])
def test_cuda_that_cannot_be_had_is_an_error_saying_why(cuda, ray_gpus, message):
    with pytest.raises(RuntimeError, match=message):
        resolve_device("cuda", cuda_available=cuda, ray_gpus=ray_gpus)


def test_this_process_outside_ray_resolves_auto_by_torch_alone():
    assert resolve_device("auto") == (CUDA if torch.cuda.is_available() else CPU)


@pytest.mark.parametrize("device, mode, weights, want", [
    (CPU, "auto", "float32", None),  # the CPU learner computes exactly as before
    (CPU, "bfloat16", "float32", torch.bfloat16),
    (CUDA, "auto", "float32", torch.bfloat16),  # mixed precision: fp32 master weights, bf16 matmuls
    (CUDA, "auto", "bfloat16", None),  # bf16 weights: nothing to cast
    (CUDA, "off", "float32", None),
])
def test_autocast_dtype(device, mode, weights, want):
    assert autocast_dtype(device, mode, weights) == want


def test_a_cpu_learner_has_no_autocast(policy):
    learner = Learner(str(policy), LearnerConfig(device="auto"), AlgoConfig(), seed=0)
    if not torch.cuda.is_available():
        assert learner.device == CPU and learner.autocast_dtype is None


def test_right_padded_batches_need_no_padding_mask(policy):
    """What the CUDA learner relies on to run the Triton attention: for a right-padded batch, log-probs
    of real tokens are the same with and without the padding mask (causal: no real token sees a pad)."""
    learner = Learner(str(policy), LearnerConfig(device="cpu", lr=0.0), AlgoConfig(), seed=0)
    samples = _samples([1.0, -1.0])
    s = samples[1]
    s.completion_ids, s.loss_mask, s.behavior_logprobs = (x[:-5] for x in (s.completion_ids, s.loss_mask,
                                                                           s.behavior_logprobs))
    batch = _batch([1.0, -1.0], policy, samples=samples)
    assert batch.right_padded() and not bool(batch.attention_mask.all())
    pos = batch.completion_mask
    masked = token_logprobs(learner.model, batch.input_ids, batch.attention_mask, chunked=True, positions=pos,
                            n_vocab=learner.n_vocab)
    unmasked = token_logprobs(learner.model, batch.input_ids, None, chunked=True, positions=pos,
                              n_vocab=learner.n_vocab)
    torch.testing.assert_close(unmasked, masked, rtol=1e-5, atol=1e-6)
    left = batch._replace(attention_mask=batch.attention_mask.flip(-1))
    assert not left.right_padded()


def test_batch_to_its_own_device_is_the_same_tensors(policy):
    batch = _batch([1.0, -1.0], policy)
    assert all(a is b for a, b in zip(batch.to("cpu"), batch))


def test_gradient_checkpointing_gives_the_same_step(policy):
    batch = _batch([1.0, -1.0, 0.5, -0.5], policy)
    runs = []
    for ckpt in (False, True):
        learner = Learner(str(policy), LearnerConfig(device="cpu", lr=1e-3, gradient_checkpointing=ckpt),
                          AlgoConfig(), seed=0)
        m = learner.train_step(batch)
        runs.append((m, [p.detach().clone() for p in learner.model.parameters()]))
    (m0, p0), (m1, p1) = runs
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5, abs=1e-7)
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("override, section", [
    ("learner.lora.rank=16 learner.world_size=2", "issue 17 §2 + §3"),
])
def test_declared_but_unbuilt_learner_settings_are_refused_at_start(policy, override, section):
    """Presets and the memory plan may state them (compose works); a run refuses them, never a no-op."""
    cfg = compose(override.split())
    assert section in not_implemented(cfg.learner)[0]
    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}'"):
        require_implemented(cfg)
    with pytest.raises(NotImplementedError, match=re.escape(section)):
        Learner(str(policy), cfg.learner, AlgoConfig(), seed=0)


# ---- CUDA (skipped without a device) -------------------------------------------------------------
@pytest.mark.parametrize("autocast, tol", [("off", 2e-3), ("auto", 5e-2)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_learner_step_matches_cpu(policy, autocast, tol):
    """The same GRPO step on CUDA (Triton MoE and attention; bf16 autocast under "auto") and on CPU."""
    from kernels.patch import kernels_in_use

    batch = _batch([1.0, -1.0, 0.5, -0.5], policy)
    out = {}
    for device in ("cpu", "cuda"):
        learner = Learner(str(policy), LearnerConfig(device=device, autocast=autocast, lr=1e-3), AlgoConfig(), seed=0)
        assert kernels_in_use(learner.model)["moe"] and kernels_in_use(learner.model)["attention"]
        m = learner.train_step(batch)
        sync = learner.state_for_sync()
        assert all(t.device.type == "cpu" for t in sync.values())
        out[device] = (m, learner.logprobs(batch), sync)
    (mc, lc, sc), (mg, lg, sg) = out["cpu"], out["cuda"]
    assert lg.device.type == "cpu"
    assert mg["grad_norm"] == pytest.approx(mc["grad_norm"], rel=tol)
    torch.testing.assert_close(lg, lc, rtol=tol, atol=tol)
    for k in sc:
        torch.testing.assert_close(sg[k], sc[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_experts_compute_in_the_autocast_dtype_on_cuda():
    from kernels.moe import expert_compute_dtype

    x, w = torch.randn(4, 8, device="cuda"), torch.randn(2, 8, 16, device="cuda")
    assert expert_compute_dtype(x, w) == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert expert_compute_dtype(x, w) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # TRL's CPU autocast keeps fp32 experts
        assert expert_compute_dtype(x.cpu(), w.cpu()) == torch.float32


def test_docstring_examples():
    import doctest

    import rl.device

    assert doctest.testmod(rl.device).failed == 0
