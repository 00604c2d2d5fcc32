"""The bubblewrap sandbox contains untrusted code: each test would fail against a weaker sandbox.

Real bwrap, real processes (no mocks); skipped where bwrap is absent (scripts/setup.sh installs it).
Leftover processes are found by a marker in their command line, scanned over the host's /proc.
"""
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rewards.sandbox import SandboxConfig, SandboxPool, SandboxUnavailable, check_sandbox, run_python

pytestmark = pytest.mark.bwrap
ROOT = Path(__file__).resolve().parents[2]
SLEEPER = "import time; time.sleep(120)"


def marked_processes(marker: str) -> list[int]:
    """Host pids whose command line holds `marker` (this test process excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                pids.append(int(entry))
    return pids


def spawn_sleepers(marker: str) -> str:
    """Program text starting marked sleepers three ways: a child, a setsid'd daemon, a double fork."""
    return textwrap.dedent(f"""
        import os, subprocess, time
        subprocess.Popen(["/usr/bin/python3", "-c", {SLEEPER!r}, {marker!r}])
        subprocess.Popen(["/usr/bin/python3", "-c", {SLEEPER!r}, {marker!r}], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/usr/bin/python3", ["python3", "-c", {SLEEPER!r}, {marker!r}])
            os._exit(0)
        time.sleep(0.3)
        print("started", flush=True)
    """)


def test_runs_code_with_stdin_under_the_system_python():
    r = run_python("import sys; print(sys.executable, sum(map(int, sys.stdin.read().split())))", stdin="1 2 39")
    assert (r.returncode, r.stdout, r.timed_out, r.output_truncated) == (0, "/usr/bin/python3 42\n", False, False)
    assert r.ok and 0 < r.duration_s < 5


def test_network_is_unreachable_even_the_hosts_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        for host, port in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
            try:
                socket.create_connection((host, port), timeout=2).close()
                print("CONNECTED", host)
            except OSError as exc:
                print("blocked", host, exc.errno)
        print(sorted(name for _, name in socket.if_nameindex()))
    """)
    try:
        r = run_python(code, timeout_s=10)
    finally:
        server.close()
    assert r.returncode == 0, r.stderr
    assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 3
    assert r.stdout.splitlines()[-1] == "['lo']"  # a fresh network namespace: its own loopback only


def test_only_the_fresh_scratch_folder_is_writable():
    code = textwrap.dedent("""
        import os
        for path in ["/x", "/usr/x", "/usr/lib/x", "/dev/x", "/dev/shm/x", "/sandbox/x", "/sandbox/main.py",
                     "/proc/x", "/etc/x", "/home/x", "/root/x", "/var/tmp/x"]:
            try:
                with open(path, "w") as f:
                    f.write("x")
                print("WROTE", path)
            except OSError as exc:
                print("refused", path, exc.errno)
        print("seen before:", os.path.exists("/tmp/left-by-last-run"))
        with open("/tmp/left-by-last-run", "w") as f:
            f.write("x" * 1000)
        print("cwd", os.getcwd(), "scratch ok")
    """)
    for _ in range(2):  # the second run must not see the first run's file: a fresh scratch each time
        r = run_python(code)
        assert r.returncode == 0, r.stderr
        assert "WROTE" not in r.stdout and r.stdout.count("refused") == 12
        assert "seen before: False" in r.stdout and "cwd /tmp scratch ok" in r.stdout
    assert not Path("/tmp/left-by-last-run").exists()  # the host's /tmp was never touched


def test_host_files_are_not_there():
    paths = ["/etc/shadow", "/etc/passwd", "/root", str(ROOT / "README.md"), str(ROOT), str(Path.home()),
             "/home", "/var/run", "/run", "/sys/fs/cgroup"]
    code = f"import os\nprint([p for p in {paths!r} if os.path.exists(p)])"
    r = run_python(code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_environment_is_cleared(monkeypatch):
    monkeypatch.setenv("DELIBERATE_SECRET_TOKEN", "hunter2")
    r = run_python("import os; print(sorted(os.environ.items()))")
    assert "hunter2" not in r.stdout and "DELIBERATE" not in r.stdout
    assert {k for k, _ in eval(r.stdout)} <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE", "PWD"}


def test_runs_as_an_unprivileged_user_without_capabilities():
    code = textwrap.dedent("""
        import os, resource
        caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapPrm"))]
        print(os.getuid(), os.getgid(), os.getgroups(), caps, resource.getrlimit(resource.RLIMIT_CORE))
        os.setuid(0)
    """)
    r = run_python(code)
    assert r.stdout.strip() == "65534 65534 [] ['0000000000000000', '0000000000000000'] (0, 0)", r.stdout
    assert r.returncode != 0 and "os.setuid(0)" in r.stderr  # cannot become root inside either


def test_process_limit_holds_inside_and_a_fork_bomb_is_contained():
    count = textwrap.dedent("""
        import os, time
        n = 0
        while n < 500:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            n += 1
        print(n)
    """)
    config = SandboxConfig(max_processes=16)
    r = run_python(count, timeout_s=10, config=config)
    assert r.returncode == 0, r.stderr
    assert 0 < int(r.stdout) < 16  # the children died with the sandbox when its main process exited

    marker = f"bomb-{secrets.token_hex(6)}"
    bomb = textwrap.dedent(f"""
        import os, sys
        if len(sys.argv) < 2:
            os.execv(sys.executable, [sys.executable, __file__, {marker!r}])  # mark every descendant
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    start = time.monotonic()
    r = run_python(bomb, timeout_s=2)
    assert r.timed_out and time.monotonic() - start < 2 + 2
    assert marked_processes(marker) == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork


