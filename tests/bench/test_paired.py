"""bench.paired: per-effort accuracies, the task-paired difference and its SE, mixture labels matched to a
single-env twin's ids."""
import json

import pytest

from bench.paired import compare, main, task_cells


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(checkpoint, prefix, correct):
    """correct: {task: [0/1 per sample]} at low effort."""
    return [{"checkpoint": checkpoint, "task_id": f"{prefix}{t}", "effort": "low", "correct": c}
            for t, cs in correct.items() for c in cs]


def test_paired_difference_weights_repeated_tasks_and_matches_labels(tmp_path, capsys):
    # the mixed run holds walk tasks "walk:walk-a" and a safety task that --env walk drops; the twin's ids are bare
    mixed = _write(tmp_path / "m.jsonl", _rows("rl", "walk:", {"walk-a": [1, 1, 1, 1], "walk-b": [0, 0]})
                   + _rows("rl", "safety:", {"safety-x": [1, 1]}))
    twin = _write(tmp_path / "t.jsonl", _rows("rl", "", {"walk-a": [1, 1, 0, 0], "walk-b": [0, 1]}))
    a, b = task_cells(twin, "rl", "walk"), task_cells(mixed, "rl", "walk")
    (row,) = compare(a, b)
    assert (row["a"], row["b"], row["tasks"]) == (pytest.approx(3 / 6), pytest.approx(4 / 6), 2)
    # per-task differences +0.5 (4 samples) and -0.5 (2 samples): weighted mean (4*0.5 - 2*0.5) / 6
    assert row["diff"] == pytest.approx(1 / 6)
    assert row["se"] > 0
    main([f"{twin}:rl", f"{mixed}:rl", "--env", "walk"])
    assert "| low | 0.500 | 0.667 | +16.7 |" in capsys.readouterr().out


def test_unknown_checkpoint_names_what_the_file_holds(tmp_path):
    path = _write(tmp_path / "s.jsonl", _rows("sft", "", {"t": [1]}))
    with pytest.raises(SystemExit, match=r"no samples of checkpoint 'rl' \(it holds \['sft'\]\)"):
        task_cells(path, "rl")
