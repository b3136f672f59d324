"""The REST API against its own OpenAPI document (schemathesis), on a real control-plane
process with real etcd and OpenBao: no server error, and every status and body one the
document allows (the document is generated from the proto: control_plane/openapi.py).

A short run; ``scripts/fuzz-api --minutes 3`` is the long one (bench/fuzz_api.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fuzz_api import CHECKS, fuzz
from control_plane.auth import Role
from localfleet.installer import LocalServices

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


def test_rest_api_conforms_to_its_openapi_document(
    control_plane: tuple[str, str], tmp_path: Path
) -> None:
    url, token = control_plane
    result = fuzz(url, token, max_examples=3, seed=16, phases="examples,fuzzing", workdir=tmp_path)
    assert "response_schema_conformance" in CHECKS
    assert result.cases > 100, result.output
    assert (result.server_errors, result.mismatches) == (0, 0), "\n".join(result.failures)
