"""The test runner that executes inside the sandbox (rewards/code_reward.py sends it as the program).

Runs under the system python, standard library only; never imports this project. Its stdin is one
JSON job:

    {"nonce": str, "code": str, "setup": str, "tests": [test, ...], "entry_point": str | null,
     "timeout_s": float}

where a test is one of
- a string: Python statements run after the solution, in its namespace (asserts; HumanEval's
  `def check(candidate): ...` followed by `check(entry_point)`); passing = no exception;
- {"input": str, "output": str}: the solution runs as `__main__` with that stdin; passing = its
  stdout equals `output` up to trailing whitespace on each line and trailing blank lines
  (LiveCodeBench "stdin" tests, judges' usual comparison);
- {"args": [...], "expected": value}: `entry_point(*args)` (or `Solution().entry_point(*args)`)
  must equal `expected` after a JSON round trip (LiveCodeBench "functional" tests).

Output, on the original stdout, one line per verdict, each prefixed with the nonce:
    <nonce>{"compile": "ok"}  or  <nonce>{"compile": "SyntaxError: ..."}
    <nonce>{"test": i, "status": "pass" | "wrong_answer" | "runtime_error" | "timeout", "error": str}
The parent counts only nonce-prefixed lines and gives every test without a verdict "timeout" (the
sandbox's wall clock ran out) or "runtime_error" (the process died: os._exit, a crash, the output cap).

Why the nonce and the per-test verdicts: a policy under RL finds the cheap exploits. Exiting with
status 0 before the tests run (`sys.exit(0)`, `os._exit(0)`), or printing "all passed", earns
nothing here: a test passes only when this runner reports it, with a nonce the program was never
shown (read from stdin, which is then gone). SystemExit counts as a runtime error in function tests.
The program's own prints go to a capped buffer or to stderr, never to the verdict channel. The
builtins and `json` functions the runner uses are bound before the program runs, and every test
runs with a fresh copy of the original builtins, so patching `builtins.exec` or
`builtins.AssertionError` does not turn a failure into a pass. Limits: it all runs in one interpreter, so a program that goes looking for the
nonce in the runner's memory (frames, gc) could forge verdicts; the sandbox bounds what it can do
otherwise. Tests are as strong as their asserts: `assert f(x) == 1` passes an object whose `__eq__`
is always true (the tiny world's tests also check the result's type).
"""
import builtins
import copy
import io
import json
import os
import signal
import sys

_BUILTINS = dict(vars(builtins))  # a snapshot, taken before the program can patch anything
# The runner's own functions resolve builtins (exec, isinstance...) here, not in the `builtins` module
# the program can patch: since Python 3.10 a function keeps the builtins of its globals at definition.
__builtins__ = dict(_BUILTINS)
_dumps, _loads = json.dumps, json.loads
_BaseException, _AssertionError, _SystemExit = BaseException, AssertionError, SystemExit
OUTPUT_CAP = 1 << 20  # characters of program stdout kept per test (stdin/stdout tests compare it)


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that `except Exception` in the program does not eat it."""


def _alarm(signum, frame):
    raise _Timeout()


class _CappedText(io.StringIO):
    """stdout for the program: keeps the first OUTPUT_CAP characters, drops the rest."""

    def write(self, s):
        room = OUTPUT_CAP - self.tell()
        if room > 0:
            super().write(str(s)[:room])
        return len(s)


def _error(exc):
    return f"{type(exc).__name__}: {exc}"[:300]


def _timed(fn, timeout_s):
    """(status, error) of `fn()` under a per-call alarm."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        fn()
        return "pass", ""
    except _Timeout:
        return "timeout", "per-test time limit"
    except _AssertionError as exc:
        return "wrong_answer", _error(exc)
    except _BaseException as exc:  # SystemExit included: exiting is not passing
        return "runtime_error", _error(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _same_output(got, want):
    def norm(text):
        return "\n".join(line.rstrip() for line in str(text).rstrip().splitlines())
    return norm(got) == norm(want)


def _canonical(value):
    return _loads(_dumps(value))  # tuples -> lists; a value JSON cannot hold raises (a wrong answer)


def _run_stdio(program, test, timeout_s):
    """The program as __main__ with the test's stdin; compares its stdout."""
    out = _CappedText()
    sys.stdin, sys.stdout = io.StringIO(str(test["input"])), out

    def run():
        try:
            exec(program, {"__name__": "__main__", "__builtins__": dict(_BUILTINS)})
        except _SystemExit as exc:  # a script may exit; only a clean exit counts
            if exc.code not in (None, 0):
                raise
    try:
        status, error = _timed(run, timeout_s)
    finally:
        sys.stdin, sys.stdout = io.StringIO(""), _CappedText()
    if status == "pass" and not _same_output(out.getvalue(), test["output"]):
        status, error = "wrong_answer", f"stdout {out.getvalue()[:200]!r}"
    return status, error


def _run_call(namespace, entry_point, test):
    fn = namespace.get(entry_point)
    if fn is None and "Solution" in namespace:
        fn = getattr(namespace["Solution"](), entry_point)
    if fn is None:
        raise NameError(f"the solution defines no {entry_point!r}")
    got = fn(*copy.deepcopy(test["args"]))
    try:
        same = _canonical(got) == _canonical(test["expected"])
    except (TypeError, ValueError):
        same = False
    if not same:
        raise _AssertionError(f"returned {got!r:.200}")


def main():
    job = _loads(sys.stdin.buffer.read())
    nonce, tests, timeout_s = job["nonce"], job["tests"], float(job["timeout_s"])
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the program writes to fd 1 directly lands in stderr
    sys.stdin, sys.stdout = io.StringIO(""), _CappedText()

    def report(**verdict):
        channel.write(nonce + _dumps(verdict) + "\n")
        channel.flush()

    setup = job.get("setup") or ""
    try:
        program = compile(setup + "\n" + job["code"] if setup else job["code"], "<solution>", "exec")
    except Exception as exc:  # SyntaxError, null bytes, lone surrogates, too deeply nested...
        report(compile=_error(exc))
        return
    report(compile="ok")
    namespace = {"__name__": "solution", "__builtins__": dict(_BUILTINS)}
    defined = None  # (status, error) of running the solution's top level, for non-stdio tests
    for i, test in enumerate(tests):
        if isinstance(test, dict) and "input" in test:
            status, error = _run_stdio(program, test, timeout_s)
        else:
            if defined is None:
                defined = _timed(lambda: exec(program, namespace), timeout_s)
            if defined[0] != "pass":
                status, error = defined
            else:
                namespace["__builtins__"] = dict(_BUILTINS)
                if isinstance(test, dict):
                    status, error = _timed(lambda: _run_call(namespace, job.get("entry_point"), test), timeout_s)
                else:
                    status, error = _timed(lambda: exec(test, namespace), timeout_s)
        report(test=i, status=status, error=error)


if __name__ == "__main__":
    main()
