"""Harmony I/O: the only module that imports `openai_harmony`.

What it does
- `load_encoding()` returns the o200k_harmony encoding offline. openai-harmony downloads
  `o200k_base.tiktoken` unless `TIKTOKEN_ENCODINGS_BASE` names a folder holding it. We rebuild that
  file byte for byte from the `quicktok-v1` wheel (its `o200k.vocab`: u32 count, then per record
  u16 length, token bytes, u32 rank), check the sha256 openai-harmony itself checks, and point
  `TIKTOKEN_ENCODINGS_BASE` at our cache folder. A user-set `TIKTOKEN_ENCODINGS_BASE` wins; without
  quicktok the normal download path is left untouched.
- `render_prompt(...)` renders system (reasoning effort) + developer + user and the assistant header
  prefix, ready for completion.
- `parse_completion(ids)` parses sampled tokens into per-channel messages non-strictly. Malformed
  model output never raises: it yields `Transcript(format_ok=False, error=...)`.
- `render_training(...)` renders a full conversation for SFT with a loss mask on the tokens the
  assistant generates (headers after `<|start|>assistant`, content, `<|end|>`/`<|return|>`).
- `open_channel(ids)`, `analysis_header()`, `forced_final_header()`: what budget forcing
  (rl/forcing.py) needs to know of a completion cut short and the exact ids it inserts.

Departure from openai-harmony: its `auto_drop_analysis` only drops analysis before the first final;
we render single-turn tasks, where the rule does not matter.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import os
import struct
from pathlib import Path

from envs.types import EFFORTS, Message, Transcript

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_FILE = "o200k_base.tiktoken"

# Special tokens of o200k_harmony (shared/reference/gpt-oss.md).
START, END, MESSAGE, CHANNEL = 200006, 200007, 200008, 200005
RETURN, CALL, CONSTRAIN = 200002, 200012, 200003
ENDOFTEXT = 199999  # <|endoftext|>: padding, and what an unmappable id decodes to
STOP_TOKENS = (RETURN, CALL)  # stop_tokens_for_assistant_actions; <|end|> is not a stop


def cache_dir() -> Path:
    """Where generated artefacts live (override with DELIBERATE_CACHE)."""
    root = os.environ.get("DELIBERATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "deliberate"
    )
    return Path(root)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rebuild_o200k_vocab(out_dir: Path) -> Path:
    """Write `o200k_base.tiktoken` from quicktok's packaged vocab; verify its sha256."""
    from importlib.resources import files

    src = files("quicktok") / "data" / "o200k.vocab"
    raw = src.read_bytes()
    (count,) = struct.unpack_from("<I", raw, 0)
    pos, records = 4, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", raw, pos)
        tok = raw[pos + 2 : pos + 2 + n]
        (rank,) = struct.unpack_from("<I", raw, pos + 2 + n)
        records.append((rank, tok))
        pos += 2 + n + 4
    records.sort()
    text = b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for r, t in records)
    digest = hashlib.sha256(text).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise RuntimeError(
            f"rebuilt {O200K_FILE} has sha256 {digest}, expected {O200K_BASE_SHA256}; "
            "the installed quicktok-v1 is not 0.4.0 — install quicktok-v1==0.4.0 or set "
            "TIKTOKEN_ENCODINGS_BASE to a folder holding the real file"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{O200K_FILE}.{os.getpid()}"
    tmp.write_bytes(text)
    os.replace(tmp, out_dir / O200K_FILE)  # atomic: concurrent workers never see half a file
    return out_dir / O200K_FILE


def ensure_vocab() -> str | None:
    """Point openai-harmony at a verified local vocab; returns the folder used (None = download)."""
    user = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if user:
        return user
    folder = cache_dir() / "tiktoken"
    path = folder / O200K_FILE
    if not (path.exists() and _sha256(path) == O200K_BASE_SHA256):
        try:
            rebuild_o200k_vocab(folder)
        except ModuleNotFoundError:
            return None  # no quicktok: let openai-harmony download as usual
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    return str(folder)


@functools.cache
def load_encoding():
    """The o200k_harmony encoding, loaded offline when possible (cached per process)."""
    ensure_vocab()
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def _system_message(effort: str):
    from openai_harmony import Message as HMessage, ReasoningEffort, Role, SystemContent

    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is not one of {EFFORTS}")
    content = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    # A fixed date keeps prompts (and the tiny model's vocabulary) deterministic.
    content = content.with_conversation_start_date("2026-01-01")
    return HMessage.from_role_and_content(Role.SYSTEM, content)


def _prompt_messages(user: str, effort: str, developer: str | None):
    from openai_harmony import DeveloperContent, Message as HMessage, Role

    msgs = [_system_message(effort)]
    if developer:
        msgs.append(
            HMessage.from_role_and_content(
                Role.DEVELOPER, DeveloperContent.new().with_instructions(developer)
            )
        )
    msgs.append(HMessage.from_role_and_content(Role.USER, user))
    return msgs


def render_prompt(user: str, effort: str = "medium", developer: str | None = None) -> list[int]:
    """Token ids of system + developer + user, ending with `<|start|>assistant` for completion."""
    from openai_harmony import Conversation, Role

    enc = load_encoding()
    conv = Conversation.from_messages(_prompt_messages(user, effort, developer))
    return enc.render_conversation_for_completion(conv, Role.ASSISTANT)


def render_completion(analysis: str | None, final: str) -> list[int]:
    """Token ids an ideal assistant would generate after `render_prompt` (ends with <|return|>)."""
    from openai_harmony import Message as HMessage, Role

    enc = load_encoding()
    ids: list[int] = []
    if analysis is not None:
        msg = HMessage.from_role_and_content(Role.ASSISTANT, analysis).with_channel("analysis")
        ids += enc.render(msg)
    msg = HMessage.from_role_and_content(Role.ASSISTANT, final).with_channel("final")
    final_ids = enc.render(msg)
    if final_ids[-1] != END:
        raise RuntimeError(f"unexpected final message terminator {final_ids[-1]}")
    ids += final_ids[:-1] + [RETURN]
    # render_prompt already ends with `<|start|>assistant`: drop that header prefix.
    head = _assistant_header()
    if ids[: len(head)] != head:
        raise RuntimeError(f"rendered assistant message does not start with {head}")
    return ids[len(head) :]


@functools.cache
def _assistant_header() -> list[int]:
    """`<|start|>assistant`, the suffix of every completion prompt."""
    return [START] + load_encoding().encode("assistant", allowed_special=set())


def render_training(
    user: str, analysis: str | None, final: str, effort: str = "medium", developer: str | None = None
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for one SFT example: mask is 1 exactly on assistant-generated tokens."""
    prompt = render_prompt(user, effort, developer)
    completion = render_completion(analysis, final)
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def parse_completion(token_ids: list[int]) -> Transcript:
    """Parse sampled assistant tokens (everything after `render_prompt`) without ever raising."""
    from openai_harmony import HarmonyError, Role

    enc = load_encoding()
    ids = list(token_ids)
    if ids and ids[-1] in STOP_TOKENS:
        ids = ids[:-1]
    try:
        raw = enc.parse_messages_from_completion_tokens(ids, Role.ASSISTANT, strict=False)
    except HarmonyError as exc:
        return Transcript(format_ok=False, error=f"harmony: {exc}")
    except Exception as exc:  # untrusted output must never crash the pipeline
        return Transcript(format_ok=False, error=f"{type(exc).__name__}: {exc}")
    try:
        return _transcript(raw, ids)
    except Exception as exc:  # untrusted output must never crash the pipeline
        return Transcript(format_ok=False, error=f"{type(exc).__name__}: {exc}")


def _transcript(raw, ids: list[int]) -> Transcript:
    messages = [
        Message(m.channel, m.recipient, "".join(getattr(c, "text", "") for c in m.content))
        for m in raw
    ]
    t = Transcript(messages=messages)
    t.analysis = "\n".join(m.text for m in messages if m.channel == "analysis")
    finals = [m.text for m in messages if m.channel == "final"]
    if finals:
        t.final = finals[-1]
    t.analysis_tokens = channel_token_counts(ids).get("analysis", 0)
    if t.final is None:
        t.format_ok, t.error = False, "no final-channel message"
    elif any(m.channel not in ("analysis", "commentary", "final") for m in messages):
        t.format_ok, t.error = False, "message on an unknown channel"
    return t


def channel_token_counts(token_ids: list[int]) -> dict[str, int]:
    """Content tokens per channel, counted on the sampled ids themselves (never re-tokenized, so
    text that spells a special token cannot break it). Headers run up to `<|message|>`, content up
    to `<|end|>`, `<|return|>`, `<|call|>` or a new `<|start|>`."""
    return _scan_channels(token_ids)[0]


def open_channel(token_ids: list[int]) -> str | None:
    """The channel whose message content `token_ids` end inside ("" for a message without a channel),
    or None when they end between messages or inside a header: what budget forcing asks of a
    completion cut at its analysis cap.

    >>> ids = render_completion("7*6=42.", "42")  # <|channel|>analysis<|message|>7*6=42.<|end|><|start|>...
    >>> end = ids.index(END)
    >>> open_channel(ids[:2]), open_channel(ids[:4]), open_channel(ids[:end + 1]), open_channel(ids[:-1])
    (None, 'analysis', None, 'final')
    """
    return _scan_channels(token_ids)[1]


def _scan_channels(token_ids: list[int]) -> tuple[dict[str, int], str | None]:
    """(content tokens per channel, the channel whose content is still open at the end or None)."""
    enc = load_encoding()
    counts: dict[str, int] = {}
    header: list[int] = []
    channel, in_content = None, False
    for tok in token_ids:
        if tok in (END, RETURN, CALL, START):
            in_content, header, channel = False, [], None
        elif in_content:
            counts[channel or ""] = counts.get(channel or "", 0) + 1
        elif tok == MESSAGE:
            text = enc.decode(header)
            words = text.split("<|channel|>", 1)[1].split() if "<|channel|>" in text else []
            channel, in_content = (words[0] if words else None), True
        else:
            header.append(tok)
    return counts, (channel or "") if in_content else None


@functools.cache
def analysis_header() -> tuple[int, ...]:
    """`<|channel|>analysis<|message|>`: what a completion writes before its chain of thought (the
    prompt already ends with `<|start|>assistant`), as openai-harmony renders it."""
    ids = _empty_assistant_message("analysis")
    return tuple(ids[len(_assistant_header()) : -1])


@functools.cache
def forced_final_header() -> tuple[int, ...]:
    """`<|end|><|start|>assistant<|channel|>final<|message|>`: closes an open analysis message and
    opens the final one (budget forcing inserts these ids), as openai-harmony renders it."""
    return (END, *_empty_assistant_message("final")[:-1])


def _empty_assistant_message(channel: str) -> list[int]:
    """`<|start|>assistant<|channel|>{channel}<|message|><|end|>` rendered by openai-harmony."""
    from openai_harmony import Message as HMessage, Role

    ids = load_encoding().render(HMessage.from_role_and_content(Role.ASSISTANT, "").with_channel(channel))
    if ids[-2:] != [MESSAGE, END] or ids[: len(_assistant_header())] != _assistant_header():
        raise RuntimeError(f"unexpected rendering of an empty {channel} message: {ids}")
    return ids


def decode(token_ids: list[int]) -> str:
    """Text of ids, special tokens included (invalid UTF-8 replaced)."""
    return load_encoding().decode(list(token_ids))


def encode(text: str) -> list[int]:
    """Plain-text ids (no special tokens allowed)."""
    return load_encoding().encode(text, allowed_special=set())


def special_token_ids() -> list[int]:
    """Every Harmony special token id (reserved ones included)."""
    enc = load_encoding()
    return sorted(enc.encode(t, allowed_special="all")[0] for t in enc.special_tokens_set)
