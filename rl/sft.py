"""Cold-start SFT: TRL `SFTTrainer` on generated Harmony transcripts, loss on assistant tokens only.

Each example is one task rendered at one reasoning effort: system (`Reasoning: low|medium|high`) +
user prompt, then the assistant's analysis channel styled by effort (low terse, medium key steps, high
full step-by-step with a check; `envs.math_tasks.solution`) and the final answer. Sequences are
pre-tokenized with openai-harmony (canonical ids), mapped to the tiny model's ids, and passed with
`assistant_masks`, which TRL turns into labels (-100 on prompt tokens).

LM head: SFTTrainer scores tokens through a fused head on the model (TRL `add_fused_lm_head`:
`model(**batch, labels=, fused_lm_head=True)` returns per-token log-probs, entropy and top-1 hits).
On CPU TRL's head scores every position (prompt and padding too), folds entropy and top-1 into its
tiles with gradient bookkeeping, and allocates a (tokens, 32768) buffer per call: about half of an SFT
step on the tiny model under torch.profiler. `install_lm_head` puts in its place one that follows the
same protocol and computes the loss's log-probs only: `sft.loss_head=trl` (default) with TRL's fold on
the same positions (`OneTileLogprobs`: bit-identical loss and weights), `sft.loss_head=assistant` with
our chunked kernel (kernels/logprobs.py) on the assistant tokens only (faster again, a different float
summation order, opt-in). Entropy and token accuracy, which only feed the logs, are computed without
gradient on the assistant tokens (bench/RESULTS.md "SFT step").

Console: one line every `sft.logging_steps` steps (step/total, loss, lr, elapsed, ETA) when
`logging.progress`, in place of TRL's redrawn bar; the datasets / checkpoint-writing bars are silenced.

Run: `python -m rl.pipeline experiment=tiny` (calls `run_sft`), or `run_sft(...)` directly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from pathlib import Path

import torch

from envs import harmony
from envs.tool_episode import teacher_episode
from envs.types import EFFORTS, Task, ToolTrace
from rl.config import LoggingConfig, PythonToolConfig, SFTConfig
from rl.metrics import MetricsLogger, progress_line, quiet_progress_bars
from rl.model import VocabMap, hf_tokenizer, load_policy, save_checkpoint
from rl.tools import task_prompt


def slip_final(final: str, rng: random.Random) -> str:
    """An integer final answer off by one (either way; never negative), as a teacher's copy slip.

    >>> slip_final("13", random.Random(0)) in ("12", "14")
    True
    """
    value = int(final)
    return str(value + 1 if value <= 0 or rng.random() < 0.5 else value - 1)


def sft_examples(tasks: list[Task], solution_fn, vmap: VocabMap, efforts=EFFORTS, final_slip_rate: float = 0.0,
                 seed: int = 0, tool: PythonToolConfig | None = None) -> list[dict]:
    """{input_ids, assistant_masks} per (task, effort), in model ids.

    `solution_fn(task, effort)` gives `(analysis, final)`, or a `ToolTrace` for a task solved with the
    python tool: rendered as the rollout's episode holds it (`envs.tool_episode.teacher_episode`: the
    tool's answers are inserted ids, mask 0). `tool` (`rollout.tools.python`): prompts are the
    rollout's (`rl.tools.task_prompt`, the tool described when enabled); a ToolTrace needs it enabled.

    `final_slip_rate`: fraction of transcripts whose final answer disagrees with their (correct)
    reasoning by one, the reasoning/answer inconsistency of traces distilled from an imperfect teacher.
    The SFT policy imitates the slip; only a reward on the answer can remove it (the tiny demo's RL
    target). Integer finals only; others are left as they are. A `solution_fn` that returns None for a
    (task, effort) drops that example (the deliberative filter's rejects, rl/deliberative.py)."""
    if not 0.0 <= final_slip_rate < 1.0:
        raise ValueError(f"final_slip_rate={final_slip_rate} must be in [0, 1)")
    tool = tool or PythonToolConfig()
    rng = random.Random(f"slip:{seed}")
    rows = []
    for task in tasks:
        for effort in efforts:
            trace = solution_fn(task, effort)
            if trace is None:
                continue
            final = trace.final if isinstance(trace, ToolTrace) else trace[1]
            if final_slip_rate and rng.random() < final_slip_rate and final.lstrip("-").isdigit():
                final = slip_final(final, rng)
            prompt = task_prompt(task, effort, tool)
            if isinstance(trace, ToolTrace):
                if not tool.enabled:
                    raise ValueError(f"task {task.task_id}: its SFT trace calls the python tool; set "
                                     "rollout.tools.python.enabled=true (or env.tool_traces=0)")
                completion, mask = teacher_episode(dataclasses.replace(trace, final=final), tool.max_output_tokens,
                                                   keep_id=lambda t: vmap.covers((t,)))
            else:
                completion = harmony.render_completion(trace[0], final)
                mask = [1] * len(completion)
            rows.append({"input_ids": vmap.to_model(prompt + completion), "assistant_masks": [0] * len(prompt) + mask})
    return rows


def progress_callback(show: bool, sink: MetricsLogger | None):
    """A TrainerCallback: at each trainer log (every `logging_steps` steps) one console line
    (`rl.metrics.progress_line`: step/total, loss, lr, elapsed, ETA) when `show`, and the log's
    numbers to `sink`. Built in a function so importing rl.sft does not import transformers (~8 s)."""
    from transformers import TrainerCallback

    class SFTProgress(TrainerCallback):
        start = 0.0
        first: tuple[int, float] | None = None  # (step, time) of the first log: the ETA's rate skips
        # the first steps, which pay one-off costs (kernel builds, allocator warm-up)

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first = time.perf_counter(), None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:  # the end-of-training summary (train_loss, runtime)
                return
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "total_flos"}
            if sink is not None:
                sink.log(numbers, state.global_step)
            if show:
                print(self.line(state.global_step, state.max_steps, numbers), flush=True)

        def line(self, step: int, total: int, numbers: dict[str, float]) -> str:
            now = time.perf_counter()
            self.first = self.first or (step, now)
            eta = None if step == self.first[0] else (now - self.first[1]) / (step - self.first[0]) * (total - step)
            shown = {"loss": numbers["loss"], "lr": numbers["learning_rate"]}
            return progress_line("sft", step, total, now - self.start, shown, eta_s=eta)

    return SFTProgress()


