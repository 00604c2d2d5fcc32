r"""The tiny world where thinking pays: labelled chains of mod-10 operations ("chain").

What
- `ChainEnv(seed, steps=5)` yields tasks such as "x=7\na: +3\nb: *2\nc: -1\nd: +2\ne: *3\nKeep the last
  digit. Final x?" (answer "3": 7+3=0, 0*2=0, 0-1=9, 9+2=1, 1*3=3; every step keeps the last digit).
  `metadata["answer"]` is the final digit as a string, so the math-verify reward scores it.
- `solution(task, effort, variant)` writes a partial scratchpad: the first `j` steps one per line
  ("a: 7+5=2"), then the value of x after the rest, stated in one shot ("x = 6."). `j` is how much of
  the chain the trace works out ("c: 0 -1 = 9"); the rest is composed in one forward pass.
- Train and test never overlap: a problem's split is a pure function of (start, ops), hashed.

Why this world (measured before choosing; README "A tiny world where thinking pays")
- Every written step is one fact of an 80-entry table (digit, op -> digit; ops +1..+3, -1..-3, *2,
  *3), and the op it needs is found by *content*: a trace line starts with the same tokens as the
  question's line for that step ("c:" then " -", "1"), so copying the op is an induction-head lookup,
  not counting positions. Measured before choosing (README "A tiny world where thinking pays"): with
  all 270 facts of + - * by 1-9 and the question's ops on one line (other tokens than the trace's),
  1,200 SFT steps left the facts at chance (p = 0.1 per written result); the previous tiny world's
  running sums of digits had 405 facts at p ~ 0.75 each, so its 4-step traces were right less often
  than its one-shot answers, and accuracy fell with effort.
- The answer in one shot is hard: + - and * do not commute, so the final digit depends on the order of
  the whole chain and cannot be read off an average the way a sum can (attention computes sums
  easily; that is why one-shot digit sums scored 0.57). Accuracy falls with the number of steps left
  to compose implicitly, and rises with the number written out: effort pays (Nye et al. 2021, "Show
  your work": scratchpads turn a long computation into steps a small model does reliably).

Effort styles (the SFT cold start; lengths vary around the effort budgets on purpose, so that budget
compliance is something RL has to learn: `STYLE`): low writes 0-2 steps, medium 2-4, high all of
them and sometimes re-checks the chain (over the high budget). `budgets(steps)` gives the CoT token
budgets that fit low = 1 step, medium = 3 steps, high = every step once.

Run `python -m envs.chain_tasks` to print one task per effort and the token counts per style.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from envs.types import EFFORTS, Task

ENV_NAME = "math"  # scored by the math reward: the final answer is an integer
TEST_FRACTION = 0.1
LABELS = "abcdefghij"
OPS = ("+", "-", "*")
QUESTION_RE = re.compile(r"^x=(\d)\n((?:[a-j]: [-+*]\d\n)+)Keep the last digit\. Final x\?$")
OP_RE = re.compile(r"^([a-j]): ([-+*])(\d)$")
OP_DIGITS = {"+": (1, 2, 3), "-": (1, 2, 3), "*": (2, 3)}  # 8 ops: an 80-fact table

# Written steps j per effort as (j, weight); "all" = every step, "all+check" = every step, then the
# chain again as a check (longer than the high budget). Relative to a chain of `steps` operations.
STYLE = {
    "low": ((0, 0.35), (1, 0.35), (2, 0.30)),
    "medium": ((2, 0.30), (3, 0.40), (4, 0.30)),
    "high": (("all", 0.7), ("all+check", 0.3)),
}
# Steps each effort's budget fits (the budget is the token count of that trace plus a margin).
BUDGET_STEPS = {"low": 1, "medium": 3, "high": "all"}


def apply(x: int, op: str) -> int:
    """One step on the last digit: "+5", "-8", "*3" applied to x in 0..9, result mod 10.

    >>> apply(7, "+5"), apply(6, "-8"), apply(2, "*3")
    (2, 8, 6)
    """
    sym, d = op[0], int(op[1:])
    if sym == "+":
        return (x + d) % 10
    if sym == "-":
        return (x - d) % 10
    if sym == "*":
        return (x * d) % 10
    raise ValueError(f"op {op!r} is not one of +d, -d, *d")


def run_chain(start: int, ops: list[str]) -> list[int]:
    """Values of x after each op (len(ops) values)."""
    out, x = [], start
    for op in ops:
        x = apply(x, op)
        out.append(x)
    return out


def question(start: int, ops: list[str]) -> str:
    body = "".join(f"{LABELS[i]}: {op}\n" for i, op in enumerate(ops))
    return f"x={start}\n{body}Keep the last digit. Final x?"


def parse_question(text: str) -> tuple[int, list[str]]:
    """(start, ops) of a chain question; ValueError naming the problem otherwise.

    >>> parse_question("x=7\\na: +3\\nb: *2\\nKeep the last digit. Final x?")
    (7, ['+3', '*2'])
    """
    m = QUESTION_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a chain question (x=<digit>, lines 'a: <op>', Keep the last digit. "
                         "Final x?)")
    ops = []
    for i, part in enumerate(m.group(2).splitlines()):
        om = OP_RE.match(part)
        if not om or om.group(1) != LABELS[i]:
            raise ValueError(f"{text!r}: step {i + 1} is {part!r}, expected '{LABELS[i]}: <+|-|*><digit>'")
        ops.append(om.group(2) + om.group(3))
    return int(m.group(1)), ops


def canonical_key(start: int, ops: list[str]) -> str:
    return f"{start}|{','.join(ops)}"


def split_of(start: int, ops: list[str]) -> str:
    """"test" for about TEST_FRACTION of all chains, else "train"; depends on the chain only."""
    digest = hashlib.sha256(canonical_key(start, ops).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 10_000 < TEST_FRACTION * 10_000 else "train"


def _op(rng: random.Random) -> str:
    sym = rng.choice(OPS)
    return f"{sym}{rng.choice(OP_DIGITS[sym])}"


def step_line(i: int, x: int, op: str) -> str:
    """The written form of step i from value x: "c: 0 -1 = 9" (the op's tokens are the question's)."""
    return f"{LABELS[i]}: {x} {op} = {apply(x, op)}"


def _pick(rng: random.Random, weighted) -> object:
    r, acc = rng.random(), 0.0
    for value, w in weighted:
        acc += w
        if r < acc:
            return value
    return weighted[-1][0]


def trace(start: int, ops: list[str], written: int, check: bool = False) -> str:
    """The analysis text that works out the first `written` steps and states the rest in one shot."""
    if not 0 <= written <= len(ops):
        raise ValueError(f"written={written} must be in 0..{len(ops)}")
    values = run_chain(start, ops)
    lines, x = [], start
    for i in range(written):
        lines.append(step_line(i, x, ops[i]))
        x = values[i]
    if check:
        lines.append("Check:")
        x = start
        for i in range(len(ops)):
            lines.append(step_line(i, x, ops[i]))
            x = values[i]
    lines.append(f"x = {values[-1]}.")
    return "\n".join(lines)


@dataclass
class ChainEnv:
    """Seeded source of labelled mod-10 chains. `tasks("train"|"test", n, seed)` never mixes splits.

    >>> env = ChainEnv(seed=0)
    >>> t = env.tasks("test", 1)[0]
    >>> start, ops = parse_question(t.question)
    >>> split_of(start, ops), len(ops), t.metadata["answer"] == str(run_chain(start, ops)[-1])
    ('test', 5, True)
    """

    name = "chain"
    seed: int = 0
    steps: int = 5  # operations per chain

    def __post_init__(self):
        if not 1 <= self.steps <= len(LABELS):
            raise ValueError(f"steps={self.steps} must be in 1..{len(LABELS)}")

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """`n` distinct chains of `split`, deterministic in (env seed, `seed`, split, steps)."""
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: use 'train' or 'test'")
        rng = random.Random(f"chain:{self.seed}:{seed}:{split}:{self.steps}")
        out, seen = [], set()
        for _ in range(n * 50 + 1000):
            if len(out) == n:
                break
            start, ops = rng.randint(0, 9), [_op(rng) for _ in range(self.steps)]
            key = canonical_key(start, ops)
            if key in seen or split_of(start, ops) != split:
                continue
            seen.add(key)
            out.append(self._task(start, ops, split))
        if len(out) < n:
            raise ValueError(f"only {len(out)} distinct {split} chains of {self.steps} steps; ask for fewer than {n}")
        return out

    def _task(self, start: int, ops: list[str], split: str) -> Task:
        key = canonical_key(start, ops)
        return Task(
            task_id=f"chain-{hashlib.sha256(key.encode()).hexdigest()[:12]}",
            env=ENV_NAME,
            question=question(start, ops),
            metadata={"answer": str(run_chain(start, ops)[-1]), "split": split, "steps": len(ops)},
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
    >>> analysis.splitlines()[-1] == f"x = {final}." and analysis.startswith("a: ")
    True
    """
    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is not one of {EFFORTS}")
    start, ops = parse_question(task.question)
    rng = random.Random(f"style:{task.task_id}:{effort}")
    style = _pick(rng, STYLE[effort])
    check = style == "all+check"
    written = len(ops) if isinstance(style, str) else min(int(style), len(ops))
    answer = str(run_chain(start, ops)[-1])
    return trace(start, ops, written, check), answer


