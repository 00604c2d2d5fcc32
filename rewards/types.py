"""What a reward plugin returns. Lives in `rewards` (the scoring layer); `rl` imports it downwards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardResult:
    """A score, named parts for logging, free-form info."""

    score: float
    parts: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