def install_lm_head(model, loss_head: str) -> None:
    """Replace the fused LM head SFTTrainer installed on `model` by one that computes only the loss's log-probs.

    Same protocol as TRL's (`model(..., labels=, fused_lm_head=True)` -> `FusedCausalLMOutput`: `log_probs`
    (B, T-1), zero where the label is -100, plus `entropy`, `is_top1`, `label_mask`), so SFTTrainer's
    `compute_loss` is unchanged. `loss_head`: "trl" = TRL's chunked kernel on the positions TRL scores
    (every position on CPU, the labelled ones on CUDA/XPU): the loss and gradients are TRL's bit for bit;
    "assistant" = `kernels.logprobs` on the labelled (assistant) positions only."""
    import functools
    import types

    from trl.trainer.utils import FusedCausalLMOutput

    if loss_head not in LOSS_HEADS:
        raise ValueError(f"sft.loss_head={loss_head!r}; choose from {list(LOSS_HEADS)}")
    unfused = model.forward  # TRL's wrapper: without fused_lm_head=True it is the model's own forward

    @functools.wraps(type(model).forward)  # Trainer reads the signature to pick dataset columns
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return unfused(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                           **kwargs)
        if shift_labels is not None or kwargs.get("output_router_logits"):
            raise ValueError("install_lm_head: shift_labels (sequence parallelism) and router logits (MoE aux loss) "
                             "are not supported; set sft.loss_head to TRL's path or drop them")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # (B, T-1, H)
        labels = labels[:, 1:]  # (B, T-1) next-token targets
        mask = labels != -100  # (B, T-1)
        weight = self.get_output_embeddings().weight  # (V, H)
        log_probs = LOSS_HEADS[loss_head](hidden, weight, labels, mask)  # (B, T-1), 0 off the mask
        entropy, is_top1 = token_metrics(hidden.detach(), weight.detach(), labels, mask)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def trl_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """TRL's fused-head log-probs, the same kernel call as `add_fused_lm_head` minus entropy and top-1 (which
    do not touch the log-probs): (B, T, H), (V, H), (B, T), (B, T) -> (B, T), 0 off the mask."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    compact = _use_triton(hidden.device)  # TRL's rule: only the labelled positions where Triton runs
    if compact:
        h, targets = hidden[mask], labels[mask]  # (N, H), (N,)
    else:
        h, targets = hidden.reshape(-1, hidden.size(-1)), labels.clamp(min=0).reshape(-1)  # (B*T, H), (B*T,)
    if not compact and h.shape[0] <= TOKEN_CHUNK_SIZE and weight.shape[0] <= _CHUNKED_LOGPROB_CHUNK_SIZE:
        log_probs = OneTileLogprobs.apply(h, weight, targets)  # TRL's torch fold in one tile, fewer passes
    else:
        log_probs = ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None,
                                                 1.0, ("log_probs",))[0]
    if compact:
        return log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
    return log_probs.view(mask.shape).masked_fill(~mask, 0)


class OneTileLogprobs(torch.autograd.Function):
    """TRL's `ChunkedLogProbFunction` (log-probs only, temperature 1, no bias/softcap) when the input is one
    tile (N <= TOKEN_CHUNK_SIZE, V <= its vocabulary chunk), bit for bit: the same GEMMs and the same float
    operations in the same order, minus TRL's exact no-ops (x * 1.0, 0 * rescale + s, zeros + grad, copies)
    and with its logits gradient g (onehot - p) built in 3 passes over the tile instead of 13.
    (N, H), (V, H), (N,) -> (N,). Equivalence: tests/rl/test_sft_progress.py."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        z = torch.mm(hidden, weight.t())  # (N, V)
        top = z.amax(-1)  # (N,)
        log_z = top + torch.log(torch.exp(z - top[:, None]).sum(-1))
        ctx.save_for_backward(hidden, weight, targets, log_z)
        return z.gather(-1, targets[:, None]).squeeze(-1) - log_z

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, log_z = ctx.saved_tensors
        g_z = torch.exp(torch.mm(hidden, weight.t()).sub_(log_z[:, None])).neg_()  # (N, V) -p
        g_z[torch.arange(targets.shape[0], device=targets.device), targets] += 1  # onehot - p
        g_z.mul_(grad[:, None])
        g_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device).addmm_(g_z, weight)
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device).addmm_(g_z.t(), hidden)
        return g_hidden, g_weight, None


