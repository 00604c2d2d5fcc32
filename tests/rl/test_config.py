"""The config schema: typed objects out, one line naming the key for every bad value, overrides the
command line can actually express."""
import pytest

from rl.config import AlgoConfig, Config, ConfigError, LearnerConfig, LrScale, compose, validate


def test_validate_returns_typed_objects_with_schema_defaults():
    c = validate({})
    assert isinstance(c, Config) and isinstance(c.learner, LearnerConfig) and isinstance(c.algo, AlgoConfig)
    assert c.algo.max_tokens == c.rollout.max_tokens  # Dr.GRPO's normaliser resolved once, to a constant


@pytest.mark.parametrize("raw, key", [
    ({"algo": {"advantag": "grpo"}}, "algo.advantag"),  # misspelt key
    ({"learner": {"lr": "fast"}}, "learner.lr"),  # wrong type
    ({"algo": {"advantage": "ppo"}}, "algo.advantage"),  # outside the declared choices
    ({"env": {"efforts": ["low", "extreme"]}}, "env.efforts"),  # a list element outside them
    ({"rollout": {"dtype": "int8"}}, "rollout.dtype"),
    ({"rollout": {"max_tokens": 600, "max_model_len": 512}}, "rollout.max_tokens"),
    ({"learner": {"temperature": 0.7}}, "learner.temperature"),
    ({"learner": {"betas": [0.9]}}, "learner.betas"),
    ({"learner": {"lr_scale": [{"pattern": ".", "scale": -1.0}]}}, "learner.lr_scale"),
    ({"learner": {"num_gpus": 2}}, "learner.num_gpus"),  # one rank, at most one GPU
    ({"learner": {"device": "tpu"}}, "learner.device"),
    ({"learner": {"autocast": "float16"}}, "learner.autocast"),
    ({"learner": {"world_size": 0}}, "learner.world_size"),
    ({"rollout": {"num_gpus": 1, "tensor_parallel_size": 2}}, "rollout.num_gpus"),
    ({"rollout": {"quantization": "awq"}}, "rollout.quantization"),
    ({"cluster": {"placement": "colocate"}, "rollout": {"num_workers": 2}}, "rollout.num_workers"),
    ({"cluster": {"placement": "colocate"}, "learner": {"num_gpus": 0.6}, "rollout": {"num_gpus": 0.6}},
     "rollout.num_gpus"),
    ({"cluster": {"placement": "colocate"}, "rollout": {"tensor_parallel_size": 2}}, "rollout.tensor_parallel_size"),
    ({"cluster": {"gpus_per_node": 1}, "learner": {"num_gpus": 1}, "rollout": {"num_gpus": 1}},
     "cluster.gpus_per_node"),  # 2 GPUs asked of a 1-GPU cluster
    ({"cluster": {"placement": "pack"}}, "cluster.placement"),
    ({"rollout": {"top_p": 0.9}, "algo": {"old_logprobs": "behavior"}}, "algo.old_logprobs"),
    ({"env": {"efforts": []}}, "env.efforts"),
    ({"env": {"name": "dataset"}}, "env.dataset"),
    ({"model": {"name": "gpt-oss-20b"}}, "model.path"),
    ({"reward": {"terms": {"math": {"timeout_s": 5}}}}, "reward.terms.math"),
    ({"eval": {"metric": "nope"}}, "eval.metric"),
    ({"rollout": {"budget_forcing": {"caps": {"low": 0}}}}, "rollout.budget_forcing.caps"),
    ({"rollout": {"budget_forcing": {"caps": {"extreme": 8}}}}, "rollout.budget_forcing.caps"),
    ({"rollout": {"budget_forcing": {"caps": {"low": "short"}}}}, "rollout.budget_forcing.caps.low"),
    ({"rollout": {"tools": {"python": {"enabled": True}}, "budget_forcing": {"enabled": True}}},
     "rollout.tools.python.enabled"),  # not combined yet
    ({"rollout": {"tools": {"python": {"max_calls": 0}}}}, "rollout.tools.python.max_calls"),
    ({"rollout": {"tools": {"python": {"description": "jupyter"}}}}, "rollout.tools.python.description"),
    ({"rollout": {"tools": {"python": {"max_output_tokens": 0}}}}, "rollout.tools.python.max_output_tokens"),
    ({"model": {"dtype": "float32"}}, "model.dtype"),  # deleted dead fields stay deleted
    ({"algo": {"name": "grpo"}}, "algo.name"),
    ({"env": {"test_size": 10}}, "env.test_size"),
])
def test_a_bad_value_fails_naming_its_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        validate(raw)
    assert "\n" not in str(err.value)


