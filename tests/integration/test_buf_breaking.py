"""``scripts/buf-breaking`` (run by ``scripts/test``): proto/ against proto/ before the last
commit that changed it. Run in a scratch git repository holding a copy of the repo's protos,
so each case is a real commit history and a real ``buf breaking``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import REPO

pytestmark = pytest.mark.integration

_FIELD = "  string message = 4;\n"
"""A field of ``RevisionInfo`` in proto/specmesh/v1/common.proto."""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if not (REPO / "node_modules" / ".bin" / "buf").exists():
        pytest.fail("buf is not installed: ./scripts/bootstrap runs npm ci")
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "buf-breaking", root / "scripts" / "buf-breaking")
    shutil.copy(REPO / "buf.yaml", root / "buf.yaml")
    shutil.copytree(REPO / "proto", root / "proto")
    (root / "node_modules").symlink_to(REPO / "node_modules")
    (root / "package.json").write_text((REPO / "package.json").read_text())
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "test@specmesh.invalid")
    _git(root, "config", "user.name", "test")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "the contract")
    return root


def _change_proto(repo: Path, old: str, new: str, message: str) -> None:
    common = repo / "proto" / "specmesh" / "v1" / "common.proto"
    text = common.read_text()
    assert old in text
    common.write_text(text.replace(old, new, 1))
    _git(repo, "commit", "-q", "-am", message)


def _run(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(repo / "scripts" / "buf-breaking")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_removed_field_fails_naming_it(repo: Path) -> None:
    _change_proto(repo, _FIELD, "", "drop RevisionInfo.message")

    run = _run(repo)

    assert run.returncode != 0
    assert 'Previously present field "4" with name "message"' in run.stdout + run.stderr


def test_an_added_field_passes_against_the_commit_before(repo: Path) -> None:
    _change_proto(
        repo,
        _FIELD,
        _FIELD + "  // Why the revision was made, in one word.\n  string reason = 6;\n",
        "add RevisionInfo.reason",
    )

    run = _run(repo)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "proto/ against" in run.stdout


def test_a_declared_break_is_skipped_with_its_reason(repo: Path) -> None:
    _change_proto(repo, _FIELD, "", "drop RevisionInfo.message\n\nProto-Breaking: nobody reads it")

    run = _run(repo)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "declares Proto-Breaking: nobody reads it" in run.stdout
