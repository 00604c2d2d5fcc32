"""Procedural multi-step arithmetic for the tiny world: tasks, held-out splits, effort-styled CoT.

What
- `MathEnv(seed, difficulty)` yields `Task`s such as "Compute (47+18)*6-29." from a closed grammar:
  sums of 2-3 numbers, products, `a*b+c`, `a*b-c`, `(a+b)*c-d`. `metadata["answer"]` is the exact
  integer as a string, `metadata["expr"]` the expression the question asks about.
- Train and test never overlap: a problem's split is a pure function of its *canonical key* (terms of
  sums and factors of products sorted, so "47+86" and "86+47" are one problem) hashed with sha256.
  About `TEST_FRACTION` of all problems are test problems, whatever the seed or difficulty.
- `solution(task, effort)` returns `(analysis, final)` used for the SFT cold start:
  low = one line, medium = key steps (running sums, place-value splits), high = digit-level column
  arithmetic with carries/borrows plus a "Check:" line. The final answer is always the bare integer.
- `vocabulary_corpus(n)` returns strings covering every token the tasks and traces can produce, so the
  tiny model's trimmed vocabulary (rl/model.py) can be built from it.
- `MathEnv(tool_traces=p)`: a share p of the problems (by a hash of the problem) is solved in SFT with
  the python tool instead (`tool_solution`: the trace prints the expression, reads the tool's answer
  and gives it as the final); needs `rollout.tools.python.enabled` (the prompts then describe it).

Why digit-level: o200k splits digits into chunks of up to three ("4042" -> "404", "2"), so answering
directly means predicting multi-digit chunks from multi-digit chunks (thousands of facts), while the
high-effort trace reduces every step to one-digit facts (<=100 of each kind) plus carries. At the
default difficulty a tiny model answering directly is expected to be clearly worse than one writing
the steps; that is what makes accuracy rise with reasoning effort.

Run `python -m envs.math_tasks` to print one task per effort and the mean CoT token counts.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Union

from envs.draw import check_split, draw_distinct, hashed_split, unit_hash
from envs.types import EFFORTS, Task, ToolCall, ToolTrace

ENV_NAME = "math"
TEST_FRACTION = 0.1
PLACES = ("units", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands")

# An expression: an int, or (op, args) with op in "+" (n-ary), "-" and "*" (binary).
Expr = Union[int, tuple]


# --------------------------------------------------------------------------- expressions


def render(e: Expr) -> str:
    """Canonical text of an expression, parenthesised only where needed: "(47+18)*6-29"."""
    if isinstance(e, int):
        return str(e)
    op, args = e
    if op == "+":
        return "+".join(render(a) for a in args)
    left, right = args
    if op == "-":
        r = render(right)
        return f"{render(left)}-{f'({r})' if _is_sum(right) else r}"
    parts = [f"({render(a)})" if _is_sum(a) else render(a) for a in args]
    return "*".join(parts)


def _is_sum(e: Expr) -> bool:
    return not isinstance(e, int) and e[0] in "+-"


def evaluate(e: Expr) -> int:
    if isinstance(e, int):
        return e
    op, args = e
    vals = [evaluate(a) for a in args]
    if op == "+":
        return sum(vals)
    return vals[0] - vals[1] if op == "-" else vals[0] * vals[1]


def parse_expr(text: str) -> Expr:
    """Parse the closed grammar (integers, + - *, parentheses) back into an `Expr`."""
    tokens = re.findall(r"\d+|[-+*()]", text.replace(" ", ""))
    if "".join(tokens) != text.replace(" ", ""):
        raise ValueError(f"{text!r} is outside the arithmetic grammar (digits, + - * and parentheses)")
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"{text!r} ends early")
        pos += 1
        return tokens[pos - 1]

    def atom() -> Expr:
        tok = take()
        if tok == "(":
            inner = total()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {text!r}")
            return inner
        if not tok.isdigit():
            raise ValueError(f"expected a number in {text!r}, got {tok!r}")
        return int(tok)

    def product() -> Expr:
        e = atom()
        while peek() == "*":
            take()
            e = ("*", (e, atom()))
        return e

    def total() -> Expr:
        e = product()
        while peek() in ("+", "-"):
            op, rhs = take(), product()
            if op == "+" and not isinstance(e, int) and e[0] == "+":
                e = ("+", e[1] + (rhs,))  # keep sums n-ary: a+b+c
            else:
                e = (op, (e, rhs))
        return e

    e = total()
    if peek() is not None:
        raise ValueError(f"unexpected {peek()!r} in {text!r}")
    return e


def canonical_key(e: Expr) -> str:
    """Order-insensitive identity of a problem: terms of sums and factors of products sorted."""
    if isinstance(e, int):
        return str(e)
    op, args = e
    keys = [canonical_key(a) for a in args]
    if op in "+*":
        keys.sort()
    return f"{op}({','.join(keys)})"


def split_of(e: Expr | str) -> str:
    """"test" for about TEST_FRACTION of all problems, else "train"; depends on the problem only."""
    return hashed_split(canonical_key(parse_expr(e) if isinstance(e, str) else e), TEST_FRACTION)


# --------------------------------------------------------------------------- problem families


def _num(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 2, 10**digits - 1)


def _add(rng, d):
    k = rng.choice(d["add_terms"])
    return ("+", tuple(_num(rng, rng.choice(d["add_digits"])) for _ in range(k)))


def _mul(rng, d):
    a, b = _num(rng, d["mul_top"]), _num(rng, rng.choice(d["mul_bottom"]))
    return ("*", (a, b) if rng.random() < 0.8 else (b, a))


def _muladd(rng, d):
    prod = ("*", (_num(rng, d["mul_top"]), _num(rng, rng.choice(d["mul_bottom"]))))
    c = _num(rng, d["offset"])
    if rng.random() < 0.5 or evaluate(prod) <= c:
        return ("+", (prod, c))
    return ("-", (prod, c))


def _chain(rng, d):
    total = ("+", (_num(rng, 2), _num(rng, 2)))
    prod = ("*", (total, _num(rng, d["chain_factor"])))
    sub = rng.randint(10, min(10 ** d["offset"] - 1, evaluate(prod) - 1))
    return ("-", (prod, sub))


def _digit_sum(rng, d):
    """A running sum of single digits, e.g. 7+5+9+3+8: every step is a small fact (sum + digit), so a
    tiny model can learn the steps quickly, while the one-shot answer needs the whole sum at once."""
    return ("+", tuple(rng.randint(1, 9) for _ in range(rng.choice(d["digit_terms"]))))


def _muldiff(rng, d):
    """The difference of two products, a*b-c*d, drawn so that it is a two-digit number (10..99): the
    operands and the answer are all 1-2 digit o200k chunks (tokens every task uses), while the answer
    needs both products. The python tool's family (conf/experiment/tool.yaml): a tiny model copies
    frequent chunks from a tool message into its final, not rare 3-digit ones (README "Code and the
    python tool in the tiny world")."""
    while True:
        a, b = _num(rng, d["mul_top"]), _num(rng, rng.choice(d["mul_bottom"]))
        c, f = _num(rng, d["mul_top"]), _num(rng, rng.choice(d["mul_bottom"]))
        if 10 <= a * b - c * f <= 99:
            return ("-", (("*", (a, b)), ("*", (c, f))))


FAMILIES = {"add": _add, "mul": _mul, "muladd": _muladd, "chain": _chain, "digit_sum": _digit_sum,
            "muldiff": _muldiff}

# Digit counts per difficulty. Level 2 (default) is the tiny-world setting: 2-digit x 2-digit
# products and 3-term sums, where one-shot answers are hard and column arithmetic is not.
DIFFICULTY = {
    1: dict(add_terms=(2,), add_digits=(2,), mul_top=2, mul_bottom=(1,), offset=2, chain_factor=1, digit_terms=(4, 5)),
    2: dict(add_terms=(2, 3), add_digits=(2, 3), mul_top=2, mul_bottom=(1, 2), offset=2,
            chain_factor=1, digit_terms=(5, 6)),
    3: dict(add_terms=(3,), add_digits=(3, 4), mul_top=3, mul_bottom=(1, 2), offset=3,
            chain_factor=2, digit_terms=(6, 7)),
}


@dataclass
class MathEnv:
    """Seeded arithmetic task source. `tasks("train"|"test", n, seed)` never mixes the splits.

    >>> env = MathEnv(seed=0)
    >>> t = env.tasks("test", 1)[0]
    >>> t.question.startswith("Compute ") and split_of(t.metadata["expr"]) == "test"
    True
    """

    name = ENV_NAME
    seed: int = 0
    difficulty: int = 2  # 1..3; see DIFFICULTY. Level 3 high-effort traces exceed 256 tokens
    families: tuple[str, ...] = ("add", "mul", "muladd", "chain")
    digit_sum_trace: str = "stepwise"  # DIGIT_SUM_TRACES: digit sums' high/medium traces ("rewrite": _rewrite_trace)
    tool_traces: float = 0.0  # share of problems whose SFT trace calls the python tool (`tool_solution`)

    def __post_init__(self):
        if not 0.0 <= self.tool_traces <= 1.0:
            raise ValueError(f"tool_traces={self.tool_traces} must be in [0, 1]")
        if self.difficulty not in DIFFICULTY:
            raise ValueError(f"difficulty={self.difficulty} is not one of {sorted(DIFFICULTY)}")
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"families={self.families} must be a non-empty subset of {sorted(FAMILIES)}")
        if self.digit_sum_trace not in DIGIT_SUM_TRACES:
            raise ValueError(f"digit_sum_trace={self.digit_sum_trace!r} is not one of {DIGIT_SUM_TRACES}")

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """`n` distinct problems of `split`, deterministic in (env seed, `seed`, split, difficulty)."""
        check_split(split)
        rng = random.Random(f"math:{self.seed}:{seed}:{split}:{self.difficulty}")
        spec = DIFFICULTY[self.difficulty]

        def draw():
            e = FAMILIES[rng.choice(self.families)](rng, spec)
            return canonical_key(e), split_of(e), lambda: self._task(e, split)

        return draw_distinct(split, n, draw, n * 200 + 1000,
                             f"problems at difficulty {self.difficulty} (raise the difficulty for more)")

    def _task(self, e: Expr, split: str) -> Task:
        expr = render(e)
        key = canonical_key(e)
        return Task(
            task_id=f"math-{hashlib.sha256(key.encode()).hexdigest()[:12]}",
            env=ENV_NAME,
            question=f"Compute {expr}.",
            metadata={"answer": str(evaluate(e)), "expr": expr, "split": split,
                      "difficulty": self.difficulty,
                      **({"trace": self.digit_sum_trace} if self.digit_sum_trace != "stepwise" else {})},
        )

    def solution(self, task: Task, effort: str) -> tuple[str, str] | ToolTrace:
        if self.tool_traces and unit_hash(f"tool:{task.task_id}") < self.tool_traces:
            return tool_solution(task, effort)
        return solution(task, effort)

    def vocabulary_corpus(self) -> list[str]:
        return vocabulary_corpus()


