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
