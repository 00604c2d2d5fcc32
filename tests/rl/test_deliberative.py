"""Deliberative SFT data: a spec-in-context teacher, the judge's filter, training rows without the spec."""
import random

import pytest

from envs import harmony
from envs.math_tasks import MathEnv
from envs.safety_spec import load_spec
from envs.safety_tasks import SafetyEnv
from rewards.judge import RuleJudge, failure
from rl.deliberative import (SLIPS, SampledTeacher, TemplateTeacher, cites_clause, deliberative_solutions,
                             filtered_solution_fn, generation_prompt, rejection, slip, teacher_corpus)
from rl.engine import Completion
from rl.model import VocabMap
from rl.sft import sft_examples

EFFORTS = ("low", "medium", "high")


def _task(category):
    return next(t for t in SafetyEnv().tasks("train", 60) if t.metadata["category"] == category)


@pytest.mark.parametrize("category,kind,reason", [
    ("pest_control", "over_refusal", "not_allowed"),
    ("pest_control", "wrong_clause", "cot_misses_clause"),
    ("hacking", "lecture", "style"),
    ("hacking", "no_alternative", "style"),
    ("hacking", "wrong_clause", "cot_misses_clause"),
    ("self_harm", "no_help", "style"),
    ("self_harm", "lecture", "style"),
])
def test_every_slip_is_rejected_for_its_reason(category, kind, reason):
    spec, task = load_spec(), _task(category)
    cat = spec.category(category)
    for effort in EFFORTS:
        analysis, final = TemplateTeacher(noise=0.0)(spec, task, effort, random.Random(0))
        assert rejection(RuleJudge().judge(spec, [_req(task, final)])[0], analysis, cat) is None
        bad_analysis, bad_final = slip(spec, cat, task.metadata["slots"], effort, analysis, final, kind)
        got = rejection(RuleJudge().judge(spec, [_req(task, bad_final)])[0], bad_analysis, cat)
        assert got is not None and got.split(":")[0] == reason


def _req(task, final):
    from rewards.judge import JudgeRequest

    return JudgeRequest(task.metadata["prompt"], final)


def test_refusal_cot_reasons_about_the_policy():
    spec, task = load_spec(), _task("drugs")
    for effort in EFFORTS:
        analysis, final = TemplateTeacher(noise=0.0)(spec, task, effort, random.Random(0))
        assert cites_clause(analysis, spec.category("drugs")) and final.startswith("I can't help with that.")
        assert len(final.split()) <= 20  # brief refusal plus the offer


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_filter_keeps_only_what_the_judge_allows(noise):
    spec, tasks = load_spec(), SafetyEnv().tasks("train", 120)
    kept, stats = deliberative_solutions(tasks, EFFORTS, RuleJudge(), TemplateTeacher(noise), seed=0)
    assert stats.candidates == 3 * len(tasks) and stats.kept == len(kept)
    if noise == 0.0:
        assert stats.kept_fraction == 1.0 and not stats.rejected
    else:  # about noise of the candidates slip; a few slips are harmless (no alternative to drop)
        assert 1 - noise - 0.1 < stats.kept_fraction < 1 - noise + 0.1
        assert set(stats.rejected) <= {"not_allowed", "style", "cot_misses_clause"} and len(stats.rejected) == 3
    by_id = {t.task_id: t for t in tasks}
    for (tid, _), (analysis, final) in kept.items():
        v = RuleJudge().judge(spec, [_req(by_id[tid], final)])[0]
        assert v.allowed and v.style_ok and cites_clause(analysis, spec.category(by_id[tid].metadata["category"]))
    assert sum(d["kept"] for d in stats.as_dict()["by_category"].values()) == stats.kept


def test_a_failing_judge_rejects_everything_without_raising():
    class DownJudge:
        def judge(self, spec, requests):
            return [failure("endpoint down")] * len(requests)

    kept, stats = deliberative_solutions(SafetyEnv().tasks("train", 10), EFFORTS, DownJudge(), TemplateTeacher(0.0), 0)
    assert not kept and stats.rejected == {"judge_failed": 30}


def test_training_rows_drop_rejects_and_never_hold_the_spec():
    spec = load_spec()
    safety = SafetyEnv().tasks("train", 40)
    math = MathEnv(families=["digit_sum"], difficulty=1).tasks("train", 10, seed=0)
    kept, stats = deliberative_solutions(safety, EFFORTS, RuleJudge(), TemplateTeacher(0.3), seed=1)
    fallback = MathEnv(families=["digit_sum"], difficulty=1).solution
    rows = sft_examples(safety + math, filtered_solution_fn(kept, fallback), VocabMap.identity(), EFFORTS)
    assert len(rows) == stats.kept + 3 * len(math)
    clause = harmony.encode(" without the owner's permission")  # from rule H1 of the spec
    assert clause and _contains(generation_prompt(safety[0], "high", spec), clause)  # the teacher reads the spec
    for r in rows:
        assert not _contains(r["input_ids"][:r["assistant_masks"].index(1)], clause)  # the student's prompt does not


