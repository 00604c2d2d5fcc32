"""Run untrusted Python in a bubblewrap sandbox: `run_python(code, stdin, timeout_s, memory_mb) -> ExecResult`.

What
- `run_python(code, stdin=None, timeout_s=None, memory_mb=None, config=None)` runs `code` as a
  script under the *system* python (`SandboxConfig.python`, /usr/bin/python3; never the project's
  venv) and returns an `ExecResult`: returncode, stdout, stderr, timed_out, output_truncated,
  duration_s. Untrusted code never raises here: a crash, a kill or a timeout is a result.
- `SandboxPool(max_workers)` runs many executions at once (a thread pool, each thread waiting on one
  sandbox), bounded so that scoring never takes every core from the trainer; `default_pool()` is the
  process-wide one.
- `check_sandbox(config)` raises `SandboxUnavailable` (saying how to install bubblewrap, or why it
  failed) when untrusted code cannot be contained; `run_python` calls it first. There is no fallback
  that runs code unsandboxed.

Security model (docs/ARCHITECTURE.md#faults; verified by tests/rewards/test_sandbox.py)
- bubblewrap (`bwrap`) with every namespace unshared (`--unshare-all --unshare-user`): no network
  (a new network namespace whose only interface is its own loopback; the host's is out of reach), own
  pid/ipc/uts/cgroup namespaces, no nested user namespaces.
- Filesystem: /usr read-only (with the /bin, /lib, /lib64, /sbin links or read-only binds of the
  host), a fresh /proc and a minimal read-only /dev; a fresh tmpfs /tmp of `scratch_mb` is the only
  writable place (also the working directory and HOME). /etc, /home, /root, the repository and the
  host's /tmp are not there at all. The program and this launcher are copied in (`--ro-bind-data`
  from memfds): nothing is written on the host.
- Environment cleared (`--clearenv`; PATH, HOME, TMPDIR, LANG and PYTHONDONTWRITEBYTECODE only), new
  session (`--new-session`: no TIOCSTI into our terminal), `--die-with-parent`.
- Unprivileged uid 65534 inside. When we are root, bubblewrap itself is started as uid/gid 65534
  (`Popen(user=, group=)`): mapped to root outside, the kernel would skip RLIMIT_NPROC (it is ignored
  for the host's uid 0; measured: a sandboxed fork loop got 50 of 50 children as root, 14 with the
  limit at 16 as uid 65534).
- rlimits, set by rewards/sandbox_init.py inside the sandbox before it runs the program: CPU time
  (ceil(timeout) + 1 s), address space (`memory_mb`), processes (`max_processes`, counted per user
  namespace, so per sandbox), file size, open files, core files 0; plus `nice` 10.
- Wall clock: past `timeout_s` the bwrap process group gets SIGKILL; its pid-1 init in the sandbox
  then dies too (`--die-with-parent`), and the kernel kills every process left in that pid
  namespace, so nothing outlives the call, daemonised children included.
- stdout and stderr are read as they come and capped at `output_bytes` each: past the cap the
  program is killed (a judge's "output limit exceeded") and `output_truncated` is set.
- The container's own limits still apply on top (cgroup memory of the trainer: the tmpfs is charged
  there, bounded by `scratch_mb`).

Cost per execution (`python -m bench.bench_sandbox`, bench/RESULTS.md): bubblewrap's namespaces and
mounts, one interpreter start (the launcher runs the program in-process; exec-ing a second
interpreter cost ~15 ms more), the uid switch, and the launcher's own imports, cut to modules the
interpreter loads anyway (json, runpy and traceback cost ~10-20 ms a run: `print(1)` went from a
median 139 ms to 54 ms side by side at load 12 on the 2 cores). On the idle box: 13.8 ms median,
5.6 ms over a bare interpreter start (8.2 ms). Under load the `nice` 10 shows: the sandboxes wait
for the CPU, by design.
"""
from __future__ import annotations

import atexit
import functools
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

