"""The workload both sides of bench/bench_vs_trl.py train on, the step record they report, and the
memory sampler that watches each side's processes.

Workload: `experiment=tiny` (the demo's RL stage) from an SFT checkpoint, with the benchmark's sizes
as Hydra overrides; both sides compose the same overrides, so the learning rate, optimizer, trained
parameters, group size, max new tokens, reward terms and task stream are one config. The tasks of
step s are `TaskStream.next(train.tasks_per_step)` called s times from cursor 0, as rl/train.py draws
them; each task is one prompt per effort in `env.efforts`.
"""
from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# What `make demo` writes (rl/pipeline.py: run_dir=outputs/tiny-<date>; the SFT checkpoint in sft/).
DEMO_SFT_GLOB = "outputs/tiny-*/sft"
# Seconds per phase; a side fills those it has (TRL's old-policy log-prob pass, our weight sync...).
PHASES = ("generation", "reward", "logprobs", "update", "sync", "other")


def default_policy(root: str | os.PathLike = ".") -> str | None:
    """The newest `make demo` SFT checkpoint under `root` (None when there is none)."""
    found = sorted(p for p in glob.glob(str(Path(root, DEMO_SFT_GLOB))) if Path(p, "config.json").exists())
    return found[-1] if found else None


def require_policy(path: str | None) -> str:
    """`path` as an absolute folder holding an HF checkpoint, or SystemExit saying how to make one."""
    if path is None:
        raise SystemExit(f"no SFT checkpoint found ({DEMO_SFT_GLOB}): run `make demo` (it writes "
                         "outputs/tiny-<date>/sft) or pass --policy PATH to an HF checkpoint folder")
    if not Path(path, "config.json").exists():
        raise SystemExit(f"--policy {path}: no HF checkpoint there (config.json missing); run `make demo` "
                         "(it writes outputs/tiny-<date>/sft) or pass another folder")
    return str(Path(path).resolve())


def overrides(policy: str, run_dir: str | os.PathLike, steps: int, tasks_per_step: int, group_size: int,
              max_new_tokens: int) -> list[str]:
    """The Hydra overrides both sides compose (`rl.config.compose`)."""
    return ["experiment=tiny", f"model.path={policy}", f"run_dir={run_dir}", f"train.steps={steps}",
            f"train.tasks_per_step={tasks_per_step}", f"algo.group_size={group_size}",
            f"rollout.max_tokens={max_new_tokens}", f"rollout.max_model_len={max(256, max_new_tokens + 160)}",
            f"train.checkpoint_every={steps}", "logging.tensorboard=false"]


def step_tasks(cfg) -> list[list]:
    """The tasks of every step, in the order rl/train.py draws them."""
    from rl.data import TaskStream, make_env

    env = make_env(cfg.env, cfg.seed)
    stream = TaskStream(env.tasks("train", cfg.env.train_size), cfg.seed)
    return [stream.next(cfg.train.tasks_per_step) for _ in range(cfg.train.steps)]


@dataclass
class StepRecord:
    """One GRPO step (one rollout batch and the optimizer steps trained on it) of one side."""

    step: int
    reward: float  # mean composite reward of the step's samples
    seconds: dict[str, float]  # per phase (PHASES)
    total_s: float  # wall time of the whole step
    generated_tokens: int  # completion tokens sampled
    trained_tokens: int  # completion tokens in the loss (summed over the optimizer steps' batches)


@dataclass
class SideResult:
    """What one side's subprocess writes back (JSON)."""

    side: str  # "ours" | "trl:<mode>"
    settings: str = ""  # what ran, in words
    steps: list[StepRecord] = field(default_factory=list)
    wall_s: float = 0.0  # the side's whole run, start-up included
    memory: dict = field(default_factory=dict)  # MemorySampler.report()
    error: str | None = None  # why it did not run to the end

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SideResult":
        return cls(**{**d, "steps": [StepRecord(**s) for s in d.get("steps", [])]})


def _vm_hwm(pid: int) -> int:
    """Peak resident set of a live process (VmHWM, bytes); 0 when it is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Resident memory of this process and all its descendants (Ray's daemons and actors, a vLLM engine
    process), sampled every `interval` s on a thread: the peak of the summed RSS (shared library pages
    count once per process), and each process's own peak (VmHWM, last read while it lived) by role."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self._me = psutil.Process()
        self.interval, self.peak_sum = interval, 0
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, VmHWM)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        import psutil

        total = 0
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                role = role_of(p.pid == self._me.pid, p.cmdline())
            except psutil.Error:
                continue
            self.peaks[p.pid] = (role, max(self.peaks.get(p.pid, ("", 0))[1], _vm_hwm(p.pid)))
        self.peak_sum = max(self.peak_sum, total)

    def report(self) -> dict:
        """{"peak_sum": bytes, "roles": {role: summed per-process peaks}}"""
        roles: dict[str, int] = {}
        for role, hwm in self.peaks.values():
            roles[role] = roles.get(role, 0) + hwm
        return {"peak_sum": self.peak_sum, "roles": roles}


def role_of(is_self: bool, cmdline: list[str]) -> str:
    """A process's part in a run, from its command line (Ray names actor processes `ray::<Class>`).

    >>> role_of(False, ["ray::Learner.train_step"]), role_of(False, ["python", "-c", "from multiprocessing.x"])
    ('learner actor', 'process pools (math reward; torch compile workers)')
    """
    if is_self:
        return "driver"
    line = " ".join(cmdline)
    for key, role in (("ray::Learner", "learner actor"), ("ray::RolloutEngine", "rollout actor"),
                      ("ray::RolloutWorker", "rollout actor"), ("EngineCore", "vLLM engine process"),
                      ("multiprocessing", "process pools (math reward; torch compile workers)"),
                      ("compile_worker", "process pools (math reward; torch compile workers)")):
        if key in line:
            return role
    if "ray" in line or "gcs_server" in line:
        return "Ray daemons and idle workers"
    return f"other: {Path(cmdline[0]).name}" if cmdline else "other"


class Stopwatch:
    """Seconds since construction (a side's wall time)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
