"""Procedural function-writing tasks for the tiny world: hidden tests, held-out splits, effort-styled CoT.

What
- `CodeEnv(seed, families)` yields `Task`s such as "Write a Python function f(x) that returns x*3+2."
  with `metadata["tests"]` (hidden assert statements, checked by the "code" reward in the sandbox),
  `metadata["entry_point"]` ("f"), `metadata["reference"]` (a solution) and `metadata["function"]`
  (the canonical function, below).
- Families (the phrasing) over three kinds of integer functions (what is computed):

  | family     | kind      | question                                                       |
  |------------|-----------|----------------------------------------------------------------|
  | expr       | linear    | ... f(x) that returns x*3+2.   (or 3*x+2)                      |
  | expr2      | affine2   | ... f(x, y) that returns x*3+y*4-5.                            |
  | words      | linear    | ... f(x) that returns x times 3 plus 2.                        |
  | examples   | linear    | ... f(x) for the line with f(1)=5 and f(3)=11.                 |
  | piecewise  | piecewise | ... f(x) that returns x*3 if x > 4, otherwise x+2.             |

  linear: m*x+c with m in 2..12, c in -50..50; affine2: a*x+b*y+c with a, b in 2..9; piecewise:
  x*a if x > t else x+b with t in 0..9, a in 2..9, b in 1..20.
- Train and test never overlap: a task's split is a pure function of its *canonical function*
  (kind and parameters, e.g. "linear(3,2)"), hashed with sha256; about `TEST_FRACTION` of the
  functions are test functions. So a held-out function is never seen in training in any phrasing
  ("x*3+2", "3*x+2", "x times 3 plus 2", or through two of its values).
- Hidden tests: five inputs per task, never the ones a question shows, each
  `assert type(f(7)) is int and f(7) == 23` (the type check defeats an always-equal object).
- `solution(task, effort) -> (analysis, final)` for the SFT cold start: low = the function in one
  line, medium = the key step and one check, high = every arithmetic step and checks on two inputs
  (for `examples`, solving for slope and offset is where the thinking helps). The final is always
  the same shape: a ```python block with `def f(...):` and the return (and an `if` for piecewise).
- `vocabulary_corpus(n)` returns strings covering every token the tasks and traces produce.

Run `python -m envs.code_tasks` to print one task per family and its traces.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from envs.draw import check_split, draw_distinct, hashed_split
from envs.types import EFFORTS, Task

ENV_NAME = "code"
TEST_FRACTION = 0.1
FAMILIES = ("expr", "expr2", "words", "examples", "piecewise")
KIND_OF = {"expr": "linear", "expr2": "affine2", "words": "linear", "examples": "linear",
           "piecewise": "piecewise"}
SLOPES, OFFSETS = range(2, 13), range(-50, 51)
COEFS, THRESHOLDS, STEPS = range(2, 10), range(0, 10), range(1, 21)


# --------------------------------------------------------------------------- functions


def canonical(kind: str, params: tuple[int, ...]) -> str:
    """The function's identity, independent of how a question phrases it: "linear(3,2)"."""
    return f"{kind}({','.join(map(str, params))})"


def split_of(function: str) -> str:
    """"test" for about TEST_FRACTION of all functions, else "train"; depends on the function only."""
    return hashed_split(function, TEST_FRACTION)


def evaluate(kind: str, params: tuple[int, ...], args: tuple[int, ...]) -> int:
    if kind == "linear":
        (m, c), (x,) = params, args
        return m * x + c
    if kind == "affine2":
        (a, b, c), (x, y) = params, args
        return a * x + b * y + c
    (t, a, b), (x,) = params, args
    return x * a if x > t else x + b


def _signed(c: int) -> str:
    """"+2", "-4", or "" for 0: the tail of an expression."""
    return f"+{c}" if c > 0 else (f"-{-c}" if c < 0 else "")


def _linear_expr(m: int, c: int, slope_first: bool = False) -> str:
    return (f"{m}*x" if slope_first else f"x*{m}") + _signed(c)


