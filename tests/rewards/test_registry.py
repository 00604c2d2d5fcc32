"""Reward registry: names, decorator, options, Hydra _target_, entry-point plugins."""
import importlib.metadata

import pytest

import rewards
from rewards import registry
from rewards.effort import EffortLengthReward
from rewards.format import format_reward
from rewards.types import RewardResult


@pytest.fixture
def clean_registry(monkeypatch):
    """A private copy of the registry so tests can register freely."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_entry_points_loaded", True)
    return registry


def test_builtins_are_registered():
    assert {"math", "effort_length", "format"} <= set(rewards.available_rewards())


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as err:
        rewards.get_reward("maths")
    msg = str(err.value)
    assert "unknown reward 'maths'" in msg
    for name in ("math", "effort_length", "format"):
        assert name in msg


def test_decorator_registers_function_and_class(clean_registry, make_sample):
    @rewards.register_reward("always_half")
    def always_half(sample):
        return RewardResult(0.5, {"half": 0.5})

    @rewards.register_reward("scaled")
    class Scaled:
        def __init__(self, k=1.0):
            self.k = k

        def __call__(self, sample):
            return RewardResult(self.k)

    sample = make_sample("408")
    assert rewards.get_reward("always_half")(sample).score == 0.5
    assert rewards.get_reward("scaled", k=3.0)(sample).score == 3.0
    assert rewards.build_reward({"name": "scaled", "k": 2.0})(sample).score == 2.0
    with pytest.raises(TypeError, match="takes no options"):
        rewards.get_reward("always_half", k=1)


def test_duplicate_name_is_an_error(clean_registry):
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("format")(lambda s: None)


def test_build_from_hydra_target(make_sample):
    from omegaconf import OmegaConf

    spec = OmegaConf.create({"_target_": "rewards.effort.EffortLengthReward", "budgets": {"high": 4}})
    reward = rewards.build_reward(spec)
    assert isinstance(reward, EffortLengthReward) and reward.budgets == {"high": 4}
    assert rewards.build_reward({"_target_": "rewards.format.format_reward", "_partial_": True})(
        make_sample("1")
    ).score == 1.0


@pytest.mark.parametrize("spec,expected", [
    ("format", format_reward),
    (format_reward, format_reward),
])
def test_build_by_name_or_callable(spec, expected):
    assert rewards.build_reward(spec) is expected


@pytest.mark.parametrize("spec,error", [
    ({"budgets": {}}, ValueError),
    (42, TypeError),
    ("nope", KeyError),
])
def test_build_rejects_bad_specs(spec, error):
    with pytest.raises(error):
        rewards.build_reward(spec)


def test_entry_point_plugins_load_lazily(clean_registry, monkeypatch):
    eps = [importlib.metadata.EntryPoint("third_party_format", "rewards.format:format_reward",
                                         registry.ENTRY_POINT_GROUP)]
    calls = []

    def fake_entry_points(group):
        calls.append(group)
        return eps

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert rewards.get_reward("format") is format_reward and calls == []  # no plugin scan needed
    assert rewards.get_reward("third_party_format") is format_reward
    assert calls == [registry.ENTRY_POINT_GROUP]
    rewards.get_reward("third_party_format")
    assert len(calls) == 1  # scanned once


def test_broken_plugin_names_itself(clean_registry, monkeypatch):
    eps = [importlib.metadata.EntryPoint("broken", "no_such_pkg.mod:fn", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry.importlib.metadata, "entry_points", lambda group: eps)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.raises(ImportError, match="reward plugin 'broken' = 'no_such_pkg.mod:fn'"):
        rewards.get_reward("anything")
