"""The learner's one input type, `TrainBatch`, and the one function that builds it, `collate`.

Scored samples (canonical o200k_harmony ids) and their advantages go in; right-padded tensors in the
policy's own (model) ids come out. The train loop, the benches and the tests all build learner input
this way, and the learner never sees a string-keyed dict or a per-sample list (docs/ARCHITECTURE.md,
"Seams"). Shapes: B samples, L = longest prompt + completion in the batch.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from envs.types import Sample
from rl.model import VocabMap


class TrainBatch(NamedTuple):
    input_ids: Tensor  # (B, L) long: prompt + completion in model ids, right-padded with pad_id
    attention_mask: Tensor  # (B, L) long: 1 on real tokens
    completion_mask: Tensor  # (B, L) bool: the completion tokens (what the learner scores)
    loss_mask: Tensor  # (B, L) float: 1 on completion tokens the policy generated (tool output: 0)
    behavior_logprobs: Tensor  # (B, L) float: rollout engine's log-prob at completion positions, else 0
    advantages: Tensor  # (B,) float

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        """(B,) long: real tokens per row."""
        return self.attention_mask.sum(-1)

    def select(self, index: Sequence[int] | Tensor) -> "TrainBatch":
        """Rows `index` in that order, trimmed to their own longest row (less padding per micro-batch)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        width = int(self.lengths[idx].max()) if len(idx) else 0
        return TrainBatch(*(t[idx, :width] if t.dim() == 2 else t[idx] for t in self))

    def num_tokens(self) -> float:
        """Tokens that carry loss."""
        return float(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> "TrainBatch":
        """Every tensor on `device` (the same tensors when already there)."""
        return TrainBatch(*(t.to(device) for t in self))

    def right_padded(self) -> bool:
        """Whether every row is real tokens then padding (what `collate` builds): no 0 before a 1."""
        m = self.attention_mask
        return bool((m[:, 1:] <= m[:, :-1]).all()) if m.shape[1] > 1 else True


def collate(samples: Sequence[Sample], advantages: Sequence[float] | Tensor, vmap: VocabMap) -> TrainBatch:
    """`TrainBatch` from scored samples: canonical ids mapped to the policy's ids by its `vmap`,
    padded with its `<|endoftext|>`.

    >>> from envs.types import Transcript
    >>> s = Sample("t", "math", "low", [5, 6], [7, 8, 9], [1, 1, 0], [-0.1, -0.2, -0.3], Transcript())
    >>> b = collate([s], [0.5], VocabMap.identity())
    >>> b.input_ids.tolist(), b.completion_mask.int().tolist(), b.loss_mask.tolist()
    ([[5, 6, 7, 8, 9]], [[0, 0, 1, 1, 1]], [[0.0, 0.0, 1.0, 1.0, 0.0]])
    """
    adv = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)  # (B,)
    if adv.shape[0] != len(samples):
        raise ValueError(f"{len(samples)} samples but {adv.shape[0]} advantages")
    B = len(samples)
    L = max((len(s.prompt_ids) + len(s.completion_ids) for s in samples), default=0)
    ids = torch.full((B, L), vmap.pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    comp = torch.zeros((B, L), dtype=torch.bool)
    lmask = torch.zeros((B, L), dtype=torch.float32)
    behav = torch.zeros((B, L), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        if len(s.loss_mask) != c:
            raise ValueError(f"sample {i} ({s.task_id}): loss_mask has {len(s.loss_mask)} entries for {c} tokens")
        if len(s.behavior_logprobs) != c:
            raise ValueError(f"sample {i} ({s.task_id}): {len(s.behavior_logprobs)} behaviour log-probs "
                             f"for {c} tokens")
        ids[i, : p + c] = torch.tensor(vmap.to_model(list(s.prompt_ids) + list(s.completion_ids)), dtype=torch.long)
        attn[i, : p + c] = 1
        comp[i, p : p + c] = True
        lmask[i, p : p + c] = torch.tensor(s.loss_mask, dtype=torch.float32)
        behav[i, p : p + c] = torch.tensor(s.behavior_logprobs, dtype=torch.float32)
    return TrainBatch(ids, attn, comp, lmask, behav, adv)