def _test_inputs(kind: str, params: tuple[int, ...], shown: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Five inputs the question does not show; piecewise tests sit on both sides of the threshold."""
    if kind == "affine2":
        return [(0, 0), (1, 2), (3, -1), (5, 4), (-2, 7)]
    if kind == "piecewise":
        t = params[0]
        return [(x,) for x in (t, t + 1, t - 3, t + 6, -2)]
    pool = [x for x in (0, 4, 7, -3, 10, 12, 9) if x not in shown]
    return [(x,) for x in pool[:5]]


def _call(args: tuple[int, ...]) -> str:
    return f"f({', '.join(map(str, args))})"


# --------------------------------------------------------------------------- questions and code


def _draw(family: str, rng: random.Random) -> tuple[tuple[int, ...], dict]:
    """Parameters of the family's kind and the phrasing choices of one question."""
    if family == "expr2":
        return (rng.choice(COEFS), rng.choice(COEFS), rng.choice(OFFSETS)), {}
    if family == "piecewise":
        return (rng.choice(THRESHOLDS), rng.choice(COEFS), rng.choice(STEPS)), {}
    params = (rng.choice(SLOPES), rng.choice(OFFSETS))
    if family == "expr":
        return params, {"slope_first": rng.random() < 0.5}
    if family == "examples":
        p, q = sorted(rng.sample(range(0, 7), 2))
        return params, {"points": (p, q)}
    return params, {}


def _question(family: str, params: tuple[int, ...], style: dict) -> str:
    head = "Write a Python function"
    if family == "expr":
        return f"{head} f(x) that returns {_linear_expr(*params, style['slope_first'])}."
    if family == "expr2":
        a, b, c = params
        return f"{head} f(x, y) that returns x*{a}+y*{b}{_signed(c)}."
    if family == "words":
        m, c = params
        tail = f" plus {c}" if c > 0 else (f" minus {-c}" if c < 0 else "")
        return f"{head} f(x) that returns x times {m}{tail}."
    if family == "examples":
        p, q = style["points"]
        fp, fq = (evaluate("linear", params, (x,)) for x in (p, q))
        return f"{head} f(x) for the line with f({p})={fp} and f({q})={fq}."
    t, a, b = params
    return f"{head} f(x) that returns x*{a} if x > {t}, otherwise x+{b}."


def _code(family: str, params: tuple[int, ...], style: dict) -> str:
    if family == "expr2":
        a, b, c = params
        return f"def f(x, y):\n    return x*{a}+y*{b}{_signed(c)}"
    if family == "piecewise":
        t, a, b = params
        return f"def f(x):\n    if x > {t}:\n        return x*{a}\n    return x+{b}"
    return f"def f(x):\n    return {_linear_expr(*params, style.get('slope_first', False))}"


@dataclass
class CodeEnv:
    """Seeded function-writing task source. `tasks("train"|"test", n, seed)` never mixes the splits.

    >>> t = CodeEnv(seed=0).tasks("test", 1)[0]
    >>> t.question.startswith("Write a Python function f(") and split_of(t.metadata["function"]) == "test"
    True
    """

    name = ENV_NAME
    seed: int = 0
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self):
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"families={self.families} must be a non-empty subset of {list(FAMILIES)}")

    def tasks(self, split: str, n: int, seed: int | None = None) -> list[Task]:
        """`n` distinct questions of `split`, deterministic in (env seed, `seed`, split, families)."""
        check_split(split)
        rng = random.Random(f"code:{self.seed}:{seed}:{split}:{','.join(self.families)}")

        def draw():
            family = rng.choice(self.families)
            params, style = _draw(family, rng)
            function = canonical(KIND_OF[family], params)
            question = _question(family, params, style)
            return question, split_of(function), lambda: self._task(family, params, style, question, function, split)

        return draw_distinct(split, n, draw, n * 200 + 1000,
                             f"questions for families {list(self.families)} (add families for more)")

    def _task(self, family: str, params: tuple[int, ...], style: dict, question: str, function: str,
              split: str) -> Task:
        kind = KIND_OF[family]
        shown = style.get("points", ())
        tests = [f"assert type({_call(a)}) is int and {_call(a)} == {evaluate(kind, params, a)}"
                 for a in _test_inputs(kind, params, shown)]
        return Task(
            task_id=f"code-{hashlib.sha256(question.encode()).hexdigest()[:12]}",
            env=ENV_NAME,
            question=question,
            metadata={"tests": tests, "entry_point": "f", "reference": _code(family, params, style),
                      "function": function, "family": family, "split": split},
        )

    def solution(self, task: Task, effort: str) -> tuple[str, str]:
        return solution(task, effort)

    def vocabulary_corpus(self) -> list[str]:
        """Strings covering every token this env's tasks, traces and finals produce (the tiny build)."""
        return vocabulary_corpus()


# --------------------------------------------------------------------------- solution traces


def _parse(task: Task) -> tuple[str, tuple[int, ...], dict]:
    """(family, params, style) back from a task's metadata and question."""
    family, function = task.metadata.get("family"), task.metadata.get("function")
    if family not in FAMILIES or not function:
        raise ValueError(f"task {task.task_id} has no code-task metadata (family, function); "
                         "solution() needs a CodeEnv task")
    params = tuple(int(p) for p in function[function.index("(") + 1: -1].split(","))
    style: dict = {}
    if family == "expr":
        style["slope_first"] = f"{params[0]}*x" in task.question
    elif family == "examples":
        left = task.question.split("with ", 1)[1]
        style["points"] = tuple(int(part.split("(")[1].split(")")[0]) for part in left.split(" and "))
    return family, params, style


def _check_linear(m: int, c: int, x: int) -> str:
    """ "Check f(4): 4*3=12, 12+2=14." """
    steps = f"{x}*{m}={x * m}"
    if c:
        steps += f", {x * m}{_signed(c)}={x * m + c}"
    return f"Check f({x}): {steps}."


