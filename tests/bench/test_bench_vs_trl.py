"""bench/bench_vs_trl.py's pure parts: TRL's tokenizer gives our prompt ids, our reward wrapped for TRL
scores as our rollout does, TRL's config mirrors ours, the step clock, the result table. The end-to-end
smoke run (both sides, Ray, vLLM, TRL training) is `slow` and needs a `make demo` checkpoint."""
import argparse
import doctest
import importlib

import pytest

from bench.grpo_workload import SideResult, StepRecord


@pytest.fixture(scope="module")
def world():
    """(tasks, vocabulary map, embedding rows, TRL tokenizer) for a few math tasks."""
    from envs.math_tasks import MathEnv, vocabulary_corpus
    from rl.model import VocabMap, collect_vocab
    from bench.trl_side import harmony_tokenizer

    tasks = MathEnv(seed=0, difficulty=1).tasks("train", 4)
    vmap: VocabMap = collect_vocab(vocabulary_corpus(30) + [t.question for t in tasks])
    n_rows = -(-len(vmap) // 64) * 64
    return tasks, vmap, n_rows, harmony_tokenizer(vmap.canonical, n_rows)


def render(task, effort):
    from envs import harmony

    return harmony.render_prompt(task.question, effort, task.developer)


def test_trl_tokenizer_reproduces_our_prompt_ids(world):
    from envs import harmony
    from envs.types import EFFORTS
    from bench.trl_side import trl_dataset

    tasks, vmap, n_rows, tok = world
    dataset, seen, prompts = trl_dataset([tasks[:2], tasks[2:]], EFFORTS, render, tok, vmap.to_model)
    assert len(dataset) == len(tasks) * len(EFFORTS) and seen == tasks
    for row in dataset:  # what TRL does with a row: tokenize its text
        want = vmap.to_model(render(tasks[row["task_index"]], row["effort"]))
        assert tok(text=[row["prompt"]])["input_ids"][0] == want
        assert prompts[row["task_index"], row["effort"]] == render(tasks[row["task_index"]], row["effort"])
    ids = render(tasks[0], "high")
    assert tok.decode(vmap.to_model(ids)) == harmony.decode(ids)  # special tokens spelled as Harmony does
    assert tok.pad_token_id == vmap.pad_id and tok.eos_token_id == vmap.to_model([harmony.RETURN])[0]


def test_trl_dataset_refuses_a_prompt_the_tokenizer_does_not_reproduce(world):
    from bench.trl_side import trl_dataset

    tasks, vmap, _, tok = world
    shifted = lambda ids: [i + 1 for i in vmap.to_model(ids)]  # noqa: E731
    with pytest.raises(ValueError, match="does not reproduce the prompt"):
        trl_dataset([tasks[:1]], ["low"], render, tok, shifted)


def test_text_outside_the_vocabulary_gets_ids_past_the_embedding(world):
    _, vmap, n_rows, tok = world
    ids = tok(text=["Zebra"])["input_ids"][0]
    assert ids and all(i >= n_rows for i in ids)  # not another token's row


def test_trl_reward_scores_as_our_rollout_does(world):
    from envs import harmony
    from envs.harmony import STOP_TOKENS
    from envs.math_tasks import solution
    from rewards.compose import CompositeReward
    from rl.engine import Completion
    from rl.workers import to_sample
    from bench.trl_side import TrlReward

    tasks, vmap, _, _ = world
    terms = {"math": {"weight": 1.0, "timeout_s": 5.0},
             "effort_length": {"weight": 0.2, "budgets": {"low": 16, "medium": 64, "high": 256}}}
    reward = CompositeReward.from_config(terms)
    task = tasks[0]
    prompts = {(0, "low"): render(task, "low")}
    analysis, final = solution(task, "low")
    right = harmony.render_completion(analysis, final)
    wrong = harmony.render_completion(analysis, str(int(final) + 1))
    cut = right[:5]  # truncated: no stop id
    wrapped = TrlReward(reward, [task], prompts, vmap.to_canonical, vmap.to_model(list(STOP_TOKENS)))
    completions = [vmap.to_model(c) for c in (right, wrong, cut)]
    scores = wrapped(prompts=["p"] * 3, completions=["c"] * 3, completion_ids=completions,
                     task_index=[0, 0, 0], effort=["low"] * 3, trainer_state=None)
    ours = [to_sample(task, "low", prompts[0, "low"], Completion(c, [0.0] * len(c), f))
            for c, f in ((right, "stop"), (wrong, "stop"), (cut, "length"))]
    assert scores == [r.score for r in reward.score_batch(ours)]
    assert scores[0] > scores[1] and scores[0] >= 1.0
    samples = wrapped.samples(completions, [0, 0, 0], ["low"] * 3)
    assert [s.finish_reason for s in samples] == ["stop", "stop", "length"]
    assert [s.completion_ids for s in samples] == [right, wrong, cut]
    assert wrapped.calls == [(sum(scores) / 3, sum(map(len, completions)))]


def test_grpo_args_mirror_our_config(tmp_path):
    from bench.grpo_workload import overrides
    from bench.trl_side import grpo_args
    from rl.config import compose

    cfg = compose(overrides("/nowhere/sft", tmp_path, steps=3, tasks_per_step=12, group_size=8, max_new_tokens=96))
    args = grpo_args(cfg, "generate", tmp_path, n_vocab=2273, n_rows=2304)
    # 12 tasks x 3 efforts x 8 = 288 samples; 4 optimizer steps of 72 = 2 micro-batches of 36 (<= 64)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.steps_per_generation) == (36, 2, 8)
    assert args.max_steps == 3 * cfg.algo.mini_batches and args.num_generations == 8
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2) == (cfg.learner.lr, *cfg.learner.betas)
    assert (args.max_completion_length, args.loss_type, args.scale_rewards, args.beta) == (96, "dapo", "group", 0.0)
    assert not args.bf16 and not args.gradient_checkpointing and not args.shuffle_dataset
    assert args.generation_kwargs == {"suppress_tokens": list(range(2273, 2304))}
    fast = grpo_args(cfg, "fast", tmp_path, n_vocab=2273, n_rows=2304)
    assert fast.use_vllm and fast.bf16 and fast.generation_kwargs == {"allowed_token_ids": list(range(2273))}
    cfg.algo.loss_agg = "seq_mean_token_mean"
    with pytest.raises(ValueError, match="no TRL equivalent for algo.loss_agg"):
        grpo_args(cfg, "generate", tmp_path, n_vocab=2273, n_rows=2304)


