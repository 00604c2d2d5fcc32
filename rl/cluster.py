"""Ray for a run: an embedded local Ray by default, or join a running cluster (`cluster.address`).

    init_ray(cfg.cluster)   # ClusterConfig: address null = local; "auto" or "host:port" = join

Token authentication (Ray >= 2.52; on by default for local clusters since 2.59)
  `ray start --head` turns token authentication on when it finds a token (the `RAY_AUTH_TOKEN`
  variable, the file `RAY_AUTH_TOKEN_PATH` names, or `~/.ray/auth_token`, which any earlier local
  `ray.init()` on the machine leaves behind), unless `RAY_AUTH_MODE` says otherwise
  (ray/scripts/scripts.py, `start`: `maybe_enable_token_auth_if_token_available`). A driver does
  the same only for `address="auto"`: with an explicit "host:port" Ray connects without the token
  (ray/_private/worker.py, `init`: "an explicit address ... never does") and the head answers
  `InvalidAuthToken`. So for an explicit address we make the same choice `auto` makes: a token
  found on this node turns token mode on, which is harmless for a head without authentication (it
  ignores the token). With no token, or the wrong one, the error says where the token must go.

The runtime_env carries the repository on PYTHONPATH (every node needs the repository and its
`.venv` at the same path) and the environment vLLM needs inside a Ray actor (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import os
from pathlib import Path

from rl.config import ClusterConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN_HELP = (
    "copy the head's token to this node: `ray get-auth-token` on the head prints it; put it in "
    "~/.ray/auth_token here, or export RAY_AUTH_TOKEN=<token> (or RAY_AUTH_TOKEN_PATH=<file>). "
    "See https://docs.ray.io/en/latest/ray-security/token-auth.html")


def runtime_env() -> dict:
    """What every Ray worker process of the run gets: the repository importable, vLLM in-process."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                         "PYTHONPATH": path,
                         # libraries' deprecation notices (vLLM's torch.distributed.reduce_op...) are not
                         # the user's to fix; they would print once per actor into the training console
                         "PYTHONWARNINGS": "ignore::FutureWarning"}}


def init_ray(cfg: ClusterConfig) -> None:
    """Start (address null) or join (address set) Ray for this process; no-op if Ray is up. A local start runs
    Ray's workers (the learner and rollout actors) at `cfg.worker_niceness` (Ray's default is 15)."""
    import ray

    if not -20 <= cfg.worker_niceness <= 19:
        raise ValueError(f"cluster.worker_niceness={cfg.worker_niceness} must be in -20..19")
    if ray.is_initialized():
        return
    if not cfg.address:
        os.environ.setdefault("RAY_worker_niceness", str(cfg.worker_niceness))  # read by the raylet it starts
        ray.init(num_cpus=cfg.num_cpus or max(os.cpu_count() or 2, 4), namespace=cfg.namespace,
                 runtime_env=runtime_env(), include_dashboard=False, log_to_driver=True)
        return
    token = _use_token_if_available()
    try:
        ray.init(address=cfg.address, namespace=cfg.namespace, runtime_env=runtime_env(), log_to_driver=True)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        if not _is_auth_error(exc):
            raise
        have = "the token found on this node was refused" if token else "no token was found on this node"
        raise ConnectionError(
            f"the Ray cluster at {cfg.address} requires token authentication and {have}: {TOKEN_HELP}"
        ) from exc


def kill_actors(actors, wait_s: float = 60.0) -> None:
    """Kill Ray actors (no restart) and wait, up to `wait_s` in all, until each is gone. `ray.kill` only sends
    the signal: a call submitted right after it can still be answered, and a GPU or a port still be held
    when the next stage starts. An actor counts as gone when a call to it fails (`RayActorError`) or hangs."""
    import time

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    actors = list(actors)
    for a in actors:
        ray.kill(a, no_restart=True)
    deadline = time.monotonic() + wait_s
    for a in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(a.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except (RayActorError, GetTimeoutError):
                break
            time.sleep(0.2)


def _use_token_if_available() -> bool:
    """Token mode on if this node has a token and RAY_AUTH_MODE is unset (what Ray does for
    address="auto"); returns whether token mode is on."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    # Sets RAY_AUTH_MODE=token (inherited by this process's children) and refreshes Ray's config.
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _is_auth_error(exc: BaseException | None) -> bool:
    """Whether a failed `ray.init` was refused for its token. Ray raises a ConnectionError from either
    an AuthenticationError or a RuntimeError that carries the GCS client's error as text."""
    from ray.exceptions import AuthenticationError

    while exc is not None:
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
