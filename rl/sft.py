"""Cold-start SFT: TRL `SFTTrainer` on generated Harmony transcripts, loss on assistant tokens only.

Each example is one task rendered at one reasoning effort: system (`Reasoning: low|medium|high`) +
user prompt, then the assistant's analysis channel styled by effort (low terse, medium key steps, high
full step-by-step with a check; `envs.math_tasks.solution`) and the final answer. Sequences are
pre-tokenized with openai-harmony (canonical ids), mapped to the tiny model's ids, and passed with
`assistant_masks`, which TRL turns into labels (-100 on prompt tokens).

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
from envs.types import EFFORTS, Task
from rl.config import LoggingConfig, SFTConfig
from rl.metrics import MetricsLogger, progress_line, quiet_progress_bars
from rl.model import VocabMap, hf_tokenizer, load_policy, save_checkpoint


def slip_final(final: str, rng: random.Random) -> str:
    """An integer final answer off by one (either way; never negative), as a teacher's copy slip.

    >>> slip_final("13", random.Random(0)) in ("12", "14")
    True
    """
    value = int(final)
    return str(value + 1 if value <= 0 or rng.random() < 0.5 else value - 1)


def sft_examples(tasks: list[Task], solution_fn, vmap: VocabMap, efforts=EFFORTS, final_slip_rate: float = 0.0,
                 seed: int = 0) -> list[dict]:
    """{input_ids, assistant_masks} per (task, effort), in model ids.

    `final_slip_rate`: fraction of transcripts whose final answer disagrees with their (correct)
    reasoning by one, the reasoning/answer inconsistency of traces distilled from an imperfect teacher.
    The SFT policy imitates the slip; only a reward on the answer can remove it (the tiny demo's RL
    target). Integer finals only; others are left as they are."""
    if not 0.0 <= final_slip_rate < 1.0:
        raise ValueError(f"final_slip_rate={final_slip_rate} must be in [0, 1)")
    rng = random.Random(f"slip:{seed}")
    rows = []
    for task in tasks:
        for effort in efforts:
            analysis, final = solution_fn(task, effort)
            if final_slip_rate and rng.random() < final_slip_rate and final.lstrip("-").isdigit():
                final = slip_final(final, rng)
            ids, mask = harmony.render_training(task.question, analysis, final, effort, task.developer)
            rows.append({"input_ids": vmap.to_model(ids), "assistant_masks": mask})
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
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    torch.set_num_threads(cfg.num_threads)
    out_path = Path(out_path)
    args = _trainer_args(cfg, seed, out_path, max(len(r["input_ids"]) for r in rows))
    sink = MetricsLogger(logging_dir, logging, config=dataclasses.asdict(cfg), name="sft") if logging_dir else None
    # quiet: "Loading weights", the datasets map bars ("examples/s"), the save's "Writing model shards"
    with quiet_progress_bars(), sink or contextlib.nullcontext():
        model, vmap = load_policy(model_path, dtype=torch.float32)
        if cfg.kernels == "deliberate":
            from kernels.patch import apply_kernels

            apply_kernels(model)  # grouped MoE + block sink attention; same weights, ~2x faster on CPU
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=hf_tokenizer(vmap), callbacks=[progress_callback(logging.progress, sink)])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm's stand-in prints raw log dicts
        result = trainer.train()
        save_checkpoint(trainer.model, vmap, out_path)
    return {"train_loss": float(result.training_loss), "steps": int(result.global_step)}
