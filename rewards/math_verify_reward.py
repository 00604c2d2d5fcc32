"""Math answer checking with math-verify, behind a hard per-job deadline in worker processes.

What
- `verify_answer(final, gold, timeout_s)` -> 1.0 / 0.0, usable outside the pipeline.
- `verify_batch([(final, gold), ...], timeout_s)` -> scores, checked in parallel by a process pool;
  `verify_many` is the same with a status per job ("exact", "verified", "no_answer", "timeout",
  "crashed", "error: ...").
- Reward "math" (`MathReward`, options `timeout_s`, `answer_key`): parts {"correct", "format"}. A
  sample without a final-channel message (or with `transcript.format_ok == False`) is a format
  failure, scored 0 without calling math-verify; a sample whose metadata has no answer is not
  applicable (None).

How
math-verify is called as `verify(gold, answer)` (gold first: the function is not symmetric), on
values read by `rewards.math_parse` (golds as LaTeX first; guards against misreadings fixed upstream
after math-verify 0.9.0). Its own timeout uses SIGALRM, which fails off the main thread and never
interrupts C-level big-integer work (Math-Verify issue 65: `\\boxed{\\dfrac{5^{(5^{(5^{(5^5)})}-4)}-5}{16}}`
spins for ever), so we pass `parsing_timeout=None` / `timeout_seconds=None` and enforce time from
outside with pebble's `ProcessPool`: each job gets `timeout_s` from the moment a worker takes it;
past it pebble kills the worker and starts another, and the job scores 0.0 "timeout". A worker that
dies (segfault, kill) scores "crashed". `_init_worker` runs first in every worker:
- SIGTERM back to its default action: pebble's Python-level handler cannot run while C code spins,
  so pebble fell back to SIGKILL 3 s later (measured: a C loop killed 3.05 s after its deadline;
  0.04 s with the default action);
- PR_SET_PDEATHSIG and closing its copy of the forkserver's liveness pipe, so that workers die with
  the trainer even mid-computation (holding that pipe, a busy worker kept the forkserver, and so
  itself, alive after the trainer was killed);
- an address-space limit (RLIMIT_AS, `memory_mb`), so a runaway expansion raises MemoryError in the
  worker instead of taking the trainer's memory.

Start method: forkserver, with the caller's `__main__` left out. The trainer runs Ray and torch
threads, so fork is unsafe; spawn and forkserver both re-run the caller's `__main__` as `__mp_main__`
in every worker: `python -m rl.train` would cost each worker 4.6 s and 240 MB importing the trainer
and torch (vs 1.4 s / 60 MB for math-verify alone), and a script without a `__main__` guard would
re-run itself. Our workers are forked by a fresh forkserver interpreter that preloads math-verify,
and `_without_main` drops the main module from the start-up data of our workers only. That and
`_release_forkserver` are the two places we reach into `multiprocessing` internals. A forkserver
started earlier by someone else works too; its children then import math-verify themselves (~1 s).

Measured on the 2-core CPU box under load from other jobs (old = the hand-written 300-line pool in
git history: subprocess workers and one warm spare), 2 workers:
- replacement after a timeout kill (two hangs, then a job that needs a replaced worker; seconds past
  the deadline): old 0.40-0.62 s, pebble 0.24-0.30 s;
- 256 distinct pairs, warm: old 0.98 s, pebble 0.94 s with the old checking code, 1.05-1.09 s with
  the guarded parsing of `rewards.math_parse` (a second, LaTeX-only parse per answer);
- cold start: old 1.8-3.1 s, pebble 0.6-1.0 s.

Where we depart from plain math-verify: a fast path returns 1.0 for answers equal to the gold after
stripping, and compares two plain integer literals (|n| < 1e12) exactly, without a worker round trip;
both give the verdict math-verify would.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing.spawn
import os
import re
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import NamedTuple

from pebble import ProcessExpired, ProcessPool

from envs.types import Sample
from rewards.registry import register_reward
from rewards.types import RewardResult

DEFAULT_TIMEOUT_S = 5.0
WORKER_NAME = "deliberate-math-verify"  # multiprocessing name: marks our workers for _without_main
PROCESS_NAME = "math-verify"  # OS-level name of the workers (/proc/<pid>/comm)
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


def _check(final: str, gold: str) -> tuple[float, str]:
    """One verdict, computed in a worker."""
    from math_verify import verify

    from rewards.math_parse import parse_answer, parse_gold

    try:
        g = parse_gold(gold)
        if not g:
            return 0.0, "error: gold answer unparseable"
        answer = parse_answer(final)
        if not answer:
            return 0.0, "no_answer"
        # Never format parsed objects: str() of a huge expression can itself hang.
        return float(verify(g, answer, timeout_seconds=None)), "verified"
    except MemoryError:
        return 0.0, "error: MemoryError"
    except Exception as exc:  # malformed model output must cost a score, not the worker
        return 0.0, f"error: {type(exc).__name__}"


def _release_forkserver() -> None:
    """Close our copy of the forkserver's liveness pipe. Forkserver children inherit its write end, and
    the forkserver only exits once every holder has closed it: a worker busy in C code would keep the
    forkserver alive after the trainer died, and with it (PR_SET_PDEATHSIG) itself."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def _init_worker(memory_mb: int | None) -> None:
    """Runs first in every worker (after pebble installed its signal handlers)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die at once, even inside C-level big-int work
    _release_forkserver()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the forkserver (it dies with us)
        libc.prctl(15, PROCESS_NAME.encode())  # PR_SET_NAME: shows in ps/top as "math-verify"
    except (OSError, AttributeError):
        pass  # not Linux: idle workers still exit when the pool's pipe closes
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
    import math_verify  # noqa: F401  (before the memory limit; preloaded by the forkserver)
    import rewards.math_parse  # noqa: F401

    if memory_mb:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))


# --------------------------------------------------------------------------- parent side

_stdlib_preparation_data = multiprocessing.spawn.get_preparation_data


def _without_main(name: str) -> dict:
    """`multiprocessing.spawn.get_preparation_data`, minus the main module for our workers: they run
    only importable functions, so re-running the caller's script in each of them is pure cost."""
    data = _stdlib_preparation_data(name)
    if name == WORKER_NAME:
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


