"""Deliberative SFT data (Guan et al. 2024, §2.3; issue 15 §4): generate with the spec, filter by the judge,
train without it.

What
1. Generate: for each safety task and effort a teacher writes a (CoT, answer) candidate with the spec in its
   context. `generation_prompt` is what it is given: the spec as prose (`envs.safety_spec.spec_text`) in the
   developer message, then the request. The tiny world's teacher (`TemplateTeacher`) is the templated trace
   of `envs.safety_tasks` (the analysis names the category, cites its rule and, at higher efforts, the
   look-alike it is not and the style rules; the final is the spec's response), made imperfect on purpose:
   with probability `teacher_noise` it slips the way a sampled teacher does (`SLIPS`: over-refusing a
   benign look-alike, citing the look-alike's clause, lecturing in a refusal, dropping the offered
   alternative or the way to get help), so the filter has something to reject.
2. Filter: the judge (any `rewards.judge` backend: `rule`, `spec_rm`, `http`) reads the spec, the request
   and the FINAL answer and must allow it with its style kept (score 1). As in the paper's SFT filter, and
   unlike RL, the CoT is checked too (`cites_clause`): the analysis must name the request's category, its
   rule id and the response type the spec expects, so a refusal's analysis reasons about the policy.
   What was kept, per category and per reason rejected, is returned (`FilterStats`) and the pipeline
   writes it to `<run_dir>/sft_data.json` and prints the kept fraction.
3. Train: the kept (CoT, answer) pairs are rendered with the task's own prompt, the spec removed
   (`rl.sft.sft_examples` renders `task.question` / `task.developer`, never the generation prompt), so the
   policy must recall the policy from its weights.

Departures: the paper samples candidates from a reasoning model with the spec in context and grades them
with a spec-reading reward model; the tiny world's teacher is templated (a 4.6M model cannot read a
40-line spec) with injected slips, and the judge is the spec's rule judge (or the trained spec RM). Real
scale: `SampledTeacher` samples the candidates through the rollout workers (`sft.deliberative.teacher:
policy`, the checkpoint being fine-tuned, or `teacher_model: <path>`); tested end to end on a tiny model,
whose sampled candidates are mostly rejected (it cannot read the spec).

Run: `python -m rl.pipeline experiment=safety` (the SFT stage calls `deliberative_solutions` for the safety
tasks of `env.mixture`); `python -m rl.deliberative` prints a few candidates, the verdicts and the kept
fraction.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from envs import harmony
from envs.safety_spec import Category, Spec, load_spec, normalize, spec_text
from envs.safety_tasks import ENV_NAME as SAFETY_ENV, spec_response, trace
from envs.types import Task
from rewards.judge import JudgeRequest, Verdict

Solution = tuple[str, str]  # (analysis, final)

# Teacher slips by the response type the spec expects: what a sampled teacher gets wrong.
SLIPS = {
    "comply": ("over_refusal", "wrong_clause"),  # refuses the benign look-alike / reasons from its twin's rule
    "refuse": ("lecture", "no_alternative", "wrong_clause"),
    "safe_complete": ("lecture", "no_help", "wrong_clause"),
}
LECTURE = "That is wrong, and you should think about it."


def teacher_developer(spec: Spec) -> str:
    return "Follow this safety specification.\n\n" + spec_text(spec)


def _safety_specs(tasks: Sequence[Task]) -> dict[str, Spec]:
    """The spec of every safety task, by path, loaded once each (first-seen order)."""
    return {p: load_spec(p) for p in dict.fromkeys(t.metadata["spec"] for t in tasks if t.env == SAFETY_ENV)}


def teacher_prompts(tasks: Sequence[Task], efforts: Sequence[str]) -> list[list[int]]:
    """Every prompt a sampled teacher gets for `tasks` (their safety tasks) at `efforts`."""
    specs = _safety_specs(tasks)
    return [generation_prompt(t, e, specs[t.metadata["spec"]]) for t in tasks if t.env == SAFETY_ENV for e in efforts]


def teacher_corpus(tasks: Sequence[Task]) -> list[str]:
    """The text a sampled teacher's prompts add to the tasks' own (one developer message per spec): what a
    tiny model's trimmed vocabulary must also cover for `sft.deliberative.teacher=policy`."""
    return [teacher_developer(spec) for spec in _safety_specs(tasks).values()]


def generation_prompt(task: Task, effort: str, spec: Spec) -> list[int]:
    """The teacher's prompt (canonical o200k_harmony ids): the spec in the developer message, then the
    request. Training never uses it (the spec is removed from the context)."""
    developer = teacher_developer(spec)
    if task.developer:
        developer = f"{task.developer}\n\n{developer}"
    return harmony.render_prompt(task.question, effort, developer)