def test_lr_scale_overrides_the_command_line_can_express():
    norms = 'learner.lr_scale=[{pattern:"norm\\.weight$",scale:1.0},{pattern:".",scale:0.0}]'
    assert compose([norms]).learner.lr_scale == [LrScale(r"norm\.weight$", 1.0), LrScale(".", 0.0)]
    assert compose(["experiment=tiny"]).learner.lr_scale[0].pattern == r"norm\.weight$"
    assert compose(["experiment=tiny", "learner.lr_scale=[]"]).learner.lr_scale == []  # clears the preset


def test_reward_terms_in_the_composites_shape():
    c = compose(["+reward.terms.format={weight:0.1}", "reward.terms.math.timeout_s=9", "~reward.terms.effort_length"])
    assert c.reward.terms == {"math": {"weight": 1.0, "timeout_s": 9}, "format": {"weight": 0.1}}
    from rewards.compose import CompositeReward

    assert set(CompositeReward.from_config(c.reward.terms).rewards) == {"math", "format"}


def test_yaml_holds_only_what_differs_from_the_schema():
    """A group file that repeats a schema default would be a second source of truth."""
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[2] / "conf"
    defaults = asdict(Config())
    for path in conf.glob("*/*.yaml"):
        node = defaults.get(path.parent.name)
        values = yaml.safe_load(path.read_text()) or {}
        if node is None or path.parent.name == "experiment":
            continue
        same = {k: v for k, v in values.items() if node.get(k) == v and k not in ("name", "engine", "advantage")}
        assert not same, f"{path.relative_to(conf)} repeats schema defaults {same}"


def test_the_resolved_config_round_trips():
    from omegaconf import OmegaConf

    from rl.config import to_yaml

    c = compose(["experiment=tiny", "algo=dapo"])
    assert validate(OmegaConf.create(to_yaml(c))) == c


def test_chain_experiment_budgets_are_the_worlds_budgets():
    """experiment=chain scores ThinkPrune's reward against budgets that fit 1 / 3 / all hops of its chains:
    a copy of envs.chain_tasks.budgets, checked here so the two cannot drift apart."""
    from envs.chain_tasks import ChainEnv

    c = compose(["experiment=chain"])
    term = c.reward.terms["effort_length"]
    assert c.env.name == "chain" and term["shape"] == "thinkprune" and term["gate"] == "math"
    assert dict(term["budgets"]) == ChainEnv(steps=c.env.steps).budgets()
    assert c.reward.terms["math"]["weight"] == 0.0 and c.eval.metric == "math"