INIT_SCRIPT = Path(__file__).with_name("sandbox_init.py")
NOBODY = 65534  # the overflow uid/gid: owns nothing on the host
INSTALL_HINT = ("install bubblewrap: `sudo apt-get install bubblewrap` (Debian/Ubuntu), `sudo dnf install "
                "bubblewrap` (Fedora), or run scripts/setup.sh, which installs it")
_CHUNK = 1 << 16
_REAP_S = 2.0  # how long a killed sandbox may take to empty its pid namespace


class SandboxUnavailable(RuntimeError):
    """Untrusted code cannot be contained here (no bubblewrap, or it cannot create namespaces)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one execution; every default is the tested setting."""

    bwrap: str = "bwrap"  # name on PATH or a path
    python: str = "/usr/bin/python3"  # the interpreter inside (read-only bind of /usr); not the venv
    timeout_s: float = 10.0  # wall clock, the whole process tree is killed past it
    memory_mb: int = 512  # RLIMIT_AS per process
    max_processes: int = 32  # RLIMIT_NPROC inside the sandbox's user namespace (threads count)
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    scratch_mb: int = 64  # size of the tmpfs /tmp, the only writable place
    output_bytes: int = 1 << 20  # cap on stdout and on stderr each; past it the program is killed
    nice: int = 10  # scheduling priority increment (the trainer keeps the CPU first)
    uid: int = NOBODY  # uid/gid inside (and of bwrap itself when we are root)


