r"""The tiny world where thinking pays: pointer chasing through ten boxes ("chain").

What
- `ChainEnv(seed, steps=5)` yields tasks such as
  "Boxes a-j (a=0, j=9):\na3\nb7\n...\nj2\nStart at c. Follow 5 times. Final number?" (box a holds 3,
  box b holds 7, ...): each box's digit names the next box (0 = a, ..., 9 = j; digits may repeat).
  Open box c, read its number, go to the box it names, and so on `steps` times; the answer is the last
  number read. `metadata["answer"]` is that digit as a string, so the math-verify reward scores it.
- `solution(task, effort)` writes a partial scratchpad: the first `j` boxes opened, one per line
  ("1|c9", "2|j2", ...), then the last number, stated in one shot ("Answer: 4."). `j` is how much of
  the chain the trace works out; the rest is composed inside one forward pass.
- Train and test never overlap: a problem's split is a pure function of (boxes, start, steps), hashed.

Why this world (measured before choosing; README "A tiny world where thinking pays")
- A written step is what the tiny model does reliably: after the box letter "c" the next token is the
  one that followed "c" in the question (box letters are unique tokens, numbers another kind), the
  canonical one-token induction-head copy (Olsson et al. 2022); going from the number 9 to box j is one
  10-entry bijection. Nothing needs counting positions or memorising arithmetic. Composing several
  hops in one forward pass is what a shallow transformer cannot do (k-hop composition needs depth
  growing with k: Sanford, Hsu & Telgarsky 2024, "Transformers, parallel computation, and logarithmic depth"; a scratchpad turns it
  into k one-hop steps: Nye et al. 2021, "Show your work"). So accuracy rises with the steps written.
- Rejected after measuring (1,200 SFT steps, 400 held-out samples per effort, outputs/exp-chain*):
  (1) mod-10 chains of + - * ops ("a: 7 +3 = 0"): with the question's lines sharing the trace's tokens
  the op copy reached 99%, but the 80-fact table stayed at 0.6 per written result (greedy), so high
  effort scored 0.21; (2)-(4) tables holding a permutation of 0-9, read as "4→9", as boxes "c: 7" and
  as boxes "c7": reads at chance (0.095-0.107) in all three, and in (4) even the final channel's copy
  of "Answer: N." sat at p ~ 0.1. A question that holds every digit exactly once gives a head that
  attends to "the digits" the uniform distribution, the best it can do before the lookup forms, and
  SFT stayed there. With a random function (digits repeat, some are missing) the same "c7" reads
  reached 0.70 per step at T=1. The previous tiny world (running digit sums) had its 405 addition
  facts at p ~ 0.75 and fell with effort.

Effort styles (the SFT cold start; lengths vary around the effort budgets on purpose, so that budget
compliance is something RL has to learn: `STYLE`): low writes 0-2 steps, medium 2-4, high all of
them and sometimes checks the chain again (over the high budget). `budgets(steps)` gives the CoT token
budgets that fit low = 1 step, medium = 3 steps, high = every step once.

Run `python -m envs.chain_tasks` to print one task per effort and the token counts per style.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from envs.draw import check_split, draw_distinct, hashed_split, pick_weighted, show_world, written_steps
from envs.types import EFFORTS, Task

ENV_NAME = "math"  # scored by the math reward: the final answer is an integer
TEST_FRACTION = 0.1
LABELS = "abcdefghij"
BOXES = "abcdefghij"  # box n is BOXES[n]
QUESTION_RE = re.compile(r"^Boxes a-j \(a=0, j=9\):\n((?:[a-j]\d\n){10})Start at ([a-j])\. Follow (\d+) times\. "
                         r"Final number\?$")  # the ten rows in any order, each box once

# Written steps j per effort as (j, weight); "all" = every step, "all+check" = every step, then the
# chain again as a check (longer than the high budget). Relative to a chain of `steps` lookups.
STYLE = {
    "low": ((0, 0.35), (1, 0.35), (2, 0.30)),
    "medium": ((2, 0.30), (3, 0.40), (4, 0.30)),
    "high": (("all", 0.7), ("all+check", 0.3)),
}
# Steps each effort's budget fits (the budget is the token count of that trace plus a margin).
BUDGET_STEPS = {"low": 1, "medium": 3, "high": "all"}


def run_chain(table: list[int], start: int, steps: int) -> list[int]:
    """Numbers read in the boxes opened, starting at box `start` (`steps` numbers); box d holds table[d].

    >>> run_chain([3, 7, 9, 0, 6, 8, 1, 4, 5, 2], 2, 3)
    [9, 2, 9]
    """
    out, box = [], start
    for _ in range(steps):
        box = table[box]
        out.append(box)
    return out


def question(table: list[int], start: int, steps: int, order: list[int] | None = None) -> str:
    """The question text; `order` lists the boxes in the order their rows appear (None = a to j)."""
    order = list(range(len(table))) if order is None else order
    if sorted(order) != list(range(len(table))):
        raise ValueError(f"order={order} must list each of the {len(table)} boxes once")
    rows = "".join(f"{BOXES[d]}{table[d]}\n" for d in order)
    return f"Boxes a-j (a=0, j=9):\n{rows}Start at {BOXES[start]}. Follow {steps} times. Final number?"


def parse_question(text: str) -> tuple[list[int], int, int]:
    """(table, start box, steps) of a chain question; ValueError naming the problem otherwise.

    >>> parse_question(question([3, 7, 9, 0, 6, 8, 1, 4, 5, 2], 4, 5))
    ([3, 7, 9, 0, 6, 8, 1, 4, 5, 2], 4, 5)
    """
    m = QUESTION_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a chain question (Boxes a-j (a=0, j=9):, ten lines '<box><digit>', "
                         "Start at <box>. Follow <k> times. Final number?)")
    table: list[int | None] = [None] * len(BOXES)
    for line in m.group(1).splitlines():
        box, value = BOXES.index(line[0]), int(line[1:])
        if table[box] is not None:
            raise ValueError(f"{text!r}: box {line[0]} has two rows; each box a-j needs exactly one")
        table[box] = value
    steps = int(m.group(3))
    if not 1 <= steps <= len(LABELS):
        raise ValueError(f"{text!r}: {steps} steps, expected 1..{len(LABELS)}")
    return table, BOXES.index(m.group(2)), steps


def canonical_key(table: list[int], start: int, steps: int) -> str:
    return f"{''.join(map(str, table))}|{start}|{steps}"


def split_of(table: list[int], start: int, steps: int) -> str:
    """"test" for about TEST_FRACTION of all chains, else "train"; depends on the chain only."""
    return hashed_split(canonical_key(table, start, steps), TEST_FRACTION)


def step_line(i: int, box: int, table: list[int]) -> str:
    """Step i (0-based) opening `box`: "2|h1" (after the step number, the question's own line for h)."""
    return f"{i + 1}|{BOXES[box]}{table[box]}"


def trace(table: list[int], start: int, steps: int, written: int, check: bool = False) -> str:
    """The analysis text that works out the first `written` steps and states the rest in one shot."""
    if not 0 <= written <= steps:
        raise ValueError(f"written={written} must be in 0..{steps}")
    values = run_chain(table, start, steps)
    lines, x = [], start
    for i in range(written):
        lines.append(step_line(i, x, table))
        x = values[i]
    if check:
        lines.append("Check:")
        x = start
        for i in range(steps):
            lines.append(step_line(i, x, table))
            x = values[i]
    lines.append(f"Answer: {values[-1]}.")
    return "\n".join(lines)


@dataclass
class ChainEnv:
    """Seeded source of box chains. `tasks("train"|"test", n, seed)` never mixes splits.

    >>> env = ChainEnv(seed=0)
    >>> t = env.tasks("test", 1)[0]
    >>> table, start, steps = parse_question(t.question)
    >>> split_of(table, start, steps), steps, t.metadata["answer"] == str(run_chain(table, start, steps)[-1])
    ('test', 5, True)
    """

    name = "chain"
    seed: int = 0
    steps: int = 5  # applications of f per chain
    # Both measured worse than the defaults (README "Effort that pays: the world study"): with the rows in a
    # random order (a box found only by its letter) reads stay at chance; without fixed points, 0.18.
    shuffle_rows: bool = False  # rows in a random order per task
    fixed_points: bool = True  # False: no box names itself (f(x) != x), so a chain never stalls on one box

    def __post_init__(self):
        if not 1 <= self.steps <= len(LABELS):
            raise ValueError(f"steps={self.steps} must be in 1..{len(LABELS)}")

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """`n` distinct chains of `split`, deterministic in (env seed, `seed`, split, steps)."""
        check_split(split)
        rng = random.Random(f"chain:{self.seed}:{seed}:{split}:{self.steps}")

        def draw():
            table = [rng.randint(0, 9) for _ in range(10)]
            if not self.fixed_points:  # f(x) != x: redraw x's digit among the other nine, uniformly
                table = [v if v != x else (v + rng.randint(1, 9)) % 10 for x, v in enumerate(table)]
            start = rng.randint(0, 9)
            order = list(range(10))
            if self.shuffle_rows:
                rng.shuffle(order)
            return (canonical_key(table, start, self.steps), split_of(table, start, self.steps),
                    lambda: self._task(table, start, split, order))

        return draw_distinct(split, n, draw, n * 50 + 1000, f"chains of {self.steps} steps")

    def _task(self, table: list[int], start: int, split: str, order: list[int]) -> Task:
        key = canonical_key(table, start, self.steps)
        return Task(
            task_id=f"chain-{hashlib.sha256(key.encode()).hexdigest()[:12]}",
            env=ENV_NAME,
            question=question(table, start, self.steps, order),
            metadata={"answer": str(run_chain(table, start, self.steps)[-1]), "split": split, "steps": self.steps},
        )

    def solution(self, task: Task, effort: str) -> tuple[str, str]:
        return solution(task, effort)

    def budgets(self) -> dict[str, int]:
        return budgets(self.steps)

    def vocabulary_corpus(self) -> list[str]:
        return vocabulary_corpus(self.steps)


def solution(task: Task, effort: str) -> tuple[str, str]:
    """(analysis, final) for a chain task in the style of `effort` (see `STYLE`); the number of written
    steps is drawn from the effort's distribution with a seed of (task, effort), so the SFT data is
    reproducible.

    >>> t = ChainEnv().tasks("train", 1)[0]
    >>> analysis, final = solution(t, "high")
    >>> analysis.splitlines()[-1] == f"Answer: {final}." and analysis.startswith("1|")
    True
    """
    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is not one of {EFFORTS}")
    table, start, steps = parse_question(task.question)
    rng = random.Random(f"style:{task.task_id}:{effort}")
    style = pick_weighted(rng, STYLE[effort])
    written = written_steps(style, steps)
    answer = str(run_chain(table, start, steps)[-1])
    return trace(table, start, steps, written, check=style == "all+check"), answer


def budgets(steps: int) -> dict[str, int]:
    """CoT token budget per effort for chains of `steps` lookups: the tokens of the trace writing
    `BUDGET_STEPS[effort]` steps, plus 2 tokens of margin (every chain of the same length tokenizes to
    the same count: one token per digit, box, step number and separator; 5 per written step)."""
    from envs.harmony import encode

    table = list(range(10))
    out = {}
    for effort, n in BUDGET_STEPS.items():
        out[effort] = len(encode(trace(table, 0, steps, written_steps(n, steps)))) + 2
    return out


def vocabulary_corpus(steps: int = 5) -> list[str]:
    """Strings covering every token chain questions and traces can produce."""
    rng = random.Random(0)
    out = [" ".join(str(i) for i in range(10)), "Check:", "Answer: 0."]
    for _ in range(200):
        table = list(range(10))
        rng.shuffle(table)
        start = rng.randint(0, 9)
        out.append(question(table, start, steps))
        out.append(trace(table, start, steps, steps, check=True))
    out += [step_line(i, x, list(range(10))) for i in range(len(LABELS)) for x in range(10)]
    out += [f"Start at {b}. Follow {k} times." for b in BOXES for k in range(1, len(LABELS) + 1)]
    return out


def _main() -> None:
    show_world(ChainEnv(seed=0), EFFORTS)


if __name__ == "__main__":
    _main()
