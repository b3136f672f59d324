"""The REST API against its own OpenAPI document (schemathesis), on a real control-plane
process with real etcd and OpenBao: no server error, no response that breaks the schema."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from control_plane.auth import Role, StaticTokenAuthenticator
from specmesh.services import LocalServices, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def control_plane(services: LocalServices, tmp_path: Path) -> Iterator[tuple[str, str]]:
    token = "tok-admin-" + uuid.uuid4().hex
    tokens = tmp_path / "tokens.json"
    StaticTokenAuthenticator.write_file(
        tokens, {token: ("admin", [Role.ADMIN, Role.SECRETS_ADMIN])}
    )
    port = free_port()
    env = {
        **os.environ,
        "SPECMESH_ETCD_ENDPOINT": services.etcd.endpoint,
        "SPECMESH_ETCD_PREFIX": f"/st-{uuid.uuid4().hex[:8]}",
        "SPECMESH_VAULT_ADDR": services.bao.address,
        "SPECMESH_VAULT_TOKEN": services.bao.root_token,
        "SPECMESH_TOKENS_FILE": str(tokens),
        "SPECMESH_GRPC_LISTEN": f"127.0.0.1:{free_port()}",
        "SPECMESH_OTLP_LISTEN": f"127.0.0.1:{free_port()}",
        "SPECMESH_TRACES_DB": str(tmp_path / "traces.db"),
    }
    log = (tmp_path / "cp.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "specmesh.cli", "control-plane", "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"control plane did not start: {(tmp_path / 'cp.log').read_text()}")
    yield url, token
    proc.terminate()
    proc.wait(timeout=10)
    assert proc.returncode == 0, (tmp_path / "cp.log").read_text()


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
