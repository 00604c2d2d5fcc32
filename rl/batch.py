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

    def prompt_rows(self) -> tuple[Tensor, Tensor]:
        """(starts, rows), (B,) long each: where each row's completion starts (its prompt length; the row's
        length when it has no completion) and which distinct prompt it has, numbered 0.. in order of first
        appearance (the rows of one GRPO group share one)."""
        comp = self.completion_mask
        has = comp.any(-1)
        starts = torch.where(has, comp.int().argmax(-1), self.lengths)
        seen: dict[tuple[int, ...], int] = {}
        ids = self.input_ids.tolist()
        rows = [seen.setdefault(tuple(r[:p]), len(seen)) for r, p in zip(ids, starts.tolist())]
        return starts, torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)

    def split_prompts(self) -> "PromptSplit | None":
        """The batch as its distinct prompts and its completions (`PromptSplit`), or None when no two rows
        share a prompt, no row has a completion, or the batch is not what `collate` builds (right-padded,
        each completion non-empty-prompted and running from its first token to the row's end): the learner
        then runs every row as it is."""
        starts, rows = self.prompt_rows()
        G, B = int(rows.max()) + 1 if len(rows) else 0, self.size
        ends = self.lengths
        C = int((ends - starts).max()) if B else 0
        if G == B or C == 0 or not self.right_padded():
            return None
        col = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None, :]
        tail = (col >= starts[:, None]) & (col < ends[:, None])  # (B, L): [start, end) of each row
        if not torch.equal(tail, self.completion_mask.bool()) or bool((starts[self.completion_mask.any(-1)] == 0).any()):
            return None
        first = torch.full((G,), -1, dtype=torch.long, device=rows.device).scatter_reduce(
            0, rows, torch.arange(B, device=rows.device), reduce="amin", include_self=False)  # (G,): a row per prompt
        plen = starts[first]  # (G,)
        P = int(plen.max())
        dev = self.input_ids.device
        col = torch.arange(P, device=dev)[None, :]  # (1, P)
        pad = (P - plen)[:, None]  # (G, 1) left padding
        prompt_mask = col >= pad  # (G, P)
        src = (col - pad).clamp(min=0)  # (G, P): index into the prompt's row
        prompt_ids = torch.where(prompt_mask, self.input_ids[first].gather(1, src), 0)
        prompt_pos = torch.where(prompt_mask, col - pad, 0)
        ccol = torch.arange(C, device=dev)[None, :]  # (1, C)
        completion_mask = ccol < (ends - starts)[:, None]  # (B, C)
        csrc = (starts[:, None] + ccol).clamp(max=self.input_ids.shape[1] - 1)
        completion_ids = torch.where(completion_mask, self.input_ids.gather(1, csrc), 0)
        return PromptSplit(prompt_ids, prompt_mask, prompt_pos, completion_ids, completion_mask,
                           starts[:, None] + ccol, rows)

    def right_padded(self) -> bool:
        """Whether every row is real tokens then padding (what `collate` builds): no 0 before a 1."""
        m = self.attention_mask
        return bool((m[:, 1:] <= m[:, :-1]).all()) if m.shape[1] > 1 else True


class PromptSplit(NamedTuple):
    """A `TrainBatch` as G distinct prompts and its B completions, for the learner's shared-prompt pass
    (`learner.share_prompts`, kernels.attention.PrefixKV): each prompt is run once, each completion
    attends to its prompt's keys. Prompts are left-padded and completions right-padded, so every row's
    real tokens are contiguous and the last prompt column is each prompt's last token. Padding ids are 0
    (masked everywhere)."""

    prompt_ids: Tensor  # (G, P) long, left-padded
    prompt_mask: Tensor  # (G, P) bool: real prompt tokens
    prompt_positions: Tensor  # (G, P) long: 0.. on the real tokens, 0 on padding
    completion_ids: Tensor  # (B, C) long, right-padded
    completion_mask: Tensor  # (B, C) bool: real completion tokens (the batch's completion_mask, compacted)
    completion_positions: Tensor  # (B, C) long: the row's prompt length + 0..
    rows: Tensor  # (B,) long: each row's prompt, in 0..G-1

    def masks(self) -> list[Tensor]:
        """The real-token masks of the two passes, prompts then completions (RouterStats.record)."""
        return [self.prompt_mask, self.completion_mask]


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
