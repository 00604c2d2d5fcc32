"""Cold-start SFT: TRL `SFTTrainer` on generated Harmony transcripts, loss on assistant tokens only.

Each example is one task rendered at one reasoning effort: system (`Reasoning: low|medium|high`) +
user prompt, then the assistant's analysis channel styled by effort (low terse, medium key steps, high
full step-by-step with a check; `envs.math_tasks.solution`) and the final answer. Sequences are
pre-tokenized with openai-harmony (canonical ids), mapped to the tiny model's ids, and passed with
`assistant_masks`, which TRL turns into labels (-100 on prompt tokens).

Run: `python -m rl.pipeline experiment=tiny` (calls `run_sft`), or `run_sft(...)` directly.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from envs import harmony
from rl.model import VocabMap, hf_tokenizer, load_policy, save_checkpoint
from envs.types import EFFORTS, Task


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


def run_sft(model_path: str | os.PathLike, out_path: str | os.PathLike, rows: list[dict], cfg: dict,
            seed: int = 0, logging_dir: str | None = None) -> dict:
    """Train the policy at `model_path` on `rows`; save an HF checkpoint at `out_path`. Returns metrics."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    model, vmap = load_policy(model_path, dtype=torch.float32)
    if cfg.get("kernels", "deliberate") == "deliberate":
        from kernels.patch import apply_kernels

        apply_kernels(model)  # grouped MoE + block sink attention; same weights, ~2x faster on CPU
    tokenizer = hf_tokenizer(vmap)
    max_len = max(len(r["input_ids"]) for r in rows)
    beta1, beta2 = cfg.get("betas", (0.9, 0.999))
    if logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logging_dir)  # transformers' TensorBoardCallback reads it
    args = SFTConfig(
        output_dir=str(Path(out_path).with_name(Path(out_path).name + ".trainer")),
        max_steps=int(cfg["steps"]),
        per_device_train_batch_size=int(cfg["batch_size"]),
        learning_rate=float(cfg["lr"]),
        lr_scheduler_type=cfg.get("lr_scheduler", "cosine"),
        warmup_steps=int(cfg.get("warmup_steps", 10)),
        adam_beta1=float(beta1),
        adam_beta2=float(beta2),
        weight_decay=float(cfg.get("weight_decay", 0.0)),
        max_grad_norm=float(cfg.get("grad_clip", 1.0)),
        max_length=max_len,
        logging_steps=int(cfg.get("logging_steps", 10)),
        save_strategy="no",
        report_to=["tensorboard"] if logging_dir else [],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # tiny model: memory is plentiful, recompute costs ~30%
        bf16=False,  # fp32 like the learner (TRL defaults to bf16 autocast)
        disable_tqdm=not cfg.get("progress", True),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    result = trainer.train()
    save_checkpoint(trainer.model, vmap, out_path)
    return {"train_loss": float(result.training_loss), "steps": int(result.global_step)}
