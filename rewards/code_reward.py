"""Verifiable code reward: the final channel's code runs against hidden tests in the sandbox.

What
- `extract_code(final)`: the last ```python (or ```py, or unlabelled) fenced block of the final
  answer; an unterminated fence runs to the end; text without fences is taken as bare code. Only
  blank lines around it are dropped, so an indented function body stays indented.
- `run_tests(code, tests, ...) -> TestReport`: one status per test, "pass", "wrong_answer",
  "runtime_error", "timeout" or "compile_error", from one sandboxed run of rewards/code_harness.py
  (its docstring has the three test forms: assert statements, stdin/stdout pairs, call/expected).
  `submit_tests(pool, ...)` starts one without waiting (`.report()` waits), so that many programs
  run at once on a `SandboxPool` (the reward scores a batch that way).
- `score_code(code, tests, mode="pass_rate", ...) -> float`: pass_rate = passed / len(tests);
  all_pass = 1.0 only if every test passed (HumanEval's pass@1 criterion, Chen et al. 2021).
- Reward "code" (`CodeReward`; options `mode`, `timeout_s` per test, `memory_mb`, `max_workers`
  (concurrent sandboxes; default half the cores), `bwrap` (its path, when not on PATH)):
  applies to samples whose metadata has "tests" (else None). Parts: `pass_rate`, `all_pass`,
  `format` (1 when code was found in a well-formed final answer), and the fraction of tests per
  failure kind: `compile_error`, `runtime_error`, `timeout`, `wrong_answer`. Task metadata may add
  `setup` (code run before the solution, e.g. HumanEval's prompt with its imports) and
  `entry_point` (the function call/expected tests call).

Untrusted output never raises: garbage, syntax errors, non-UTF-8 text (lone surrogates), null
bytes, infinite loops, floods of output, fork or memory bombs, `sys.exit(0)` before the tests: each
ends as statuses and a score. What does raise is our side: malformed tests in task metadata
(`ValueError`) and a missing sandbox (`SandboxUnavailable`, at reward construction already: a run
with a code term refuses to start rather than execute anything unsandboxed).

Time: each test has `timeout_s` inside the runner (SIGALRM); the sandbox's wall clock is
timeout_s * (tests + 1) + 2 s for the whole program, after which every test without a verdict is a
timeout. Measured on the 2-core box under load from other jobs: HumanEval's 164 canonical
solutions in 12-16 s on 2 sandboxes (~0.1-0.2 s each, mostly sandbox and interpreter start).
"""
from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from envs.types import Sample
from rewards.registry import register_reward
from rewards.sandbox import ExecResult, SandboxConfig, SandboxPool, check_sandbox, default_pool
from rewards.types import RewardResult

HARNESS = Path(__file__).with_name("code_harness.py")
STATUSES = ("pass", "wrong_answer", "runtime_error", "timeout", "compile_error")
FAILURES = STATUSES[1:]
MODES = ("pass_rate", "all_pass")
DEFAULT_TIMEOUT_S = 3.0  # per test
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = ("python", "py", "python3", "")


def extract_code(final: str | None) -> str | None:
    """The program in a final answer, or None when there is none.

    >>> extract_code("Here:\\n```python\\ndef f(x):\\n    return x+1\\n```\\nDone.")
    'def f(x):\\n    return x+1'
    >>> extract_code("def f(x): return 2"), extract_code("```\\n\\n```"), extract_code(None)
    ('def f(x): return 2', None, None)
    """
    if not final or not final.strip():
        return None
    if "```" in final:
        blocks = [body for tag, body in _FENCE.findall(final) if tag.lower() in _PYTHON_TAGS]
        code = blocks[-1] if blocks else ""
    else:
        code = final
    code = re.sub(r"^\s*\n", "", code).rstrip()
    return code or None