@dataclass
class ExecResult:
    """What one sandboxed run did. `returncode` is the program's exit status as bwrap reports it
    (128 + N when signal N killed it, e.g. 137 for SIGKILL, 152 for SIGXCPU); None when we killed it
    (timeout or output cap)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    output_truncated: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


# --------------------------------------------------------------------------- availability


def resolve_bwrap(config: SandboxConfig) -> str:
    """Absolute path of bwrap; `SandboxUnavailable` naming the fix when it is not there."""
    path = shutil.which(config.bwrap)
    if path is None:
        raise SandboxUnavailable(
            f"bubblewrap (bwrap) not found at {config.bwrap!r}: code rewards run untrusted code only "
            f"inside its sandbox and refuse to run without it; {INSTALL_HINT}")
    return path


_working: set[tuple] = set()  # (bwrap path, python, uid) that ran the probe program (failures are retried)
_probe_lock = threading.Lock()


def check_sandbox(config: SandboxConfig | None = None) -> None:
    """Raise `SandboxUnavailable` unless a probe program runs in the sandbox (once per setup and process)."""
    config = config or SandboxConfig()
    bwrap = resolve_bwrap(config)
    key = (bwrap, config.python, config.uid)
    with _probe_lock:
        if key in _working:
            return
        why = _probe(bwrap, config)
        if why is not None:
            raise SandboxUnavailable(why)
        _working.add(key)


def _probe(bwrap: str, config: SandboxConfig) -> str | None:
    """None when `print(6 * 7)` runs in the sandbox, else why not and what to do."""
    if not os.path.isfile(config.python):
        return f"sandbox python {config.python!r} does not exist; install python3 or set SandboxConfig.python"
    try:
        r = _run(bwrap, config, "print(6 * 7)", None, timeout_s=max(config.timeout_s, 30.0),
                 memory_mb=config.memory_mb)
    except OSError as exc:  # bwrap not executable, or we may not switch to the sandbox's uid
        return f"bubblewrap at {bwrap} could not be started as uid {config.uid}: {exc}"
    if r.ok and r.stdout.strip() == "42":
        return None
    return (f"bubblewrap at {bwrap} could not start a sandbox (exit {r.returncode}, stderr "
            f"{r.stderr.strip()[-300:]!r}). It needs unprivileged user namespaces: sysctl "
            "kernel.unprivileged_userns_clone=1 (Debian), kernel.apparmor_restrict_unprivileged_userns=0 "
            "(Ubuntu 24.04), or an AppArmor profile that allows bwrap")


# --------------------------------------------------------------------------- one execution


def run_python(code: str, stdin: str | bytes | None = None, timeout_s: float | None = None,
               memory_mb: int | None = None, config: SandboxConfig | None = None) -> ExecResult:
    """Run `code` as a script in the sandbox; `stdin` is fed to it. Never raises for what the code does.

    >>> r = run_python("import sys; print(sum(map(int, sys.stdin.read().split())))", stdin="2 3 4")
    >>> r.returncode, r.stdout, r.timed_out
    (0, '9\\n', False)
    >>> run_python("while True: pass", timeout_s=0.5).timed_out
    True
    """
    config = config or SandboxConfig()
    check_sandbox(config)
    return _run(resolve_bwrap(config), config, code, stdin,
                timeout_s=config.timeout_s if timeout_s is None else timeout_s,
                memory_mb=config.memory_mb if memory_mb is None else memory_mb)


def _run(bwrap: str, config: SandboxConfig, code: str, stdin: str | bytes | None, timeout_s: float,
         memory_mb: int) -> ExecResult:
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s={timeout_s} and memory_mb={memory_mb} must be positive")
    data = stdin.encode("utf-8", "surrogateescape") if isinstance(stdin, str) else (stdin or b"")
    fds = [_memfd("init", _init_script()),
           _memfd("main", code.encode("utf-8", "surrogateescape"))]
    limits = {"nice": config.nice,
              "RLIMIT_CPU": math.ceil(timeout_s) + 1,
              "RLIMIT_AS": memory_mb << 20,
              "RLIMIT_NPROC": config.max_processes,
              "RLIMIT_FSIZE": config.max_file_mb << 20,
              "RLIMIT_NOFILE": config.max_open_files,
              "RLIMIT_CORE": 0}
    info_r, info_w = os.pipe()  # bwrap writes {"child-pid": N} there: the sandbox's init, seen from here
    fds.append(info_w)
    argv = bwrap_argv(bwrap, config, init_fd=fds[0], main_fd=fds[1]) + ["--info-fd", str(info_w)] + [
        config.python, "-I", "/sandbox/init.py", ",".join(f"{k}={int(v)}" for k, v in limits.items()), "/sandbox/main.py"]
    drop = {"user": config.uid, "group": config.uid, "extra_groups": []} if os.geteuid() == 0 else {}
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=fds, env={"PATH": "/usr/bin:/bin"}, cwd="/",
                                start_new_session=True, **drop)
    except BaseException:
        os.close(info_r)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    try:
        out, err, timed_out, truncated = _communicate(proc, data, start + timeout_s, config.output_bytes)
    finally:
        _kill_tree(proc, info_r)
    returncode = None if (timed_out or truncated) else proc.returncode
    return ExecResult(returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                      timed_out, truncated, time.monotonic() - start)


def bwrap_argv(bwrap: str, config: SandboxConfig, init_fd: int, main_fd: int) -> list[str]:
    """The bubblewrap command line up to (not including) the program to run."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
            "--uid", str(config.uid), "--gid", str(config.uid),
            "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):  # merged-/usr links, or the real folders
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
             "--size", str(config.scratch_mb << 20), "--tmpfs", "/tmp",
             "--ro-bind-data", str(init_fd), "/sandbox/init.py",
             "--ro-bind-data", str(main_fd), "/sandbox/main.py",
             "--remount-ro", "/",
             "--chdir", "/tmp", "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
             "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
             "--new-session", "--die-with-parent"]
    return argv


