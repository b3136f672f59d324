"""The vendored Istio CRD schemas (``control_plane/istio/``) and their refresh script.

The script's download path needs GitHub; ``--from FILE`` (an offline copy) is the path run
here, against a temporary copy of the vendored folder so the real one is never touched.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from control_plane.istio import CRDS_PATH
from control_plane.mesh import IstioValidator
from control_plane.settings import ControlPlaneSettings

from ..conftest import REPO

SCRIPT = REPO / "scripts" / "refresh_istio_crds.py"
README = CRDS_PATH.parent / "README.md"


def _refresh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _row(readme: str, name: str) -> str:
    found = re.search(rf"^\| {name} \| (.+) \|$", readme, re.M)
    assert found, f"README has no {name!r} row"
    return found.group(1)


@pytest.fixture
def vendored_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "istio"
    dest.mkdir()
    shutil.copy(README, dest / "README.md")
    shutil.copy(CRDS_PATH, dest / CRDS_PATH.name)
    return dest


def test_readme_states_the_vendored_files_checksum() -> None:
    readme = README.read_text()
    assert _row(readme, "sha256") == f"`{hashlib.sha256(CRDS_PATH.read_bytes()).hexdigest()}`"
    version = _row(readme, "Istio version")
    assert f"tag `{version}`" in _row(readme, "source")


def test_control_plane_validates_with_the_vendored_file_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SPECMESH_ISTIO_CRDS", raising=False)
    assert ControlPlaneSettings().istio_crds == CRDS_PATH
    kinds = IstioValidator().kinds()
    assert ("networking.istio.io/v1", "VirtualService") in kinds
    assert ("security.istio.io/v1", "AuthorizationPolicy") in kinds


def test_refresh_from_a_file_rewrites_the_copy_and_its_readme(
    vendored_copy: Path, tmp_path: Path
) -> None:
    newer = tmp_path / "customresourcedefinitions.gen.yaml"
    newer.write_bytes(CRDS_PATH.read_bytes() + b"# a later release\n")
    vendored_before = CRDS_PATH.read_bytes(), README.read_text()

    result = _refresh("1.31.0", "--from", str(newer), "--dest", str(vendored_copy))

    assert result.returncode == 0, result.stderr
    assert (vendored_copy / CRDS_PATH.name).read_bytes() == newer.read_bytes()
    readme = (vendored_copy / "README.md").read_text()
    assert _row(readme, "Istio version") == "1.31.0"
    assert "tag `1.31.0`" in _row(readme, "source")
    assert _row(readme, "sha256") == f"`{hashlib.sha256(newer.read_bytes()).hexdigest()}`"
    assert (CRDS_PATH.read_bytes(), README.read_text()) == vendored_before


def test_refresh_refuses_a_file_that_is_not_istios_crds(
    vendored_copy: Path, tmp_path: Path
) -> None:
    page = tmp_path / "page.yaml"
    page.write_text("kind: ConfigMap\nmetadata: {name: x}\n")
    before = (
        (vendored_copy / "README.md").read_text(),
        (vendored_copy / CRDS_PATH.name).read_bytes(),
    )

    result = _refresh("1.31.0", "--from", str(page), "--dest", str(vendored_copy))

    assert result.returncode == 1
    assert "not a CustomResourceDefinition" in result.stderr
    assert (
        (vendored_copy / "README.md").read_text(),
        (vendored_copy / CRDS_PATH.name).read_bytes(),
    ) == before


def test_refresh_refuses_a_malformed_version(vendored_copy: Path) -> None:
    result = _refresh("latest", "--from", str(CRDS_PATH), "--dest", str(vendored_copy))

    assert result.returncode == 1
    assert "version: must look like 1.30.3 (got 'latest')" in result.stderr
