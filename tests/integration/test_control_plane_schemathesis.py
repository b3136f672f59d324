"""The REST API against its own OpenAPI document (schemathesis), on a real control-plane
process with real etcd and OpenBao: no server error, no response that breaks the schema."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.auth import Role
from specmesh.services import LocalServices

from .cp_process import ControlPlaneProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def control_plane(services: LocalServices, tmp_path: Path) -> Iterator[tuple[str, str]]:
    token = "tok-admin-" + uuid.uuid4().hex
    process = ControlPlaneProcess(
        services, tmp_path, tokens={token: ("admin", [Role.ADMIN, Role.SECRETS_ADMIN])}
    )
    url = process.start()
    yield url, token
    assert process.stop() == 0, process.log.read_text()


def test_rest_api_conforms_to_its_openapi_document(control_plane: tuple[str, str]) -> None:
    url, token = control_plane
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"), "run", f"{url}/api/v1/openapi.json",
            "--header", f"Authorization: Bearer {token}",
            "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
            "--max-examples", "15", "--generation-deterministic",
            "--request-timeout", "20", "--phases", "examples,fuzzing",
        ],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
