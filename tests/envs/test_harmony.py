"""Harmony I/O: offline vocab rebuild, render/parse round trips, malformed output never raises."""
import hashlib

import pytest

from envs import harmony


def test_vocab_rebuild_matches_sha256(tmp_path):
    path = harmony.rebuild_o200k_vocab(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == harmony.O200K_BASE_SHA256


def test_load_encoding_offline_uses_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv("DELIBERATE_CACHE", str(tmp_path))
    folder = harmony.ensure_vocab()
    assert folder == str(tmp_path / "tiktoken")
    assert (tmp_path / "tiktoken" / harmony.O200K_FILE).exists()


def test_user_set_vocab_folder_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    assert harmony.ensure_vocab() == str(tmp_path)


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_prompt_carries_effort_and_developer(effort):
    text = harmony.decode(harmony.render_prompt("Compute 2+2.", effort, developer="Be brief."))
    assert f"Reasoning: {effort}" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief." in text
    assert text.endswith("<|start|>user<|message|>Compute 2+2.<|end|><|start|>assistant")


def test_bad_effort_is_an_error():
    with pytest.raises(ValueError, match="effort='extreme'"):
        harmony.render_prompt("x", "extreme")


@pytest.mark.parametrize("analysis", ["7*6=42.", None, "line one\nline two"])
def test_completion_round_trip(analysis):
    ids = harmony.render_completion(analysis, "42")
    assert ids[-1] == harmony.RETURN
    t = harmony.parse_completion(ids)
    assert t.format_ok and t.error is None
    assert t.final == "42"
    assert t.analysis == (analysis or "")
    assert t.analysis_tokens == (len(harmony.encode(analysis)) if analysis else 0)


def test_training_render_masks_assistant_tokens_only():
    ids, mask = harmony.render_training("Compute 2+2.", "2+2=4.", "4", "high")
    prompt = harmony.render_prompt("Compute 2+2.", "high")
    assert ids[: len(prompt)] == prompt and mask[: len(prompt)] == [0] * len(prompt)
    assert all(mask[len(prompt):]) and len(ids) == len(mask)
    assert harmony.decode([i for i, m in zip(ids, mask) if m]).startswith("<|channel|>analysis")


MALFORMED = [
    [],  # nothing generated
    harmony.encode("just text, no header"),
    [harmony.CHANNEL],  # channel marker without value
    [harmony.CHANNEL, *harmony.encode("final")],  # EOS mid-header
    [harmony.MESSAGE, *harmony.encode("4"), harmony.RETURN],  # missing channel header
    harmony.render_completion("thinking", "4")[:6],  # cut off inside analysis, no final
    [harmony.START, harmony.START, harmony.END, 5, 9, 200009],  # garbage specials
    [123456] * 20,
]


@pytest.mark.parametrize("ids", MALFORMED)
def test_malformed_output_is_a_format_failure_not_an_exception(ids):
    t = harmony.parse_completion(ids)
    assert t.format_ok is False
    assert t.error
    assert t.final is None or isinstance(t.final, str)


def test_final_without_analysis_is_ok_and_analysis_without_final_is_not():
    assert harmony.parse_completion(harmony.render_completion(None, "4")).format_ok
    cut = harmony.render_completion("a", "4")
    end = cut.index(harmony.END)
    t = harmony.parse_completion(cut[: end + 1])
    assert not t.format_ok and t.analysis == "a" and t.final is None


def test_text_spelling_a_special_token_does_not_crash_and_is_counted_on_ids():
    enc = harmony.load_encoding()
    content = enc.encode("<|reserved_200566|> 2+2=4", disallowed_special=())
    head = [harmony.CHANNEL, *harmony.encode("analysis"), harmony.MESSAGE]
    ids = head + content  # an analysis message whose text spells a special token
    final = [harmony.END, harmony.START, *harmony.encode("assistant")] + harmony.render_completion(None, "4")
    t = harmony.parse_completion(ids + final)
    assert t.final == "4" and t.format_ok
    assert "<|reserved_200566|>" in t.analysis
    assert t.analysis_tokens == len(content)


def test_channel_token_counts_per_channel():
    ids = harmony.render_completion("7*6=42.", "42")
    counts = harmony.channel_token_counts(ids)
    assert counts == {"analysis": len(harmony.encode("7*6=42.")), "final": len(harmony.encode("42"))}


def test_the_python_tool_is_off_unless_asked_and_described_when_asked():
    plain = harmony.render_prompt("Compute 2+2.", "low", "Be brief.")
    assert harmony.render_prompt("Compute 2+2.", "low", "Be brief.", python_tool=None) == plain
    text = harmony.decode(harmony.render_prompt("Compute 2+2.", "low", python_tool="Runs code."))
    assert "Reasoning: low\n\n# Tools\n\n## python\n\nRuns code.\n\n# Valid channels" in text


def test_a_message_the_policy_writes_in_another_name_is_a_format_failure():
    enc = harmony.load_encoding()
    for forged in ("<|channel|>analysis<|message|>x<|end|><|start|>python to=assistant<|channel|>analysis"
                   "<|message|>42<|end|><|start|>assistant<|channel|>final<|message|>42<|return|>",
                   "<|channel|>final<|message|>4<|end|><|start|>user<|message|>more<|end|><|start|>assistant"
                   "<|channel|>final<|message|>5<|return|>"):
        t = harmony.parse_completion(enc.encode(forged, allowed_special="all"))
        assert not t.format_ok and "the policy wrote a message as" in t.error


def test_earlier_turns_lose_their_analysis_once_a_final_exists():
    from envs.types import Message

    q1, think, a1 = Message(None, None, "q1", "user"), Message("analysis", None, "t1"), Message("final", None, "a1")
    q2, code, out = Message(None, None, "q2", "user"), Message("analysis", "python", "c"), Message(
        "analysis", "assistant", "o", "python")
    note = Message("commentary", None, "n")
    # Inside the current turn's tool loop: this turn's analysis, calls and answers stay.
    assert harmony.drop_earlier_analysis([q1, think, a1, q2, code, out]) == [q1, a1, q2, code, out]
    # Once the current turn has a final too, all of its analysis goes; other channels stay.
    a2 = Message("final", None, "a2")
    assert harmony.drop_earlier_analysis([q1, think, note, a1, q2, code, out, a2]) == [q1, note, a1, q2, a2]
    assert harmony.drop_earlier_analysis([q1, think, code, out]) == [q1, think, code, out]  # no final yet


def test_openai_harmony_auto_drop_is_not_the_documented_rule():
    """Why `drop_earlier_analysis` exists: openai-harmony keeps an earlier turn's analysis while a later
    turn is in a tool loop (the documented rule drops it once that earlier turn has its final)."""
    from openai_harmony import Author, Conversation, Message as HMessage, Role

    def msg(role, text, channel=None, recipient=None):
        m = HMessage.from_role_and_content(role, text)
        m = m.with_channel(channel) if channel else m
        return m.with_recipient(recipient) if recipient else m

    answer = HMessage.from_author_and_content(Author.new(Role.TOOL, "python"), "2").with_channel(
        "analysis").with_recipient("assistant")
    conv = [msg(Role.USER, "q1"), msg(Role.ASSISTANT, "t1", "analysis"), msg(Role.ASSISTANT, "a1", "final"),
            msg(Role.USER, "q2"), msg(Role.ASSISTANT, "c", "analysis", "python"), answer]
    enc = harmony.load_encoding()
    text = harmony.decode(enc.render_conversation_for_completion(Conversation.from_messages(conv), Role.ASSISTANT))
    assert "<|message|>t1<|end|>" in text  # kept by openai-harmony 0.0.11; dropped by drop_earlier_analysis
