"""bench/bench_scaling.py's pure parts: the exponent fit, the FLOP count, MFU, the point plan and the
report's verdicts. The measured run (Ray, vLLM, the learner at every point) is the benchmark itself."""
import doctest
import importlib
import math

import pytest

from bench.bench_scaling import (AXES, Point, exponents, fit_exponent, mean_context, mfu, plan, report,
                                 train_flops, trained_parts)

TINY = {"hidden_size": 192, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 192, "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"] * 2}


def test_doctests():
    assert doctest.testmod(importlib.import_module("bench.bench_scaling")).failed == 0


@pytest.mark.parametrize("b", [0.0, 0.5, 1.0, 1.7])
def test_fit_exponent_recovers_a_power_law(b):
    xs = [2, 4, 8, 16]
    assert fit_exponent(xs, [3.0 * x ** b for x in xs]) == pytest.approx(b, abs=1e-12)


def test_fit_exponent_is_the_least_squares_slope_of_noisy_points():
    xs, ys = [1, 2, 4, 8], [1.0, 2.2, 3.6, 8.8]
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / 4, sum(ly) / 4
    want = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)
    assert fit_exponent(xs, ys) == pytest.approx(want)
    assert 0.9 < want < 1.1


@pytest.mark.parametrize("xs, ys, message", [([1], [1], "two or more"), ([1, 2], [1, 0], "positive"),
                                             ([2, 2], [1, 3], "distinct"), ([1, 2, 3], [1, 2], "two or more")])
def test_fit_exponent_refuses_what_it_cannot_fit(xs, ys, message):
    with pytest.raises(ValueError, match=message):
        fit_exponent(xs, ys)


def test_mean_context_matches_counting_every_position():
    for length in (1, 5, 64, 65, 200):
        for window in (None, 1, 64):
            full = [t if window is None else min(t, window) for t in range(1, length + 1)]
            assert mean_context(length, window) == pytest.approx(sum(full) / length)


def test_train_flops_counts_the_tiny_model_by_hand():
    rows, prompt, completion, vocab = 3, 70, 30, 1200
    f = train_flops(TINY, vocab, rows, prompt, completion)
    tokens = rows * (prompt + completion)
    weights_per_token_layer = (2 * 192 * (4 + 4) * 64 + 2 * 256 * 192) + 2 * 192 * 8 + 2 * (2 * 192 * 384 + 2 * 192 * 192)
    weights = 4 * tokens * weights_per_token_layer + rows * completion * 2 * 192 * vocab
    core = tokens * 4 * 4 * 64 * 2 * (mean_context(100, 64) + mean_context(100, None))
    assert f.forward == pytest.approx(weights + core)
    assert f.train == pytest.approx(f.forward + weights + 2 * core)  # frozen matrices: activation gradients only


def test_train_flops_adds_weight_gradients_of_the_parts_that_train():
    frozen = train_flops(TINY, 1200, 2, 10, 5)
    head = train_flops(TINY, 1200, 2, 10, 5, frozenset({"head"}))
    assert head.forward == frozen.forward
    assert head.train - frozen.train == pytest.approx(2 * 5 * 2 * 192 * 1200)  # head runs on completion tokens only
    every = train_flops(TINY, 1200, 2, 10, 5, frozenset({"attn", "router", "experts", "head"}))
    assert every.train > head.train
    with pytest.raises(ValueError, match="unknown parts"):
        train_flops(TINY, 1200, 2, 10, 5, frozenset({"embed"}))


def test_train_flops_grow_linearly_in_rows_and_the_window_caps_attention():
    one, four = train_flops(TINY, 1200, 1, 80, 40), train_flops(TINY, 1200, 4, 80, 40)
    assert four.train == pytest.approx(4 * one.train)
    wide = train_flops({**TINY, "sliding_window": 4096}, 1200, 1, 80, 40)
    assert wide.forward > one.forward


def test_mfu_and_its_errors():
    assert mfu(3e9, 1.5, 4e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 0.0, 1.0)


def test_plan_moves_one_axis_at_a_time_and_runs_the_held_point_once():
    hold = {"tasks_per_step": 12, "group_size": 8, "max_new_tokens": 96}
    grid = {"group_size": [2, 4, 8, 16], "max_new_tokens": [24, 48, 96, 192], "tasks_per_step": [3, 6, 12, 24]}
    points = plan(hold, grid)
    assert len(points) == 10 and points.count(hold) == 1
    for p in points:
        assert sum(p[a] != hold[a] for a in AXES) <= 1


def trained_model():
    import torch

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(2, 2)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.input_layernorm = Attn(), torch.nn.LayerNorm(2)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers, self.lm_head = torch.nn.ModuleList([Layer()]), torch.nn.Linear(2, 3)

    return Model()


def test_trained_parts_follow_lr_scale():
    from rl.config import LrScale

    assert trained_parts(trained_model(), [LrScale(r"layernorm\.weight$", 1.0), LrScale(".", 0.0)]) == frozenset()
    assert trained_parts(trained_model(), [LrScale("lm_head", 0.0)]) == frozenset({"attn"})
    assert trained_parts(trained_model(), []) == frozenset({"attn", "head"})


def point(tasks, group, tokens, step, sync, learner=1.0, error=None):
    seconds = {"step": step, "rollout": step / 2, "reward": 0.01, "learner": learner, "sync": sync, "other": 0.0}
    return Point({"tasks_per_step": tasks, "group_size": group, "max_new_tokens": tokens}, seconds,
                 tasks * 3 * group, 20.0, 70.0, 2e9, error=error)


def test_exponents_use_the_points_on_the_axis_only():
    hold = {"tasks_per_step": 2, "group_size": 2, "max_new_tokens": 8}
    points = [point(2, g, 8, 1.5 * g, 0.01) for g in (1, 2, 4)] + [point(4, 2, 8, 100.0, 0.01)]
    ex = exponents(points, "group_size", hold)
    assert ex["step"] == pytest.approx(1.0) and ex["rollout"] == pytest.approx(1.0)
    assert ex["other"] is None  # no measurable time: no log
    assert exponents(points, "max_new_tokens", hold)["step"] is None  # one point on that axis


def test_report_says_whether_sync_stays_under_three_percent_everywhere():
    hold = {"tasks_per_step": 2, "group_size": 2, "max_new_tokens": 8}
    grid = {"group_size": [1, 2], "max_new_tokens": [8], "tasks_per_step": [2]}
    ok = [point(2, 1, 8, 2.0, 0.02), point(2, 2, 8, 4.0, 0.04)]
    text = "\n".join(report(ok, grid, hold, peak=1e10, peak_note="test"))
    assert "at most **1.00%**" in text and "met)" in text and "NOT met" not in text
    assert "| 2 | 12 | 70 + 20.0 | 4.00 |" in text and "20.0%" in text  # 2 GFLOP/s of a 10 GFLOP/s peak
    bad = [point(2, 1, 8, 2.0, 0.02), point(2, 2, 8, 4.0, 0.2)]
    assert "NOT met" in "\n".join(report(bad, grid, hold, peak=1e10, peak_note="test"))


def test_report_lists_a_failed_point_with_its_error():
    hold = {"tasks_per_step": 2, "group_size": 2, "max_new_tokens": 8}
    grid = {"group_size": [1, 2], "max_new_tokens": [8], "tasks_per_step": [2]}
    pts = [point(2, 1, 8, 2.0, 0.02), Point({**hold}, {}, 12, 0.0, 0.0, 0.0, error="timed out")]
    text = "\n".join(report(pts, grid, hold, peak=1e10, peak_note="test"))
    assert "failed: timed out" in text
