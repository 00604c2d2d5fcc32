"""bench/bench_rollout.py's parts other than the timed run: its doctests, the argument checks, and HF
data-parallel generate at smoke size (every process samples exactly its share of the tokens, the runs are
timed from the first start to the last end)."""
import argparse
import doctest
import importlib

import pytest

from bench import bench_rollout


def test_doctests():
    assert doctest.testmod(importlib.import_module("bench.bench_rollout")).failed == 0


@pytest.mark.parametrize("argv", [["--pool-workers", "0"], ["--hf-procs", "2,0"], ["--pool-groups-per-call", "0"],
                                  ["--reps", "0"]])
def test_bad_counts_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_rollout.main(argv)
    assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_hf_data_parallel_samples_every_token_of_its_share(tmp_path):
    ckpt, prompts = bench_rollout.workload(tmp_path / "tiny", 3)  # 3 prompts over 2 processes: 2 + 1
    args = argparse.Namespace(n=2, max_tokens=4, hf_reps=2)
    run = bench_rollout.measure_hf_procs(ckpt, prompts, args, procs=2)
    assert "error" not in run, run
    assert run["procs"] == 2 and run["threads"] == 1
    assert 0 < run["best"] <= run["median"] and run["first"] > 0 and run["start_s"] > 0
