"""The tiny world learns the python tool: a tiny gpt-oss whose vocabulary holds the tool's prompts and
answers (rl.tools.vocabulary_ids), SFT'd on traces that call it (envs.math_tasks.tool_solution through
rl.sft.sft_examples), then rolled out by the real vLLM engine with the tool on: its calls run in the
bubblewrap sandbox and the episodes go on to a final answer. Minutes on 2 cores (slow)."""
import re

import pytest

from envs import harmony
from envs.math_tasks import MathEnv
from rl.config import LoggingConfig, PythonToolConfig, RolloutConfig, SFTConfig, ToolsConfig
from rl.model import VocabMap, build_tiny_model
from rl.sft import run_sft, sft_examples
from rl.tools import task_prompt, vocabulary_ids

pytestmark = [pytest.mark.slow, pytest.mark.bwrap]  # skipped without bubblewrap (tests/conftest.py)

TOOL = PythonToolConfig(enabled=True, max_calls=2, timeout_s=2.0, max_workers=2)
SMALL = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=64,
             max_position_embeddings=512)


def test_an_sft_model_calls_the_tool_and_answers_with_it(tmp_path):
    env = MathEnv(seed=0, difficulty=1, families=("mul",), tool_traces=1.0)
    train, test = env.tasks("train", 400), env.tasks("test", 16)
    corpus = [t.question for t in train + test] + [x for t in train for x in env.solution(t, "low").texts()]
    model = build_tiny_model(SMALL, corpus, tmp_path / "model", extra_ids=vocabulary_ids(TOOL))
    rows = sft_examples(train, env.solution, VocabMap.load(model), ["low"], tool=TOOL)
    sft = SFTConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=10, logging_steps=1000)
    run_sft(model, tmp_path / "sft", rows, sft, seed=0, logging=LoggingConfig(tensorboard=False, progress=False),
            logging_dir=None)

    from rl.engine import RolloutEngine

    engine = RolloutEngine(tmp_path / "sft", RolloutConfig(max_model_len=320, max_tokens=48, kv_cache_gib=1,
                                                           tools=ToolsConfig(TOOL)), seed=0)
    try:
        prompts = [task_prompt(t, "low", TOOL) for t in test]
        episodes = engine.generate(prompts, 1, temperature=0.0, python_tool=True)  # greedy
    finally:
        engine.shutdown()
    answered = finals = right = 0
    for task, comps in zip(test, episodes):
        for c in comps:
            t = harmony.parse_completion(c.ids)
            calls = [m for m in t.messages if m.recipient == "python"]
            answers = [m for m in t.messages if m.author == "python"]
            inserted = harmony.decode([i for i, s in zip(c.ids, c.sampled) if not s])
            if calls and answers:
                answered += 1
                assert inserted.startswith("<|start|>python to=assistant<|channel|>analysis<|message|>")
                assert calls[0].text.startswith("print(")
                product = re.fullmatch(r"print\((\d+)\*(\d+)\)", calls[0].text)
                if product:  # the sandbox ran the policy's code: its answer is the product
                    assert answers[0].text == f"{int(product[1]) * int(product[2])}\n"
                finals += t.final is not None
                right += t.final == task.metadata["answer"]
    n = len(test)
    assert answered >= n * 3 // 4, f"{answered}/{n} episodes called the tool and got its answer"
    assert finals >= answered * 3 // 4, f"{finals}/{answered} answered episodes went on to a final"
    print(f"tool episodes: {answered}/{n} called and answered, {finals} finals, {right} right")
