"""Layers import downwards only (docs/ARCHITECTURE.md#layers): rl -> rewards -> envs; kernels below rl.
Read from the source (every import statement, top level or inside a function), nothing is imported."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {  # package -> our packages it may import
    "envs": set(),
    "kernels": set(),
    "rewards": {"envs"},
    "rl": {"rewards", "envs", "kernels"},
}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_layers_below(package):
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) - ALLOWED[package] - {package})
           for f in sorted((ROOT / package).rglob("*.py"))}
    assert not {f: b for f, b in bad.items() if b}, f"{package} imports upwards"
