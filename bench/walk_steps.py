"""What a checkpoint's written steps get right on walks (`env.name=walk`, envs/walk_tasks.py).

Run:  .venv/bin/python -m bench.walk_steps outputs/x/eval/samples.jsonl   (written by rl.evaluate)

Per checkpoint and effort, from every sample's analysis ("3,6,1,...", ending in the last room or in a
one-shot jump ">N"): the start room copied, each written room right given the room written before it
(the step's fact: DOORS[door][room]), each written room on the true walk, the jump right given the last
written room and the doors left (the one-shot part; apart, the jumps after the walk's last real door,
which copy the last room), the final equal to the trace's last room, and
accuracy by doors written and by the walk's real doors (histograms).
"""
from __future__ import annotations

import sys
from collections import Counter, defaultdict

from bench.trace_steps import by_checkpoint
from envs.walk_tasks import DOORS, parse_question, walk


def _rooms(analysis: str) -> tuple[list[int], int | None] | None:
    """(rooms written, jump target or None) of a trace's first line; None when it does not parse."""
    first = (analysis or "").split("\n")[0]
    head, _, jump = first.partition(">")
    if not set(head) <= set("0123456789,LRS"):
        return None
    try:
        return [int(ch) for ch in head if ch.isdigit()], (int(jump) if jump else None)
    except ValueError:
        return None


def step_stats(records: list[dict]) -> dict[str, dict]:
    """{effort: rates} over `records` (samples.jsonl lines).

    >>> q = "Doors: L, R. Start in room 3. Final room?"
    >>> s = step_stats([{"effort": "high", "question": q, "analysis": "3,1,7", "final": "7"},
    ...                 {"effort": "low", "question": q, "analysis": "3,1,>4", "final": "4"}])
    >>> s["high"]["step_fact"], s["high"]["on_walk"], s["high"]["correct"], s["low"]["jump"], s["low"]["correct"]
    (1.0, 1.0, 1.0, 0.0, 0.0)
    >>> s2 = step_stats([{"effort": "low", "question": "Doors: L, S. Start in room 3. Final room?",
    ...                   "analysis": "3L1S>1", "final": "1"}])["low"]
    >>> s2["copies"], s2["copy"], s2["correct"]
    (1, 1.0, 1.0)
    >>> s["high"]["by_real"], s["low"]["by_written"]
    ({2: (1, 1.0)}, {1: (1, 0.0)})
    """
    out = {}
    for effort in dict.fromkeys(r["effort"] for r in records):
        c: Counter = Counter()
        by_written: dict[int, list[int]] = defaultdict(list)
        by_real: dict[int, list[int]] = defaultdict(list)
        for r in (r for r in records if r["effort"] == effort):
            start, doors = parse_question(r["question"])
            truth = walk(start, doors)
            parsed = _rooms(r["analysis"])
            final = (r["final"] or "").strip()
            right = final == str(truth[-1])
            c["n"] += 1
            c["correct"] += right
            by_real[len(doors.rstrip("S"))].append(right)
            if parsed is None:
                c["unparsed"] += 1
                continue
            rooms, jump = parsed
            written = max(len(rooms) - 1, 0)
            last = rooms[-1] if rooms else start
            if jump is not None:
                c["jumps"] += 1
                c["jump"] += jump == (walk(last, doors[written:]) or [last])[-1]
                if not doors[written:].strip("S"):  # the walk was over: the jump is a copy of the last room
                    c["copies"] += 1
                    c["copy"] += jump == last
            c["final_from_trace"] += final == str(jump if jump is not None else last)
            by_written[written].append(right)
            if rooms:
                c["with_start"] += 1
                c["start_copy"] += rooms[0] == start
            for i in range(1, min(len(rooms), len(doors) + 1)):
                c["steps"] += 1
                c["step_fact"] += rooms[i] == DOORS[doors[i - 1]][rooms[i - 1]]
                c["on_walk"] += rooms[i] == truth[i - 1]
        n, steps = c["n"], max(c["steps"], 1)
        out[effort] = {"n": n, "correct": c["correct"] / n, "unparsed": c["unparsed"] / n,
                       "start_copy": c["start_copy"] / max(c["with_start"], 1),
                       "steps": c["steps"], "step_fact": c["step_fact"] / steps, "on_walk": c["on_walk"] / steps,
                       "jump": c["jump"] / max(c["jumps"], 1), "jumps": c["jumps"],
                       "copy": c["copy"] / max(c["copies"], 1), "copies": c["copies"],
                       "final_from_trace": c["final_from_trace"] / max(n - c["unparsed"], 1),
                       "by_written": {k: (len(v), sum(v) / len(v)) for k, v in sorted(by_written.items())},
                       "by_real": {k: (len(v), sum(v) / len(v)) for k, v in sorted(by_real.items())}}
    return out


def main(argv: list[str] | None = None) -> None:
    for checkpoint, records in by_checkpoint((argv or sys.argv[1:])[0]).items():
        for effort, s in step_stats(records).items():
            hist = " ".join(f"{k}:{n}@{acc:.2f}" for k, (n, acc) in s["by_written"].items())
            real = " ".join(f"{k}:{n}@{acc:.2f}" for k, (n, acc) in s["by_real"].items())
            print(f"{checkpoint} {effort}: n={s['n']} acc {s['correct']:.3f} | start copied {s['start_copy']:.3f} | "
                  f"per step ({s['steps']}): fact {s['step_fact']:.3f} on walk {s['on_walk']:.3f} | "
                  f"jump ({s['jumps']}) {s['jump']:.3f}, of which after the walk's end ({s['copies']}) {s['copy']:.3f} | final = trace's last room {s['final_from_trace']:.3f} | doors written:n@acc {hist}"
                  f" | real doors:n@acc {real}")


if __name__ == "__main__":
    main()
