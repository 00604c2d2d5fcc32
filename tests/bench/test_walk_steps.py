"""bench.walk_steps reads walk traces back: a table of right and wrong traces in both formats."""
import json

import bench.walk_steps as ws

Q = "Doors: L, R, S. Start in room 3. Final room?"  # 3 -L-> 1 -R-> 7 -S-> 7


def rec(effort, analysis, final):
    return {"effort": effort, "question": Q, "analysis": analysis, "final": final}


def test_step_table():
    s = ws.step_stats([
        rec("high", "3,1,7,7", "7"),        # right, comma format
        rec("high", "3L1R7S7", "7"),        # right, doors in the trace
        rec("high", "3L1R9S9", "9"),        # one wrong fact (R from 1 is 7), then a right S step on it
        rec("medium", "3L1>7", "7"),        # a jump over R, S: right
        rec("medium", "3L1R7S>7", "7"),     # after a written S the jump copies the last room: right
        rec("low", ">5", "5"),              # a wrong one-shot jump
        rec("low", "three", "7"),           # not a trace: unparsed, but its final still scores
    ])
    high, medium, low = s["high"], s["medium"], s["low"]
    assert high["correct"] == 2 / 3 and high["steps"] == 9 and high["step_fact"] == 8 / 9
    assert high["on_walk"] == 7 / 9 and high["final_from_trace"] == 1.0 and high["jumps"] == 0
    assert medium["correct"] == 1.0 and medium["jump"] == 1.0 and medium["jumps"] == 2
    assert low["unparsed"] == 0.5 and low["jump"] == 0.0 and low["correct"] == 0.5
    assert medium["by_written"] == {1: (1, 1.0), 2: (1, 1.0)}  # the door before a jump is a peek, not a step


def test_main_prints_one_line_per_checkpoint_and_effort(tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"checkpoint": c, **rec("high", "3,1,7,7", "7")}) + "\n" for c in ("sft", "rl")))
    ws.main([str(path)])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["sft high", "rl high"]
