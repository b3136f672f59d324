"""The supervisor starts sidecars and engines with ``python -m sidecar`` / ``python -m
engine``: the same ``main`` as ``specmesh sidecar`` / ``specmesh engine``, without importing
the CLI (httpx, rich, the spec diff...: megabytes of RSS per process that never use them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from specmesh.supervisor import SupervisorConfig


@pytest.mark.parametrize("role", ["sidecar", "engine"])
def test_the_supervisors_command_runs_the_role_main_without_the_cli(role: str) -> None:
    args: tuple[str, ...] = getattr(SupervisorConfig, f"{role}_args")

    out = subprocess.run(
        [sys.executable, "-X", "importtime", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: specmesh {role}")
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert f"{role}.main" in imported
    assert not any(m.startswith("specmeshctl") for m in imported)
