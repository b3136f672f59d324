"""A plain clone works: no tracked file reads or names the project's parent folder.

Everything the project needs (the Istio CRD schemas among them, vendored under
``control_plane/istio/``) lives in the repository; a path that climbs out of it to a sibling
``shared`` folder works only on the machine it was written on.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ..conftest import REPO

# Built by concatenation so that this file does not match itself.
_SHARED = '"' + "shared" + '"'
NEEDLES = (
    "../" + "shared",
    "..\\" + "shared",
    _SHARED + " / " + '"istio"',
    "parent / " + _SHARED,
    '".." / ' + _SHARED,
)


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git clone: the tracked files are unknown")
    result = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
    )
    return [p for p in result.stdout.decode().split("\0") if p]


def test_no_tracked_file_reaches_outside_the_repository() -> None:
    offenders = []
    for name in _tracked():
        path = REPO / name
        if not path.is_file():  # deleted in the working tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            offenders += [f"{name}:{number}: {line.strip()}" for n in NEEDLES if n in line]
    assert offenders == []
