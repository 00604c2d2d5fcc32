"""Python-tool episodes: the policy calls the python tool, the answer is inserted, sampling goes on.

What it does
  `run_episodes(sample, prompts, n, budgets, seeds, execute, ...)` drives `n` episodes per prompt
  turn by turn, token-in/token-out, through two callables it is handed (this layer knows no engine
  and no sandbox: rl/tools.py binds the vLLM sampler and rewards/sandbox.py):
  1. Turn 0 is one `sample` call, `n` completions per prompt, exactly the request an episode without
     the tool would make. Sampling stops at `<|return|>` or `<|call|>` (Harmony's stop tokens).
  2. A turn that ends at `<|call|>` is parsed (`envs.harmony.parse_completion` on that turn's ids
     only). Its last message, the policy's, addressed `to=python`, is a call: its text is the code.
     Every call of the round goes to `execute` at once (the sandbox pool runs them concurrently).
  3. Each answer is inserted as openai-harmony renders a message from the tool to the assistant,
     followed by the next assistant header:
         <|start|>python to=assistant<|channel|>analysis<|message|>{output}<|end|><|start|>assistant
     (`harmony.tool_reply_head(channel)` + `harmony.encode_text(output)` + `harmony.tool_reply_tail()`;
     the channel is the call's, analysis for the built-in tool). The next round samples, one request
     per live episode and all of them in one `sample` call, from prompt + everything so far.
  4. An episode ends when a turn stops otherwise (`<|return|>`: "stop"; the budget: "length"), at a
     call past `max_calls` ("max_calls", unanswered), at a malformed call ("bad_call": not the
     policy's message, not addressed to python, or nothing parsable before `<|call|>`), or when the
     tool's answer and one more token no longer fit the budget ("length", the call unanswered).
  The result, one `Episode` per sample: ids = sampled + inserted in order, `sampled` 1 exactly on the
  ids the policy sampled (the sample's loss mask), behaviour log-probs as sampled and
  `INSERTED_LOGPROB` on inserted ids (the learner masks them out of the loss, the importance ratios
  and the KL: rl/algorithms.py `policy_loss`), the last turn's finish reason, calls answered, why it
  ended. Nothing sampled is ever re-tokenized; only the tool's output text is encoded.
- `teacher_episode(trace, ...)` renders a teacher's `ToolTrace` (SFT) as exactly the ids and loss
  mask an episode holds when the policy samples the teacher's messages and the tool answers as the
  trace says: the inserted ids are `answer_ids`', the ones rollouts insert.

Guarantees and limits
- Untrusted output never raises here: a call that does not parse or names another recipient ends
  the episode ("bad_call"; the transcript is then a format failure: no final answer). Code that
  crashes, loops or floods is the executor's business: its answer is whatever it reports (rl/tools.py:
  the traceback, a timeout note, the sandbox's output cap). What does raise is our side: an executor
  or sampler that returns the wrong number of results.
- `budgets[i]` bounds the whole completion, inserted ids included. A tool answer longer than
  `max_output_tokens` (or than what is left of the budget) is cut and ends in `TRUNCATED`.
- `keep_id` (the rollout engine passes its vocabulary's `covers`): ids of a tool's output that the
  policy's vocabulary lacks are dropped, so the tiny model's trimmed vocabulary never meets an id it
  cannot embed. With real gpt-oss (every id covered) nothing is dropped.
- Seeds: turn 0 uses the prompt's request seed; sample j's turn t >= 1 uses `turn_seed(seed, j, t)`
  (rl.seeds.continuation_seed), so a seeded episode is reproducible whatever is batched beside it.
- Earlier-turn analysis: an episode is one Harmony turn, so nothing is dropped inside it (the
  analysis stays in the context through the tool loop, as Harmony specifies); once it has a final,
  a later turn would drop it (`harmony.drop_earlier_analysis`; no env renders later turns yet).

Departures
- DESIGN.md sketches an `async` episode per sample. Here the episodes advance in rounds: one sampler
  call per round over every live episode (vLLM batches them; a sample without a call is never held
  back, it has ended), then the round's calls run concurrently. A round waits for its slowest call,
  bounded by the tool's timeout.
- gpt-oss was trained with a stateful Jupyter python tool (openai-harmony's description); the
  sandbox runs each call as a fresh script (as openai/gpt-oss's reference docker tool does) and
  rl/tools.py describes it so by default (`rollout.tools.python.description`).
- A call past `max_calls` is not answered with a "limit reached" message: the episode ends there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol, Sequence

from envs import harmony
from envs.types import INSERTED_LOGPROB, Request, ToolCall, ToolTrace

TRUNCATED = "\n[output truncated]"  # closes a tool answer that was cut to fit
ENDINGS = ("stop", "length", "max_calls", "bad_call")  # why an episode ended (`Episode.ended`)


class Sampled(Protocol):
    """What the sampler returns per completion (rl.engine.Completion is one)."""

    ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    sampled: list[int] | None


Sampler = Callable[[Sequence[Request]], Sequence[Sequence[Sampled]]]  # one engine call: result[i][j]
Executor = Callable[[Sequence[str]], Sequence[str]]  # programs -> their answers' text, run concurrently


@dataclass
class Episode:
    """One sample's completion over all its turns (see the module docstring)."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)  # 1: sampled by the policy; 0: inserted
    finish_reason: str = "stop"  # of the last turn ("length" also when the tool's answer did not fit)
    calls: int = 0  # tool calls answered
    ended: str = ""  # one of ENDINGS once it has ended
    turn_start: int = 0  # where the current turn's sampled ids begin in `ids`

    def extend(self, c: Sampled) -> None:
        """Append one turn the policy sampled."""
        self.turn_start = len(self.ids)
        self.ids += c.ids
        self.logprobs += c.logprobs
        self.sampled += [1] * len(c.ids) if c.sampled is None else c.sampled
        self.finish_reason = c.finish_reason

    def insert(self, ids: Sequence[int]) -> None:
        """Append ids the policy did not sample (a tool's answer and the next header)."""
        self.ids += ids
        self.logprobs += [INSERTED_LOGPROB] * len(ids)
        self.sampled += [0] * len(ids)