def test_walk_experiment_budgets_are_the_worlds_budgets():
    """experiment=walk: ThinkPrune's reward against budgets that fit whole walks of 3 / 5 / all doors (a copy
    of envs.walk_tasks.budgets, checked here so the two cannot drift apart)."""
    from envs.walk_tasks import WalkEnv

    c = compose(["experiment=walk"])
    term = c.reward.terms["effort_length"]
    assert c.env.name == "walk" and term["shape"] == "thinkprune" and term["gate"] == "math"
    env = WalkEnv(steps=c.env.steps, show_doors=c.env.walk_show_doors, stop=c.env.walk_stop)
    assert dict(term["budgets"]) == env.budgets()
    assert c.reward.terms["math"]["weight"] == 0.0 and c.eval.metric == "math"
    fill = c.reward.terms["fill"]  # L1-exact's targets: the budgeted traces themselves (budget less its margin)
    assert fill["shape"] == "l1_exact" and dict(fill["budgets"]) == {e: b - 1 for e, b in env.budgets().items()}


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_walk_reward_pays_for_spending_the_budget_and_never_for_a_wrong_answer(effort):
    """experiment=walk's whole reward on real traces of one 8-door walk: right within the budget beats right
    over it; among right traces within it, a door more never pays less and the budgeted trace pays most; a wrong answer
    scores below every right one within the budget, however long."""
    from envs.harmony import encode
    from envs.types import Sample, Transcript
    from envs.walk_tasks import BUDGET_STEPS, trace, walk
    from rl.data import make_reward

    c = compose(["experiment=walk"])
    reward = make_reward(c.reward)
    start, doors = 3, "LRRLRLLR"
    answer = str(walk(start, doors)[-1])
    fits = 8 if BUDGET_STEPS[effort] == "all" else BUDGET_STEPS[effort]

    def score(written, final):
        cot = trace(start, doors, written, show_doors=True)
        t = Transcript(analysis=cot, final=final, analysis_tokens=len(encode(cot)))
        return reward(Sample("t", "math", effort, [], [], [], [], t, {"answer": answer})).score

    right = [score(k, answer) for k in range(fits + 1)]
    assert right == sorted(right) and right[-1] > right[-2]  # more per door (L1's clip flattens the shortest)
    wrong = "0" if answer != "0" else "1"
    assert max(score(k, wrong) for k in range(9)) < min(right)
    if fits < 8:
        assert score(fits + 1, answer) < right[fits]  # one door over the budget


def test_routed_terms_score_their_own_envs_samples_in_the_safety_walk_preset():
    """`envs` routing end to end: the walk's ThinkPrune/L1 terms score walk samples (whose sample.env is "math")
    and never safety ones, and the safety samples get their own length budgets."""
    from envs.harmony import parse_completion, render_completion, render_prompt
    from envs.types import Sample
    from rl.data import make_env, make_reward

    c = compose(["experiment=safety_walk"])
    env, reward = make_env(c.env, 0), make_reward(c.reward)
    tasks = env.tasks("test", 40)
    walk = next(t for t in tasks if t.task_id.startswith("walk:"))
    safety = next(t for t in tasks if t.task_id.startswith("safety:"))
    parts = {}
    for t in (walk, safety):
        analysis, final = env.solution(t, "high")
        ids = render_completion(analysis, final)
        s = Sample(t.task_id, t.env, "high", render_prompt(t.question, "high"), ids, [1] * len(ids),
                   [0.0] * len(ids), parse_completion(ids), t.metadata)
        parts[t.task_id.split(":")[0]] = reward(s).parts
    assert walk.env == "math" and {"effort_length", "fill"} <= set(parts["walk"])
    assert "safety_length" not in parts["walk"]
    assert parts["walk"]["math"] == 1.0 and parts["walk"]["effort_length"] in (0.0, 1.0)
    assert {"safety", "safety_length"} <= set(parts["safety"]) and not {"effort_length", "fill"} & set(parts["safety"])


@pytest.mark.parametrize("overrides,term,want", [
    (["experiment=walk", "++reward.terms.fill.envs=[walk]"], "fill", ["math"]),  # single env: what samples carry
    (["experiment=safety_walk", "reward.terms.fill.envs=[math]"], "fill", ["math"]),  # no component named math
    (["experiment=code", "++reward.terms.format={weight: 0.1, envs: [code]}"], "format", ["code"]),
])
def test_term_envs_resolve_to_what_samples_carry(overrides, term, want):
    assert compose(overrides).reward.terms[term]["envs"] == want


@pytest.mark.parametrize("value,match", [
    ("[wlak]", "'wlak' is not an env of this run"),
    ("walk", "must be a non-empty list of env names"),
])
def test_term_envs_typo_fails_naming_the_key(value, match):
    with pytest.raises(ConfigError, match=f"reward.terms.fill.envs'.*{match}"):
        compose(["experiment=safety_walk", f"reward.terms.fill.envs={value}"])
