"""The python tool in rollouts: envs/tool_episode.py bound to the rollout engine and the sandbox.

What it does
  With `rollout.tools.python.enabled` (rl/config.py `PythonToolConfig`):
  - `task_prompt(task, effort, cfg)` renders every rollout and evaluation prompt with the tool's
    description in the system message (`description`: "sandbox" or openai-harmony's "harmony" text);
    with the tool off it is exactly `envs.harmony.render_prompt(question, effort, developer)`.
  - `WorkerPool` (in the driver) and `RolloutEngine` (rl/engine.py, on each rollout worker's node)
    refuse to start without a working bubblewrap (`require_sandbox`: `rewards.sandbox.SandboxUnavailable`,
    saying how to install it); the engine starts a `SandboxExecutor` with itself, and
    `generate(..., python_tool=True)` (what `WorkerPool.rollout` and `WorkerPool.generate` ask for)
    runs `episodes(...)`: `n` tool episodes per prompt through the engine's one-call sampler.
  - `SandboxExecutor(cfg)(codes)` runs one round's programs concurrently on a `SandboxPool`
    (`max_workers` sandboxes, each `timeout_s` and `memory_mb`) and turns each `ExecResult` into the
    tool's answer (`answer_text`): stdout, then stderr (a traceback), then a note when it timed out,
    hit the sandbox's output cap or exited non-zero without a word.

Guarantees and limits
- What the code does is never an exception: a crash is a traceback in the answer, a loop a timeout
  note. Our side failing (the sandbox gone after start) raises, as the code reward does.
- The answer's ids are what the learner trains on with loss mask 0; nothing sampled is re-tokenized.
- Budget forcing and the tool are not combined (config validation says so).
"""
from __future__ import annotations

from typing import Callable, Sequence

from envs import harmony
from envs.tool_episode import TRUNCATED, Episode, Sampler, run_episodes
from envs.types import Task
from rewards.sandbox import ExecResult, SandboxConfig, SandboxPool, check_sandbox
from rl.config import PythonToolConfig
from rl.seeds import continuation_seed


def task_prompt(task: Task, effort: str, cfg: PythonToolConfig) -> list[int]:
    """`task`'s prompt at `effort`, the python tool described in the system message when `cfg.enabled`."""
    tool = harmony.python_tool_description(cfg.description, cfg.timeout_s) if cfg.enabled else None
    return harmony.render_prompt(task.question, effort, task.developer, python_tool=tool)


def answer_text(r: ExecResult, timeout_s: float) -> str:
    """The tool's answer to one sandboxed run.

    >>> answer_text(ExecResult(0, "42\\n", ""), 10)
    '42\\n'
    >>> answer_text(ExecResult(1, "", "Traceback ...\\nZeroDivisionError: division by zero\\n"), 10)
    'Traceback ...\\nZeroDivisionError: division by zero\\n'
    >>> answer_text(ExecResult(None, "1\\n", "", timed_out=True), 2.5), answer_text(ExecResult(137, "", ""), 2)
    ('1\\n[timed out after 2.5 s]', '[exit status 137]')
    """
    text = r.stdout
    if r.stderr:
        text += ("\n" if text and not text.endswith("\n") else "") + r.stderr
    note = (f"[timed out after {timeout_s:g} s]" if r.timed_out
            else "[output limit exceeded: the program was stopped]" if r.output_truncated
            else f"[exit status {r.returncode}]" if r.returncode != 0 and not r.stderr
            else "")
    if note:
        text += ("\n" if text and not text.endswith("\n") else "") + note
    return text


def require_sandbox(cfg: PythonToolConfig) -> SandboxConfig:
    """The sandbox settings of the tool's calls; `SandboxUnavailable` (saying how to install
    bubblewrap) when untrusted code cannot be contained here."""
    config = SandboxConfig(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb)
    check_sandbox(config)
    return config


class SandboxExecutor:
    """Runs a round's calls concurrently in the bubblewrap sandbox; refuses to exist without one."""

    def __init__(self, cfg: PythonToolConfig):
        self.cfg = cfg
        self.pool = SandboxPool(cfg.max_workers, require_sandbox(cfg))

    def __call__(self, codes: Sequence[str]) -> list[str]:
        return [answer_text(r, self.cfg.timeout_s) for r in self.pool.run_many(list(codes))]

    def close(self) -> None:
        self.pool.close()


def episodes(sample: Sampler, prompts: Sequence[Sequence[int]], n: int, budgets: Sequence[int],
             seeds: Sequence[int | None], cfg: PythonToolConfig, execute: Callable[[Sequence[str]], Sequence[str]],
             keep_id: Callable[[int], bool] | None = None) -> list[list[Episode]]:
    """`n` tool episodes per prompt (envs.tool_episode.run_episodes with `cfg`'s caps; turn t of
    sample j seeded `rl.seeds.continuation_seed(request seed, j, t)`)."""
    return run_episodes(sample, prompts, n, budgets, seeds, execute, max_calls=cfg.max_calls,
                        max_output_tokens=cfg.max_output_tokens, turn_seed=continuation_seed, keep_id=keep_id)


# What the tool typically answers besides numbers (rewards/sandbox.py runs /sandbox/main.py): a trimmed
# vocabulary built for the tool holds these ids, so an error reads as an error (ids it lacks are dropped).
TYPICAL_ANSWERS = (
    'Traceback (most recent call last):\n  File "/sandbox/main.py", line 1, in <module>\n    print(x)\n',
    "          ^\n          ~^~\nNameError: name 'x' is not defined\nZeroDivisionError: division by zero\n",
    "SyntaxError: invalid syntax\nSyntaxError: '(' was never closed\nTypeError: ValueError: ",
    "\n[timed out after 10 s]\n[output limit exceeded: the program was stopped]\n[exit status 1]" + TRUNCATED,
)


def vocabulary_ids(cfg: PythonToolConfig) -> list[int]:
    """Ids a trimmed vocabulary needs for episodes with the tool: the prompts describing it at every
    effort (with and without a developer message), the answers' headers and `TYPICAL_ANSWERS`."""
    ids = set(header_ids())
    tool = harmony.python_tool_description(cfg.description, cfg.timeout_s)
    for effort in harmony.EFFORTS:
        ids.update(harmony.render_prompt("x", effort, "x", python_tool=tool))
    for text in TYPICAL_ANSWERS:
        ids.update(harmony.encode_text(text))
    return sorted(ids)


def header_ids() -> list[int]:
    """The ids every answer inserts around the output (its header on either channel, the next assistant
    header): a trimmed vocabulary must hold them (output ids it lacks are dropped, `keep_id`)."""
    return [*harmony.tool_reply_head("analysis"), *harmony.tool_reply_head("commentary"), *harmony.tool_reply_tail()]
