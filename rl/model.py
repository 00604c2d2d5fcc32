"""Policy model: build the tiny gpt-oss, trim its vocabulary, save/load HF checkpoints.

The tiny world uses the real gpt-oss architecture through transformers' `GptOssConfig` /
`GptOssForCausalLM` (learned sinks, alternating sliding/full attention, YaRN RoPE, top-k MoE with
clamped SwiGLU) at toy size. Its embedding rows are only the o200k_harmony ids the tasks can
produce plus every Harmony special token: a `VocabMap` (saved as `vocab_map.json` next to the
weights) converts canonical ids <-> model ids at the model boundary. Everything outside the model
speaks canonical o200k_harmony ids. A checkpoint without `vocab_map.json` (real gpt-oss) uses the
identity map.

Checkpoints are plain HF folders (config.json + model.safetensors) that transformers and vLLM load.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from envs import harmony

VOCAB_MAP_FILE = "vocab_map.json"


@dataclass(frozen=True)
class VocabMap:
    """Model id i <-> canonical o200k_harmony id `canonical[i]`. `canonical=None` is identity."""

    canonical: tuple[int, ...] | None

    @classmethod
    def identity(cls) -> "VocabMap":
        return cls(None)

    @classmethod
    def from_ids(cls, ids: Iterable[int]) -> "VocabMap":
        return cls(tuple(sorted(set(int(i) for i in ids))))

    def __post_init__(self):
        if self.canonical is not None:
            object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.canonical)})

    def __len__(self) -> int:
        if self.canonical is None:
            raise TypeError("identity VocabMap has no length")
        return len(self.canonical)

    @property
    def pad_id(self) -> int:
        """Model id of `<|endoftext|>`, what batches are padded with (masked everywhere it appears)."""
        return self.to_model([harmony.ENDOFTEXT])[0]

    def to_model(self, ids: Sequence[int]) -> list[int]:
        """Canonical -> model ids. An id outside the map is an error naming it (build-time check)."""
        if self.canonical is None:
            return list(ids)
        index = self._index
        try:
            return [index[i] for i in ids]
        except KeyError as exc:
            raise KeyError(
                f"token id {exc.args[0]} is not in the model's trimmed vocabulary "
                f"({len(self.canonical)} ids); rebuild the tiny model with a corpus that covers it"
            ) from None

    def to_canonical(self, ids: Sequence[int]) -> list[int]:
        if self.canonical is None:
            return list(ids)
        n = len(self.canonical)
        # ids past the map (padding rows of the embedding) cannot be sampled after training, but
        # untrusted output must never crash: map them to <|endoftext|>.
        return [self.canonical[i] if 0 <= i < n else harmony.ENDOFTEXT for i in ids]

    def covers(self, ids: Iterable[int]) -> bool:
        return self.canonical is None or all(i in self._index for i in ids)

    def save(self, folder: str | os.PathLike) -> None:
        if self.canonical is not None:
            Path(folder, VOCAB_MAP_FILE).write_text(json.dumps({"canonical_ids": list(self.canonical)}))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "VocabMap":
        path = Path(folder, VOCAB_MAP_FILE)
        if not path.exists():
            return cls.identity()
        return cls(tuple(json.loads(path.read_text())["canonical_ids"]))


def collect_vocab(texts: Iterable[str], extra_ids: Iterable[int] = ()) -> VocabMap:
    """Every id the corpus produces, rendered as Harmony prompts and completions, plus all specials."""
    ids: set[int] = set(harmony.special_token_ids()) | set(extra_ids)
    for text in texts:
        ids.update(harmony.encode(text))
    for effort in harmony.EFFORTS:  # system prompt, developer/user headers
        ids.update(harmony.render_prompt("x", effort, developer="x"))
    ids.update(harmony.render_completion("x", "x"))
    return VocabMap.from_ids(ids)


def gpt_oss_config(cfg: Mapping, vocab_size: int | None = None, **special_ids):
    """`GptOssConfig` from a `model` config node (the fields of `rl.config.ModelConfig`): the one builder
    for the tiny world and the real presets (conf/model/gpt_oss_*.yaml). Layers alternate sliding /
    full attention (even sliding), YaRN RoPE, untied embeddings, no router auxiliary loss (RL turns it
    off). `vocab_size` defaults to `cfg["vocab_size"]`; `special_ids`: eos_token_id, pad_token_id."""
    from transformers import GptOssConfig

    n_layers = cfg["num_hidden_layers"]
    return GptOssConfig(
        vocab_size=vocab_size or cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        num_local_experts=cfg["num_local_experts"],
        num_experts_per_tok=cfg["num_experts_per_tok"],
        sliding_window=cfg["sliding_window"],
        max_position_embeddings=cfg["max_position_embeddings"],
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
        rope_parameters={"rope_type": "yarn", "rope_theta": cfg["rope_theta"], "factor": cfg["rope_yarn_factor"],
                         "original_max_position_embeddings": cfg["rope_original_max_position_embeddings"],
                         "beta_fast": cfg["rope_beta_fast"], "beta_slow": cfg["rope_beta_slow"], "truncate": False},
        rms_norm_eps=cfg["rms_norm_eps"],
        swiglu_limit=cfg["swiglu_limit"],
        router_aux_loss_coef=0.0,  # RL frameworks turn the aux loss off
        output_router_logits=False,
        tie_word_embeddings=False,
        initializer_range=cfg["initializer_range"],
        **special_ids,
    )


def tiny_config(vocab_size: int, cfg: dict, eos_ids: list[int], pad_id: int):
    """GptOssConfig for the tiny world from the Hydra `model` node (eos/pad given as model ids)."""
    return gpt_oss_config(cfg, vocab_size, eos_token_id=eos_ids, pad_token_id=pad_id)


def check_tiny_shapes(cfg: dict) -> None:
    """Kernels and vLLM need head_dim 64 and expert dims that are multiples of 32 (MXFP4 groups)."""
    if cfg["head_dim"] != 64:
        raise ValueError(f"model.head_dim={cfg['head_dim']}: vLLM's CPU attention needs 64")
    for key in ("hidden_size", "intermediate_size"):
        if cfg[key] % 32:
            raise ValueError(f"model.{key}={cfg[key]} must be a multiple of 32 (MXFP4 groups)")


def build_tiny_model(cfg: Mapping, corpus: Iterable[str], out_dir: str | os.PathLike, seed: int = 0,
                     extra_ids: Iterable[int] = ()) -> Path:
    """Build a randomly initialised tiny gpt-oss with a trimmed vocab and save it as an HF folder.
    `cfg`: architecture fields of `rl.config.ModelConfig`; missing ones take the schema's defaults.
    `extra_ids`: canonical ids the vocabulary must hold beyond the corpus (the python tool's prompts
    and answers: `rl.tools.vocabulary_ids`)."""
    from dataclasses import asdict

    from transformers import GptOssForCausalLM

    from rl.config import ModelConfig

    cfg = {**asdict(ModelConfig()), **dict(cfg)}
    check_tiny_shapes(cfg)
    vmap = collect_vocab(corpus, extra_ids)
    vocab_size = -(-len(vmap) // 64) * 64  # pad rows to a multiple of 64
    # Special ids inside the HF config are model ids: <|return|>, <|call|> stop; <|endoftext|> pads.
    config = tiny_config(vocab_size, cfg, vmap.to_model(list(harmony.STOP_TOKENS)), vmap.to_model([harmony.ENDOFTEXT])[0])
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config)
    save_checkpoint(model, vmap, out_dir)
    return Path(out_dir)


def save_checkpoint(model, vmap: VocabMap, out_dir: str | os.PathLike,
                    write_weights: Callable[[Path], None] | None = None) -> None:
    """HF folder: config.json + model.safetensors + vocab_map.json (written to a temp dir, renamed).
    `write_weights(folder)` writes config.json and the weights instead of `model.save_pretrained` (a LoRA
    learner's merged export, rl/lora.py)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from rl.metrics import quiet_progress_bars

    with quiet_progress_bars():  # no "Writing model shards" bar at every checkpoint
        if write_weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            write_weights(tmp)
    save_vocabulary(vmap, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def save_vocabulary(vmap: VocabMap, folder: str | os.PathLike) -> None:
    """vocab_map.json and, for a trimmed vocabulary, the tokenizer files (decoding/padding only: see
    hf_tokenizer) next to a checkpoint's weights."""
    vmap.save(folder)
    if vmap.canonical is not None:
        hf_tokenizer(vmap).save_pretrained(folder)


# What a named preset (conf/model/gpt_oss_*.yaml) and the checkpoint's config.json must agree on.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window")


def resolve_checkpoint(model) -> Path:
    """The local folder `model.path` (an `rl.config.ModelConfig`) names, checked against the preset.

    A folder is used as is. Anything else must be a Hub id ("openai/gpt-oss-20b"), fetched once into the
    Hugging Face cache by `huggingface_hub.snapshot_download` (HF_HOME; with HF_HUB_OFFLINE=1 only the
    cache is read): the drivers call this once at start, so the learner and every rollout worker get
    the same local folder (on a multi-node cluster it must be on a filesystem every node sees). For a
    named real model (`model.name` other than "tiny"), the folder's config.json must match the preset's
    `ARCHITECTURE_FIELDS`, so a 120b folder under `model=gpt_oss_20b` fails here, not in the memory plan."""
    path = Path(model.path)
    if not path.is_dir():
        if path.is_absolute() or str(model.path).startswith(".") or str(model.path).count("/") != 1:
            raise FileNotFoundError(f"model.path={model.path}: no such folder (nor a Hub id like openai/gpt-oss-20b)")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        try:
            path = Path(snapshot_download(model.path))
        except (OSError, HfHubHTTPError) as exc:
            raise FileNotFoundError(
                f"model.path={model.path}: not a local folder, and fetching it from the Hugging Face Hub failed "
                f"({type(exc).__name__}); download the released folder where every node sees it and pass its "
                "path") from exc
    if model.name != "tiny":
        check_architecture(model, path)
    return path


def check_architecture(model, path: str | os.PathLike) -> None:
    """Raise naming every `ARCHITECTURE_FIELDS` entry where `path`'s config.json and the preset differ."""
    found = json.loads(Path(path, "config.json").read_text())
    wrong = {k: (getattr(model, k), found.get(k)) for k in ARCHITECTURE_FIELDS if getattr(model, k) != found.get(k)}
    if wrong:
        said = ", ".join(f"model.{k}={want} but config.json says {got}" for k, (want, got) in wrong.items())
        raise ValueError(f"model.path={path} does not hold model={model.name}: {said}")


def meta_model(model):
    """`GptOssForCausalLM` for a `model` config node on the meta device: shapes and parameter counts, no
    memory (the real presets' size check and the memory plan's cross-check)."""
    from dataclasses import asdict

    from transformers import GptOssForCausalLM

    with torch.device("meta"):
        return GptOssForCausalLM(gpt_oss_config(asdict(model)))


def is_mxfp4_checkpoint(path: str | os.PathLike) -> bool:
    cfg = json.loads(Path(path, "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def load_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32, packed_experts: bool = False):
    """(model, VocabMap) from an HF folder, eager attention (our kernels are switched on by the learner).

    Released-style MXFP4 checkpoints (`*_blocks`/`*_scales` experts) load with `dtype` master weights, or,
    with `packed_experts`, keep their experts 4-bit and frozen (`kernels.moe.FrozenMxfp4Experts`: the
    LoRA base, rl/lora.py); a dense folder loads as it is either way."""
    from transformers import GptOssForCausalLM

    from rl.metrics import quiet_progress_bars

    with quiet_progress_bars():  # no "Loading weights" bar per learner/test
        if is_mxfp4_checkpoint(path):
            from kernels.mxfp4_checkpoint import load_mxfp4_checkpoint

            model = load_mxfp4_checkpoint(path, dtype=dtype, packed_experts=packed_experts)
            model.set_attn_implementation("eager")
        else:
            model = GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model, VocabMap.load(path)


def export_mxfp4(src: str | os.PathLike, dst: str | os.PathLike, scale_rule: str = "floor",
                 max_shard_size: int | str | None = None) -> Path:
    """Write the policy at `src` as a released-style MXFP4 checkpoint (experts packed, rest bf16);
    `max_shard_size` (e.g. "5GB") shards it with an index, as the released gpt-oss folders are."""
    from kernels.mxfp4_checkpoint import save_mxfp4_checkpoint

    model, vmap = load_policy(src)
    out = save_mxfp4_checkpoint(model, dst, scale_rule=scale_rule, max_shard_size=max_shard_size)
    save_vocabulary(vmap, out)
    return out


def _o200k_token_bytes() -> dict[int, bytes]:
    """rank -> token bytes, from the verified o200k_base.tiktoken (envs.harmony rebuilds it offline)."""
    import base64


    folder = harmony.ensure_vocab()
    if folder is None:
        raise RuntimeError("no local o200k_base.tiktoken: install quicktok-v1 or set TIKTOKEN_ENCODINGS_BASE")
    out = {}
    for line in Path(folder, harmony.O200K_FILE).read_bytes().splitlines():
        tok, rank = line.split()
        out[int(rank)] = base64.b64decode(tok)
    return out


@functools.cache
def hf_tokenizer(vmap: VocabMap):
    """A transformers tokenizer over the trimmed vocabulary, for decoding and padding only.

    Token strings are the GPT-2 byte-level spelling of each o200k token's bytes (unique per token), so
    `decode` gives real text. Encoding text with it is NOT o200k BPE — always tokenize through
    `envs.harmony` (token-in/token-out; nothing is re-tokenized).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from envs import harmony

    if vmap.canonical is None:
        raise ValueError("hf_tokenizer needs a trimmed VocabMap; real gpt-oss ships its own tokenizer")
    byte_map = bytes_to_unicode()
    ranks = _o200k_token_bytes()
    enc = harmony.load_encoding()
    special = {enc.encode(t, allowed_special="all")[0]: t for t in enc.special_tokens_set}
    vocab, specials = {}, []
    for model_id, cid in enumerate(vmap.canonical):
        if cid in special:
            vocab[special[cid]] = model_id
            specials.append(special[cid])
        else:
            vocab["".join(byte_map[b] for b in ranks[cid])] = model_id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|return|>",
        additional_special_tokens=[s for s in specials if s not in ("<|endoftext|>", "<|return|>")],
    )
