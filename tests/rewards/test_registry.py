"""Reward registry: names, decorator, options, Hydra _target_, entry-point plugins."""
import os
import subprocess
import sys

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


PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.0.1"

[project.entry-points."deliberate.rewards"]
{name} = "{module}:{attr}"

[tool.setuptools]
py-modules = ["{module}"]
"""

SHOUT_MODULE = """
from rewards.types import RewardResult


def shout(sample):
    final = sample.transcript.final or ""
    return RewardResult(float(final.isupper()), {"upper": float(final.isupper())})
"""


@pytest.fixture
def install_plugin(tmp_path, monkeypatch, clean_registry):
    """pip-install a throw-away plugin package into tmp_path/site (offline) and put it on sys.path;
    the registry re-scans entry points on the next lookup. Everything is restored afterwards."""
    modules = []

    def install(dist, name, module, attr, source):
        src = tmp_path / dist
        src.mkdir()
        pyproject = PLUGIN_PYPROJECT.format(dist=dist, name=name, module=module, attr=attr)
        (src / "pyproject.toml").write_text(pyproject)
        (src / f"{module}.py").write_text(source)
        site = tmp_path / f"{dist}-site"
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
        subprocess.run([*pip, "--target", str(site), str(src)], check=True, capture_output=True,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setattr(registry, "_entry_points_loaded", False)
        modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def test_installed_plugin_package_is_found(install_plugin, make_sample, monkeypatch):
    install_plugin("deliberate-shout", "shout", "deliberate_shout", "shout", SHOUT_MODULE)
    scans = []
    real = registry.importlib.metadata.entry_points

    def spy(group):
        scans.append(group)
        return real(group=group)

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", spy)
    assert rewards.get_reward("format") is format_reward and scans == []  # registered names need no scan
    shout = rewards.get_reward("shout")
    assert shout.__module__ == "deliberate_shout"
    assert shout(make_sample("YES")).score == 1.0 and shout(make_sample("no")).score == 0.0
    assert "shout" in rewards.available_rewards()
    assert scans == [registry.ENTRY_POINT_GROUP]  # scanned once
    assert rewards.CompositeReward.from_config({"shout": {"weight": 2.0}})(make_sample("OK")).score == 2.0


def test_plugins_are_not_visible_after_the_test():
    assert "shout" not in rewards.available_rewards()


def test_broken_plugin_package_names_itself(install_plugin):
    install_plugin("deliberate-broken", "broken", "deliberate_broken", "score",
                   "import no_such_dependency_xyz\n")
    with pytest.raises(ImportError, match=r"reward plugin 'broken' = 'deliberate_broken:score'.*"
                                          r"declared by 'deliberate-broken'.*no_such_dependency_xyz"):
        rewards.get_reward("anything")