def assistant_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """Our chunked selective log-softmax on the labelled positions only: (B, T, H), (V, H), (B, T), (B, T) ->
    (B, T), 0 off the mask. Same values as TRL's head to float rounding, not the same summation order."""
    from kernels.logprobs import selective_log_softmax

    log_probs = selective_log_softmax(hidden[mask], weight, labels[mask])  # (N,)
    return log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)


LOSS_HEADS = {"trl": trl_head_logprobs, "assistant": assistant_head_logprobs}  # sft.loss_head


@torch.no_grad()
def token_metrics(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and "target is the first argmax" (TRL's `entropy` / `mean_token_accuracy`) on the labelled
    positions, `chunk` tokens of logits at a time, no gradient: (B, T, H), (V, H), (B, T), (B, T) -> two (B, T)."""
    h, targets = hidden[mask], labels[mask]  # (N, H), (N,)
    entropy = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    is_top1 = torch.empty(h.shape[0], device=h.device, dtype=torch.bool)
    for a in range(0, h.shape[0], chunk):
        logits = (h[a:a + chunk] @ weight.t()).float()  # (n, V)
        logp = logits.log_softmax(-1)
        entropy[a:a + chunk] = -(logp.exp() * logp).sum(-1)
        is_top1[a:a + chunk] = logits.argmax(-1) == targets[a:a + chunk]
    return (entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
            is_top1.new_zeros(mask.shape).masked_scatter(mask, is_top1))


def _trainer_args(cfg: SFTConfig, seed: int, out_path: Path, max_len: int):
    """TRL's SFTConfig for our typed `cfg` (every value from the schema; nothing re-defaulted here)."""
    from trl import SFTConfig as TRLSFTConfig

    beta1, beta2 = cfg.betas
    return TRLSFTConfig(
        output_dir=str(out_path.with_name(out_path.name + ".trainer")),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        adam_beta1=beta1,
        adam_beta2=beta2,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip,
        max_length=max_len,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],  # progress_callback feeds rl.metrics' sinks (jsonl, TensorBoard, W&B)
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # tiny model: memory is plentiful, recompute costs ~30%
        bf16=False,  # fp32 like the learner (TRL defaults to bf16 autocast)
        disable_tqdm=True,  # a bar redrawn per step; our progress lines replace it
    )


def run_sft(model_path: str | os.PathLike, out_path: str | os.PathLike, rows: list[dict], cfg: SFTConfig, *,
            seed: int, logging: LoggingConfig, logging_dir: str | None) -> dict:
    """Train the policy at `model_path` on `rows`; save an HF checkpoint at `out_path`. Returns metrics.

    Prints a progress line every `cfg.logging_steps` steps when `logging.progress`; `logging_dir`
    (None = console only) receives the stage's metrics.jsonl / tensorboard / wandb (rl/metrics.py)."""
    torch.set_num_threads(cfg.num_threads)
    out_path = Path(out_path)
    sink = MetricsLogger(logging_dir, logging, config=dataclasses.asdict(cfg), name="sft") if logging_dir else None
    # quiet: "Loading weights", the datasets map bars ("examples/s"), the save's "Writing model shards"
    with quiet_progress_bars(), sink or contextlib.nullcontext():
        trainer, vmap = sft_trainer(model_path, out_path, rows, cfg, seed=seed,
                                    callbacks=[progress_callback(logging.progress, sink)])
        install_lm_head(trainer.model, cfg.loss_head)  # the loss's log-probs only (module docstring)
        result = trainer.train()
        save_checkpoint(trainer.model, vmap, out_path)
    return {"train_loss": float(result.training_loss), "steps": int(result.global_step)}


def sft_trainer(model_path: str | os.PathLike, out_path: Path, rows: list[dict], cfg: SFTConfig, *, seed: int,
                callbacks: list) -> tuple:
    """(SFTTrainer with TRL's own LM head, VocabMap) for the policy at `model_path` on `rows`; `run_sft` then
    installs `cfg.loss_head` (`install_lm_head`). bench/bench_sft.py builds its variants here."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    args = _trainer_args(cfg, seed, out_path, max(len(r["input_ids"]) for r in rows))
    model, vmap = load_policy(model_path, dtype=torch.float32)
    if cfg.kernels == "deliberate":
        from kernels.patch import apply_kernels

        apply_kernels(model)  # grouped MoE + block sink attention; same weights, ~2x faster on CPU
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=hf_tokenizer(vmap), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm's stand-in prints raw log dicts
    return trainer, vmap
