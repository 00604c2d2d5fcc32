"""README "Adding a reward plugin": the example module and the config lines run as written."""
import re
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from envs.types import Sample, Transcript
from rewards import CompositeReward, registry

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Adding a reward plugin\n")
    return text[start: text.index("\n## ", start + 1)]


def _terms_from_readme() -> list[dict]:
    """`reward.terms` as each `+reward.terms.<name>=...` override in the section sets it."""
    overrides = re.findall(r"'(\+reward\.terms\.[^']+)'", _section())
    assert len(overrides) == 2, overrides
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [{o.key_or_group.removeprefix("reward.terms."): o.value()} for o in parsed]


@pytest.fixture
def readme_module(tmp_path, monkeypatch):
    """The section's python block written as my_pkg/rewards.py and imported, in a private registry."""
    (block,) = re.findall(r"```python\n(.*?)```", _section(), re.S)
    assert block.startswith("# my_pkg/rewards.py\n")
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "rewards.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    import my_pkg.rewards

    yield my_pkg.rewards
    for name in ("my_pkg.rewards", "my_pkg"):
        sys.modules.pop(name, None)


def _sample(final):
    return Sample("t", "math", "low", [], [], [], [], Transcript(final=final), {"answer": "4"})


@pytest.mark.parametrize("final,expected", [("4", 1.0), ("The answer, after all that work, is 4.", 0.0),
                                            (None, None)])
def test_readme_plugin_builds_from_its_config_lines(readme_module, final, expected):
    for terms in _terms_from_readme():
        comp = CompositeReward.from_config(terms)
        assert comp.weights == {"brevity": 0.1}
        r = comp.score_batch([_sample(final)])[0]
        if expected is None:
            assert (r.score, r.info["applicable"]) == (0.0, [])
        else:
            assert (r.score, r.parts["brevity"]) == (pytest.approx(0.1 * expected), expected)
    built = [CompositeReward.from_config(t).rewards["brevity"] for t in _terms_from_readme()]
    assert built[0] is readme_module.brevity and isinstance(built[1], readme_module.Brevity)


def test_readme_mentions_the_failure_policy():
    assert "reward.on_error" in _section() and "reward.timeout_s" in _section()