@functools.cache
def _init_script() -> bytes:
    return INIT_SCRIPT.read_bytes()


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(f"deliberate-sandbox-{name}")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin, read stdout/stderr up to `cap` bytes each, until both close and the process exits,
    the deadline passes (timed_out) or an output passes the cap (truncated)."""
    outputs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in outputs:
        sel.register(f, selectors.EVENT_READ)
    pending = memoryview(data)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out = truncated = False
    try:
        while sel.get_map() and not truncated:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(left, 1.0)):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        pending = pending[os.write(f.fileno(), pending[:_CHUNK]):]
                    except BrokenPipeError:
                        pending = pending[:0]  # the program stopped reading: not our failure
                    if not pending:
                        sel.unregister(f)
                        f.close()
                    continue
                chunk = os.read(f.fileno(), _CHUNK)
                if not chunk:
                    sel.unregister(f)
                    continue
                buf, room = outputs[f], cap - len(outputs[f])
                buf += chunk[:room]
                truncated = len(chunk) > room
        if not timed_out and not truncated:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # closed its outputs but kept running
                timed_out = True
    finally:
        sel.close()
    return bytes(outputs[proc.stdout]), bytes(outputs[proc.stderr]), timed_out, truncated


def _kill_tree(proc: subprocess.Popen, info_fd: int) -> None:
    """SIGKILL bwrap's process group (unless it exited) and reap it. The sandbox's init then dies too
    (--die-with-parent) and the kernel kills every process of its pid namespace before the init is
    gone; we wait for that (at most `_REAP_S`), so that nothing of the run outlives the call. When bwrap
    exits by itself it has already reaped its init, so there is nothing to wait for."""
    killed = proc.poll() is None
    if killed:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    try:
        os.set_blocking(info_fd, False)
        info = os.read(info_fd, 4096) if killed else b""
    except BlockingIOError:  # killed before bwrap wrote it: no sandbox was started
        info = b""
    finally:
        os.close(info_fd)
    child = re.search(rb'"child-pid"\s*:\s*(\d+)', info)
    if child:
        _wait_gone(int(child.group(1)))
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None and not f.closed:
            try:
                f.close()
            except BrokenPipeError:
                pass


def _wait_gone(pid: int) -> None:
    """Wait until process `pid` has exited (gone, or a zombie nobody reaped yet), at most _REAP_S."""
    deadline = time.monotonic() + _REAP_S
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in (b"Z", b"X"):
            return
        time.sleep(0.005)


# --------------------------------------------------------------------------- pool


class SandboxPool:
    """Runs up to `max_workers` sandboxes at once (threads waiting on subprocesses).

    The default, half the cores (at least 1), leaves the other half to the trainer; every sandbox also
    runs at `nice` 10. At most `max_workers * max_processes` sandboxed processes exist at any time.

    >>> with SandboxPool(max_workers=2) as pool:
    ...     [r.stdout for r in pool.run_many(["print(1)", "print(2)"])]
    ['1\\n', '2\\n']
    """

    def __init__(self, max_workers: int | None = None, config: SandboxConfig | None = None):
        self.max_workers = max_workers or max(1, (os.cpu_count() or 2) // 2)
        self.config = config or SandboxConfig()
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="sandbox")
        self._owner = os.getpid()  # a forked child must build its own pool

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, code: str, stdin: str | bytes | None = None, timeout_s: float | None = None,
               memory_mb: int | None = None) -> Future:
        """A future of `run_python(code, ...)` with this pool's config."""
        return self._executor.submit(run_python, code, stdin, timeout_s, memory_mb, self.config)

    def run_many(self, codes: Sequence[str], stdins: Sequence[str | bytes | None] | None = None,
                 timeout_s: float | None = None, memory_mb: int | None = None) -> list[ExecResult]:
        """One result per program, in order; they run concurrently."""
        stdins = list(stdins) if stdins is not None else [None] * len(codes)
        if len(stdins) != len(codes):
            raise ValueError(f"{len(codes)} programs but {len(stdins)} stdins")
        futures = [self.submit(c, s, timeout_s, memory_mb) for c, s in zip(codes, stdins)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)


_default_pool: SandboxPool | None = None
_default_lock = threading.Lock()


def default_pool(config: SandboxConfig | None = None) -> SandboxPool:
    """The process-wide pool (created on first use; a different config replaces it)."""
    global _default_pool
    config = config or SandboxConfig()
    with _default_lock:
        if _default_pool is None or _default_pool.config != config or _default_pool._owner != os.getpid():
            _default_pool = SandboxPool(config=config)
            atexit.register(_default_pool.close)
        return _default_pool