# --------------------------------------------------------------------------- solution traces


def _digits(n: int) -> list[int]:
    """Digits from units upward."""
    return [int(c) for c in reversed(str(n))]


def _order(vals: list[int]) -> tuple[int, int]:
    """(top, bottom) of a long multiplication: the question's order unless the second is longer."""
    a, b = vals
    return (b, a) if len(str(b)) > len(str(a)) else (a, b)


def _column_add(terms: list[int]) -> list[str]:
    """One clause per column, units first; the last column writes its full sum."""
    cols, carry, out = max(len(str(t)) for t in terms), 0, []
    for i in range(cols):
        ds = [_digits(t)[i] for t in terms if len(str(t)) > i] + ([carry] if carry else [])
        s, last = sum(ds), i == cols - 1
        if len(ds) == 1:
            clause = f"{PLACES[i]} {s}"
        else:
            clause = f"{PLACES[i]} {'+'.join(map(str, ds))}={s}"
        if s >= 10 and not last:
            clause += f", write {s % 10} carry {s // 10}"
        carry = s // 10
        out.append(clause + ".")
    return out


def _column_sub(x: int, y: int) -> list[str]:
    """Column subtraction x-y (x >= y) with borrows, units first."""
    xs, ys, borrow, out = _digits(x), _digits(y), 0, []
    for i, xd in enumerate(xs):
        yd = ys[i] if i < len(ys) else 0
        parts = [str(xd)] + ([str(borrow)] if borrow else []) + ([str(yd)] if i < len(ys) else [])
        val = xd - borrow - yd
        if len(parts) == 1:
            clause = f"{PLACES[i]} {xd}"
        elif val < 0:
            clause = f"{PLACES[i]} {'-'.join(parts)}, borrow, 1{'-'.join(parts)}={val + 10}"
        else:
            clause = f"{PLACES[i]} {'-'.join(parts)}={val}"
        borrow = 1 if val < 0 else 0
        out.append(clause + ".")
    return out


