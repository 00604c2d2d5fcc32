"""envs.mixture: shares by weight, disjoint splits, namespaced ids, solutions from the right component."""
import pytest

from envs.hierarchy import HierarchyEnv
from envs.math_tasks import MathEnv
from envs.mixture import MixtureEnv, label_of, shares
from envs.safety_tasks import SafetyEnv


@pytest.mark.parametrize("weights,n,want", [
    ({"a": 1.0}, 7, {"a": 7}),
    ({"a": 1, "b": 1}, 5, {"a": 3, "b": 2}),            # tie: the order given wins the remainder
    ({"a": 0.7, "b": 0.15, "c": 0.15}, 20, {"a": 14, "b": 3, "c": 3}),
    ({"a": 0.7, "b": 0.15, "c": 0.15}, 10, {"a": 7, "b": 2, "c": 1}),
    ({"a": 98, "b": 1, "c": 1}, 5, {"a": 3, "b": 1, "c": 1}),  # every component keeps one
    ({"a": 98, "b": 1, "c": 1}, 2, {"a": 2, "b": 0, "c": 0}),  # too few to give each one
    ({"a": 2, "b": 1}, 0, {"a": 0, "b": 0}),
])
def test_shares_sum_to_n_by_weight(weights, n, want):
    got = shares(weights, n)
    assert got == want and sum(got.values()) == n


def _mix(seed=0):
    return MixtureEnv({"math": (MathEnv(seed=seed, difficulty=1), 0.6),
                       "safety": (SafetyEnv(seed=seed), 0.2),
                       "hierarchy": (HierarchyEnv(seed=seed), 0.2)}, seed=seed)


def test_tasks_are_namespaced_shared_by_weight_and_deterministic():
    mix = _mix()
    train = mix.tasks("train", 50)
    assert [t.task_id for t in train] == [t.task_id for t in _mix().tasks("train", 50)]
    labels = [label_of(t.task_id) for t in train]
    assert {lab: labels.count(lab) for lab in set(labels)} == {"math": 30, "safety": 10, "hierarchy": 10}
    assert {t.env for t in train} == {"math", "safety", "hierarchy"}  # rewards still route by env
    assert all(t.task_id.split(":", 1)[1].startswith(t.env) for t in train)
    assert labels[:10] != sorted(labels[:10], key=["math", "safety", "hierarchy"].index)  # interleaved
    assert len({t.task_id for t in train}) == 50


def test_splits_never_overlap_and_solutions_come_from_the_component():
    mix = _mix()
    train, test = mix.tasks("train", 60), mix.tasks("test", 30)
    assert not {t.task_id for t in train} & {t.task_id for t in test}
    assert not {t.question for t in train if t.env == "math"} & {t.question for t in test if t.env == "math"}
    for t in train[:12]:
        env = mix.components[label_of(t.task_id)][0]
        own = mix.unwrap(t)
        assert own.task_id == t.task_id.split(":", 1)[1]
        assert mix.solution(t, "high") == env.solution(own, "high")
    corpus = mix.vocabulary_corpus()
    assert set(MathEnv(seed=0).vocabulary_corpus()) <= set(corpus)


def test_same_env_twice_under_two_labels_keeps_ids_apart():
    mix = MixtureEnv({"easy": (MathEnv(seed=0, difficulty=1), 1), "hard": (MathEnv(seed=0, difficulty=3), 1)})
    ts = mix.tasks("test", 10)
    assert sorted(label_of(t.task_id) for t in ts) == ["easy"] * 5 + ["hard"] * 5
    assert {t.metadata["difficulty"] for t in ts if t.task_id.startswith("hard:")} == {3}


@pytest.mark.parametrize("components,match", [
    ({}, "at least one component"),
    ({"a:b": (MathEnv(seed=0), 1)}, "free of ':'"),
    ({"": (MathEnv(seed=0), 1)}, "non-empty"),
    ({"a": (MathEnv(seed=0), 0)}, "weight must be a number > 0"),
    ({"a": (MathEnv(seed=0), True)}, "weight must be a number > 0"),
    ({"a": (MathEnv(seed=0), "1")}, "weight must be a number > 0"),
])
def test_bad_mixtures_fail_naming_the_component(components, match):
    with pytest.raises(ValueError, match=match):
        MixtureEnv(components)


class _Exhausted:
    """An env with no tasks left (as MathEnv answers a request for more distinct tasks than exist)."""

    def tasks(self, split, n, seed=None):
        raise ValueError(f"only 0 distinct {split} problems found")


def test_component_errors_name_the_component_and_foreign_tasks_are_refused():
    mix = MixtureEnv({"math": (MathEnv(seed=0), 1), "tiny": (_Exhausted(), 1)})
    with pytest.raises(ValueError, match="mixture component 'tiny': only 0 distinct test"):
        mix.tasks("test", 4)
    t = MathEnv(seed=0).tasks("test", 1)[0]
    with pytest.raises(ValueError, match="not from this mixture"):
        mix.solution(t, "low")


@pytest.mark.parametrize("module", ["envs.mixture", "envs.draw"])
def test_docstring_examples(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0