@dataclass
class TestReport:
    """Per-test statuses of one program, and what the sandbox saw."""

    statuses: list[str]
    error: str = ""  # the first failure's message (compile error, exception, timeout...)
    result: ExecResult | None = field(default=None, repr=False)

    @property
    def pass_rate(self) -> float:
        return self.statuses.count("pass") / len(self.statuses) if self.statuses else 0.0

    @property
    def all_pass(self) -> float:
        return float(bool(self.statuses) and all(s == "pass" for s in self.statuses))

    def score(self, mode: str) -> float:
        return self.pass_rate if mode == "pass_rate" else self.all_pass

    def fractions(self) -> dict[str, float]:
        n = max(1, len(self.statuses))
        return {kind: self.statuses.count(kind) / n for kind in FAILURES}


def check_tests(tests) -> list:
    """`tests` as a list of the harness's test forms; ValueError naming the first bad one."""
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, Sequence) or not tests:
        raise ValueError(f"tests must be a non-empty list, got {type(tests).__name__} {tests!r:.80}")
    for i, t in enumerate(tests):
        ok = (isinstance(t, str) or (isinstance(t, Mapping) and ({"input", "output"} <= t.keys()
                                                                  or {"args", "expected"} <= t.keys())))
        if not ok:
            raise ValueError(f"test {i} is {t!r:.80}: give an assert string, {{'input', 'output'}} "
                             "or {'args', 'expected'}")
    return [dict(t) if isinstance(t, Mapping) else t for t in tests]


def _job(code: str, tests: list, setup: str, entry_point: str | None, timeout_s: float) -> tuple[str, str]:
    nonce = secrets.token_hex(16)
    return nonce, json.dumps({"nonce": nonce, "code": code, "setup": setup or "", "tests": tests,
                              "entry_point": entry_point, "timeout_s": timeout_s})


