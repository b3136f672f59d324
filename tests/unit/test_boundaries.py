"""The architecture's rooms: engine, sidecar and control_plane never import each other
(they talk over proto/ and etcd), the shared core imports none of them, and the CLI
(specmeshctl) imports none of them either: it talks to the control plane over proto/.

litellm (seconds and ~150 MB to import) is the engine's: the control plane
and the shared core never import it, not even lazily; costs come from
:mod:`specmesh.prices`, which reads litellm's price file without importing it."""

from __future__ import annotations

import ast

import pytest

from ..conftest import REPO

PARTS = ("engine", "sidecar", "control_plane")
FORBIDDEN = {
    "specmesh": {*PARTS, "specmeshctl", "litellm"},
    "engine": {"sidecar", "control_plane", "specmeshctl"},
    "sidecar": {"engine", "control_plane", "specmeshctl"},
    "control_plane": {"engine", "sidecar", "specmeshctl", "litellm"},
    # the CLI reaches the control plane only through the generated client of proto/
    "specmeshctl": {*PARTS, "litellm"},
}


def _imports(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(), filename=path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_package_imports_only_what_its_room_allows(package: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(
            _imports(str(path.relative_to(REPO))) & FORBIDDEN[package]
        )
        for path in (REPO / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
