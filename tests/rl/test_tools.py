"""The python tool wired into rollouts (rl/tools.py): real sandboxed calls answered inside an episode,
the sample and the learner's batch aligned position by position, prompts, and the engine and worker
pool switches (without vLLM or Ray: the engine's sampler and the pool's transport are stubbed).
The episode logic itself: tests/envs/test_tool_episode.py.
"""
import doctest

import pytest
import torch

from envs import harmony
from envs.types import INSERTED_LOGPROB, Task
from rl import tools
from rl.algorithms import policy_loss
from rl.batch import collate
from rl.config import PythonToolConfig, RolloutConfig, ToolsConfig, compose
from rl.engine import Completion, RolloutEngine
from rl.model import VocabMap
from rl.seeds import continuation_seed, request_seed
from rl.workers import WorkerPool, to_sample

ON = PythonToolConfig(enabled=True, timeout_s=4.0, max_workers=3)  # 1 s timed out a crashing call on a loaded box


def call_turn(code):
    """A policy turn: a line of analysis, then `code` sent to python (what follows `<|start|>assistant`)."""
    enc = harmony.load_encoding()
    return enc.encode(f"<|channel|>analysis<|message|>Run it.<|end|><|start|>assistant to=python<|channel|>analysis"
                      f"<|message|>{code}<|call|>", allowed_special="all")


FINAL = harmony.render_completion(None, "done")


def scripted(turns_by_user):
    """The engine's one-call sampler, scripted: a prompt whose user text is a key of `turns_by_user`
    plays those turns in order (turn t after t tool answers); log-prob -0.01 * (position + 1)."""
    calls = []

    def sample(requests):
        calls.append(list(requests))
        out = []
        for r in requests:
            user = next(u for u in turns_by_user if f"<|start|>user<|message|>{u}<|end|>" in harmony.decode(r.prompt))
            turns = turns_by_user[user]
            ids = turns[min(harmony.decode(r.prompt).count("<|call|>"), len(turns) - 1)][:r.max_tokens]
            out.append([Completion(ids, [-0.01 * (k + 1) for k in range(len(ids))], "stop") for _ in range(r.n)])
        return out

    sample.calls = calls
    return sample


def test_docstring_examples_hold():
    import rl.seeds

    assert doctest.testmod(tools).failed == 0 and doctest.testmod(rl.seeds).failed == 0


def test_prompts_describe_the_tool_only_when_it_is_on():
    task = Task("t", "math", "Compute 2+2.", developer="Be brief.")
    off = tools.task_prompt(task, "low", PythonToolConfig())
    assert off == harmony.render_prompt("Compute 2+2.", "low", "Be brief.")  # byte for byte as before
    assert "# Tools" not in harmony.decode(off)
    text = harmony.decode(tools.task_prompt(task, "low", ON))
    assert "# Tools\n\n## python\n\nUse this tool to execute Python code" in text
    assert "without network access" in text and "timed out after 4 seconds" in text
    assert text.endswith("<|start|>user<|message|>Compute 2+2.<|end|><|start|>assistant")
    builtin = harmony.decode(tools.task_prompt(task, "low", PythonToolConfig(enabled=True, description="harmony")))
    assert "stateful Jupyter notebook" in builtin


def test_the_switch_composes_from_the_command_line():
    c = compose(["rollout.tools.python.enabled=true", "rollout.tools.python.max_calls=2"])
    assert c.rollout.tools.python.enabled and c.rollout.tools.python.max_calls == 2
    assert not compose([]).rollout.tools.python.enabled  # off by default


@pytest.mark.bwrap
def test_sandboxed_calls_are_answered_and_the_batch_lines_up():
    """Three episodes whose calls print, crash and loop run in one round on the sandbox pool; each
    answer comes back as the tool's message; the learner's batch masks exactly the inserted ids."""
    codes = {"Print.": "print(123*456)", "Crash.": "print(1/0)", "Loop.": "while True: pass"}
    sample = scripted({u: [call_turn(c), FINAL] for u, c in codes.items()})
    tasks = [Task(u, "math", u) for u in codes]
    prompts = [tools.task_prompt(t, "low", ON) for t in tasks]
    executor = tools.SandboxExecutor(ON)
    try:
        episodes = tools.episodes(sample, prompts, 1, [300] * 3, [5, 6, 7], ON, executor)
    finally:
        executor.close()
    answers = [[m.text for m in harmony.parse_completion(eps[0].ids).messages if m.author == "python"]
               for eps in episodes]
    assert answers[0] == ["56088\n"]
    assert "ZeroDivisionError: division by zero" in answers[1][0]
    assert answers[2] == ["[timed out after 4 s]"]
    assert [len(c) for c in sample.calls] == [3, 3]  # one round of calls for all three
    assert [r.seed for r in sample.calls[1]] == [continuation_seed(s, 0, 1) for s in (5, 6, 7)]
    samples = [to_sample(t, "low", p, Completion(e.ids, e.logprobs, e.finish_reason, e.sampled))
               for t, p, [e] in zip(tasks, prompts, episodes)]
    for s in samples:
        assert s.transcript.format_ok and s.transcript.final == "done" and s.transcript.tool_calls == 1
    batch = collate(samples, [1.0, -1.0, 0.5], VocabMap.identity())
    for i, (s, [e]) in enumerate(zip(samples, episodes)):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        assert batch.input_ids[i, p:p + c].tolist() == e.ids
        assert batch.loss_mask[i, :p].sum() == 0 and batch.loss_mask[i, p:p + c].tolist() == e.sampled
        assert batch.behavior_logprobs[i, p:p + c].tolist() == pytest.approx(e.logprobs)
        inserted = [k for k, m in enumerate(e.sampled) if not m]
        assert inserted and all(e.logprobs[k] == INSERTED_LOGPROB for k in inserted)
        assert harmony.decode([e.ids[k] for k in inserted]).startswith("<|start|>python to=assistant")
    # Whatever the log-probs at inserted positions hold, the loss does not move.
    logprobs = batch.behavior_logprobs.clone().requires_grad_()
    base, _ = policy_loss(logprobs, batch.behavior_logprobs, batch.advantages, batch.loss_mask)
    garbage = torch.where(batch.loss_mask.bool() | ~batch.completion_mask, batch.behavior_logprobs,
                          torch.full_like(batch.behavior_logprobs, 1e4))
    moved, _ = policy_loss(logprobs, garbage, batch.advantages, batch.loss_mask)
    assert torch.equal(base, moved)