class Call(NamedTuple):
    code: str
    channel: str  # the channel to answer on
    room: int  # tokens of output that still fit the budget


def run_episodes(sample: Sampler, prompts: Sequence[Sequence[int]], n: int, budgets: Sequence[int],
                 seeds: Sequence[int | None], execute: Executor, *, max_calls: int, max_output_tokens: int,
                 turn_seed: Callable[[int, int, int], int], keep_id: Callable[[int], bool] | None = None,
                 ) -> list[list[Episode]]:
    """`n` python-tool episodes per prompt; result[i][j] is sample j of prompt i. `budgets[i]`: ids
    per completion (inserted ones included); `seeds[i]`: prompt i's request seed (None: unseeded)."""
    if max_calls < 0 or max_output_tokens < 0:
        raise ValueError(f"need max_calls >= 0 and max_output_tokens >= 0, got {max_calls=} {max_output_tokens=}")
    first = sample([Request(list(p), n, b, s) for p, b, s in zip(prompts, budgets, seeds, strict=True)])
    episodes = [[Episode() for _ in range(n)] for _ in prompts]
    for i, comps in enumerate(_checked(first, len(prompts), n)):
        for ep, c in zip(episodes[i], comps):
            ep.extend(c)
    live = [(i, j) for i in range(len(prompts)) for j in range(n)]
    turn = 0
    while live:
        calls = {(i, j): call for i, j in live
                 if (call := next_call(episodes[i][j], budgets[i], max_calls)) is not None}
        if not calls:
            break
        turn += 1
        outputs = list(execute([c.code for c in calls.values()]))
        if len(outputs) != len(calls):
            raise RuntimeError(f"the tool executor answered {len(outputs)} of {len(calls)} calls")
        requests = []
        for ((i, j), call), output in zip(calls.items(), outputs):
            ep = episodes[i][j]
            ep.insert(answer_ids(output, call, max_output_tokens, keep_id))
            ep.calls += 1
            seed = None if seeds[i] is None else turn_seed(seeds[i], j, turn)
            requests.append(Request([*prompts[i], *ep.ids], 1, budgets[i] - len(ep.ids), seed))
        for (i, j), [c] in zip(calls, _checked(sample(requests), len(requests), 1)):
            episodes[i][j].extend(c)
        live = list(calls)
    return episodes


