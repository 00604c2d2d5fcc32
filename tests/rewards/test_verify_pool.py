"""The math-verify worker pool: hard deadlines, replacement, memory limit, process hygiene."""
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rewards.math_verify_reward import (
    PROCESS_NAME, MathReward, VerifyPool, default_pool, verify_answer, verify_batch, verify_many,
)

ROOT = Path(__file__).resolve().parents[2]
# Math-Verify issue 65: verify() on this spins in C-level big-int arithmetic for ever.
HANG = r"\boxed{\dfrac{5^{(5^{(5^{(5^5)})}-4)}-5}{16}}"


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _workers_below(root: int) -> list[int]:
    """Live math-verify workers among the descendants of `root` (they are forkserver children)."""
    parent, name = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        pid = int(entry)
        name[pid] = stat[stat.index("(") + 1: stat.rindex(")")]
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    return [p for p, n in name.items() if n == PROCESS_NAME and below(p) and _alive(p)]


def test_hang_is_killed_at_the_deadline_and_replaced():
    limit = 2.0
    with VerifyPool(workers=1) as pool:
        before = pool.submit(os.getpid).result()
        t0 = time.monotonic()
        verdicts = verify_many([(HANG, "408"), ("The answer is 408", "408")], limit, pool=pool)
        wall = time.monotonic() - t0
        assert [tuple(v) for v in verdicts] == [(0.0, "timeout"), (1.0, "verified")]
        assert wall < limit + 1.0  # the second job waited for the one replaced worker
        after = pool.submit(os.getpid).result()
    assert after != before and not _alive(before)
    assert not _alive(after)  # closing the pool reaped its workers


def test_c_level_loop_is_killed_at_the_deadline():
    # `sum` over a range loops in C without checking signals: a Python-level SIGTERM handler (pebble's)
    # would wait for it, and pebble only SIGKILLs 3 s later.
    with VerifyPool(workers=1) as pool:
        pool.start()
        t0 = time.monotonic()
        hung = pool.submit(sum, range(10**13), timeout_s=1.0)
        after = pool.submit(os.getpid)
        with pytest.raises(TimeoutError):
            hung.result()
        after.result()
        assert time.monotonic() - t0 < 1.0 + 1.5


def test_default_pool_runs_hangs_side_by_side():
    limit = 1.5
    default_pool().start()
    t0 = time.monotonic()
    scores = verify_batch([(HANG, "408"), (HANG, "1"), ("\\boxed{408}", "408"), ("7", "8")], timeout_s=limit)
    assert scores == [0.0, 0.0, 1.0, 0.0]
    # Two hangs on two workers run side by side: about one timeout, not two in a row.
    assert time.monotonic() - t0 < 2 * limit


def test_reward_batch_timeout_status(make_sample):
    results = MathReward(timeout_s=1.0).score_batch([make_sample(HANG), make_sample("408")])
    assert results[0].info["status"] == "timeout" and results[0].score == 0.0
    assert results[1].score == 1.0


def test_works_off_the_main_thread():
    out = []
    th = threading.Thread(target=lambda: out.append(verify_answer("The answer is 408", "408")))
    th.start()
    th.join(30)
    assert out == [1.0]


def test_worker_killed_mid_job_scores_crashed_and_is_replaced():
    with VerifyPool(workers=1) as pool:
        pid = pool.submit(os.getpid).result()
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        verdict = pool.run([(HANG, "408")], timeout_s=20)[0]
        assert tuple(verdict) == (0.0, "crashed") and time.monotonic() - t0 < 5
        assert pool.run([("The answer is 408", "408")], timeout_s=20)[0].score == 1.0
        assert pool.submit(os.getpid).result() != pid


def test_workers_run_under_an_address_space_limit():
    with VerifyPool(workers=1, memory_mb=1024) as pool:
        assert pool.submit(resource.getrlimit, resource.RLIMIT_AS).result() == (2**30, 2**30)
        with pytest.raises(MemoryError):
            pool.submit(bytearray, 2 * 2**30).result()
        assert pool.run([("The answer is 408", "408")])[0].score == 1.0


def test_closing_the_default_pool_leaves_no_processes():
    verify_batch([("The answer is 1", "1")])
    workers = _workers_below(os.getpid())
    assert len(workers) == default_pool().n_workers
    default_pool().close()
    assert [p for p in workers if _alive(p)] == []
    assert verify_answer("The answer is 2", "2") == 1.0  # reopens on demand


def test_pool_started_by_a_finished_thread_keeps_working():
    # PR_SET_PDEATHSIG fires when the *thread* that forked a worker exits; ours are forked by the
    # forkserver, so the thread that started the pool may end.
    with VerifyPool(workers=1) as pool:
        th = threading.Thread(target=pool.start)
        th.start()
        th.join(60)
        pid = pool.submit(os.getpid).result()
        time.sleep(0.3)
        assert tuple(pool.run([("The answer is 408", "408")], timeout_s=20)[0]) == (1.0, "verified")
        assert pool.submit(os.getpid).result() == pid


# A training script without an `if __name__ == "__main__"` guard: spawn and forkserver workers would
# each run it again (as __mp_main__), which re-imports the trainer and re-starts its work.
UNGUARDED_SCRIPT = """
import os, sys
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
from rewards.math_verify_reward import verify_batch
print(verify_batch([("$\\\\frac{1}{2}$", "0.5"), ("The answer is $2^{10}$", "1024")]))
"""


@pytest.mark.parametrize("how", ["path", "module"])
def test_workers_do_not_rerun_the_callers_main(tmp_path, how):
    (tmp_path / "unguarded.py").write_text(UNGUARDED_SCRIPT)
    marker = tmp_path / "runs.txt"
    cmd = ["unguarded.py"] if how == "path" else ["-m", "unguarded"]
    out = subprocess.run([sys.executable, *cmd, str(marker)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1.0, 1.0]"
    assert len(marker.read_text().splitlines()) == 1


TRAINER_SCRIPT = """
import os
from rewards.math_verify_reward import VerifyPool
pool = VerifyPool(workers=1)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(sum, range(10**13), timeout_s=600).result()  # busy in C until killed
"""


def test_workers_die_with_the_trainer(tmp_path):
    (tmp_path / "trainer.py").write_text(textwrap.dedent(TRAINER_SCRIPT))
    proc = subprocess.Popen([sys.executable, "trainer.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        worker = int(proc.stdout.readline())
        time.sleep(0.5)
        assert _alive(worker)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)