def test_phase_clock_takes_nested_phases_out_of_their_parent():
    from bench.trl_side import PhaseClock

    now = [0.0]

    def wait(seconds):
        now[0] += seconds

    clock = PhaseClock(optimizer_steps_per_batch=2, clock=lambda: now[0])
    sync = clock.timed("sync", lambda: wait(5))

    def generate():
        sync()
        wait(2)

    clock.on_train_begin(None, None, None)
    clock.timed("generation", generate)()
    clock.timed("logprobs", lambda: wait(1), grad=False)()  # grad is on here: not timed
    wait(3)
    clock.on_step_end(None, argparse.Namespace(global_step=1), None)  # mid-batch: nothing recorded yet
    clock.on_step_end(None, argparse.Namespace(global_step=2), None)
    assert clock.batches == [(11.0, {"sync": 5.0, "generation": 2.0})]


def record(step, total, reward, generation):
    return StepRecord(step=step, reward=reward, seconds={"generation": generation, "update": total - generation},
                      total_s=total, generated_tokens=100, trained_tokens=100)


def test_result_tables_put_sides_side_by_side():
    from bench.bench_vs_trl import summary, tables

    ours = SideResult("ours", "rl.train", [record(1, 9.0, 0.1, 5.0), record(2, 2.0, 0.2, 1.0),
                                           record(3, 4.0, 0.3, 1.0)], memory={"peak_sum": 2 ** 30, "roles": {}})
    trl = SideResult("trl:generate", "generate: ...", [record(1, 20.0, 0.0, 9.0), record(2, 6.0, 0.1, 3.0),
                                                       record(3, 12.0, 0.5, 3.0)])
    broken = SideResult("trl:vllm", error="AssertionError: Attempted to load weight")
    s = summary(ours)  # step 1 left out of the means
    assert s["s_per_step"] == 3.0 and s["generation"] == 1.0 and s["gen_tok_s"] == 100.0 and s["peak_gib"] == 1.0
    text = "\n".join(tables([ours, trl, broken]))
    assert "| ours | 3.00 |" in text and "| trl:generate | 9.00 |" in text and "| 3.00x |" in text
    assert "| 3 | 0.300 | 0.500 |" in text  # reward curves, one column per side
    assert "- trl:vllm: AssertionError: Attempted to load weight" in text
    assert "(trl:generate; its s/step / ours): **3.00x** (target >= 3x: met)" in text


def test_smoke_sizes_are_labelled_not_a_result():
    from bench.bench_vs_trl import DEFAULTS, header

    smoke = argparse.Namespace(steps=2, tasks_per_step=2, group_size=2, max_new_tokens=16)
    assert "not the benchmark result" in "\n".join(header(smoke, "/p/sft", "Load average at start 3.0."))
    full = argparse.Namespace(**DEFAULTS)
    assert "not the benchmark result" not in "\n".join(header(full, "/p/sft", ""))


def test_missing_policy_says_how_to_make_one(tmp_path):
    from bench.grpo_workload import default_policy, require_policy

    assert default_policy(tmp_path) is None
    with pytest.raises(SystemExit, match="make demo"):
        require_policy(None)
    with pytest.raises(SystemExit, match="make demo"):
        require_policy(str(tmp_path))
    (tmp_path / "outputs" / "tiny-2026-01-02_00-00-00" / "sft").mkdir(parents=True)
    (tmp_path / "outputs" / "tiny-2026-01-02_00-00-00" / "sft" / "config.json").write_text("{}")
    assert default_policy(tmp_path).endswith("tiny-2026-01-02_00-00-00/sft")


@pytest.mark.parametrize("module", ["bench.trl_side", "bench.grpo_workload", "bench.bench_vs_trl"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.slow
def test_smoke_run_both_sides(tmp_path):
    """Both sides train 2 tiny steps from the newest `make demo` checkpoint (minutes on 2 cores)."""
    from bench.bench_vs_trl import SECTION, main
    from bench.grpo_workload import default_policy

    if default_policy() is None:
        pytest.skip("no outputs/tiny-*/sft: run `make demo` first")
    results_md = tmp_path / "RESULTS.md"
    main(["--steps", "2", "--tasks-per-step", "2", "--group-size", "2", "--max-new-tokens", "16",
          "--trl-modes", "generate", "--out", str(tmp_path / "out"), "--write", str(results_md)])
    text = results_md.read_text()
    assert SECTION in text and "| ours |" in text and "| trl:generate |" in text and "Did not run" not in text