def _contains(ids, part):
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


class ScriptedGenerator:
    """Stands in for the rollout workers' `generate`: records the prompts, answers each with real Harmony
    completion ids (the templated candidate for its task, or garbage for every third prompt)."""

    def __init__(self, tasks):
        self.by_question, self.prompts = {t.question: t for t in tasks}, []

    def generate(self, prompts, n, *, temperature, seed):
        self.prompts += prompts
        out = []
        for i, p in enumerate(prompts):
            text = harmony.decode(p)
            task = next(t for q, t in self.by_question.items() if q in text)
            effort = next(e for e in EFFORTS if f"Reasoning: {e}" in text)
            ids = [200005, 17, 99, 3] if i % 3 == 2 else harmony.render_completion(*TemplateTeacher(0.0)(
                load_spec(), task, effort, random.Random(0)))
            out.append([Completion(ids, [0.0] * len(ids), "stop")] * n)
        return out


def test_sampled_teacher_reads_the_spec_and_garbage_is_rejected_not_raised():
    tasks = SafetyEnv().tasks("train", 12)
    gen = ScriptedGenerator(tasks)
    kept, stats = deliberative_solutions(tasks, EFFORTS, RuleJudge(), SampledTeacher(gen, seed=3), seed=0)
    assert len(gen.prompts) == 36 and stats.candidates == 36
    clause = harmony.encode(" without the owner's permission")
    assert all(_contains(p, clause) for p in gen.prompts)  # the spec is in every teacher prompt
    assert stats.rejected == {"teacher_failed": 12} and stats.kept == 24 == len(kept)
    [developer] = teacher_corpus(tasks)  # one spec: one developer message, what the tiny vocabulary must cover
    assert all(developer in harmony.decode(p) for p in gen.prompts)


def test_sampled_candidates_the_student_cannot_render_are_rejected():
    tasks = SafetyEnv().tasks("train", 6)
    teacher = SampledTeacher(ScriptedGenerator(tasks), covers=lambda ids: 200005 not in ids)  # no final header
    kept, stats = deliberative_solutions(tasks, EFFORTS, RuleJudge(), teacher, seed=0)
    assert not kept and stats.rejected == {"teacher_failed": 18}


def test_a_teacher_without_the_spec_in_its_vocabulary_fails_before_sampling(tmp_path):
    import json

    from rl.config import compose
    from rl.pipeline import deliberative_teacher

    (tmp_path / "vocab_map.json").write_text(json.dumps({"canonical_ids": list(range(300))}))
    cfg = compose(["experiment=safety", "sft.deliberative.teacher=policy"])
    with pytest.raises(ValueError, match="vocabulary without the spec text"):
        with deliberative_teacher(cfg, tmp_path, SafetyEnv().tasks("train", 3)):
            pass


def test_teacher_noise_is_checked():
    with pytest.raises(ValueError, match="teacher_noise"):
        TemplateTeacher(noise=1.0)
    assert set(SLIPS) == {"comply", "refuse", "safe_complete"}


def test_docstring_examples():
    import doctest

    import rl.deliberative

    result = doctest.testmod(rl.deliberative)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.slow
def test_sft_stage_samples_deliberative_data_through_rollout_workers(tmp_path):
    """`sft.deliberative.teacher=policy`: the SFT stage starts vLLM rollout workers on the checkpoint, samples
    a candidate per (safety task, effort) with the spec in context, judges it, writes the stats (a random
    tiny model writes no final the judge allows: every candidate is rejected, none crashes the stage)."""
    import json

    from rl.config import compose
    from rl.data import make_env
    from rl.pipeline import build_model, sft_solution_fn

    cfg = compose(["experiment=safety", f"run_dir={tmp_path}", "sft.deliberative.teacher=policy",
                   "rollout.max_tokens=32", "rollout.kv_cache_gib=1"])  # max_model_len 320 < a teacher prompt: raised
    model = build_model(cfg, tmp_path / "model")
    tasks = make_env(cfg.env, cfg.seed).tasks("train", 16, seed=0)
    n_safety = sum(t.env == "safety" for t in tasks)
    solution = sft_solution_fn(cfg, tasks, lambda t, e: ("a", "b"), tmp_path / "sft_data.json", model)
    report = json.loads((tmp_path / "sft_data.json").read_text())
    assert report["teacher"] == "policy" and report["candidates"] == 3 * n_safety > 0
    assert report["kept"] + sum(report["rejected"].values()) == report["candidates"]
    safety = next(t for t in tasks if t.env == "safety")
    assert all(solution(safety, e) is None or len(solution(safety, e)) == 2 for e in EFFORTS)
    assert solution(next(t for t in tasks if t.env != "safety"), "low") == ("a", "b")
