"""env.mixture through the config, make_env, evaluation (by_env) and the per-step metrics."""
import pytest

from envs import harmony
from envs.types import Task
from rewards.compose import CompositeReward
from rl.config import ConfigError, mixture_components, validate
from rl.data import make_env

MIX = {"math": {"weight": 0.6}, "safety": {"weight": 0.2}, "hierarchy": {"weight": 0.2}}


def test_a_mixture_config_builds_its_components():
    cfg = validate({"env": {"difficulty": 2, "mixture": {**MIX, "hard": {"weight": 0.1, "name": "math",
                                                                         "difficulty": 3, "metric": "math"}}}})
    comps = mixture_components(cfg.env)
    assert list(comps) == ["math", "safety", "hierarchy", "hard"]
    assert comps["math"].config.difficulty == 2 and comps["hard"].config.difficulty == 3  # inherit, override
    assert comps["safety"].config.name == "safety" and comps["hard"].metric == "math"
    env = make_env(cfg.env, cfg.seed)
    assert env.name == "mixture" and set(env.components) == {"math", "safety", "hierarchy", "hard"}
    assert mixture_components(validate({}).env) == {}  # no mixture: the single env, as before


@pytest.mark.parametrize("mixture,key", [
    ({"math": {"weight": 0}}, "env.mixture.math.weight"),
    ({"math": {"weight": -1}}, "env.mixture.math.weight"),
    ({"math": {}}, "env.mixture.math.weight"),
    ({"math": 0.5}, "env.mixture.math"),
    ({"math": {"weight": 1, "bogus": 1}}, "env.mixture.math.bogus"),
    ({"math": {"weight": 1, "efforts": ["low"]}}, "env.mixture.math.efforts"),   # run-wide
    ({"math": {"weight": 1, "train_size": 5}}, "env.mixture.math.train_size"),  # run-wide
    ({"nope": {"weight": 1}}, "env.mixture.nope.name"),                         # label is no env name
    ({"m": {"weight": 1, "name": "math", "difficulty": "x"}}, "env.mixture.m.difficulty"),
    ({"m": {"weight": 1, "name": "math", "families": ["cube"]}}, "env.mixture.m.families"),
    ({"safety": {"weight": 1, "spec": "missing.yaml"}}, "env.mixture.safety.spec"),
    ({"d": {"weight": 1, "name": "dataset"}}, "env.mixture.d.dataset"),
    ({"math": {"weight": 1, "metric": 3}}, "env.mixture.math.metric"),
])
def test_bad_mixture_entries_fail_naming_the_key(mixture, key):
    with pytest.raises(ConfigError, match=f"bad config key '{key}'"):
        validate({"env": {"mixture": mixture}})


class _AnswerPool:
    """`generate` gives each prompt's task the final in `finals` (keyed by question)."""

    def __init__(self, finals):
        self.finals = finals

    def generate(self, prompts, n, *, temperature, seed):
        from rl.engine import Completion

        out = []
        for p in prompts:
            text = harmony.decode(p)
            final = next(f for q, f in self.finals.items() if q in text)
            ids = harmony.render_completion("thinking", final)
            out.append([Completion(ids, [-0.1] * len(ids), "stop") for _ in range(n)])
        return out


def _two_math_envs():
    cfg = validate({"env": {"mixture": {"easy": {"weight": 1, "name": "math"},
                                        "hard": {"weight": 1, "name": "math", "metric": "effort_length"}}},
                    "eval": {"efforts": ["low", "high"], "samples_per_task": 2}})
    tasks = [Task("easy:a", "math", "Compute 2+2.", {"answer": "4"}),
             Task("easy:b", "math", "Compute 3+3.", {"answer": "6"}),
             Task("hard:c", "math", "Compute 9*9.", {"answer": "81"})]
    pool = _AnswerPool({"2+2": "4", "3+3": "7", "9*9": "80"})  # easy: one right of two; hard: wrong
    return cfg, tasks, pool


def test_evaluation_scores_each_env_by_its_own_metric_and_reports_by_env():
    from rl.evaluate import evaluate_policy, scalars

    cfg, tasks, pool = _two_math_envs()
    records = []
    res = evaluate_policy(pool, tasks, cfg, CompositeReward.from_config(cfg.reward.terms), records)
    easy, hard = res["by_env"]["easy"], res["by_env"]["hard"]
    assert (easy["low"]["accuracy"], easy["low"]["n"]) == (0.5, 4)
    # hard is scored by the (ungated) length term: its wrong answers are within budget, so 1.0
    assert (hard["high"]["accuracy"], hard["high"]["n"]) == (1.0, 2)
    assert res["low"]["accuracy"] == pytest.approx((0.5 * 4 + 1.0 * 2) / 6)  # every sample by its own metric
    assert res["low"]["n"] == 6 and "monotonicity" in easy
    assert {r["correct"] for r in records if r["task_id"] == "hard:c"} == {1.0}
    flat = scalars(res)
    assert flat["eval/easy/accuracy/low"] == 0.5 and flat["eval/hard/accuracy/high"] == 1.0
    assert flat["eval/accuracy/low"] == res["low"]["accuracy"]


def test_single_env_evaluation_has_no_by_env():
    from rl.evaluate import evaluate_policy

    cfg = validate({"eval": {"efforts": ["low"]}})
    tasks = [Task("a", "math", "Compute 2+2.", {"answer": "4"})]
    res = evaluate_policy(_AnswerPool({"2+2": "4"}), tasks, cfg, CompositeReward.from_config(cfg.reward.terms))
    assert "by_env" not in res and res["low"]["accuracy"] == 1.0


def test_report_and_tables_show_each_env(tmp_path, capsys):
    from rl.evaluate import evaluate_policy, print_tables, write_results

    cfg, tasks, pool = _two_math_envs()
    res = {"sft": evaluate_policy(pool, tasks, cfg, CompositeReward.from_config(cfg.reward.terms))}
    write_results(res, tmp_path, {"checkpoints": {"sft": "x"}, "efforts": ["low", "high"], "tasks": 3,
                                  "samples_per_task": 2, "temperature": 1.0, "seed": 0, "metric": "math",
                                  "env_metrics": {"easy": "math", "hard": "effort_length"}})
    md = (tmp_path / "eval.md").read_text()
    assert "## Env: easy" in md and "## Env: hard" in md
    assert "easy: `math`, hard: `effort_length`" in (tmp_path / "report.md").read_text()
    print_tables(res, ["low", "high"])
    out = capsys.readouterr().out
    assert "per env" in out and "hard" in out


def test_step_metrics_per_env():
    from rewards.types import RewardResult
    from rl.train import step_metrics
    from envs.types import Sample, Transcript

    def sample(tid, env):
        return Sample(tid, env, "low", [1], [2], [1], [-0.1], Transcript(final="x"), {})

    samples = [sample("math:a", "math"), sample("math:b", "math"), sample("safety:c", "safety")]
    results = [RewardResult(1.0, {"math": 1.0}), RewardResult(0.0, {"math": 0.0}),
               RewardResult(0.5, {"safety": 1.0})]
    m = step_metrics(samples, results, "math", {"math": "math", "safety": "safety"})
    assert m["accuracy/env/math"] == 0.5 and m["accuracy/env/safety"] == 1.0
    assert m["reward/env/safety"] == 0.5 and m["accuracy"] == pytest.approx(2 / 3)
    assert step_metrics(samples, results, "math")["accuracy"] == pytest.approx(1 / 3)  # no mixture: as before