def budgets(steps: int) -> dict[str, int]:
    """CoT token budget per effort for chains of `steps` ops: the tokens of the trace writing
    `BUDGET_STEPS[effort]` steps, plus 2 tokens of margin (every chain of the same length tokenizes to
    the same count: one token per digit, label, sign and separator; 10 per written step)."""
    from envs.harmony import encode

    start, ops = 0, ["+1"] * steps
    out = {}
    for effort, n in BUDGET_STEPS.items():
        written = steps if n == "all" else min(n, steps)
        out[effort] = len(encode(trace(start, ops, written))) + 2
    return out


def vocabulary_corpus(steps: int = 5) -> list[str]:
    """Strings covering every token chain questions and traces can produce."""
    rng = random.Random(0)
    out = [" ".join(str(i) for i in range(10)), "Check:", "x = 0."]
    for _ in range(200):
        start, ops = rng.randint(0, 9), [_op(rng) for _ in range(steps)]
        out.append(question(start, ops))
        out.append(trace(start, ops, steps, check=True))
    for sym in OPS:
        for x in range(10):
            out += [step_line(i, x, f"{sym}{d}") for i in range(len(LABELS)) for d in OP_DIGITS[sym]]
    return out


def _main() -> None:
    from envs.harmony import encode

    env = ChainEnv(seed=0)
    task = env.tasks("train", 1)[0]
    print(task.question, "->", task.metadata["answer"])
    for effort in EFFORTS:
        print(f"--- {effort}\n{solution(task, effort)[0]}")
    sample = env.tasks("train", 300)
    print("budgets:", env.budgets())
    for effort in EFFORTS:
        counts = [len(encode(solution(t, effort)[0])) for t in sample]
        print(f"{effort}: mean {sum(counts) / len(counts):.1f} min {min(counts)} max {max(counts)}")


if __name__ == "__main__":
    _main()