def _mul_by_digit(top: int, d: int) -> list[str]:
    """Long multiplication of `top` by one digit: one clause per digit of `top`."""
    if d == 0:
        return [f"{top}*0=0."]
    ds, carry, out = _digits(top), 0, []
    for i, td in enumerate(ds):
        p = td * d
        clause = f"{td}*{d}={p}" + (f", {p}+{carry}={p + carry}" if carry else "")
        p += carry
        if i < len(ds) - 1:
            clause += f", write {p % 10}" + (f" carry {p // 10}" if p >= 10 else "")
            carry = p // 10
        out.append(clause + ".")
    return out


def _high_op(op: str, vals: list[int], label: str) -> list[str]:
    """Digit-level lines for one operation on already-computed operand values."""
    if op == "+":
        return [f"{'+'.join(map(str, vals))}: " + " ".join(_column_add(vals)) + f" So {label}."]
    if op == "-":
        return [f"{vals[0]}-{vals[1]}: " + " ".join(_column_sub(*vals)) + f" So {label}."]
    top, bottom = _order(vals)
    if bottom < 10:
        return [f"{top}*{bottom}: " + " ".join(_mul_by_digit(top, bottom)) + f" So {label}."]
    lines, partials = [], []
    for i, d in enumerate(_digits(bottom)):
        shift = 10**i
        body = " ".join(_mul_by_digit(top, d))
        tail = f" So {top}*{d}={top * d}" + (f", {top}*{d * shift}={top * d * shift}." if i and d else ".")
        lines.append(f"{top}*{d}: {body}{tail}" if d else body)
        if d:
            partials.append(top * d * shift)
    if len(partials) > 1:
        lines.append(f"{'+'.join(map(str, partials))}: " + " ".join(_column_add(partials)) + f" So {label}.")
    return lines