def next_call(ep: Episode, budget: int, max_calls: int) -> Call | None:
    """The call that ends `ep`'s latest turn, or None when the episode has ended (`ep.ended` says why)."""
    turn = ep.ids[ep.turn_start:]
    if ep.finish_reason != "stop" or not turn or turn[-1] != harmony.CALL:
        ep.ended = "length" if ep.finish_reason == "length" else "stop"
        return None
    messages = harmony.parse_completion(turn).messages  # never raises
    last = messages[-1] if messages else None
    if last is None or last.author != "assistant" or last.recipient != harmony.TOOL_NAME:
        ep.ended = "bad_call"
        return None
    if ep.calls >= max_calls:
        ep.ended = "max_calls"
        return None
    channel = last.channel if last.channel in ("analysis", "commentary") else "analysis"
    room = budget - len(ep.ids) - len(harmony.tool_reply_head(channel)) - len(harmony.tool_reply_tail()) - 1
    if room < 0:  # not even an empty answer and one more sampled token fit
        ep.ended, ep.finish_reason = "length", "length"
        return None
    return Call(last.text, channel, room)


def answer_ids(output: str, call: Call, max_output_tokens: int,
               keep_id: Callable[[int], bool] | None = None) -> list[int]:
    """The inserted ids answering `call` with `output`: the tool's message (its content cut to
    min(`max_output_tokens`, `call.room`) ids, ending in `TRUNCATED` when cut) and the next
    assistant header.

    >>> ids = answer_ids("56088\\n", Call("print(123*456)", "analysis", 100), 64)
    >>> harmony.decode(ids)
    '<|start|>python to=assistant<|channel|>analysis<|message|>56088\\n<|end|><|start|>assistant'
    >>> harmony.decode(answer_ids("12345" * 100, Call("", "analysis", 100), 7)).split("<|message|>")[1]
    '123451\\n[output truncated]<|end|><|start|>assistant'
    """
    def kept(text: str) -> list[int]:
        return [t for t in harmony.encode_text(text) if keep_id is None or keep_id(t)]

    content, cap = kept(output), min(max_output_tokens, call.room)
    if len(content) > cap:
        mark = kept(TRUNCATED)
        content = content[:max(0, cap - len(mark))] + mark[:cap]
    return [*harmony.tool_reply_head(call.channel), *content, *harmony.tool_reply_tail()]


def _checked(result: Sequence[Sequence[Sampled]], requests: int, n: int) -> Sequence[Sequence[Sampled]]:
    if len(result) != requests or any(len(comps) != n for comps in result):
        raise RuntimeError(f"the sampler answered {[len(c) for c in result]} completions for {requests} "
                           f"requests of {n}")
    return result


def teacher_episode(trace: ToolTrace, max_output_tokens: int,
                    keep_id: Callable[[int], bool] | None = None) -> tuple[list[int], list[int]]:
    """(ids, sampled) of the completion a python-tool episode holds when the policy writes `trace`'s
    messages (openai-harmony's rendering, after the context's `<|start|>assistant`) and the tool
    answers each call with its `output` (inserted as `answer_ids` inserts it: `sampled` 0 there).

    >>> ids, sampled = teacher_episode(ToolTrace((ToolCall("print(6*7)", "42\\n"),), "42"), 256)
    >>> harmony.decode(ids)
    ' to=python<|channel|>analysis<|message|>print(6*7)<|call|><|start|>python to=assistant<|channel|>analysis<|message|>42\\n<|end|><|start|>assistant<|channel|>final<|message|>42<|return|>'
    >>> harmony.decode([t for t, s in zip(ids, sampled) if not s])
    '<|start|>python to=assistant<|channel|>analysis<|message|>42\\n<|end|><|start|>assistant'
    """
    head = harmony.assistant_header()
    ids: list[int] = []
    sampled: list[int] = []

    def write(message: list[int]) -> None:  # the policy's; the context always ends with `head` here
        if ids and ids[-len(head):] != list(head):
            ids.extend(head)  # after <|end|> the policy writes the next header itself
            sampled.extend([1] * len(head))
        ids.extend(message[len(head):])
        sampled.extend([1] * (len(message) - len(head)))

    for step in trace.steps:
        if isinstance(step, ToolCall):
            write(harmony.render_assistant(step.code, "analysis", harmony.TOOL_NAME))
            answer = answer_ids(step.output, Call(step.code, "analysis", max_output_tokens), max_output_tokens, keep_id)
            ids.extend(answer)
            sampled.extend([0] * len(answer))
        else:
            write(harmony.render_assistant(step, "analysis"))
    final = harmony.render_assistant(trace.final, "final")
    write(final[:-1] + [harmony.RETURN])
    return ids, sampled