def test_the_tool_refuses_to_start_without_bubblewrap(monkeypatch):
    from rewards.sandbox import SandboxUnavailable

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match="install bubblewrap"):
        tools.SandboxExecutor(ON)
    with pytest.raises(SandboxUnavailable, match="install bubblewrap"):  # before any worker starts
        WorkerPool("/nonexistent/model", RolloutConfig(tools=ToolsConfig(ON)), 0, worker_cls=object)


class _Executor:
    def __init__(self):
        self.rounds = []

    def __call__(self, codes):
        self.rounds.append(list(codes))
        return ["56088\n"] * len(codes)


def _engine(python: bool) -> RolloutEngine:
    """A RolloutEngine without vLLM: its sampler is scripted, its sandbox a stub."""
    eng = RolloutEngine.__new__(RolloutEngine)
    eng.cfg = RolloutConfig(max_tokens=200, max_model_len=4096, tools=ToolsConfig(ON if python else PythonToolConfig()))
    eng.vocab, eng.llm, eng.checkpoint = VocabMap.identity(), object(), "stub"
    eng.stats = {"budget_forced": 0, "tool_calls": 0}
    eng._python = _Executor() if python else None
    eng._sample = lambda requests, sampling: scripted({"Go.": [call_turn("print(123*456)"), FINAL]})(requests)
    return eng


def test_engine_generate_runs_episodes_when_asked():
    eng = _engine(python=True)
    prompt = tools.task_prompt(Task("t", "math", "Go."), "high", ON)
    [comps] = eng.generate([prompt], n=2, seed=3, python_tool=True)
    for c in comps:
        assert c.ids[-len(FINAL):] == FINAL and 0 in c.sampled and c.finish_reason == "stop"
        assert harmony.parse_completion(c.ids).final == "done"
    assert eng._python.rounds == [["print(123*456)"] * 2] and eng.stats["tool_calls"] == 2
    [[plain]] = eng.generate([prompt], n=1, seed=3)  # without the flag: one plain call
    assert plain.ids == call_turn("print(123*456)") and plain.sampled == [1] * len(plain.ids)
    with pytest.raises(ValueError, match="not combined"):
        eng.generate([prompt], python_tool=True, analysis_caps=[8])
    with pytest.raises(ValueError, match="rollout.tools.python.enabled"):
        _engine(python=False).generate([prompt], python_tool=True)
    assert request_seed(3, 0, 2) != continuation_seed(request_seed(3, 0, 2), 0, 1)


def test_worker_pool_asks_for_the_tool_in_rollouts_and_evaluation():
    from concurrent.futures import ThreadPoolExecutor

    pool = WorkerPool.__new__(WorkerPool)
    pool.cfg, pool.version, pool._ops, sent = RolloutConfig(tools=ToolsConfig(ON)), None, ThreadPoolExecutor(1), []
    ids = harmony.render_completion(None, "4")

    def sample(prompts, call, caps=None):  # what the work queue would send, as one call
        sent.append({**call, "prompts": prompts})
        return [[Completion(ids, [0.0] * len(ids), "stop")] * call["n"] for _ in prompts]

    pool._sample = sample
    samples = pool.rollout([Task("t", "math", "Compute 2+2.")], ["low"], 2, seed=1)
    assert len(samples) == 2 and sent[0]["python_tool"] is True
    assert "## python" in harmony.decode(sent[0]["prompts"][0]) and "## python" in harmony.decode(samples[0].prompt_ids)
    pool.generate([sent[0]["prompts"][0]], 1, temperature=0.0, seed=None)
    assert sent[1]["python_tool"] is True
    pool.cfg = RolloutConfig()  # off: the calls are what they were before the tool existed
    pool.rollout([Task("t", "math", "Compute 2+2.")], ["low"], 2, seed=1)
    assert "python_tool" not in sent[2] and "## python" not in harmony.decode(sent[2]["prompts"][0])
    pool._ops.shutdown()