def _medium_op(op: str, vals: list[int]) -> str:
    """One line of key steps: running sums, place-value splits."""
    if op == "+":
        acc, parts = vals[0], []
        for v in vals[1:]:
            parts.append(f"{acc}+{v}={acc + v}")
            acc += v
        return ", ".join(parts) + "."
    if op == "-":
        x, y = vals
        if y < 10:
            return f"{x}-{y}={x - y}."
        tens, units = y - y % 10, y % 10
        return f"{x}-{tens}={x - tens}, {x - tens}-{units}={x - y}." if units else f"{x}-{y}={x - y}."
    top, bottom = _order(vals)
    split_bottom = bottom >= 10
    split, other = (bottom, top) if split_bottom else (top, bottom)
    pieces = [int(c) * 10**i for i, c in enumerate(reversed(str(split))) if c != "0"][::-1]
    if len(pieces) == 1:
        return f"{top}*{bottom}={top * bottom}."
    prods = [p * other for p in pieces]
    terms = "+".join(f"{other}*{p}" if split_bottom else f"{p}*{other}" for p in pieces)
    return f"{top}*{bottom} = {terms} = {'+'.join(map(str, prods))} = {top * bottom}."


def _check(e: Expr) -> str:
    """A closing check by a different route: undo the last +/-, or re-split a product."""
    op, args = e
    vals = [evaluate(a) for a in args]
    total = evaluate(e)
    if op == "+":
        return f"Check: {total}-{vals[-1]}={total - vals[-1]}."
    if op == "-":
        return f"Check: {total}+{vals[1]}={vals[0]}."
    top, bottom = _order(vals)
    pieces = [int(c) * 10**i for i, c in enumerate(reversed(str(top))) if c != "0"][::-1]
    prods = [p * bottom for p in pieces]
    if len(pieces) == 1:
        return f"Check: {bottom}*{top}={total}."
    return f"Check: {'+'.join(f'{p}*{bottom}' for p in pieces)} = {'+'.join(map(str, prods))} = {total}."


