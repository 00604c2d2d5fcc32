"""run_sft on the tiny policy: a readable progress line per logging step, no progress-bar spam, the
stage's metrics in its logging folder, a loadable checkpoint."""
import json
import re

import pytest

from envs.math_tasks import MathEnv, solution
from rl.config import LoggingConfig, SFTConfig
from rl.model import VocabMap
from rl.sft import run_sft, sft_examples

LINE = re.compile(r"^sft  step (\d+)/3 \(\d+%\)  loss [\d.]+  lr \S+  elapsed \d+:\d\d  eta \d+:\d\d$")


@pytest.fixture
def rows(policy):
    tasks = MathEnv(families=["add"], difficulty=1).tasks("train", 4, seed=0)
    return sft_examples(tasks, solution, VocabMap.load(policy), ["low"])


def _cfg(**kw):
    return SFTConfig(steps=3, batch_size=2, warmup_steps=0, logging_steps=1, lr=1e-3, **kw)


def test_progress_line_every_logging_step_and_no_bars(policy, rows, tmp_path, capfd):
    logging = LoggingConfig(tensorboard=False, wandb=False, progress=True)
    out = run_sft(policy, tmp_path / "sft", rows, _cfg(), seed=0, logging=logging,
                  logging_dir=str(tmp_path / "logs"))
    captured = capfd.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("sft  step")]
    assert [int(LINE.match(line).group(1)) for line in lines] == [1, 2, 3], captured.out
    console = captured.out + captured.err
    for spam in ("examples/s", "Writing model shards", "it/s]", "{'loss'"):
        assert spam not in console, f"{spam!r} on the console:\n{console}"
    assert out["steps"] == 3 and (tmp_path / "sft" / "config.json").exists()
    logged = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [1, 2, 3] and all("loss" in x for x in logged)


def test_progress_off_prints_no_progress(policy, rows, tmp_path, capfd):
    logging = LoggingConfig(tensorboard=False, wandb=False, progress=False)
    run_sft(policy, tmp_path / "sft", rows, _cfg(kernels="stock"), seed=0, logging=logging, logging_dir=None)
    captured = capfd.readouterr()
    assert "sft  step" not in captured.out
    assert "it/s]" not in captured.out + captured.err


# ---- the SFT LM head (rl.sft.install_lm_head): same trajectory as TRL's own head ----------------------
def _train(policy, rows, tmp_path, head):
    import torch

    from rl.sft import install_lm_head, sft_trainer

    trainer, _ = sft_trainer(policy, tmp_path / "out", rows, _cfg(), seed=0,
                             callbacks=[])
    if head is not None:
        install_lm_head(trainer.model, head)
    trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, torch


def test_trl_loss_head_is_bit_identical_to_trls_own_head(policy, rows, tmp_path):
    base_logs, base, torch = _train(policy, rows, tmp_path, None)
    logs, weights, _ = _train(policy, rows, tmp_path, "trl")
    assert [x["loss"] for x in logs] == [x["loss"] for x in base_logs]
    assert all(torch.equal(base[k], weights[k]) for k in base)
    for key in ("entropy", "mean_token_accuracy"):  # the logged metrics, now without gradient: same values
        assert [x[key] for x in logs] == pytest.approx([x[key] for x in base_logs], rel=1e-5, abs=1e-6)


def test_assistant_loss_head_matches_to_float_rounding(policy, rows, tmp_path):
    base_logs, base, torch = _train(policy, rows, tmp_path, None)
    logs, weights, _ = _train(policy, rows, tmp_path, "assistant")
    assert [x["loss"] for x in logs] == pytest.approx([x["loss"] for x in base_logs], rel=1e-5)
    assert all(torch.allclose(base[k], weights[k], atol=1e-5) for k in base)


@pytest.mark.parametrize("n,v", [(7, 5), (300, 2304), (1840, 512)])
def test_one_tile_logprobs_is_trls_kernel_bit_for_bit(n, v):
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from rl.sft import OneTileLogprobs

    gen = torch.Generator().manual_seed(n)
    h0, w0 = torch.randn(n, 16, generator=gen), torch.randn(v, 16, generator=gen) * 0.3
    targets, keep = torch.randint(0, v, (n,), generator=gen), torch.rand(n, generator=gen) < 0.3

    def run(fn):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp = fn(h, w).masked_fill(~keep, 0)  # masked rows get a zero gradient, as in SFT
        (-lp.sum() / keep.sum()).backward()
        return lp.detach(), h.grad, w.grad

    ref = run(lambda h, w: ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, 32768, None, 1.0, ("log_probs",))[0])
    ours = run(lambda h, w: OneTileLogprobs.apply(h, w, targets))
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))
