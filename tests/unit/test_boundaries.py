"""The architecture's rooms: engine, sidecar and control_plane never import each other
(they talk over proto/ and etcd), the shared core imports none of them, and the CLI
(specmeshctl) imports none of them either: it talks to the control plane over proto/.
The dev tooling of a source checkout (``localfleet``: the local fleet, the services
installer, the scripted model server) is imported by no process and not by the shared core
(only the CLI's fleet commands load it), and the image does not ship it.

litellm (seconds and ~150 MB to import) is the engine's: the control plane
and the shared core never import it, not even lazily; costs come from
:mod:`specmesh.prices`, which reads litellm's price file without importing it."""

from __future__ import annotations

import ast

import pytest

from ..conftest import REPO

PARTS = ("engine", "sidecar", "control_plane")
TOOLING = "localfleet"
FORBIDDEN = {
    "specmesh": {*PARTS, "specmeshctl", TOOLING, "litellm"},
    "engine": {"sidecar", "control_plane", "specmeshctl", TOOLING},
    "sidecar": {"engine", "control_plane", "specmeshctl", TOOLING},
    "control_plane": {"engine", "sidecar", "specmeshctl", TOOLING, "litellm"},
    # the CLI reaches the control plane only through the generated client of proto/, and
    # the dev tooling only by name, at run time (specmeshctl/fleet.py: _dev_tooling)
    "specmeshctl": {*PARTS, TOOLING, "litellm"},
    # the tooling starts the processes by their commands; it shares only the core
    TOOLING: {*PARTS, "specmeshctl", "litellm"},
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


def test_the_image_ships_the_processes_and_the_cli_but_no_dev_tooling() -> None:
    copied = {
        line.split()[1]
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    }
    assert {"specmesh", "engine", "sidecar", "control_plane", "specmeshctl"} <= copied
    assert TOOLING not in copied
