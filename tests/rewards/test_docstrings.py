"""The doctest-sized examples in reward and math-task docstrings stay true."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", [
    "rewards.registry", "rewards.math_verify_reward", "rewards.effort", "rewards.format",
    "rewards.compose", "rewards.math_parse", "envs.math_tasks",
])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
