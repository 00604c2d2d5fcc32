"""bench.trace_steps reads written steps back: a table of right and wrong rewrite traces."""
import doctest

import bench.trace_steps as ts


def test_docstring_examples():
    assert doctest.testmod(ts).failed == 0


def test_step_stats_separate_copies_sums_and_the_final():
    recs = [
        {"effort": "high", "question": "Compute 4+8+9.", "analysis": "4+8+9\n12+9+0\n21+0+0", "final": "21"},
        {"effort": "high", "question": "Compute 4+8+9.", "analysis": "4+8+9\n12+8+0\n20+0+0", "final": "21"},
        {"effort": "low", "question": "Compute 1+2+3.", "analysis": "1+2+3", "final": "7"},
        {"effort": "low", "question": "Compute 1+2+3.", "analysis": "garbage", "final": "6"},
    ]
    s = ts.step_stats(recs)
    assert s["high"]["steps"] == 4 and s["high"]["step_copy"] == 0.75 and s["high"]["step_sum"] == 1.0
    assert s["high"]["last_line_right"] == 0.5 and s["high"]["final_from_trace"] == 0.5 and s["high"]["correct"] == 1.0
    assert s["low"]["first_line_copy"] == 0.5 and s["low"]["correct"] == 0.5 and s["low"]["final_from_trace"] == 0.0
