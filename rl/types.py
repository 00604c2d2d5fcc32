"""Small types that cross process boundaries (DESIGN §3). Keep them small and picklable."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from envs.harmony import Transcript

EFFORTS = ("low", "medium", "high")


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
    loss_mask: list[int]  # 1 on tokens the policy generated
    behavior_logprobs: list[float]  # rollout engine's log-probs of completion_ids
    transcript: Transcript
    metadata: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "stop"  # "stop" | "length"

    @property
    def group_key(self) -> tuple[str, str]:
        """GRPO group: same task and same effort."""
        return (self.task_id, self.effort)


@dataclass
class RewardResult:
    """What a reward plugin returns: a score, named parts for logging, free-form info."""

    score: float
    parts: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
