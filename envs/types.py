"""The types that cross package and process boundaries (docs/ARCHITECTURE.md, "Seams").

They live at the bottom layer, beside the Harmony I/O that fills them, so `rewards` and `rl` import
them downwards and nothing imports upwards. Keep them small and picklable: they travel through Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EFFORTS = ("low", "medium", "high")  # Harmony's `Reasoning: low|medium|high`, in increasing order


@dataclass
class Message:
    """One parsed assistant message."""

    channel: str | None
    recipient: str | None
    text: str


@dataclass
class Transcript:
    """A parsed completion. `final` is None when no final-channel message was produced."""

    messages: list[Message] = field(default_factory=list)
    analysis: str = ""
    final: str | None = None
    analysis_tokens: int = 0  # tokens of analysis-channel content (CoT length)
    format_ok: bool = True
    error: str | None = None


@dataclass
class Task:
    """One problem from an environment. `metadata` carries what rewards need (e.g. "answer")."""

    task_id: str
    env: str
    question: str
    metadata: dict[str, Any] = field(default_factory=dict)
    developer: str | None = None  # developer instructions rendered into the prompt


@dataclass
class Sample:
    """One rollout: canonical o200k_harmony ids in and out, never re-tokenized."""

    task_id: str
    env: str
    effort: str
    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the policy generated (0: inserted, e.g. by budget forcing)
    behavior_logprobs: list[float]  # rollout engine's log-probs of completion_ids
    transcript: Transcript
    metadata: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "stop"  # "stop" | "length"
    budget_forced: bool = False  # rollout closed the analysis at its cap and opened the final (rl/forcing.py)

    @property
    def group_key(self) -> tuple[str, str]:
        """GRPO group: same task and same effort."""
        return (self.task_id, self.effort)