@dataclass
class TemplateTeacher:
    """The tiny world's spec-in-context teacher: the templated deliberative trace, slipping with
    probability `noise` (one of `SLIPS` for the category's expected response).

    >>> from envs.safety_tasks import SafetyEnv
    >>> env = SafetyEnv()
    >>> t = next(t for t in env.tasks("train", 40) if t.metadata["category"] == "hacking")
    >>> TemplateTeacher(noise=0.0)(env.spec, t, "low", random.Random(0))[0]
    'Category hacking, rule H1: refuse.'
    """

    noise: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"teacher_noise={self.noise} must be in [0, 1)")

    def write(self, items: Sequence[tuple[Spec, Task, str]], rng: random.Random) -> list[Solution | None]:
        """A candidate per (spec, task, effort), in order (the teacher protocol `deliberative_solutions` calls)."""
        return [self(spec, task, effort, rng) for spec, task, effort in items]

    def __call__(self, spec: Spec, task: Task, effort: str, rng: random.Random) -> Solution:
        cat = spec.category(task.metadata["category"])
        slots = task.metadata["slots"]
        analysis = trace(spec, cat, slots, effort)
        final = spec_response(spec, cat, slots)
        if rng.random() >= self.noise:
            return analysis, final
        return slip(spec, cat, slots, effort, analysis, final, rng.choice(SLIPS[cat.response]))


def slip(spec: Spec, cat: Category, slots: dict[str, str], effort: str, analysis: str, final: str,
         kind: str) -> Solution:
    """The candidate a teacher writes when it makes the mistake `kind` (one of `SLIPS`)."""
    if kind == "over_refusal":
        return analysis.replace(cat.response, "refuse"), spec.responses.refuse[0]
    if kind == "wrong_clause":  # reasons from the look-alike's clause; the answer may still be right
        twin = spec.category(cat.look_alike) if cat.look_alike else cat
        return trace(spec, twin, {}, "low"), final
    if kind == "lecture":
        return analysis, f"{final} {LECTURE}"
    if kind == "no_alternative":
        return analysis, spec.responses.refuse[0]
    if kind == "no_help":
        return analysis, spec.responses.safe_complete[0]
    raise ValueError(f"slip kind {kind!r} is not one of {sorted({k for v in SLIPS.values() for k in v})}")


@dataclass
class SampledTeacher:
    """Real scale: candidates sampled from a model with the spec in its context (`generation_prompt`) through
    `generator`, anything with `generate(prompts, n, *, temperature, seed) -> list[list[Completion]]`: the
    rollout workers (`rl.workers.WorkerPool`) serving the policy or a stronger teacher checkpoint. Each
    completion is parsed as Harmony (`envs.harmony.parse_completion`, never raises); one with no final answer,
    or one the student's vocabulary cannot render (`covers`), is None, which `deliberative_solutions` rejects
    as "teacher_failed" without asking the judge."""

    generator: object
    temperature: float = 1.0
    seed: int = 0
    # the student's vocabulary check (`rl.model.VocabMap.covers`): a kept candidate is re-rendered for SFT, and
    # decoded text can re-encode into ids a trimmed vocabulary lacks; such a candidate is None too
    covers: Callable[[list[int]], bool] | None = None

    def write(self, items: Sequence[tuple[Spec, Task, str]], rng: random.Random) -> list[Solution | None]:
        if not items:
            return []
        prompts = [generation_prompt(task, effort, spec) for spec, task, effort in items]
        completions = self.generator.generate(prompts, 1, temperature=self.temperature, seed=self.seed)
        out: list[Solution | None] = []
        for samples in completions:
            t = harmony.parse_completion(samples[0].ids) if samples else None
            solution = (t.analysis, t.final) if t is not None and t.format_ok and t.final else None
            if solution and self.covers and not self.covers(harmony.render_completion(*solution)):
                solution = None
            out.append(solution)
        return out


def rule_id(cat: Category) -> str:
    return cat.rule.split(":", 1)[0] if ":" in cat.rule else cat.id


def cites_clause(analysis: str, cat: Category) -> bool:
    """The CoT reasons from the right clause: it names the category, its rule id and the expected response.

    >>> from envs.safety_spec import load_spec
    >>> cat = load_spec().category("hacking")
    >>> cites_clause("hacking, rule H1: refuse.", cat), cites_clause("account_security, rule A1: comply.", cat)
    (True, False)
    """
    text = normalize(analysis)
    return all(normalize(x) in text for x in (cat.id, f"rule {rule_id(cat)}", cat.response))


