"""Math answer checking with math-verify, behind a hard per-job deadline in worker processes.

What
- `verify_answer(final, gold, timeout_s)` -> 1.0 / 0.0, usable outside the pipeline.
- `verify_batch([(final, gold), ...], timeout_s)` -> scores, checked in parallel by a process pool;
  `verify_many` is the same with a status per job ("exact", "verified", "no_answer", "timeout",
  "crashed", "error").
- Reward "math" (`MathReward`): parts {"correct", "format"}. A sample without a final-channel message
  (or with `transcript.format_ok == False`) is a format failure, scored 0 without calling math-verify;
  a sample whose metadata has no "answer" is not applicable (None).

How
math-verify is called as `verify(parse(gold), parse(answer))` (gold first: the function is not
symmetric). Its own timeout uses SIGALRM, which fails off the main thread and never interrupts
C-level big-integer work (Math-Verify issue 65: `\\boxed{\\dfrac{5^{(5^{(5^{(5^5)})}-4)}-5}{16}}` spins
for ever), so we pass `parsing_timeout=None` / `timeout_seconds=None` and enforce time from outside:
`VerifyPool` owns a few worker processes (fresh interpreters started with subprocess, one socket
each; unlike multiprocessing's spawn/forkserver they never re-import the caller's `__main__`, so a
training script is not re-run in every worker and needs no `if __name__ == "__main__"` guard). Every
job gets a deadline when it is handed to a ready worker; a worker past its deadline is SIGKILLed and
replaced (~0.5 s to re-import math-verify), and its job scores 0.0 with status "timeout". A worker that
dies (segfault, memory limit) scores "crashed". Workers run under an address-space limit, so a
runaway expansion cannot take the trainer's memory, and die with the trainer (PR_SET_PDEATHSIG + watchdog).
The default pool is created on first use and closed at exit (atexit); `with VerifyPool() as pool:`
gives a private one.

Where we depart from plain math-verify: a fast path returns 1.0 for answers equal to the gold after
stripping, and compares two plain integer literals (|n| < 1e12) exactly, without a worker round trip;
both give the same verdict math-verify would.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import NamedTuple

from rewards.registry import register_reward
from envs.types import Sample
from rewards.types import RewardResult

DEFAULT_TIMEOUT_S = 5.0
_INT = re.compile(r"[+-]?\d{1,12}")


class Verdict(NamedTuple):
    score: float  # 1.0 correct, 0.0 otherwise
    status: str  # exact | verified | no_answer | timeout | crashed | error: ...


def _fast_verdict(final: str | None, gold: str) -> Verdict | None:
    """Cheap verdicts that need no math-verify call; None when a worker must decide."""
    if final is None or not final.strip():
        return Verdict(0.0, "no_answer")
    f, g = final.strip(), str(gold).strip()
    if f == g:
        return Verdict(1.0, "exact")
    if _INT.fullmatch(f) and _INT.fullmatch(g):
        return Verdict(float(int(f) == int(g)), "exact")
    return None


# --------------------------------------------------------------------------- worker side


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse

    parsed = parse(gold, parsing_timeout=None)
    return parsed or parse(f"${gold}$", parsing_timeout=None)  # bare LaTeX such as \frac{1}{2}


def _check(final: str, gold: str) -> tuple[float, str]:
    from math_verify import parse, verify

    g = _parse_gold(gold)
    if not g:
        return 0.0, "error: gold answer unparseable"
    answer = parse(final, parsing_timeout=None)
    if not answer:
        return 0.0, "no_answer"
    # Never format parsed objects: str() of a huge expression can itself hang.
    return float(verify(g, answer, timeout_seconds=None)), "verified"


def _limit_memory(memory_mb: int | None) -> None:
    if memory_mb:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent(parent: int, use_pdeathsig: bool) -> None:
    """Exit when the trainer dies. PR_SET_PDEATHSIG (Linux) kills even mid-computation, but fires
    when the *thread* that started us exits, so it is only used for workers started by the main
    thread; a watchdog thread covers the rest (it runs between bytecodes, so a C-level loop delays
    it until the loop ends or hits the memory limit)."""
    if use_pdeathsig:
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="parent-watchdog").start()


def _worker_main() -> None:
    """Worker entry (argv: socket fd, memory MB, parent pid, pdeathsig 0/1). Sends ("ready", pid),
    then answers each (job, final, gold) with (job, score, status) until it reads None or EOF."""
    fd, memory_mb, parent, pdeathsig = (int(a) for a in sys.argv[1:5])
    _die_with_parent(parent, bool(pdeathsig))
    if os.getppid() != parent:
        return  # the trainer died before we got here
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silence "timeout disabled" warnings
    import math_verify  # noqa: F401  (imports before the memory limit)

    _limit_memory(memory_mb)
    conn = Connection(fd)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job, final, gold = msg
        try:
            score, status = _check(final, gold)
        except MemoryError:
            score, status = 0.0, "error: MemoryError"
        except Exception as exc:  # malformed model output must cost a score, not the worker
            score, status = 0.0, f"error: {type(exc).__name__}"
        conn.send((job, score, status))


# --------------------------------------------------------------------------- parent side

_WORKER_CMD = "from rewards.math_verify_reward import _worker_main; _worker_main()"


class _Worker:
    """One worker process (a fresh interpreter: no re-import of the caller's __main__)."""

    def __init__(self, memory_mb: int | None, start_timeout_s: float):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # so `rewards` imports without installing
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        main_thread = threading.current_thread() is threading.main_thread()
        args = [str(theirs.fileno()), str(memory_mb or 0), str(os.getpid()), str(int(main_thread))]
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CMD, *args], env=env,
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL)
        theirs.close()  # so we see EOF when the worker dies
        self.conn = Connection(ours.detach())
        self.ready = False
        self.start_deadline = time.monotonic() + start_timeout_s
        self.job: int | None = None
        self.deadline = float("inf")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self, wait_s: float = 0.5) -> bool:
        """SIGKILL (C-level big-int loops ignore everything else); True once reaped."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.conn.close()
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return False  # e.g. stuck in uninterruptible I/O on a loaded box: reap it later
        return True

    def request_stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass  # already gone

    def stop(self, wait_s: float = 1.0) -> bool:
        """Idle workers are asked to exit; busy or still-importing ones are SIGKILLed."""
        if self.ready and self.job is None:
            self.request_stop()
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        return self.kill(wait_s)


class VerifyPool:
    """A few math-verify worker processes with a hard deadline per job.

    >>> with VerifyPool(workers=1, spares=0) as pool:
    ...     [v.score for v in pool.run([("The answer is 408", "408"), ("7", "408")], timeout_s=5)]
    [1.0, 0.0]
    """

    def __init__(self, workers: int | None = None, spares: int = 1, memory_mb: int | None = 2048,
                 start_timeout_s: float = 60.0):
        self.n_workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.n_spares = spares  # idle, already-imported workers that replace a killed one at once
        self.memory_mb = memory_mb  # address-space limit per worker; None = unlimited
        self.start_timeout_s = start_timeout_s
        self._workers: list[_Worker] = []
        self._spares: list[_Worker] = []
        self._dying: list[_Worker] = []  # killed but not yet reaped
        self._lock = threading.Lock()
        self._owner = os.getpid()

    def __enter__(self) -> "VerifyPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "VerifyPool":
        """Start all workers and wait until each has imported math-verify."""
        with self._lock:
            self._fill()
            for w in self._all():
                while not w.ready:
                    self._poll([w], self._remaining(w))
                    self._expire(None)
        return self

    def pids(self) -> list[int]:
        """Process ids of all workers, spares included."""
        return [w.pid for w in self._all()]

    def close(self) -> None:
        with self._lock:
            for w in self._all():
                if w.ready and w.job is None:
                    w.request_stop()  # all at once, so they exit side by side
            for w in self._all() + self._dying:
                if not w.stop(wait_s=5.0):
                    logging.getLogger(__name__).warning("math-verify worker %d not reaped", w.pid)
            self._workers, self._spares, self._dying = [], [], []

    def _all(self) -> list[_Worker]:
        return self._workers + self._spares

    def run(self, jobs: Sequence[tuple[str, str]], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Verdict]:
        """Verify `(final, gold)` pairs in parallel; each pair gets `timeout_s` once a worker takes it."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive")
        results: list[Verdict | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        with self._lock:
            if os.getpid() != self._owner:
                raise RuntimeError("VerifyPool used in a forked child; create a new pool there")
            self._dying = [w for w in self._dying if w.proc.poll() is None]
            self._fill()
            while queue or any(w.job is not None for w in self._workers):
                self._fill()
                self._dispatch(queue, jobs, timeout_s)
                self._poll(self._all(), self._next_wakeup(), results)
                self._expire(results)
            self._fill()  # replacements start now, in the background
        return results  # type: ignore[return-value]

    def _fill(self) -> None:
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self.memory_mb, self.start_timeout_s))
        while len(self._spares) < self.n_spares:
            self._spares.append(_Worker(self.memory_mb, self.start_timeout_s))

    def _dispatch(self, queue: deque, jobs, timeout_s: float) -> None:
        for w in list(self._workers):
            if queue and w.ready and w.job is None:
                idx = queue[0]
                final, gold = jobs[idx]
                try:
                    w.conn.send((idx, str(final), str(gold)))
                except OSError:  # died while idle: replace it; the job stays queued
                    self._replace(w, None, "crashed")
                    continue
                queue.popleft()
                w.job, w.deadline = idx, time.monotonic() + timeout_s

    def _remaining(self, w: _Worker) -> float:
        return max(0.0, (w.deadline if w.ready else w.start_deadline) - time.monotonic())

    def _next_wakeup(self) -> float:
        active = [w for w in self._all() if w.job is not None or not w.ready]
        return min((self._remaining(w) for w in active), default=0.0)

    def _poll(self, workers: list[_Worker], timeout: float, results=None) -> None:
        """Read every message that arrives within `timeout`; replace workers that died."""
        by_conn = {w.conn: w for w in workers}
        for conn in wait(list(by_conn), timeout):
            w = by_conn[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._replace(w, results, "crashed")
                continue
            if msg[0] == "ready":
                w.ready = True
            elif results is not None and msg[0] == w.job:
                results[w.job] = Verdict(msg[1], msg[2])
                w.job, w.deadline = None, float("inf")

    def _expire(self, results) -> None:
        now = time.monotonic()
        for w in self._all():
            if w.job is not None and now >= w.deadline:
                self._replace(w, results, "timeout")
            elif not w.ready and now >= w.start_deadline:
                raise RuntimeError(
                    f"math-verify worker pid {w.pid} did not start within {self.start_timeout_s} s; "
                    "check that `import math_verify` works in this environment"
                )

    def _replace(self, w: _Worker, results, status: str) -> None:
        code = w.proc.poll()
        if not w.kill(wait_s=0.05):  # never block the trainer on reaping; retried later
            self._dying.append(w)
        if not w.ready:
            raise RuntimeError(
                f"math-verify worker pid {w.pid} died while starting (exit code {code}); "
                "run `python -c 'import math_verify'` to see why"
            )
        if results is not None and w.job is not None:
            results[w.job] = Verdict(0.0, status)
        if w in self._spares:
            self._spares.remove(w)
            return
        # A spare has math-verify imported already: the slot is usable at once.
        fresh = self._spares.pop(0) if self._spares else _Worker(self.memory_mb, self.start_timeout_s)
        self._workers[self._workers.index(w)] = fresh


_default_pool: VerifyPool | None = None
_default_lock = threading.Lock()


def default_pool() -> VerifyPool:
    """The process-wide pool (created on first use, closed at interpreter exit)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool._owner != os.getpid():
            _default_pool = VerifyPool()
            atexit.register(_default_pool.close)
        return _default_pool


def verify_many(pairs: Sequence[tuple[str | None, str]], timeout_s: float = DEFAULT_TIMEOUT_S,
                pool: VerifyPool | None = None) -> list[Verdict]:
    """A `Verdict` per `(final, gold)` pair; only pairs the fast path cannot settle reach workers."""
    out: list[Verdict | None] = [_fast_verdict(f, g) for f, g in pairs]
    todo = [i for i, v in enumerate(out) if v is None]
    if todo:
        checked = (pool or default_pool()).run([(pairs[i][0], pairs[i][1]) for i in todo], timeout_s)
        for i, v in zip(todo, checked):
            out[i] = v
    return out  # type: ignore[return-value]


def verify_batch(pairs: Sequence[tuple[str | None, str]], timeout_s: float = DEFAULT_TIMEOUT_S,
                 pool: VerifyPool | None = None) -> list[float]:
    """Scores (1.0 / 0.0) for `(final, gold)` pairs, checked in parallel with a hard timeout each."""
    return [v.score for v in verify_many(pairs, timeout_s, pool)]


def verify_answer(final_text: str | None, ground_truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if `final_text` states `ground_truth` (per math-verify), else 0.0; never hangs past timeout_s.

    >>> verify_answer("408", "408"), verify_answer(None, "408")
    (1.0, 0.0)
    """
    return verify_batch([(final_text, ground_truth)], timeout_s)[0]


@register_reward("math")
class MathReward:
    """Verifiable math reward: 1.0 when the final channel states the answer in metadata["answer"].

    >>> from envs.harmony import Transcript
    >>> s = Sample("t", "math", "low", [], [], [], [], Transcript(final="408"), {"answer": "408"})
    >>> r = MathReward()(s); (r.score, r.parts)
    (1.0, {'correct': 1.0, 'format': 1.0})
    >>> s.transcript = Transcript(format_ok=False, error="no final-channel message")
    >>> MathReward()(s).parts
    {'correct': 0.0, 'format': 0.0}
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, answer_key: str = "answer"):
        self.timeout_s = timeout_s
        self.answer_key = answer_key

    def __call__(self, sample: Sample) -> RewardResult | None:
        return self.score_batch([sample])[0]

    def score_batch(self, samples: Sequence[Sample]) -> list[RewardResult | None]:
        out: list[RewardResult | None] = [None] * len(samples)
        jobs: list[tuple[int, str, str]] = []
        for i, s in enumerate(samples):
            gold = s.metadata.get(self.answer_key)
            if gold is None:
                continue  # not a math task
            t = s.transcript
            if t.final is None or not t.format_ok:
                out[i] = RewardResult(0.0, {"correct": 0.0, "format": 0.0},
                                      {"status": "format", "error": t.error})
            else:
                jobs.append((i, t.final, str(gold)))
        verdicts = verify_many([(f, g) for _, f, g in jobs], self.timeout_s)
        for (i, _, _), v in zip(jobs, verdicts):
            out[i] = RewardResult(v.score, {"correct": v.score, "format": 1.0}, {"status": v.status})
        return out
