"""Chunked selective log-softmax + entropy vs full logits; peak memory independent of T and V."""
import pytest
import torch

from kernels.logprobs import logprobs_and_entropy, logprobs_and_entropy_ref, peak_bytes, selective_log_softmax


def _inputs(B=2, T=13, H=16, V=100, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    return h, w, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("chunk", "vocab_chunk"), [(5, 32), (64, 100), (1, 7), (26, 16384)])
def test_matches_full_logits(temperature, chunk, vocab_chunk):
    h, w, targets = _inputs()
    lp, ent = logprobs_and_entropy(h, w, targets, temperature=temperature, chunk_size=chunk, vocab_chunk=vocab_chunk)
    lp_ref, ent_ref = logprobs_and_entropy_ref(h, w, targets, temperature)
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(ent, ent_ref)
    a, b = torch.randn_like(lp), torch.randn_like(ent)  # any mix of the two outputs
    grads = torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (h, w))
    grads_ref = torch.autograd.grad((lp_ref * a).sum() + (ent_ref * b).sum(), (h, w))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def test_fp32_and_logprob_only_path():
    h, w, targets = (t.detach().float() if t.is_floating_point() else t for t in _inputs(T=40, V=300))
    h.requires_grad_(), w.requires_grad_()
    lp = selective_log_softmax(h, w, targets, temperature=0.9, chunk_size=16)  # the learner's call
    lp_ref, _ = logprobs_and_entropy_ref(h, w, targets, 0.9)
    assert lp.shape == targets.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(lp.sum(), (h, w))
    g_ref = torch.autograd.grad(lp_ref.sum(), (h, w))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frozen_unembedding_gets_no_grad():
    h, w, targets = _inputs()
    w.requires_grad_(False)
    lp, _ = logprobs_and_entropy(h, w, targets, chunk_size=4)
    lp.sum().backward()
    assert w.grad is None and h.grad is not None


def _peak(T: int, V: int, H: int = 32, backward: bool = True, chunk: int = 16, vocab_chunk: int = 256) -> int:
    h, w, targets = (t.detach().float() if t.is_floating_point() else t for t in _inputs(B=1, T=T, H=H, V=V))
    h.requires_grad_(), w.requires_grad_()
    with peak_bytes() as mem:
        lp, ent = logprobs_and_entropy(h, w, targets, chunk_size=chunk, vocab_chunk=vocab_chunk)
        if backward:
            (lp.sum() + ent.sum()).backward()
    return mem.peak


def test_peak_memory_does_not_grow_with_vocab():
    H = 32
    fwd = [_peak(64, V, H, backward=False) for V in (512, 2048, 8192)]
    assert fwd[0] == fwd[1] == fwd[2]  # forward: tiles only
    full_logits = 64 * 8192 * 4
    assert fwd[2] < full_logits / 8
    bwd = [_peak(64, V, H) - V * H * 4 for V in (512, 2048, 8192)]  # minus dW, the weight-sized gradient
    assert max(bwd) - min(bwd) <= 1024, bwd


def test_peak_memory_does_not_grow_with_tokens_beyond_per_token_vectors():
    H, V = 32, 1024
    fwd = [_peak(T, V, H, backward=False) for T in (64, 256, 512)]
    per_token = 3 * 4 + 4 * 4  # lp, ent, lse (fp32) + a few (N,) temporaries
    assert fwd[2] - fwd[0] <= per_token * (512 - 64), fwd
    assert fwd[2] < 512 * V * 4 / 8  # far below the (T, V) logits
    bwd = [_peak(T, V, H) - T * H * 4 for T in (64, 256, 512)]  # minus dh, the input-sized gradient
    assert bwd[2] - bwd[0] <= 2 * per_token * (512 - 64), bwd


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": torch.full((2, 13), 100)}, r"targets must be ids in \[0, 100\)"),
        ({"targets": torch.zeros(2, 12, dtype=torch.long)}, r"tuple\(targets.shape\)=\(2, 12\)"),
        ({"temperature": 0.0}, "temperature > 0"),
    ],
)
def test_errors_name_the_problem(kwargs, message):
    h, w, targets = _inputs()
    args = {"targets": targets, "temperature": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        logprobs_and_entropy(h, w, args["targets"], temperature=args["temperature"])
