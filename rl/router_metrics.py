"""MoE router metrics of the learner's training passes: per-layer expert load, load-balance coefficient
and routing entropy (issue 17 §4), logged every step as `router/...`.

What: `RouterStats(model)` puts a forward hook on every top-k router (transformers' `GptOssTopKRouter`,
which our kernels keep: kernels/patch.py replaces the experts only). Inside `record(attention_mask)` each
router call adds, over the real (unpadded) tokens of the pass, the number of top-k picks of every expert,
the router's full softmax summed per expert, and the softmax entropy; `collect(reduce)` turns the sums
into metrics and resets them. The learner records the first PPO epoch's forward passes, so every token
of a rollout batch counts once; `reduce` sums over the ranks of a learner group (FSDP: each rank holds
its rows), so the metrics are those of the whole batch.

Per layer l (E experts, top-k routing, n real tokens; f_e = picks of e / (n k), P_e = mean softmax
probability of e over the n tokens):
- `router/layer{l}/max_load` = E max_e f_e: 1 when every expert gets an equal share, E when one expert
  takes every pick (an overloaded expert is what drops tokens under capacity limits and stalls
  expert-parallel GPUs);
- `router/layer{l}/balance` = E sum_e f_e P_e: the load-balancing auxiliary loss of Switch Transformer
  (Fedus et al. 2021, eq. 4) and transformers' `load_balancing_loss_func` (the one gpt-oss is trained
  with), before its coefficient; 1 for uniform routing, up to E when routing collapses;
- `router/layer{l}/entropy` = mean over tokens of -sum_e p_e log p_e of the full softmax, in nats
  (ln E for a router that has no preference; a sharp, confident router is near 0). Shifts in it
  between steps are the routing drift that makes MoE RL unstable (rl/algorithms.py, icepop);
- `router/layer{l}/unused` = fraction of the experts that got no pick in the batch.
And their means over layers: `router/max_load`, `router/balance`, `router/entropy`, `router/unused`;
`router/tokens` is the number of tokens the first router saw (the batch's real tokens, once). Under
`learner.share_prompts` (on by default for a CPU learner alone) a micro-batch runs each distinct prompt
once, so a GRPO group's prompt tokens count once per micro-batch, not once per row: the metrics then
weigh prompts less, and `router/tokens` depends on how the rows fall into micro-batches.

A pass whose router rows do not match its mask (a model that routes only some tokens) adds nothing and
is counted in `router/skipped_passes`; metrics never stop a training step.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence

import torch


def _layer_of(name: str, fallback: int) -> int:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else fallback


class RouterStats:
    """Forward hooks on a model's top-k routers; see the module docstring."""

    def __init__(self, model: torch.nn.Module):
        routers = [(n, m) for n, m in model.named_modules()
                   if hasattr(m, "top_k") and hasattr(m, "num_experts") and "router" in type(m).__name__.lower()]
        self.layers = [_layer_of(n, i) for i, (n, _) in enumerate(routers)]
        self.num_experts = [int(m.num_experts) for _, m in routers]
        self._masks: list[torch.Tensor] | None = None  # (N,) bool per pass of the armed record; None: not recording
        self._calls: list[int] = []
        self._skipped = 0
        self._sums = [self._zeros(e) for e in self.num_experts]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(routers)]

    @staticmethod
    def _zeros(n_experts: int) -> torch.Tensor:
        return torch.zeros(2 * n_experts + 2, dtype=torch.float64)  # picks (E), prob sums (E), entropy sum, tokens

    def __len__(self) -> int:
        return len(self._handles)

    @contextlib.contextmanager
    def record(self, attention_mask: torch.Tensor | Sequence[torch.Tensor] | None) -> Iterator[None]:
        """Count the router calls of the forward passes inside, over the tokens where `attention_mask`
        (B, L) is nonzero (None: every token). A list holds one mask per pass, in the order the passes
        run (the learner's shared prompts: the prompts' pass, then the completions'; a prompt shared by a
        group is routed, and counted, once). Passes outside (the old-log-prob and KL-reference passes, a
        gradient-checkpointing recompute during backward) are not counted."""
        masks = attention_mask if isinstance(attention_mask, (list, tuple)) else [attention_mask]
        self._masks = [torch.ones(0, dtype=torch.bool) if m is None else m.reshape(-1).bool() for m in masks]
        self._calls = [0] * len(self._handles)  # per router: the pass its next call belongs to
        try:
            yield
        finally:
            self._masks = None

    def _hook(self, i: int) -> Callable:
        def hook(module, inputs, output) -> None:
            if self._masks is None:
                return
            call, self._calls[i] = self._calls[i], self._calls[i] + 1
            if call >= len(self._masks):  # more passes than masks: not counted
                self._skipped += 1
                return
            with torch.no_grad():
                out = output if isinstance(output, tuple) else (output,)
                logits = out[0]
                logits = logits.reshape(-1, logits.shape[-1])
                mask = self._masks[call]
                if mask.numel() == 0:
                    mask = torch.ones(logits.shape[0], dtype=torch.bool)
                if logits.shape[0] != mask.numel() or logits.shape[-1] != self.num_experts[i]:
                    self._skipped += 1
                    return
                mask = mask.to(logits.device)
                logits = logits[mask].float()
                e, k = self.num_experts[i], int(module.top_k)
                picks = out[2].reshape(-1, out[2].shape[-1])[mask] if len(out) > 2 else logits.topk(k, -1).indices
                logp = torch.log_softmax(logits, -1)
                p = logp.exp()
                row = torch.cat([torch.bincount(picks.reshape(-1), minlength=e)[:e].double(),
                                 p.sum(0).double(), (-(p * logp).sum()).double().reshape(1),
                                 torch.tensor([float(logits.shape[0])], dtype=torch.float64, device=p.device)])
                if self._sums[i].device != row.device:  # sums stay where the router runs: no sync a call
                    self._sums[i] = self._sums[i].to(row.device)
                self._sums[i] += row
        return hook

    def collect(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The metrics of everything recorded since the last call (then reset). `reduce` sums a float64
        tensor over the ranks of a group (`DataParallel.sum`); every rank must call it."""
        if not self._sums:
            return {}
        flat = torch.cat([s.cpu() for s in self._sums] + [torch.tensor([float(self._skipped)], dtype=torch.float64)])
        if reduce is not None:
            flat = reduce(flat)
        self._sums = [self._zeros(e) for e in self.num_experts]
        self._skipped = 0
        out: dict[str, float] = {"router/skipped_passes": float(flat[-1])}
        per: dict[str, list[float]] = {"max_load": [], "balance": [], "entropy": [], "unused": []}
        offset = 0
        for layer, e in zip(self.layers, self.num_experts):
            row = flat[offset: offset + 2 * e + 2]
            offset += 2 * e + 2
            picks, probs, ent, n = row[:e], row[e:2 * e], float(row[2 * e]), float(row[2 * e + 1])
            if n == 0:
                continue
            out.setdefault("router/tokens", n)  # the first layer's: tokens routed in the recorded passes
            f = picks / picks.sum()
            vals = {"max_load": e * float(f.max()), "balance": e * float((f * probs / n).sum()),
                    "entropy": ent / n, "unused": float((picks == 0).double().mean())}
            for k, v in vals.items():
                out[f"router/layer{layer}/{k}"] = v
                per[k].append(v)
        for k, vs in per.items():
            if vs:
                out[f"router/{k}"] = sum(vs) / len(vs)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