def _report(result: ExecResult, nonce: str, n_tests: int) -> TestReport:
    """Statuses from the runner's nonce-prefixed verdict lines; tests without one are timeouts (the
    wall clock ran out) or runtime errors (the process died)."""
    statuses: list[str | None] = [None] * n_tests
    errors: list[str] = []
    compiled = None
    for line in result.stdout.splitlines():
        if not line.startswith(nonce):
            continue
        try:
            verdict = json.loads(line[len(nonce):])
        except ValueError:
            continue
        if "compile" in verdict:
            compiled = verdict["compile"]
        elif isinstance(verdict.get("test"), int) and 0 <= verdict["test"] < n_tests \
                and verdict.get("status") in STATUSES:
            statuses[verdict["test"]] = verdict["status"]
            if verdict["status"] != "pass" and verdict.get("error"):
                errors.append(str(verdict["error"]))
    if compiled is not None and compiled != "ok":
        return TestReport(["compile_error"] * n_tests, str(compiled), result)
    missing = "timeout" if result.timed_out else "runtime_error"
    if None in statuses:
        why = ("wall-clock timeout" if result.timed_out else "output limit exceeded" if result.output_truncated
               else f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
        errors.append(why)
    return TestReport([s or missing for s in statuses], errors[0] if errors else "", result)


class PendingTests:
    """One submitted program: its future and what is needed to read the verdicts."""

    def __init__(self, future: Future, nonce: str, n_tests: int):
        self.future, self.nonce, self.n_tests = future, nonce, n_tests

    def report(self) -> TestReport:
        return _report(self.future.result(), self.nonce, self.n_tests)


def submit_tests(pool: SandboxPool, code: str, tests, setup: str = "", entry_point: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> PendingTests:
    """Start one program's tests on `pool`; `.report()` waits for its `TestReport`."""
    tests = check_tests(tests)
    nonce, job = _job(code, tests, setup, entry_point, timeout_s)
    wall = timeout_s * (len(tests) + 1) + 2.0
    return PendingTests(pool.submit(_harness_source(), stdin=job, timeout_s=wall), nonce, len(tests))


@functools.cache
def _harness_source() -> str:
    return HARNESS.read_text()


def run_tests(code: str, tests, setup: str = "", entry_point: str | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S, pool: SandboxPool | None = None) -> TestReport:
    """Statuses of `code` against `tests` (one sandboxed run).

    >>> run_tests("def f(x):\\n    return x*3+2", ["assert f(0) == 2", "assert f(1) == 6"]).statuses
    ['pass', 'wrong_answer']
    """
    return submit_tests(pool or default_pool(), code, tests, setup, entry_point, timeout_s).report()


def score_code(code: str, tests, mode: str = "pass_rate", setup: str = "", entry_point: str | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, pool: SandboxPool | None = None) -> float:
    """pass_rate (fraction of tests passed) or all_pass (1.0 iff all pass) of `code`.

    >>> score_code("def f(x):\\n    return x*3+2", ["assert f(0) == 2", "assert f(1) == 6"])
    0.5
    >>> score_code("def f(x) return", ["assert f(0) == 2"], mode="all_pass")
    0.0
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    return run_tests(code, tests, setup, entry_point, timeout_s, pool).score(mode)


@register_reward("code")
class CodeReward:
    """Pass rate (or all-pass) of the final answer's code on the task's hidden tests.

    >>> from envs.types import Transcript
    >>> s = Sample("t", "code", "low", [], [], [], [], Transcript(final="```python\\ndef f(x):\\n    return x+1\\n```"),
    ...            {"tests": ["assert f(1) == 2", "assert f(2) == 4"]})
    >>> r = CodeReward()(s); (r.score, r.parts["all_pass"], r.parts["wrong_answer"])
    (0.5, 0.0, 0.5)
    """

    def __init__(self, mode: str = "pass_rate", timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = 512,
                 max_workers: int | None = None, tests_key: str = "tests", bwrap: str = "bwrap"):
        if mode not in MODES:
            raise ValueError(f"code reward mode={mode!r} is not one of {MODES}")
        if timeout_s <= 0:
            raise ValueError(f"code reward timeout_s={timeout_s} must be positive (seconds per test)")
        self.mode, self.timeout_s, self.tests_key = mode, timeout_s, tests_key
        self.config = SandboxConfig(bwrap=bwrap, memory_mb=memory_mb)
        self.max_workers = max_workers
        check_sandbox(self.config)  # no bubblewrap: fail when the run starts, never run unsandboxed
        self._pool: SandboxPool | None = None

    def __getstate__(self) -> dict:  # picklable (Ray): the thread pool is rebuilt where it is used
        return {**self.__dict__, "_pool": None}

    @property
    def pool(self) -> SandboxPool:
        if self._pool is None:
            self._pool = SandboxPool(self.max_workers, self.config)
        return self._pool

    def __call__(self, sample: Sample) -> RewardResult | None:
        return self.score_batch([sample])[0]

    def score_batch(self, samples: Sequence[Sample]) -> list[RewardResult | None]:
        out: list[RewardResult | None] = [None] * len(samples)
        pending: list[tuple[int, PendingTests]] = []
        for i, s in enumerate(samples):
            tests = s.metadata.get(self.tests_key)
            if tests is None:
                continue  # not a code task
            code = extract_code(s.transcript.final) if s.transcript.format_ok else None
            if code is None:
                out[i] = RewardResult(0.0, {"pass_rate": 0.0, "all_pass": 0.0, "format": 0.0},
                                      {"status": "format", "error": s.transcript.error or "no code in the final answer"})
                continue
            pending.append((i, submit_tests(self.pool, code, tests, s.metadata.get("setup") or "",
                                            s.metadata.get("entry_point"), self.timeout_s)))
        for i, p in pending:
            rep = p.report()
            parts = {"pass_rate": rep.pass_rate, "all_pass": rep.all_pass, "format": 1.0, **rep.fractions()}
            out[i] = RewardResult(rep.score(self.mode), parts, {"statuses": rep.statuses, "error": rep.error})
        return out
