"""The types that cross package and process boundaries (docs/ARCHITECTURE.md, "Seams").

They live at the bottom layer, beside the Harmony I/O that fills them, so `rewards` and `rl` import
them downwards and nothing imports upwards. Keep them small and picklable: they travel through Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

EFFORTS = ("low", "medium", "high")  # Harmony's `Reasoning: low|medium|high`, in increasing order
INSERTED_LOGPROB = 0.0  # behaviour log-prob stored for inserted ids (finite: the learner masks them out)


@dataclass
class Message:
    """One parsed message of a completion: the policy's ("assistant") or a tool's answer ("python")."""

    channel: str | None
    recipient: str | None
    text: str
    author: str = "assistant"  # "assistant", or the tool that answered (a Harmony tool message's name)


@dataclass
class Transcript:
    """A parsed completion. `final` is None when no final-channel message was produced."""

    messages: list[Message] = field(default_factory=list)
    analysis: str = ""
    final: str | None = None
    analysis_tokens: int = 0  # tokens of analysis-channel content (CoT length)
    format_ok: bool = True
    error: str | None = None

    @property
    def tool_calls(self) -> int:
        """Messages the policy addressed to a tool (answered or not)."""
        return sum(m.author == "assistant" and bool(m.recipient) for m in self.messages)


@dataclass
class Task:
    """One problem from an environment. `metadata` carries what rewards need (e.g. "answer")."""

    task_id: str
    env: str
    question: str
    metadata: dict[str, Any] = field(default_factory=dict)
    developer: str | None = None  # developer instructions rendered into the prompt


class ToolCall(NamedTuple):
    """One python-tool call of a teacher's trace: the code and the tool's answer to it (what the
    sandboxed run prints, e.g. "56088\n": rl/tools.py `answer_text`)."""

    code: str
    output: str


@dataclass(frozen=True)
class ToolTrace:
    """A teacher's python-tool episode for SFT: what an env's `solution(task, effort)` returns for a task
    it solves with the tool (otherwise `(analysis, final)`). `steps` in order: analysis messages (str)
    and calls; then the final. envs/tool_episode.py `teacher_episode` renders it as a rollout would hold it."""

    steps: tuple[str | ToolCall, ...]
    final: str

    def texts(self) -> list[str]:
        """Every text it holds (the tiny model's vocabulary corpus)."""
        return [t for s in self.steps for t in ((s,) if isinstance(s, str) else s)] + [self.final]


class Request(NamedTuple):
    """One prompt for an engine's one-call sampler: `n` completions of at most `max_tokens` ids (budget
    forcing, rl/forcing.py, and python-tool episodes, envs/tool_episode.py, sample through it)."""

    prompt: list[int]  # canonical ids
    n: int
    max_tokens: int
    seed: int | None  # vLLM seed (sample j is the j-th draw of its stream); None = the engine's stream


@dataclass
class Sample:
    """One rollout: canonical o200k_harmony ids in and out, never re-tokenized."""

    task_id: str
    env: str
    effort: str
    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the policy generated (0: inserted by budget forcing or a tool)
    behavior_logprobs: list[float]  # rollout engine's log-probs of completion_ids
    transcript: Transcript
    metadata: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "stop"  # "stop" | "length"
    budget_forced: bool = False  # rollout closed the analysis at its cap and opened the final (rl/forcing.py)
    # The learner step whose weights sampled it (the `version` of the pool's last weight update,
    # rl/workers.py); None = not recorded. Async training drops samples staler than train.max_staleness.
    policy_version: int | None = None

    @property
    def group_key(self) -> tuple[str, str]:
        """GRPO group: same task and same effort."""
        return (self.task_id, self.effort)
