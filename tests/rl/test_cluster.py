"""Joining a running Ray cluster (rl/cluster.py), as the README's multi-node recipe does it.

A head started with `ray start --head` that finds a token turns token authentication on (Ray >=
2.52); `init_ray(ClusterConfig(address="host:port"))` must find the token and connect, say what to
do when it has none, and `python -m rl.train cluster=remote cluster.address=...` must train on it.
The head is this test's own: its token file is named by RAY_AUTH_TOKEN_PATH (so ~/.ray is not
touched), it has its own temp dir, and it is stopped by its own process ids (never `ray stop`, which
would stop every Ray on the machine). Drivers run as subprocesses, so this process's Ray is unaffected.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_processes(marker: str) -> list[int]:
    """Pids whose command line names `marker` (this head's temp dir: its Ray processes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass  # the process exited while we looked
    return pids


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group; returns once the node is up."""
    with open(log, "w") as out:
        proc = subprocess.Popen([RAY, "start", *args, "--disable-usage-stats", "--block"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_node(proc)
            raise AssertionError(f"ray start {' '.join(args)} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def _stop_node(proc: subprocess.Popen, marker: str | None = None) -> None:
    """SIGTERM to `ray start --block` stops its node in ~2 s (to the whole group it takes ~30 s);
    then SIGKILL to whatever is left in its group and to processes naming `marker` (its temp dir)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is empty: every process of the node has exited
    proc.wait(10)
    for pid in _own_processes(marker) if marker else []:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """(address, env for drivers) of a 4-CPU Ray head with token authentication on."""
    folder = tmp_path_factory.mktemp("head")
    token = folder / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["RAY_AUTH_TOKEN_PATH"] = str(token)  # the head finds a token: token mode, as with ~/.ray/auth_token
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    proc = _start_node(["--head", f"--port={port}", "--num-cpus=4", f"--temp-dir={temp_dir}",
                        "--include-dashboard=false"], env, folder / "head.log")
    try:
        assert "Token authentication is enabled" in (folder / "head.log").read_text()
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_node(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


JOIN = """
import json, ray
from rl.cluster import init_ray
from rl.config import ClusterConfig
init_ray(ClusterConfig(address={address!r}))
print(json.dumps(ray.cluster_resources()))
"""


def _join(address: str, env: dict) -> subprocess.CompletedProcess:
    """`init_ray` to `address` in a fresh driver process; prints the cluster's resources."""
    return subprocess.run([sys.executable, "-c", JOIN.format(address=address)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_init_ray_joins_a_token_protected_head(head, tmp_path):
    address, env = head
    out = _join(address, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["CPU"] == 4
    # A second node joins as the README says: RAY_AUTH_MODE=token and the head's token.
    env = dict(env)
    token = Path(env.pop("RAY_AUTH_TOKEN_PATH")).read_text()
    node = _start_node([f"--address={address}", "--num-cpus=1"],
                       {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, tmp_path / "node.log")
    try:
        out = _join(address, {**env, "RAY_AUTH_TOKEN": token})
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.strip().splitlines()[-1])["CPU"] == 5
    finally:
        _stop_node(node)
    # A node without the token (a new user's second machine): refused, with what to do.
    out = _join(address, {**env, "HOME": str(tmp_path)})  # no ~/.ray/auth_token there
    assert out.returncode != 0
    assert "requires token authentication and no token was found on this node" in out.stderr
    assert "ray get-auth-token" in out.stderr


@pytest.mark.timeout(900)
def test_train_two_steps_on_the_cluster(head, policy, tmp_path):
    address, env = head
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "rl.train", "cluster=remote", f"cluster.address={address}",
            f"model.path={policy}", f"run_dir={run_dir}", "train.steps=2", "train.tasks_per_step=2",
            "algo.group_size=2", "env.efforts=[low,high]", "env.train_size=20", "rollout.max_tokens=32",
            "rollout.max_model_len=256", "rollout.kv_cache_gib=0.5", "learner.micro_batch_size=4",
            "logging.tensorboard=false"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert (run_dir / "checkpoints" / "step_000002" / "model.safetensors").exists()


NICENESS_DRIVER = """
import os, ray
from rl.cluster import init_ray
from rl.config import ClusterConfig
init_ray(ClusterConfig(num_cpus=1))
print("niceness", ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote()))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("env_value, expected", [(None, 0), ("7", 7)])
def test_local_ray_runs_its_actors_at_normal_priority(env_value, expected):
    """Ray's workers start at niceness 15 unless told otherwise, and then any other process on the box starves
    the learner; a local start runs them at `cluster.worker_niceness` (0), RAY_worker_niceness winning."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    if env_value is not None:
        env["RAY_worker_niceness"] = env_value
    out = subprocess.run([sys.executable, "-c", NICENESS_DRIVER], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert f"niceness {expected}" in out.stdout, out.stdout + out.stderr[-2000:]


def test_worker_niceness_out_of_range_fails_naming_the_key():
    from rl.cluster import init_ray
    from rl.config import ClusterConfig

    with pytest.raises(ValueError, match="worker_niceness"):
        init_ray(ClusterConfig(worker_niceness=40))
