"""Every `python -m rl.<entry> ...` command line in the README composes and validates as written:
Hydra's override grammar accepts it and the schema takes every key (nothing is run)."""
import re
import shlex
from pathlib import Path

import pytest

from rl.config import compose

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("#")[0].strip() for line in lines if re.search(r"-m rl\.(pipeline|train|evaluate)\b", line)]


def overrides(command: str) -> list[str]:
    words = shlex.split(command)
    args = words[words.index("-m") + 2:]
    return [a for a in args if a not in ("-m", "--multirun")]


def test_the_readme_has_commands_to_check():
    assert len(readme_commands()) >= 8


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_composes(command):
    args = overrides(command)
    sweep = [a for a in args if re.match(r"^[\w.]+=[^\[{]*,", a)]  # multirun sweeps: take each value
    fixed = [a for a in args if a not in sweep]
    for a in sweep or [None]:
        choice = [] if a is None else [a.split("=")[0] + "=" + a.split("=", 1)[1].split(",")[0]]
        compose(fixed + choice)
