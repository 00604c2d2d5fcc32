"""Memory plan: the bytes each GPU of a run holds, from the config's numbers alone (nothing is loaded).

    python -m rl.memory_plan experiment=gpt_oss_20b_lora_1gpu     # the table README quotes, and the verdict
    plan = memory_plan(cfg); plan.check()                           # raises naming the GPU that overflows

What is counted (B = bytes, P = parameters; GiB = 2^30 B), per GPU:

learner rank (R = learner.world_size ranks; FSDP2 shards weights, grads and optimizer states R ways)
- full training (learner.lora.rank 0): weights, grads and AdamW's two moments in `learner.dtype`
  (fp32: 4 + 4 + 8 = 16 B/P), / R. With bf16 autocast over fp32 weights, the bf16 copies of the
  weights a forward used live until backward: all of them on one rank (one layer's under gradient
  checkpointing), two layers' all-gathered bf16 weights under FSDP (this layer and the prefetched one).
- LoRA (rank r > 0, rl/lora.py): the frozen base as the checkpoint holds it (MXFP4 experts at 4.25
  bits), every other weight in `learner.dtype` (the presets say bfloat16, as released), / R; adapters
  r x (in + out) per targeted projection (per expert for gate_up_proj/down_proj), 16 B/P (fp32 weight,
  grad, AdamW); FSDP gathers two layers of the frozen base.
- activations for one micro-batch of T = learner.micro_batch_size x rollout.max_model_len tokens (a
  sequence can be that long): per token and layer `layer_activation_bytes` (residual and norms at
  the weights' width, q/k/v/rotated/attention output, router logits, the MoE kernel's gathered input,
  pre-activation u for top-k experts and output, at the compute width), x L layers; under gradient
  checkpointing only each layer's input (L x H per token) plus two layers' worth (the recomputed layer
  and its gradients). Log-probs: the chunked kernel's tiles (`learner.kernels=deliberate`) or the full
  (T, V) fp32 logits and log-softmax (`stock`).
- the KL reference (algo.kl_coef > 0, full training): another copy of the weights.
rollout engine GPU (vLLM, TP = rollout.tensor_parallel_size shards)
- weights / TP: MXFP4 experts at 4.25 bits (rollout.quantization=mxfp4), else `rollout.dtype`.
- KV cache / TP: rollout.max_num_seqs sequences of rollout.max_model_len tokens, L x 2 (K, V) x KV
  heads x head_dim x 2 B (bf16) per token. Conservative: sliding-window layers are counted at full
  length (vLLM's hybrid allocator keeps only their window, so the real cache is about half).
- VLLM_OVERHEAD_GIB for vLLM's activation profile, sampler and CUDA graphs (an estimate).
and RESERVE_GIB per GPU (CUDA context, NCCL buffers, allocator fragmentation).

Budgets: `cluster.gpu_memory_gib` per GPU (what torch reports: an "80 GB" H100 is 79.6 GiB); vLLM may
take `rollout.gpu_memory_utilization` of it. cluster.placement=colocate puts a learner rank and an
engine on one GPU: the engine gets that fraction and the learner must fit in the rest; otherwise
each has its own GPU. These are estimates from shapes (activations within about +-30% of what torch
allocates for eager attention); a GPU run's `torch.cuda.max_memory_allocated` replaces them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rl.config import Config, ModelConfig

GIB = 2**30
MXFP4_BYTES = 4.25 / 8  # 4-bit code + one E8M0 byte per 32 weights
RESERVE_GIB = 2.0
VLLM_OVERHEAD_GIB = 4.0
KV_BYTES = 2  # bf16 KV cache
LOGPROB_TILE = 1024 * 4096  # tokens x vocabulary rows per tile of kernels.logprobs (fp32)
WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


# ---- parameter counts ------------------------------------------------------------------------------
def param_counts(m: ModelConfig) -> dict[str, int]:
    """Parameters of a gpt-oss `model` node by part, as `GptOssForCausalLM` holds them (tests check the
    total against a meta-device build and the model card: 20.91B / 116.83B).

    >>> from rl.config import compose
    >>> c = param_counts(compose(["model=gpt_oss_20b"]).model)
    >>> round(c["total"] / 1e9, 2), round(c["experts"] / 1e9, 2), round(c["attention"] / 1e9, 2)
    (20.91, 19.12, 0.64)
    """
    H, I, E, L, V = m.hidden_size, m.intermediate_size, m.num_local_experts, m.num_hidden_layers, m.vocab_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    attention = H * q + q + 2 * (H * kv + kv) + q * H + H + m.num_attention_heads  # q, k, v, o (+ biases), sinks
    counts = {
        "embed": V * H,
        "unembed": V * H,
        "attention": L * attention,
        "router": L * (H * E + E),
        "expert_weights": L * E * (H * 2 * I + I * H),
        "expert_biases": L * E * (2 * I + H),
        "norms": L * 2 * H + H,
    }
    counts["experts"] = counts["expert_weights"] + counts["expert_biases"]
    counts["total"] = sum(v for k, v in counts.items() if k != "experts")
    return counts


def released_weight_bytes(m: ModelConfig, quantized: bool = True, width: int = 2) -> float:
    """Bytes of the weights as served: MXFP4 expert weights (4.25 bits) + everything else at `width`
    (bf16 as released); `quantized=False`: all at `width`. gpt-oss-20b: 12.8 GiB, 120b: 60.8 GiB (card)."""
    c = param_counts(m)
    if not quantized:
        return c["total"] * width
    return c["expert_weights"] * MXFP4_BYTES + (c["total"] - c["expert_weights"]) * width


def lora_params(m: ModelConfig, rank: int, targets: list[str]) -> int:
    """Adapter parameters: rank x (in + out) per targeted projection per layer (experts: per expert)."""
    H, I, E = m.hidden_size, m.intermediate_size, m.num_local_experts
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
              "gate_up_proj": (H, 2 * I), "down_proj": (I, H)}  # (in, out) of each of rl.config.LORA_TARGETS
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"learner.lora.target_modules: {unknown} unknown; valid: {sorted(shapes)}")
    per_layer = sum(rank * sum(shapes[t]) * (E if t in ("gate_up_proj", "down_proj") else 1) for t in targets)
    return m.num_hidden_layers * per_layer


def layer_activation_bytes(m: ModelConfig, compute: int, residual: int) -> int:
    """Bytes one token leaves saved for backward in one decoder layer (see the module docstring)."""
    H, I = m.hidden_size, m.intermediate_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    norms = 4 * H * residual  # two (input, output) RMSNorm pairs
    attention = compute * (3 * q + 3 * kv) + 4 * m.num_attention_heads  # q, k, v, rotated q/k, output; fp32 LSE
    moe = 4 * m.num_local_experts + compute * (2 * H + m.num_experts_per_tok * 2 * I)  # router, x in/out, u
    return norms + attention + moe


# ---- the plan ----------------------------------------------------------------------------------------
@dataclass
class GpuBudget:
    """What one GPU role holds: (item, bytes, how) rows against `capacity` bytes."""

    role: str
    capacity: float
    items: list[tuple[str, float, str]] = field(default_factory=list)

    @property
    def used(self) -> float:
        return sum(b for _, b, _ in self.items)

    @property
    def fits(self) -> bool:
        return self.used <= self.capacity


@dataclass
class MemoryPlan:
    budgets: list[GpuBudget]

    def table(self) -> str:
        """Markdown: one block per GPU role, GiB per item, total against the budget."""
        lines = []
        for b in self.budgets:
            lines += [f"| {b.role} | GiB | how |", "|---|---:|---|"]
            lines += [f"| {name} | {n / GIB:.1f} | {how} |" for name, n, how in b.items]
            verdict = "fits" if b.fits else "DOES NOT FIT"
            lines += [f"| **total** | **{b.used / GIB:.1f}** | of {b.capacity / GIB:.1f} GiB: {verdict} |", ""]
        return "\n".join(lines).rstrip("\n")

    def check(self) -> None:
        """Raise naming every GPU role whose items exceed its budget."""
        over = [f"{b.role}: {b.used / GIB:.1f} GiB of {b.capacity / GIB:.1f}" for b in self.budgets if not b.fits]
        if over:
            raise ValueError("memory plan does not fit: " + "; ".join(over) + "\n" + self.table())


def _weights_how(c: dict[str, int], quantized: bool, width: int, shards: int) -> str:
    """The arithmetic of `released_weight_bytes`, in words."""
    if not quantized:
        return f"{c['total'] / 1e9:.2f}B x {width} B / {shards}"
    rest = (c["total"] - c["expert_weights"]) / 1e9
    return f"({c['expert_weights'] / 1e9:.2f}B expert weights x 4.25 bits + {rest:.2f}B x {width} B) / {shards}"


def _learner(cfg: Config, capacity: float) -> GpuBudget:
    m, lrn = cfg.model, cfg.learner
    c, R, L = param_counts(m), lrn.world_size, m.num_hidden_layers
    w = WIDTH[lrn.dtype]
    layer = (c["total"] - c["embed"] - c["unembed"]) / L  # parameters of one decoder layer
    b = GpuBudget(f"learner rank (1 of {R})", capacity)
    lora = lrn.lora.rank > 0
    if lora:
        base = released_weight_bytes(m, width=w)
        n = lora_params(m, lrn.lora.rank, lrn.lora.target_modules)
        rest = {"float32": "fp32", "bfloat16": "bf16"}[lrn.dtype]
        b.items.append((f"frozen base (MXFP4 experts, {rest} rest)", base / R, _weights_how(c, True, w, R)))
        b.items.append(("LoRA adapters + grads + AdamW", 16 * n / R, f"{n / 1e6:.1f}M params x 16 B / {R}"))
        gathered = 2 * (base - w * (c["embed"] + c["unembed"])) / L if R > 1 else 0.0  # two base layers
        compute = 2 if lrn.dtype == "float32" and lrn.autocast != "off" else w  # bf16 autocast over fp32
        residual = w
    else:
        b.items.append(("weights", c["total"] * w / R, f"{c['total'] / 1e9:.2f}B x {w} B / {R}"))
        b.items.append(("grads", c["total"] * w / R, f"{c['total'] / 1e9:.2f}B x {w} B / {R}"))
        b.items.append(("AdamW moments", 2 * c["total"] * w / R, f"2 x {c['total'] / 1e9:.2f}B x {w} B / {R}"))
        if cfg.algo.kl_coef > 0:
            b.items.append(("KL reference weights", c["total"] * w, f"{c['total'] / 1e9:.2f}B x {w} B (unsharded)"))
        bf16_copies = lrn.dtype == "float32" and lrn.autocast != "off"  # the GPU learner's autocast=auto
        compute, residual = (2 if bf16_copies else w), w
        if R > 1:
            gathered = 2 * layer * compute
        elif bf16_copies:
            gathered = layer * 2 if lrn.gradient_checkpointing else c["total"] * 2
        else:
            gathered = 0.0
    if gathered:
        b.items.append(("gathered / autocast bf16 weights", gathered,
                        "2 layers (FSDP)" if R > 1 else ("1 layer" if lrn.gradient_checkpointing else "every weight")))
    T = lrn.micro_batch_size * cfg.rollout.max_model_len
    per_layer = layer_activation_bytes(m, compute, residual)
    if lrn.gradient_checkpointing:
        act = T * (L * m.hidden_size * residual + 2 * per_layer)
        how = (f"{T} tokens x ({L} layer inputs x {m.hidden_size} x {residual} B"
               f" + 2 layers x {per_layer / 1024:.0f} KiB)")
    else:
        act, how = T * (L + 1) * per_layer, f"{T} tokens x {L + 1} layers x {per_layer / 1024:.0f} KiB"
    b.items.append(("activations (one micro-batch)", act, how))
    if lrn.kernels == "deliberate":
        b.items.append(("log-prob tiles", 3 * 4 * LOGPROB_TILE, "chunked kernel, fp32 tiles"))
    else:
        b.items.append(("full logits + log-softmax", 2 * 4 * T * m.vocab_size, f"{T} x {m.vocab_size} x fp32 x 2"))
    b.items.append(("reserve", RESERVE_GIB * GIB, "CUDA context, NCCL, fragmentation"))
    return b


def _engine(cfg: Config, capacity: float) -> GpuBudget:
    m, rol = cfg.model, cfg.rollout
    TP = rol.tensor_parallel_size
    quant = rol.quantization == "mxfp4"
    weights = released_weight_bytes(m, quantized=quant, width=WIDTH[rol.dtype])
    per_token = m.num_hidden_layers * 2 * m.num_key_value_heads * m.head_dim * KV_BYTES
    kv = rol.max_num_seqs * rol.max_model_len * per_token
    b = GpuBudget(f"rollout engine GPU (TP {TP})", capacity)
    b.items.append(("weights", weights / TP, _weights_how(param_counts(m), quant, WIDTH[rol.dtype], TP)))
    b.items.append(("KV cache", kv / TP, f"{rol.max_num_seqs} seqs x {rol.max_model_len} tokens x "
                                          f"{per_token // 1024} KiB / {TP}"))
    b.items.append(("vLLM activations, graphs", VLLM_OVERHEAD_GIB * GIB, "estimate"))
    return b


def memory_plan(cfg: Config) -> MemoryPlan:
    """The per-GPU plan of `cfg`; needs `cluster.gpu_memory_gib` and a model with its vocab_size (a
    named real model, conf/model/gpt_oss_*.yaml)."""
    if cfg.cluster.gpu_memory_gib <= 0:
        raise ValueError("memory plan: set cluster.gpu_memory_gib (one GPU's memory in GiB)")
    if cfg.model.vocab_size is None:
        raise ValueError("memory plan: model.vocab_size is null (the tiny model's trimmed vocabulary is built "
                         "at run time); use a model preset such as model=gpt_oss_20b")
    total = cfg.cluster.gpu_memory_gib * GIB
    share = cfg.rollout.gpu_memory_utilization * total
    budgets = []
    if cfg.learner.num_gpus > 0:
        learner_capacity = total - share if cfg.cluster.placement == "colocate" else total
        budgets.append(_learner(cfg, learner_capacity))
    if cfg.rollout.num_gpus > 0:
        budgets.append(_engine(cfg, share))
    return MemoryPlan(budgets)


def main() -> None:
    """`python -m rl.memory_plan <overrides>`: print the plan of the composed config; exit 1 if it does not fit."""
    import sys

    from rl.config import compose

    plan = memory_plan(compose(sys.argv[1:]))
    print(plan.table())
    if not all(b.fits for b in plan.budgets):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
