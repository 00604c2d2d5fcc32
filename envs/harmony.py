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
- The python tool (envs/tool_episode.py): `render_prompt(..., python_tool=python_tool_description())`
  describes it in the system message; `tool_reply_head(channel)`, `encode_text(output)` and
  `tool_reply_tail()` are the ids of its answer and of the next assistant header, as openai-harmony
  renders them; `parse_completion` reads completions that hold calls and answers.

Departure from openai-harmony: its `auto_drop_analysis` drops only the analysis before the first
final, and none while the last assistant message is not a final (a later turn's tool loop keeps
every earlier turn's analysis); `drop_earlier_analysis` implements the documented rule (earlier
turns' analysis dropped once a final exists, kept within a tool loop) for an env that renders
earlier turns (none does yet: tasks are single-turn).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import struct
from pathlib import Path
from typing import NamedTuple, Sequence

from envs.types import EFFORTS, Message, Transcript

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_FILE = "o200k_base.tiktoken"

# Special tokens of o200k_harmony (shared/reference/gpt-oss.md).
START, END, MESSAGE, CHANNEL = 200006, 200007, 200008, 200005
RETURN, CALL, CONSTRAIN = 200002, 200012, 200003
ENDOFTEXT = 199999  # <|endoftext|>: padding, and what an unmappable id decodes to
STOP_TOKENS = (RETURN, CALL)  # stop_tokens_for_assistant_actions; <|end|> is not a stop
TOOL_NAME = "python"  # the built-in python tool: the recipient of a call and the author of its answer


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


def _system_message(effort: str, python_tool: str | None = None):
    from openai_harmony import Message as HMessage, ReasoningEffort, Role, SystemContent, ToolNamespaceConfig

    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is not one of {EFFORTS}")
    content = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    # A fixed date keeps prompts (and the tiny model's vocabulary) deterministic.
    content = content.with_conversation_start_date("2026-01-01")
    if python_tool is not None:
        content = content.with_tools(ToolNamespaceConfig(name=TOOL_NAME, description=python_tool, tools=[]))
    return HMessage.from_role_and_content(Role.SYSTEM, content)


def _prompt_messages(user: str, effort: str, developer: str | None, python_tool: str | None = None):
    from openai_harmony import DeveloperContent, Message as HMessage, Role

    msgs = [_system_message(effort, python_tool)]
    if developer:
        msgs.append(
            HMessage.from_role_and_content(
                Role.DEVELOPER, DeveloperContent.new().with_instructions(developer)
            )
        )
    msgs.append(HMessage.from_role_and_content(Role.USER, user))
    return msgs


def render_prompt(user: str, effort: str = "medium", developer: str | None = None,
                  python_tool: str | None = None) -> list[int]:
    """Token ids of system + developer + user, ending with `<|start|>assistant` for completion.
    `python_tool`: the python tool's description (`python_tool_description`), put in the system
    message's `# Tools` section; None (the default) renders no tools."""
    from openai_harmony import Conversation, Role

    enc = load_encoding()
    conv = Conversation.from_messages(_prompt_messages(user, effort, developer, python_tool))
    return enc.render_conversation_for_completion(conv, Role.ASSISTANT)


def python_tool_description(style: str = "sandbox", timeout_s: float = 10.0) -> str:
    """The python tool's description for the system message. "harmony": openai-harmony's built-in
    `ToolNamespaceConfig.python()` text, what gpt-oss was trained with (a stateful Jupyter notebook
    with a 120 s timeout). "sandbox": its first paragraph (what the tool is for), then what our tool
    does: a stateless sandboxed script without network whose printed output comes back, `timeout_s`.
    "brief": two sentences for the tiny world, where the prompt's length is most of an SFT step's cost
    (the sandbox description makes a prompt 199 ids, this one 101).

    >>> text = python_tool_description("sandbox", 5)
    >>> text.startswith("Use this tool to execute Python code"), text.endswith("timed out after 5 seconds. Use print to see results.")
    (True, True)
    >>> python_tool_description("brief")
    'Runs Python code as a script in a sandbox and answers with what it printed. Use print to see results.'
    """
    from openai_harmony import ToolNamespaceConfig

    builtin = ToolNamespaceConfig.python().description
    if style == "harmony":
        return builtin
    if style == "brief":
        return "Runs Python code as a script in a sandbox and answers with what it printed. Use print to see results."
    if style != "sandbox":
        raise ValueError(f"python tool description style {style!r} is not one of ('sandbox', 'harmony', 'brief')")
    return (builtin.split("\n\n")[0] + "\n\nWhen you send a message containing Python code to python, it is run as a "
            "script in a fresh sandbox without network access; nothing is kept between calls. python will respond "
            f"with what the script printed (stdout, then stderr) or say that it timed out after {timeout_s:g} "
            "seconds. Use print to see results.")


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


def render_assistant(text: str, channel: str, recipient: str | None = None) -> list[int]:
    """One assistant message as openai-harmony renders it, from `<|start|>assistant` to `<|end|>` (or
    `<|call|>` when it has a `recipient`: `<|start|>assistant to=python<|channel|>analysis<|message|>...`)."""
    from openai_harmony import Message as HMessage, Role

    msg = HMessage.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    return load_encoding().render(msg.with_recipient(recipient) if recipient else msg)


def assistant_header() -> tuple[int, ...]:
    """`<|start|>assistant`: what a completion prompt, and a python tool's inserted answer, end with."""
    return tuple(_assistant_header())


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
    """Parse sampled assistant tokens (everything after `render_prompt`) without ever raising.

    A python-tool episode's completion holds several messages: the policy's analysis, its calls
    (`to=python`, ended by `<|call|>`), the tool's answers (inserted) and its final. `final` is the
    last final-channel message of the policy; `analysis` and `analysis_tokens` hold the policy's
    analysis-channel messages (the code of its calls included), never a tool's answer. A message
    in another author's name that does not follow a `<|call|>` was written by the policy itself
    (a forged tool answer, or a user turn): a format failure."""
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


def _author(m) -> str:
    """The message's author: its role ("assistant", "user"...) or, for a tool's message, the tool's name."""
    from openai_harmony import Role

    return (m.author.name or "tool") if m.author.role == Role.TOOL else m.author.role.value


def _transcript(raw, ids: list[int]) -> Transcript:
    messages = [
        Message(m.channel, m.recipient, "".join(getattr(c, "text", "") for c in m.content), _author(m))
        for m in raw
    ]
    own = [m for m in messages if m.author == "assistant"]
    t = Transcript(messages=messages)
    t.analysis = "\n".join(m.text for m in own if m.channel == "analysis")
    finals = [m.text for m in own if m.channel == "final"]
    if finals:
        t.final = finals[-1]
    spans = _scan_messages(ids)
    t.analysis_tokens = _content_counts(spans).get("analysis", 0)
    forged = next((s.author for k, s in enumerate(spans)
                   if s.author != "assistant" and (k == 0 or spans[k - 1].end != CALL)), None)
    if forged is not None:
        t.format_ok, t.error = False, f"the policy wrote a message as {forged!r} (only a tool answers after <|call|>)"
    elif t.final is None:
        call = own[-1].recipient if own and messages[-1] is own[-1] else None
        t.format_ok, t.error = False, "no final-channel message" + (f" (it ends with a call to {call!r})" if call else "")
    elif any(m.channel not in ("analysis", "commentary", "final") for m in messages):
        t.format_ok, t.error = False, "message on an unknown channel"
    return t


def channel_token_counts(token_ids: list[int]) -> dict[str, int]:
    """Content tokens per channel of the policy's (assistant) messages, counted on the sampled ids
    themselves (never re-tokenized, so text that spells a special token cannot break it); a tool's
    answers do not count. Headers run up to `<|message|>`, content up to `<|end|>`, `<|return|>`,
    `<|call|>` or a new `<|start|>`."""
    return _content_counts(_scan_messages(token_ids))


def open_channel(token_ids: list[int]) -> str | None:
    """The channel whose message content `token_ids` end inside ("" for a message without a channel),
    or None when they end between messages or inside a header: what budget forcing asks of a
    completion cut at its analysis cap.

    >>> ids = render_completion("7*6=42.", "42")  # <|channel|>analysis<|message|>7*6=42.<|end|><|start|>...
    >>> end = ids.index(END)
    >>> open_channel(ids[:2]), open_channel(ids[:4]), open_channel(ids[:end + 1]), open_channel(ids[:-1])
    (None, 'analysis', None, 'final')
    """
    spans = _scan_messages(token_ids)
    return (spans[-1].channel or "") if spans and spans[-1].end is None else None


class _Span(NamedTuple):
    """One message found in ids: its author, channel, content tokens and the id that ended it."""

    author: str  # the role named after <|start|> ("assistant" when none is written, as for the first)
    channel: str | None
    tokens: int
    end: int | None  # END, RETURN, CALL or START; None: the ids end inside its content


def _scan_messages(token_ids: list[int]) -> list[_Span]:
    """The messages of `token_ids` whose header reached `<|message|>`, in order."""
    enc = load_encoding()
    spans: list[_Span] = []
    header: list[int] = []
    after_start, open_span = False, None  # open_span: [author, channel, tokens] while in content
    for tok in token_ids:
        if tok in (END, RETURN, CALL, START):
            if open_span is not None:
                spans.append(_Span(*open_span, tok))
            header, after_start, open_span = [], tok == START, None
        elif open_span is not None:
            open_span[2] += 1
        elif tok == MESSAGE:
            text = enc.decode(header)
            words = text.split("<|channel|>", 1)[1].split() if "<|channel|>" in text else []
            author = (re.match(r"[^\s<]*", text).group() if after_start else "") or "assistant"
            open_span = [author, words[0] if words else None, 0]
        else:
            header.append(tok)
    if open_span is not None:
        spans.append(_Span(*open_span, None))
    return spans


def _content_counts(spans: list[_Span]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in spans:
        if s.author == "assistant":
            counts[s.channel or ""] = counts.get(s.channel or "", 0) + s.tokens
    return counts


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


@functools.cache
def tool_reply_head(channel: str = "analysis") -> tuple[int, ...]:
    """`<|start|>python to=assistant<|channel|>{channel}<|message|>`: opens the python tool's answer,
    as openai-harmony renders a message from `Author.new(Role.TOOL, "python")` to the assistant."""
    from openai_harmony import Author, Message as HMessage, Role

    msg = HMessage.from_author_and_content(Author.new(Role.TOOL, TOOL_NAME), "")
    ids = load_encoding().render(msg.with_channel(channel).with_recipient("assistant"))
    if ids[-2:] != [MESSAGE, END] or ids[0] != START:
        raise RuntimeError(f"unexpected rendering of an empty python tool message: {ids}")
    return tuple(ids[:-1])


@functools.cache
def tool_reply_tail() -> tuple[int, ...]:
    """`<|end|><|start|>assistant`: closes a tool's answer and opens the policy's next message (what
    `render_conversation_for_completion` appends after it)."""
    return (END, *_assistant_header())


def encode_text(text: str) -> list[int]:
    """Ids of untrusted text (a tool's output) as openai-harmony encodes message content: text that
    spells a special token stays ordinary text, and lone surrogates become "?". Never raises."""
    clean = text.encode("utf-8", "replace").decode("utf-8")
    return load_encoding().encode(clean, disallowed_special=())


def drop_earlier_analysis(messages: Sequence[Message]) -> list[Message]:
    """Harmony's rule for earlier turns, for rendering a conversation as the next prompt: once the
    policy has written a final message, the analysis-channel messages before it (its chain of thought,
    its python calls and their answers) are dropped; those after the last final (a tool loop still
    under way in the current turn) are kept, as is everything on other channels.

    openai-harmony's `auto_drop_analysis` differs: it drops the analysis before the *first* final
    only, and none while the last assistant message is not a final (checked against 0.0.11:
    [q1, t1, a1, q2, t2, a2, q3, t3, a3, q4] keeps t2 and t3; [q1, t1, a1, q2, t2, call, answer]
    keeps t1). No env renders
    earlier turns yet (every task is one user turn, and a python-tool episode is one turn whose
    context is its sampled ids as they are); this is the function such an env must use.

    >>> msgs = [Message(None, None, "q1", "user"), Message("analysis", None, "think"),
    ...         Message("final", None, "a1"), Message(None, None, "q2", "user"),
    ...         Message("analysis", "python", "print(2)"), Message("analysis", "assistant", "2", "python")]
    >>> [m.text for m in drop_earlier_analysis(msgs)]
    ['q1', 'a1', 'q2', 'print(2)', '2']
    """
    finals = [k for k, m in enumerate(messages) if m.author == "assistant" and m.channel == "final"]
    last = finals[-1] if finals else -1
    return [m for k, m in enumerate(messages) if k > last or m.channel != "analysis"]


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