def test_infinite_loop_times_out_and_the_whole_tree_dies():
    marker = f"tree-{secrets.token_hex(6)}"
    start = time.monotonic()
    r = run_python(spawn_sleepers(marker) + "while True:\n    pass\n", timeout_s=1.5)
    elapsed = time.monotonic() - start
    assert r.timed_out and r.returncode is None and r.stdout == "started\n"
    assert 1.5 <= elapsed < 1.5 + 2
    assert marked_processes(marker) == []  # children, daemons and double-forked orphans included


def test_background_processes_die_when_the_program_exits():
    marker = f"bg-{secrets.token_hex(6)}"
    r = run_python(spawn_sleepers(marker) + "print('done')\n", timeout_s=10)
    assert r.returncode == 0 and r.stdout == "started\ndone\n" and not r.timed_out
    assert marked_processes(marker) == []


def test_sandbox_dies_with_its_parent():
    marker = f"orphan-{secrets.token_hex(6)}"
    parent = textwrap.dedent(f"""
        from rewards.sandbox import run_python
        run_python({spawn_sleepers(marker) + "import time; time.sleep(120)"!r}, timeout_s=120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 20
        while len(marked_processes(marker)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(marked_processes(marker)) >= 3, "the sandboxed sleepers never started"
        proc.kill()  # SIGKILL: the parent gets no chance to clean up
        proc.wait()
        deadline = time.monotonic() + 2
        while marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marked_processes(marker) == []
    finally:
        proc.kill()


def test_signals_cannot_reach_the_host():
    code = textwrap.dedent(f"""
        import os, signal
        for pid in ({os.getpid()}, os.getppid(), 1):
            try:
                os.kill(pid, signal.SIGKILL)
                print("sent", pid)
            except OSError as exc:
                print("refused", pid, exc.errno)
        print("alive")
    """)
    r = run_python(code)
    assert "alive" in r.stdout and f"sent {os.getpid()}" not in r.stdout  # another pid namespace
    assert r.duration_s < 5


def test_memory_cap_holds():
    r = run_python("x = bytearray(1024 * 2**20)\nprint('allocated')", memory_mb=256)
    assert r.returncode != 0 and "MemoryError" in r.stderr and "allocated" not in r.stdout
    r = run_python("x = bytearray(64 * 2**20)\nprint('allocated')", memory_mb=256)
    assert r.returncode == 0 and r.stdout == "allocated\n"  # the cap is the cap, not a broken interpreter


def test_file_size_and_scratch_size_are_capped():
    write = "data = b'x' * (4 * 2**20)\nwith open('/tmp/big', 'wb') as f:\n    f.write(data)\nprint('wrote')"
    r = run_python(write, config=SandboxConfig(max_file_mb=1))
    assert r.returncode != 0 and "wrote" not in r.stdout  # SIGXFSZ
    fill = ("import os\nfor i in range(100):\n    with open(f'/tmp/f{i}', 'wb') as f:\n"
            "        f.write(b'x' * 2**20)\nprint('filled')")
    r = run_python(fill, config=SandboxConfig(scratch_mb=8))
    assert r.returncode != 0 and "No space left" in r.stderr


def test_output_cap_holds_and_stops_the_flood():
    start = time.monotonic()
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_s=20,
                   config=SandboxConfig(output_bytes=100_000))
    assert r.output_truncated and not r.timed_out and r.returncode is None
    assert len(r.stdout) == 100_000 and time.monotonic() - start < 5  # killed at the cap, not at the timeout
    r = run_python("import os\nwhile True:\n    os.write(2, b'e' * 65536)", config=SandboxConfig(output_bytes=50_000))
    assert r.output_truncated and len(r.stderr) == 50_000


def test_undecodable_output_and_huge_stdin_never_raise():
    r = run_python("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe ok')\nprint(len(sys.stdin.read()))",
                   stdin="y" * (4 * 2**20))
    assert r.returncode == 0 and r.stdout.endswith(" ok4194304\n") and "\ufffd" in r.stdout


def test_missing_bwrap_is_a_clear_error_and_nothing_runs():
    config = SandboxConfig(bwrap="/nonexistent/bin/bwrap")
    with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap"):
        check_sandbox(config)
    with pytest.raises(SandboxUnavailable, match=r"not found at '/nonexistent/bin/bwrap'"):
        run_python("print(1)", config=config)


def test_pool_runs_programs_concurrently_and_stays_bounded():
    code = "import time; time.sleep(1.0); print('slept')"
    with SandboxPool(max_workers=4) as pool:
        start = time.monotonic()
        results = pool.run_many([code] * 4 + ["print(2 + 2)"])
        elapsed = time.monotonic() - start
    assert [r.stdout for r in results] == ["slept\n"] * 4 + ["4\n"]
    assert elapsed < 2.5  # 5 s when run one by one
    with SandboxPool(max_workers=1) as pool:
        start = time.monotonic()
        pool.run_many(["import time; time.sleep(0.5)"] * 2)
        assert time.monotonic() - start >= 1.0  # never more than max_workers at once


def test_pool_stays_healthy_after_hostile_programs():
    hostile = ["while True: pass", "import os\nwhile True:\n    os.write(1, b'x' * 65536)",
               "x = bytearray(2**34)", "import os; os.kill(os.getpid(), 9)", "raise SystemExit(3)"]
    threads_before = threading.active_count()
    # 3 s: the flooder must get to write 10 kB before its time is up, also on a loaded box (1 s was not, once)
    with SandboxPool(max_workers=2, config=SandboxConfig(timeout_s=3.0, output_bytes=10_000)) as pool:
        results = pool.run_many(hostile)
        after = pool.run_many(["print('fine')"] * 3)
    assert [r.ok for r in results] == [False] * 5
    assert results[0].timed_out and results[1].output_truncated and results[4].returncode == 3
    assert [r.stdout for r in after] == ["fine\n"] * 3
    assert threading.active_count() <= threads_before
    assert signal.getsignal(signal.SIGINT) is not None  # nothing touched our own signal handling
