"""Math-verify reward: a table of answers, format failures, and outputs that would hang math-verify."""
import os
import threading
import time

import pytest

from rewards.math_verify_reward import (
    MathReward, VerifyPool, default_pool, verify_answer, verify_batch, verify_many,
)

# Math-Verify issue 65: verify() on this spins in C-level big-int arithmetic for ever.
HANG = r"\boxed{\dfrac{5^{(5^{(5^{(5^5)})}-4)}-5}{16}}"

TABLE = [
    ("408", "408", 1.0),
    (" 408\n", "408", 1.0),
    ("The answer is 408", "408", 1.0),
    ("The answer is 408.", "408", 1.0),
    ("\\boxed{408}", "408", 1.0),
    ("$408$", "408", 1.0),
    ("$\\frac{816}{2}$", "408", 1.0),
    ("408.0", "408", 1.0),
    ("0408", "408", 1.0),
    ("1,234", "1234", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("$x^2+2x+1$", "(x+1)^2", 1.0),
    ("-12", "-12", 1.0),
    ("12", "-12", 0.0),
    ("407", "408", 0.0),
    ("The answer is 407.", "408", 0.0),
    ("\\boxed{409}", "408", 0.0),
    ("4 0 8", "408", 0.0),
    ("garbage", "408", 0.0),
    ("}{\\frac{", "408", 0.0),
    ("", "408", 0.0),
    (None, "408", 0.0),
]


@pytest.mark.parametrize("final,gold,expected", TABLE)
def test_verify_answer_table(final, gold, expected):
    assert verify_answer(final, gold) == expected


def test_verify_batch_matches_table():
    assert verify_batch([(f, g) for f, g, _ in TABLE]) == [e for _, _, e in TABLE]


def test_hang_case_times_out_within_limit():
    limit = 2.0
    with VerifyPool(workers=2, spares=0) as pool:
        pool.start()
        before = set(pool.pids())
        t0 = time.monotonic()
        verdicts = verify_many([(HANG, "408"), ("The answer is 408", "408")], limit, pool=pool)
        wall = time.monotonic() - t0
        assert [tuple(v) for v in verdicts] == [(0.0, "timeout"), (1.0, "verified")]
        assert wall < limit + 1.0
        assert len(set(pool.pids()) - before) == 1  # the hung worker was killed and replaced
        # The pool keeps working after a kill.
        assert verify_batch([("so 17", "17"), ("\\boxed{5}", "5")], limit, pool=pool) == [1.0, 1.0]
        pids = pool.pids() + list(before)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # every worker exited and was reaped: nothing leaked


def test_default_pool_hang_and_batch_parallel():
    limit = 1.5
    default_pool().start()
    t0 = time.monotonic()
    scores = verify_batch([(HANG, "408"), (HANG, "1"), ("\\boxed{408}", "408"), ("7", "8")], timeout_s=limit)
    assert scores == [0.0, 0.0, 1.0, 0.0]
    # Two hangs on two workers run side by side: about one timeout, not two in a row.
    assert time.monotonic() - t0 < 2 * limit


def test_works_off_the_main_thread():
    out = []
    th = threading.Thread(target=lambda: out.append(verify_answer("The answer is 408", "408")))
    th.start()
    th.join(30)
    assert out == [1.0]


def test_math_reward_on_rendered_samples(make_sample):
    reward = MathReward()
    right = reward(make_sample("The answer is 408.", analysis="17*24=408."))
    wrong = reward(make_sample("407"))
    assert (right.score, right.parts) == (1.0, {"correct": 1.0, "format": 1.0})
    assert (wrong.score, wrong.parts) == (0.0, {"correct": 0.0, "format": 1.0})


def test_missing_final_is_a_format_failure_without_math_verify(make_sample, monkeypatch):
    import rewards.math_verify_reward as mvr

    monkeypatch.setattr(mvr, "default_pool", lambda: pytest.fail("math-verify must not run"))
    sample = make_sample(None, analysis="17*24 is")
    assert sample.transcript.final is None and not sample.transcript.format_ok
    r = MathReward()(sample)
    assert (r.score, r.parts, r.info["status"]) == (0.0, {"correct": 0.0, "format": 0.0}, "format")


def test_no_answer_in_metadata_is_not_applicable(make_sample):
    assert MathReward()(make_sample("408", answer=None)) is None


def test_reward_batch_timeout_status(make_sample):
    results = MathReward(timeout_s=1.0).score_batch([make_sample(HANG), make_sample("408")])
    assert results[0].info["status"] == "timeout" and results[0].score == 0.0
    assert results[1].score == 1.0


def test_bad_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        verify_batch([("The answer is 1", "1")], timeout_s=0)


def test_worker_killed_mid_job_scores_crashed_and_is_replaced():
    with VerifyPool(workers=1, spares=0) as pool:
        pool.start()
        pid = pool.pids()[0]
        killer = threading.Timer(0.5, os.kill, (pid, 9))
        killer.start()
        t0 = time.monotonic()
        verdict = pool.run([(HANG, "408")], timeout_s=20)[0]
        assert tuple(verdict) == (0.0, "crashed") and time.monotonic() - t0 < 5
        assert pool.run([("The answer is 408", "408")], timeout_s=20)[0].score == 1.0
        assert pool.pids()[0] != pid


def _children_running_workers():
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and b"_worker_main" in cmd:
            found.append(int(entry))
    return found


def test_closing_the_default_pool_leaves_no_processes():
    verify_batch([("The answer is 1", "1")])
    assert _children_running_workers()
    default_pool().close()
    assert _children_running_workers() == []
    assert verify_answer("The answer is 2", "2") == 1.0  # reopens on demand


def test_pool_started_by_a_finished_thread_keeps_working():
    # PR_SET_PDEATHSIG fires when the *thread* that started a worker exits; workers must survive it.
    with VerifyPool(workers=1, spares=0) as pool:
        th = threading.Thread(target=pool.start)
        th.start()
        th.join(60)
        pid = pool.pids()[0]
        time.sleep(0.3)
        assert tuple(pool.run([("The answer is 408", "408")], timeout_s=20)[0]) == (1.0, "verified")
        assert pool.pids() == [pid]