@dataclass
class FilterStats:
    """What the judge filter kept: counts per category and why candidates were rejected."""

    candidates: int = 0
    kept: int = 0
    by_category: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # [kept, all]
    rejected: Counter = field(default_factory=Counter)  # reason -> count

    def add(self, category: str, reason: str | None) -> None:
        """Count one candidate of `category`: kept (reason None) or rejected for `reason` ("style:..." counts as "style")."""
        self.candidates += 1
        self.by_category[category][1] += 1
        if reason is None:
            self.kept += 1
            self.by_category[category][0] += 1
        else:
            self.rejected[reason.split(":")[0]] += 1

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.candidates if self.candidates else 0.0

    def as_dict(self) -> dict:
        return {"candidates": self.candidates, "kept": self.kept, "kept_fraction": self.kept_fraction,
                "by_category": {c: {"kept": k, "candidates": n, "kept_fraction": k / n}
                                for c, (k, n) in sorted(self.by_category.items())},
                "rejected": dict(self.rejected)}


def rejection(verdict: Verdict, analysis: str, cat: Category) -> str | None:
    """Why a candidate is rejected (None: kept). The judge reads the final only; the CoT check is ours."""
    if verdict.failed:
        return "judge_failed"
    if not verdict.allowed:
        return "not_allowed"
    if not verdict.style_ok:
        return "style:" + ",".join(verdict.violations)
    if not cites_clause(analysis, cat):
        return "cot_misses_clause"
    return None


def deliberative_solutions(tasks: Sequence[Task], efforts: Sequence[str], judge, teacher: TemplateTeacher | SampledTeacher,
                           seed: int) -> tuple[dict[tuple[str, str], Solution], FilterStats]:
    """Candidates for every (safety task, effort) from `teacher.write`, judged against the task's spec:
    {(task_id, effort): (analysis, final)} for the kept ones, and the filter's stats. Non-safety tasks are
    left out; a candidate the teacher could not write (None) is rejected as "teacher_failed"."""
    rng = random.Random(f"deliberative:{seed}")
    stats, kept = FilterStats(), {}
    by_spec: dict[str, list[tuple[Task, str]]] = defaultdict(list)
    for task in tasks:
        if task.env == SAFETY_ENV:
            by_spec[task.metadata["spec"]] += [(task, effort) for effort in efforts]
    for path, pairs in by_spec.items():
        spec = load_spec(path)
        written = teacher.write([(spec, task, effort) for task, effort in pairs], rng)
        rows = []
        for (task, effort), solution in zip(pairs, written, strict=True):
            if solution is None:
                stats.add(task.metadata["category"], "teacher_failed")
            else:
                rows.append((task, effort, solution))
        verdicts = judge.judge(spec, [JudgeRequest(t.metadata["prompt"], final) for t, _, (_, final) in rows]) if rows else []
        for (task, effort, (analysis, final)), verdict in zip(rows, verdicts, strict=True):
            cat = spec.category(task.metadata["category"])
            reason = rejection(verdict, analysis, cat)
            stats.add(cat.id, reason)
            if reason is None:
                kept[(task.task_id, effort)] = (analysis, final)
    return kept, stats


def filtered_solution_fn(kept: dict[tuple[str, str], Solution],
                         fallback: Callable[[Task, str], Solution]) -> Callable[[Task, str], Solution | None]:
    """A `solution(task, effort)` for `rl.sft.sft_examples`: a safety task's kept candidate, None where the
    judge rejected it (the example is dropped), `fallback` (the env's own trace) for every other env."""

    def solution(task: Task, effort: str) -> Solution | None:
        if task.env == SAFETY_ENV:
            return kept.get((task.task_id, effort))
        return fallback(task, effort)

    return solution


def _main() -> None:
    from envs.safety_tasks import SafetyEnv
    from rewards.judge import RuleJudge

    env = SafetyEnv()
    tasks = env.tasks("train", 200)
    kept, stats = deliberative_solutions(tasks, ("low", "medium", "high"), RuleJudge(), TemplateTeacher(0.1), 0)
    print(f"teacher prompt (spec in context): {len(generation_prompt(tasks[0], 'high', env.spec))} tokens")
    for t in tasks[:4]:
        print(f"--- {t.metadata['category']}: {t.question}\n", kept.get((t.task_id, "medium"), "REJECTED"))
    print(stats.as_dict())


if __name__ == "__main__":
    _main()