def _walk(e: Expr, effort: str, lines: list[str]) -> int:
    """Post-order: solve sub-expressions first, then this operation; returns its value."""
    if isinstance(e, int):
        return e
    op, args = e
    vals = [_walk(a, effort, lines) for a in args]
    value = evaluate((op, tuple(vals)))
    sym = "+" if op == "+" else op
    label = f"{sym.join(map(str, vals))}={value}"
    if op == "*" and all(isinstance(a, int) for a in args):
        label = f"{render(e)}={value}"
    lines.extend(_high_op(op, vals, label) if effort == "high" else [_medium_op(op, vals)])
    return value


def _is_digit_sum(e: Expr) -> bool:
    return not isinstance(e, int) and e[0] == "+" and len(e[1]) > 2 and all(
        isinstance(a, int) and 0 <= a <= 9 for a in e[1])


DIGIT_SUM_TRACES = ("stepwise", "rewrite")  # MathEnv.digit_sum_trace


def _rewrite_trace(terms: tuple, effort: str, width: int) -> str:
    """Digit sums as rewrites (issue 14 world study): each line is the previous one with its first two
    terms merged and "+0" appended, every line `width` terms wide, so each token of a line copies the
    token one line up at one fixed distance; low writes the first line only, medium three, high all.

    >>> print(_rewrite_trace((4, 8, 9, 2), "high", 5))
    4+8+9+2+0
    12+9+2+0+0
    21+2+0+0+0
    23+0+0+0+0
    >>> len(_rewrite_trace((4, 8, 9, 2), "medium", 5).splitlines())
    3
    """
    cur = list(terms) + [0] * (width - len(terms))
    lines = ["+".join(map(str, cur))]
    while any(cur[1:]):
        cur = [cur[0] + cur[1]] + cur[2:] + [0]
        lines.append("+".join(map(str, cur)))
    return "\n".join(lines[: {"low": 1, "medium": 3, "high": len(lines)}[effort]])


def _digit_sum_trace(terms: tuple, effort: str) -> str:
    """medium: two digits per step ("7+5+9=21, 21+3+8=32."); high: one digit per line + a check."""
    if effort == "medium":
        steps, total = [], terms[0]
        for i in range(1, len(terms), 2):
            chunk = terms[i : i + 2]
            new = total + sum(chunk)
            steps.append(f"{total}+{'+'.join(map(str, chunk))}={new}")
            total = new
        return ", ".join(steps) + "."
    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total}+{t}={total + t}.")
        total += t
    back = [f"{total}-{terms[-1]}={total - terms[-1]}"]
    return "\n".join(lines) + "\nCheck: " + ", ".join(back) + "."


