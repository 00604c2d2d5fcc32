"""bench/bench_rollout.py's parts other than the timed run: its doctests (`run_walls`: a data-parallel run lasts
from the first start to the last end), the argument checks, and HF data-parallel generate at smoke size (every
process samples exactly its share of the tokens; a process that fails gives an error row at once, not a hang)."""
import argparse
import doctest
import importlib
import time

import pytest

from bench import bench_rollout


@pytest.mark.parametrize("module", ["bench.bench_rollout", "bench.results"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("argv", [["--pool-workers", "0"], ["--hf-procs", "2,0"], ["--pool-groups-per-call", "0"],
                                  ["--reps", "0"], ["--prompts", "2", "--hf-procs", "3"],
                                  ["--prompts", "2", "--pool-workers", "3"]])
def test_bad_counts_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_rollout.main(argv)
    assert exc.value.code == 2 and "must be" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_hf_data_parallel_samples_every_token_of_its_share(tmp_path):
    ckpt, prompts = bench_rollout.workload(tmp_path / "tiny", 3)  # 3 prompts over 2 processes: 2 + 1
    args = argparse.Namespace(n=2, max_tokens=4, hf_reps=2)
    run = bench_rollout.measure_hf_procs(ckpt, prompts, args, procs=2)
    assert "error" not in run, run
    assert run["procs"] == 2 and run["threads"] == 1
    assert 0 < run["best"] <= run["median"] and run["first"] > 0 and run["start_s"] > 0


@pytest.mark.timeout(300)
def test_hf_data_parallel_failure_is_an_error_row_not_a_hang(tmp_path):
    """A checkpoint that does not load kills every process before its first run: reported within seconds."""
    bad = tmp_path / "not-a-checkpoint"
    bad.mkdir()
    args = argparse.Namespace(n=1, max_tokens=2, hf_reps=1)
    t0 = time.monotonic()
    run = bench_rollout.measure_hf_procs(str(bad), [[1, 2, 3]] * 2, args, procs=2)
    assert "exit status" in run["error"] and time.monotonic() - t0 < 120
    assert bench_rollout.measure_hf_procs(str(bad), [[1, 2, 3]], args, procs=2)["error"] == "2 processes for 1 prompts"