class _WorkerProcess(ForkServerProcess):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "name": WORKER_NAME})


class _WorkerContext(ForkServerContext):
    Process = _WorkerProcess


def _worker_context() -> ForkServerContext:
    multiprocessing.spawn.get_preparation_data = _without_main  # both Popen classes look it up here
    ctx = _WorkerContext()
    # Ignored when a forkserver already runs; workers then import math-verify themselves (~1 s).
    ctx.set_forkserver_preload(["math_verify", "rewards.math_parse"])
    return ctx


class VerifyPool:
    """A few math-verify worker processes with a hard deadline per job (a pebble ProcessPool).

    >>> with VerifyPool(workers=1) as pool:
    ...     [v.score for v in pool.run([("The answer is 408", "408"), ("7", "408")], timeout_s=5)]
    [1.0, 0.0]
    """

    def __init__(self, workers: int | None = None, memory_mb: int | None = 2048):
        self.n_workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.memory_mb = memory_mb  # address-space limit per worker; None = unlimited
        self._pool = ProcessPool(self.n_workers, initializer=_init_worker, initargs=(memory_mb,),
                                 context=_worker_context())
        self._owner = os.getpid()

    def __enter__(self) -> "VerifyPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def active(self) -> bool:
        return self._pool.active

    def submit(self, fn: Callable, *args, timeout_s: float | None = None) -> Future:
        """Run `fn(*args)` (an importable function) in a worker; past `timeout_s` the worker is killed."""
        if os.getpid() != self._owner:
            raise RuntimeError("VerifyPool used in a forked child; create a new pool there")
        return self._pool.schedule(fn, args, timeout=timeout_s)

    def start(self) -> "VerifyPool":
        """Start the workers and wait until each has imported math-verify."""
        for f in [self.submit(os.getpid) for _ in range(self.n_workers)]:
            f.result()
        return self

    def close(self) -> None:
        """Stop every worker (busy ones are killed) and wait for them."""
        self._pool.stop()
        self._pool.join()

    def run(self, jobs: Sequence[tuple[str, str]], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Verdict]:
        """Verify `(final, gold)` pairs in parallel; each pair gets `timeout_s` once a worker takes it."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive")
        futures = [self.submit(_check, str(f), str(g), timeout_s=timeout_s) for f, g in jobs]
        return [_verdict(f) for f in futures]


def _verdict(future: Future) -> Verdict:
    try:
        return Verdict(*future.result())
    except FutureTimeout:
        return Verdict(0.0, "timeout")
    except ProcessExpired:
        return Verdict(0.0, "crashed")
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"math-verify workers could not start ({exc}); run `python -c 'import math_verify'` to see why"
        ) from exc


_default_pool: VerifyPool | None = None
_default_lock = threading.Lock()


def default_pool() -> VerifyPool:
    """The process-wide pool (created on first use, closed at interpreter exit)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool._owner != os.getpid() or not _default_pool.active:
            _default_pool = VerifyPool()
            atexit.register(_default_pool.close)
        return _default_pool


def verify_many(pairs: Sequence[tuple[str | None, str]], timeout_s: float = DEFAULT_TIMEOUT_S,
                pool: VerifyPool | None = None) -> list[Verdict]:
    """A `Verdict` per `(final, gold)` pair; only pairs the fast path cannot settle reach workers."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive")
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

    >>> verify_answer("408", "408"), verify_answer(None, "408"), verify_answer("2", r"2^{10}")
    (1.0, 0.0, 0.0)
    """
    return verify_batch([(final_text, ground_truth)], timeout_s)[0]


@register_reward("math")
class MathReward:
    """Verifiable math reward: 1.0 when the final channel states the answer in metadata["answer"].

    >>> from envs.types import Transcript
    >>> s = Sample("t", "math", "low", [], [], [], [], Transcript(final="408"), {"answer": "408"})
    >>> r = MathReward()(s); (r.score, r.parts)
    (1.0, {'correct': 1.0, 'format': 1.0})
    >>> s.transcript = Transcript(format_ok=False, error="no final-channel message")
    >>> MathReward()(s).parts
    {'correct': 0.0, 'format': 0.0}
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, answer_key: str = "answer"):
        if timeout_s <= 0:
            raise ValueError(f"math reward timeout_s={timeout_s} must be positive")
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