def solution(task: Task, effort: str) -> tuple[str, str]:
    """(analysis, final) for a math task in the style of `effort`; final is the bare integer.

    >>> t = Task("x", "math", "Compute 47+86.", {"answer": "133", "expr": "47+86"})
    >>> solution(t, "low")
    ('47+86=133.', '133')
    >>> print(solution(t, "high")[0])
    47+86: units 7+6=13, write 3 carry 1. tens 4+8+1=13. So 47+86=133.
    Check: 133-86=47.
    """
    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is not one of {EFFORTS}")
    expr = task.metadata.get("expr")
    if expr is None:
        raise ValueError(f"task {task.task_id} has no metadata['expr']; solution() needs a MathEnv task")
    e = parse_expr(expr)
    answer = str(evaluate(e))
    if answer != str(task.metadata.get("answer", answer)):
        raise ValueError(f"task {task.task_id}: {expr} = {answer}, but metadata says {task.metadata['answer']}")
    if task.metadata.get("trace") == "rewrite" and _is_digit_sum(e):
        width = max(DIFFICULTY[task.metadata.get("difficulty", 1)]["digit_terms"])
        return _rewrite_trace(e[1], effort, max(width, len(e[1]))), answer
    if effort == "low" or isinstance(e, int):
        return f"{expr}={answer}.", answer
    if _is_digit_sum(e):
        return _digit_sum_trace(e[1], effort), answer
    lines: list[str] = []
    _walk(e, effort, lines)
    if effort == "high":
        lines.append(_check(e))
    return "\n".join(lines), answer


def tool_solution(task: Task, effort: str) -> ToolTrace:
    """The task solved with the python tool: the trace prints the expression and gives the tool's
    answer as the final. low calls at once, medium says what it computes first, high also reads the
    answer back before the final.

    >>> t = Task("x", "math", "Compute 47*86.", {"answer": "4042", "expr": "47*86"})
    >>> tool_solution(t, "high")
    ToolTrace(steps=('Use python for 47*86.', ToolCall(code='print(47*86)', output='4042\\n'), 'So 47*86=4042.'), final='4042')
    """
    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is not one of {EFFORTS}")
    expr, answer = task.metadata["expr"], task.metadata["answer"]
    call = ToolCall(f"print({expr})", f"{answer}\n")  # what the sandbox prints: rl/tools.py answer_text
    steps = {"low": (call,), "medium": (f"Use python for {expr}.", call),
             "high": (f"Use python for {expr}.", call, f"So {expr}={answer}.")}[effort]
    return ToolTrace(steps, answer)


# --------------------------------------------------------------------------- vocabulary


def vocabulary_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Strings covering every token the tasks can produce: questions, traces at all efforts,
    finals, and every 1-3 digit chunk ("7", "07", "007" ... "999"; o200k splits numbers into such
    chunks). Harmony scaffolding (system prompt, special tokens) is not included."""
    out = [" ".join(f"{i:0{w}d}" for i in range(10**w)) for w in (1, 2, 3)]
    out.append(" ".join(PLACES) + " write carry borrow So Check: Compute")
    for level in sorted(DIFFICULTY):
        env = MathEnv(seed=seed, difficulty=level)
        for split in ("train", "test"):
            for task in env.tasks(split, max(1, n // 6)):
                out.append(task.question)
                for effort in EFFORTS:
                    analysis, final = solution(task, effort)
                    out += [analysis, final]
    return out


def _main() -> None:
    from envs.harmony import encode

    env = MathEnv(seed=0)
    tasks = env.tasks("train", 300)
    print(tasks[0].question)
    for effort in EFFORTS:
        print(f"--- {effort}\n{solution(tasks[0], effort)[0]}")
    for level in sorted(DIFFICULTY):
        sample = MathEnv(seed=0, difficulty=level).tasks("train", 300)
        stats = []
        for effort in EFFORTS:
            counts = [len(encode(solution(t, effort)[0])) for t in sample]
            stats.append(f"{effort} mean {sum(counts) / len(counts):.1f} max {max(counts)}")
        print(f"difficulty {level}: " + "; ".join(stats))


if __name__ == "__main__":
    _main()
