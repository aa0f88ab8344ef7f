"""The layering of docs/architecture.md: cluster -> trainer -> routing, trainer -> datasets.

routing/ imports torch only (deepspeed lazily inside functions); datasets/ nothing of ours;
trainer/ no ray and no cluster; only cluster/ imports ray and prometheus_client.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "routing": {"ray", "prometheus_client", "condmoe.trainer", "condmoe.cluster", "condmoe.datasets",
                "webdataset", "pyarrow"},
    "datasets": {"ray", "prometheus_client", "deepspeed", "condmoe.trainer", "condmoe.cluster", "condmoe.routing"},
    "trainer": {"ray", "prometheus_client", "condmoe.cluster"},
}


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (lazy imports inside functions are allowed)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_layering(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _all_imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
        if package == "routing":
            bad += [f"{path.relative_to(ROOT)} imports deepspeed at module level"
                    for n in _top_level_imports(path) if n == "deepspeed" or n.startswith("deepspeed.")]
    assert not bad, "\n".join(bad)
