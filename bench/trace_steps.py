"""What a checkpoint's written steps get right: digit sums with `env.digit_sum_trace=rewrite` traces.

Run:  .venv/bin/python -m bench.trace_steps outputs/x/eval/samples.jsonl   (written by rl.evaluate)

Per effort, from every sample's analysis (lines of "+"-joined terms): the first line copied from the
question, per written step the copy (the terms after the merged pair, shifted left, "+0" appended)
and the sum (the merged pair), whether the last line still sums to the answer, whether the final is
the last line's sum (the answer read from the trace), and accuracy.
"""
from __future__ import annotations

import json
import sys
from collections import Counter


def _row(line: str) -> list[int] | None:
    try:
        return [int(x) for x in line.split("+")]
    except ValueError:
        return None


def step_stats(records: list[dict]) -> dict[str, dict[str, float]]:
    """{effort: rates} over `records` (samples.jsonl lines).

    >>> rec = {"effort": "high", "question": "Compute 4+8+9.", "final": "21",
    ...        "analysis": "4+8+9\\n12+9+0\\n22+0+0"}
    >>> s = step_stats([rec])["high"]
    >>> s["step_copy"], s["step_sum"], s["final_from_trace"], s["correct"]
    (1.0, 0.5, 0.0, 1.0)
    """
    out = {}
    for effort in dict.fromkeys(r["effort"] for r in records):
        c: Counter = Counter()
        for r in (r for r in records if r["effort"] == effort):
            terms = [int(x) for x in r["question"].removeprefix("Compute ").rstrip(".").split("+")]
            rows = [_row(line) for line in (r["analysis"] or "").split("\n")]
            c["n"] += 1
            c["first_line_copy"] += bool(rows[0]) and rows[0][: len(terms)] == terms and not any(rows[0][len(terms):])
            for a, b in zip(rows, rows[1:]):
                if a is None or b is None or len(a) < 2:
                    continue
                c["steps"] += 1
                c["step_copy"] += b[1:] == a[2:] + [0]
                c["step_sum"] += b[0] == a[0] + a[1]
            final = (r["final"] or "").strip()
            if rows[-1] is not None:
                c["last_line_right"] += sum(rows[-1]) == sum(terms)
                c["final_from_trace"] += final == str(sum(rows[-1]))
            c["correct"] += final == str(sum(terms))
        n, steps = c["n"], max(c["steps"], 1)
        out[effort] = {"n": n, "first_line_copy": c["first_line_copy"] / n, "steps": c["steps"],
                       "step_copy": c["step_copy"] / steps, "step_sum": c["step_sum"] / steps,
                       "last_line_right": c["last_line_right"] / n, "final_from_trace": c["final_from_trace"] / n,
                       "correct": c["correct"] / n}
    return out


def by_checkpoint(path: str) -> dict[str, list[dict]]:
    """samples.jsonl (rl.evaluate) as {checkpoint: its records}, in file order."""
    out: dict[str, list[dict]] = {}
    for line in open(path):
        r = json.loads(line)
        out.setdefault(r.get("checkpoint"), []).append(r)
    return out


def main(argv: list[str] | None = None) -> None:
    for checkpoint, records in by_checkpoint((argv or sys.argv[1:])[0]).items():
        for effort, s in step_stats(records).items():
            print(f"{checkpoint} {effort}: n={s['n']} first line {s['first_line_copy']:.3f} | per step ({s['steps']}): "
                  f"copy {s['step_copy']:.3f} sum {s['step_sum']:.3f} | last line right {s['last_line_right']:.3f} | "
                  f"final = last line's sum {s['final_from_trace']:.3f} | correct {s['correct']:.3f}")


if __name__ == "__main__":
    main()
