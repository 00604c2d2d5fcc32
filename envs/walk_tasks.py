r"""A tiny world where thinking pays by construction: a walk through ten rooms by two fixed doors ("walk").

What
- `WalkEnv(seed, steps=8)` yields tasks such as
  "Doors: L, R, R, L, S, S, S, S. Start in room 3. Final room?": rooms are 0-9, and each door is a fixed
  map of rooms (`DOORS`, the same in every task: the world's physics, learned in SFT, never shown).
  Going through door L from room x leads to room L[x]; S is "stay". The answer is the room after the
  last door; `metadata["answer"]` is that digit as a string, so the math-verify reward scores it.
  A walk has `steps` slots: 1..steps real doors (L or R, uniformly many), then S to the end.
- `solution(task, effort)` writes the rooms visited, "3,6,1,7,2,2,2,2,2" (the start room, then one room
  per door; with `show_doors` each door before its room, "3L6R1..."), through the first `written`
  doors, then jumps to the final room in one shot (">2"). The final answer is always the last room
  written, so reading it off the trace is one rule.
- Train and test never overlap: a walk's split is a pure function of (start, doors), hashed.

Why this world (issue 14; README "Effort that pays")
- Every written step is what the tiny model does reliably: the question spends two tokens per door
  (" L", ",") and the trace two per room ("6", ","), so the door a step needs sits at the same distance
  behind it in every step and every task (a fixed-offset read), and the room before it two tokens back.
  The step is then one of 30 facts (room x door), the same facts in every task. Nothing needs a
  content-addressed lookup (the chain world's reads, which the tiny model did not learn at the demo's
  budget) or arithmetic facts of which there are hundreds (digit sums).
- The one-shot answer cannot be shortcut on long walks: L and R are 10-cycles that do not commute and
  generate all of S10, so the final room depends on the whole order of the doors (Liu et al. 2023,
  "Transformers learn shortcuts to automata": solving a non-abelian word problem in one pass needs depth
  growing with length; a scratchpad turns it into one step per symbol, Nye et al. 2021).
- Effort = how much of the walk is worked out (`STYLE`): low writes 0-3 doors, medium 2-5, high 4, 6
  or all 8 (sometimes the walk twice), mostly under budgets fitting 2 / 4 / 8 doors and partly over
  them, so spending the budget and keeping to it are RL's to learn. A walk ends in S doors (real doors
  first), written like any other step, so each effort's trace length is its own whatever the walk; a
  jump after a written S is a copy of the last room. `draw="iid"` keeps short walks as common as long
  ones; `stop=True` ends traces at the last real door instead (`STOP_STYLE`; RL then wrote whole walks
  at every effort, README "Effort that pays: the walk world").
- Measured (`experiment=walk`, `make demo`'s world, seeds 0-2, session 18): every written step right
  99.5-99.9%, accuracy rising with effort for SFT and RL by 17-48 points between neighbours, RL 7-18
  points over SFT at every effort and seed, keeping every budget (compliance >= 0.94) with monotonicity
  1.000 (bench/RESULTS.md "The walk world, every bar at three seeds").

Run `python -m envs.walk_tasks` to print one task per effort and the token counts per style.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from envs.draw import check_split, draw_distinct, hashed_split, pick_weighted, show_world, written_steps
from envs.types import EFFORTS, Task

ENV_NAME = "math"  # scored by the math reward: the final answer is an integer
TEST_FRACTION = 0.1
MAX_STEPS = 12
# The doors: L and R are fixed 10-cycles of rooms 0-9 that do not commute; S stays.
DOORS = {
    "L": (5, 0, 8, 1, 7, 9, 4, 3, 6, 2),
    "R": (3, 7, 0, 9, 1, 6, 2, 8, 5, 4),
    "S": tuple(range(10)),
}
QUESTION_RE = re.compile(r"^Doors: ((?:[LRS], )*[LRS])\. Start in room (\d)\. Final room\?$")

# Doors written per effort as (count, weight): an int = that many doors from the start, "all" = every door,
# "all+check" = every door and then the walk again.
# Lengths vary around the budgets on both sides: over them (RL must cut) and under them (RL must learn to
# spend the budget: each door written is a walk more it can finish).
STYLE = {
    "low": ((0, 0.4), (1, 0.35), (2, 0.1), (3, 0.15)),
    "medium": ((2, 0.4), (3, 0.35), (4, 0.1), (5, 0.15)),
    "high": ((4, 0.25), (6, 0.3), ("all", 0.25), ("all+check", 0.2)),
}
# `stop` traces (a walk shorter than the style is written whole): each effort's doors spread evenly over
# both sides of its budget (whole walks of 3 / 5 / 8 doors), so the SFT data keeps to the budgets only
# 75 / 85 / 80% of the time and finishes short walks in only some of the traces that could; "all+check"
# writes every slot twice, S doors included (always over high's budget).
STOP_STYLE = {
    "low": ((0, 0.2), (1, 0.2), (2, 0.2), (3, 0.2), (4, 0.2)),
    "medium": ((2, 0.2), (3, 0.2), (4, 0.2), (5, 0.2), (6, 0.2)),
    "high": ((4, 0.15), (6, 0.2), ("all", 0.45), ("all+check", 0.2)),
}
# Doors each effort's budget fits (the budget is the token count of that trace plus a margin): written
# before a jump, or (`stop` traces) a whole walk of that many doors, where a jump fits one door fewer.
BUDGET_STEPS = {"low": 2, "medium": 4, "high": "all"}
STOP_BUDGET_STEPS = {"low": 3, "medium": 5, "high": "all"}


def walk(start: int, doors: str) -> list[int]:
    """Rooms after each door, from `start`.

    >>> walk(3, "LSR")
    [1, 1, 7]
    """
    out, room = [], start
    for d in doors:
        room = DOORS[d][room]
        out.append(room)
    return out


def question(start: int, doors: str) -> str:
    return f"Doors: {', '.join(doors)}. Start in room {start}. Final room?"


def parse_question(text: str) -> tuple[int, str]:
    """(start room, doors) of a walk question; ValueError naming the problem otherwise.

    >>> parse_question(question(3, "LSRL"))
    (3, 'LSRL')
    """
    m = QUESTION_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a walk question (Doors: <L|R|S>, .... Start in room <0-9>. Final room?)")
    doors = m.group(1).replace(", ", "")
    if len(doors) > MAX_STEPS:
        raise ValueError(f"{text!r}: {len(doors)} doors, at most {MAX_STEPS}")
    return int(m.group(2)), doors


def split_of(start: int, doors: str) -> str:
    """"test" for about TEST_FRACTION of all walks, else "train"; depends on the walk only."""
    return hashed_split(f"walk|{start}|{doors}", TEST_FRACTION)


def trace(start: int, doors: str, written: int, check: bool = False, show_doors: bool = False,
          stop: bool = False) -> str:
    """The analysis text: the rooms through the first `written` doors, then, unless every door was
    written, a jump to the final room (">N"); `check` writes the whole walk once more. `show_doors`
    writes each door before the room it leads to ("3L1S1R7"), where the rooms alone are comma-separated;
    a partial trace then also writes the next door before its jump ("3L1S>7"): one fixed-offset copy,
    after which an S (the walk is over: real doors come first) makes the jump a copy of the last room.
    `stop` ends the walk at its last real door: trailing S doors change nothing and are not written, so a
    walk shorter than `written` is written out whole and needs no jump ("3L1" for "LSS").

    >>> trace(3, "LSR", 3), trace(3, "LSR", 1), trace(3, "LSR", 0), trace(3, "LSR", 3, check=True)
    ('3,1,1,7', '3,1,>7', '>7', '3,1,1,7\\n3,1,1,7')
    >>> trace(3, "LSR", 3, show_doors=True), trace(3, "LSR", 1, show_doors=True), trace(3, "LSR", 0, show_doors=True)
    ('3L1S1R7', '3L1S>7', '3L>7')
    >>> trace(3, "LSS", 3, show_doors=True, stop=True), trace(3, "LRS", 1, show_doors=True, stop=True)
    ('3L1', '3L1R>7')
    """
    if not 0 <= written <= len(doors):
        raise ValueError(f"written={written} must be in 0..{len(doors)}")
    if stop:
        doors = doors.rstrip("S")
        written = min(written, len(doors))
    rooms = walk(start, doors)
    steps = [(d if show_doors else ",") + str(r) for d, r in zip(doors, rooms)]  # what leads to each room
    full = str(start) + "".join(steps)
    if written == len(doors):
        text = full
    else:  # before the jump: the next door (show_doors), or a comma after any written room
        head = str(start) + "".join(steps[:written])
        text = (head + doors[written] if show_doors else head + "," if written else "") + f">{rooms[-1]}"
    return text + ("\n" + full if check else "")


@dataclass
class WalkEnv:
    """Seeded source of walks. `tasks("train"|"test", n, seed)` never mixes splits.

    >>> env = WalkEnv(seed=0)
    >>> t = env.tasks("test", 1)[0]
    >>> start, doors = parse_question(t.question)
    >>> split_of(start, doors), len(doors), t.metadata["answer"] == str(walk(start, doors)[-1])
    ('test', 8, True)
    """

    name = "walk"
    seed: int = 0
    steps: int = 8  # door slots per walk
    stay: str = "end"  # where the S slots go: "end" (real doors first) or "anywhere" (random slots)
    show_doors: bool = False  # traces write each door before its room ("3L1S1R7")
    stop: bool = False  # traces end at the walk's last real door: a walk no longer than the effort's is written whole
    draw: str = "distinct"  # "distinct" walks, or "iid": walks drawn independently, so short ones recur as often
    # as long ones (there are only 10 x 2^m walks of m real doors: distinct draws are mostly long walks)

    def __post_init__(self):
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps={self.steps} must be in 1..{MAX_STEPS}")
        if self.stay not in ("end", "anywhere"):
            raise ValueError(f"stay={self.stay!r} must be 'end' or 'anywhere'")
        if self.draw not in ("distinct", "iid"):
            raise ValueError(f"draw={self.draw!r} must be 'distinct' or 'iid'")

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """`n` walks of `split` (distinct unless `draw="iid"`), deterministic in (env seed, `seed`, split,
        steps, stay, draw)."""
        check_split(split)
        tag = "" if self.draw == "distinct" else f":{self.draw}"
        rng = random.Random(f"walk:{self.seed}:{seed}:{split}:{self.steps}:{self.stay}{tag}")

        def draw():
            start, real = rng.randint(0, 9), rng.randint(1, self.steps)
            at = range(real) if self.stay == "end" else set(rng.sample(range(self.steps), real))
            doors = "".join(rng.choice("LR") if i in at else "S" for i in range(self.steps))
            return f"{start}|{doors}", split_of(start, doors), lambda: self._task(start, doors, split)

        return draw_distinct(split, n, draw, n * 50 + 1000, f"walks of {self.steps} doors",
                             distinct=self.draw == "distinct")

    def _task(self, start: int, doors: str, split: str) -> Task:
        return Task(
            task_id=f"walk-{start}{doors}",
            env=ENV_NAME,
            question=question(start, doors),
            metadata={"answer": str(walk(start, doors)[-1]), "split": split, "steps": len(doors)},
        )

    def solution(self, task: Task, effort: str) -> tuple[str, str]:
        return solution(task, effort, self.show_doors, self.stop)

    def budgets(self) -> dict[str, int]:
        return budgets(self.steps, self.show_doors, self.stop)

    def vocabulary_corpus(self) -> list[str]:
        return vocabulary_corpus(self.steps, self.show_doors)


def solution(task: Task, effort: str, show_doors: bool = False, stop: bool = False) -> tuple[str, str]:
    """(analysis, final) for a walk in the style of `effort` (`STYLE`), drawn with a seed of (task,
    effort) so the SFT data is reproducible.

    >>> t = WalkEnv().tasks("train", 1)[0]
    >>> analysis, final = solution(t, "high")
    >>> analysis[-1] == final
    True
    """
    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is not one of {EFFORTS}")
    start, doors = parse_question(task.question)
    style = pick_weighted(random.Random(f"style:{task.task_id}:{effort}"), (STOP_STYLE if stop else STYLE)[effort])
    answer = str(walk(start, doors)[-1])
    check = style == "all+check"
    # a check line reads its doors at one fixed offset only when the line before it has a fixed length: in
    # `stop` walks it is written over every slot, S doors included ("3L1S1S1\n3L1S1S1"), as without `stop`
    return trace(start, doors, written_steps(style, len(doors)), check, show_doors, stop and not check), answer


def budgets(steps: int, show_doors: bool = False, stop: bool = False) -> dict[str, int]:
    """CoT token budget per effort for walks of `steps` doors: the tokens of the trace writing
    `BUDGET_STEPS[effort]` doors (`stop`: of the whole walk of `STOP_BUDGET_STEPS[effort]` real doors) plus 1
    token of margin, so one more door (two tokens) is over it. Every walk of the same length tokenizes to
    the same count.

    >>> budgets(8, True, stop=True)  # 3 / 5 / 8 doors written whole: 1 + 2 x doors tokens, + 1
    {'low': 8, 'medium': 12, 'high': 18}
    """
    from envs.harmony import encode

    if stop:
        def walk_of(n):  # a walk of n real doors, written whole
            real = written_steps(n, steps)
            return trace(0, ("LR" * steps)[:real] + "S" * (steps - real), steps, show_doors=show_doors, stop=True)
        return {effort: len(encode(walk_of(n))) + 1 for effort, n in STOP_BUDGET_STEPS.items()}
    doors = "LRS" * steps
    return {effort: len(encode(trace(0, doors[:steps], written_steps(n, steps), show_doors=show_doors))) + 1
            for effort, n in BUDGET_STEPS.items()}


def vocabulary_corpus(steps: int = 8, show_doors: bool = False) -> list[str]:
    """Strings covering every token walk questions and traces can produce."""
    rng = random.Random(0)
    out = [" ".join(str(i) for i in range(10)), ",".join(str(i) for i in range(10))]
    for _ in range(200):
        start, doors = rng.randint(0, 9), "".join(rng.choice("LRS") for _ in range(steps))
        out.append(question(start, doors))
        out.append(trace(start, doors, steps, True, show_doors))
        out += [trace(start, doors, k, show_doors=show_doors) for k in range(steps)]
    return out


def _main() -> None:
    show_world(WalkEnv(seed=0), EFFORTS)


if __name__ == "__main__":
    _main()