def _linear_trace(family: str, params: tuple[int, ...], style: dict, effort: str) -> str:
    m, c = params
    expr = _linear_expr(m, c, style.get("slope_first", False))
    if family == "examples":
        (p, q) = style["points"]
        fp, fq = m * p + c, m * q + c
        if effort == "low":
            return f"f(x) = {expr}."
        if effort == "medium":
            return f"slope ({fq}-{fp})/({q}-{p}) = {m}, offset {fp}-{m}*{p} = {c}. f(x) = {expr}."
        return "\n".join([
            f"f({q})-f({p}) = {fq}-{fp} = {fq - fp}, and {q}-{p} = {q - p}, so the slope is {fq - fp}/{q - p} = {m}.",
            f"f({p}) = {m}*{p}+c = {m * p}+c = {fp}, so c = {fp}-{m * p} = {c}.",
            _check_linear(m, c, q),
            f"So f(x) = {expr}."])
    if family == "words" and effort == "medium":
        word = "plus" if c > 0 else "minus"
        return f"x times {m} is x*{m}" + (f", {word} {abs(c)} gives {expr}." if c else ".")
    if effort == "low":
        return f"f(x) = {expr}."
    if effort == "medium":
        return f"f(x) = {expr}. {_check_linear(m, c, 2)}"
    return "\n".join([f"Need f(x) = {expr}.", _check_linear(m, c, 0), _check_linear(m, c, 4),
                      f"So return {expr}."])


def _affine2_trace(params: tuple[int, ...], effort: str) -> str:
    a, b, c = params
    expr = f"x*{a}+y*{b}{_signed(c)}"
    if effort == "low":
        return f"f(x, y) = {expr}."
    check = f"Check f(1, 2): 1*{a}={a}, 2*{b}={2 * b}, {a}+{2 * b}={a + 2 * b}" + (
        f", {a + 2 * b}{_signed(c)}={a + 2 * b + c}." if c else ".")
    if effort == "medium":
        return f"f(x, y) = {expr}. {check}"
    return "\n".join([f"Need f(x, y) = {expr}.", check, f"So return {expr}."])


def _piecewise_trace(params: tuple[int, ...], effort: str) -> str:
    t, a, b = params
    if effort == "low":
        return f"if x > {t} return x*{a}, else x+{b}."
    if effort == "medium":
        return f"Two cases: x > {t} gives x*{a}, otherwise x+{b}. f({t + 1}) = {(t + 1) * a}."
    return "\n".join([
        f"Case x > {t}: return x*{a}. f({t + 1}) = {t + 1}*{a} = {(t + 1) * a}.",
        f"Case x <= {t}: return x+{b}. f({t}) = {t}+{b} = {t + b}.",
        f"The branch point is {t}."])


def solution(task: Task, effort: str) -> tuple[str, str]:
    """(analysis, final) for a code task in the style of `effort`; final is one ```python block.

    >>> t = CodeEnv().tasks("train", 1)[0]
    >>> analysis, final = solution(t, "high")
    >>> final == "```python\\n" + t.metadata["reference"] + "\\n```"
    True
    """
    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is not one of {EFFORTS}")
    family, params, style = _parse(task)
    kind = KIND_OF[family]
    if kind == "linear":
        analysis = _linear_trace(family, params, style, effort)
    elif kind == "affine2":
        analysis = _affine2_trace(params, effort)
    else:
        analysis = _piecewise_trace(params, effort)
    return analysis, f"```python\n{_code(family, params, style)}\n```"


# --------------------------------------------------------------------------- vocabulary


def vocabulary_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Strings covering every token the tasks can produce: questions, traces at all efforts, finals,
    the hidden tests, and every 1-3 digit chunk (o200k splits numbers into such chunks). Harmony
    scaffolding (system prompt, special tokens) is not included."""
    out = [" ".join(f"{i:0{w}d}" for i in range(10**w)) for w in (1, 2, 3)]
    for family in FAMILIES:
        env = CodeEnv(seed=seed, families=(family,))
        for split, k in (("train", n // 2), ("test", n // 10)):  # the test split holds ~TEST_FRACTION
            for task in env.tasks(split, max(1, k)):
                out.append(task.question)
                out += task.metadata["tests"]
                for effort in EFFORTS:
                    out += list(solution(task, effort))
    return out


def _main() -> None:
    from envs.harmony import encode

    for family in FAMILIES:
        task = CodeEnv(seed=0, families=(family,)).tasks("train", 1)[0]
        print(f"=== {family}: {task.question}\n{task.metadata['tests'][0]}")
        for effort in EFFORTS:
            analysis, final = solution(task, effort)
            print(f"--- {effort}\n{analysis}\n{final}")
        sample = CodeEnv(seed=0, families=(family,)).tasks("train", 200)
        print("CoT tokens: " + "; ".join(
            f"{e} {sum(len(encode(solution(t, e)[0])) for t in sample) / len(sample):.1f}" for e in EFFORTS))


if __name__ == "__main__":
    _main()
