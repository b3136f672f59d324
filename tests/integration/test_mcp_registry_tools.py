"""The MCP Registry's tools as the control plane lists them: a real control-plane process on
the session's etcd and OpenBao, real MCP servers (``keyed`` of
:mod:`tests.integration.mcp_fixture_servers`, which answers 401 without its
``X-Api-Key``), and the CLI driven in-process against it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from control_plane.auth import Role
from localfleet.installer import LocalServices
from specmesh.ports import free_port
from specmeshctl.main import main

from ..conftest import REPO
from .cp_process import ControlPlaneProcess

pytestmark = pytest.mark.integration

WAIT = 30.0
KEY = f"fixture-key-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Cp:
    url: str
    admin: str
    secrets_admin: str
    process: ControlPlaneProcess

    def get(self, path: str) -> requests.Response:
        return requests.get(
            f"{self.url}{path}", headers={"Authorization": f"Bearer {self.admin}"}, timeout=30
        )

    def apply(self, manifest: dict[str, Any]) -> None:
        r = requests.post(
            f"{self.url}/api/v1/apply",
            json={"manifest": manifest},
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text

    def listing(self, name: str, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """``GET /api/v1/mcp-tools``'s entry for ``name`` once ``until`` accepts it."""
        deadline = time.monotonic() + WAIT
        last: Any = None
        while time.monotonic() < deadline:
            r = self.get("/api/v1/mcp-tools")
            assert r.status_code == 200, r.text
            found = [e for e in r.json()["listings"] if e["mcpServerName"] == name]
            # proto3 JSON: "" for no error / no agent's credentials, no refreshedAt when unset
            last = {
                **found[0],
                "error": found[0]["error"] or None,
                "credentialsFrom": found[0]["credentialsFrom"] or None,
                "refreshedAt": found[0].get("refreshedAt"),
            } if found else None  # fmt: skip
            if last is not None and until(last):
                return last
            time.sleep(0.05)  # polling a condition with a deadline
        raise AssertionError(f"listing of {name} never matched; last: {last}")


@contextlib.contextmanager
def _started(services: LocalServices, folder: Path, refresh_seconds: float) -> Iterator[Cp]:
    admin, secrets_admin = f"tok-a-{uuid.uuid4().hex}", f"tok-s-{uuid.uuid4().hex}"
    process = ControlPlaneProcess(
        services,
        folder,
        tokens={
            admin: ("ci-admin", [Role.ADMIN]),
            secrets_admin: ("ci-secrets", [Role.SECRETS_ADMIN]),
        },
    )
    process.env["SPECMESH_MCP_TOOLS_REFRESH_SECONDS"] = str(refresh_seconds)
    process.env["SPECMESH_MCP_TOOLS_TIMEOUT_SECONDS"] = "5"
    url = process.start()
    cp = Cp(url, admin, secrets_admin, process)
    cp.apply(
        {"apiVersion": "specmesh.io/v1", "kind": "Prompt", "metadata": {"name": "p"},
         "spec": {"version": "1.0.0", "template": "You help."}}
    )  # fmt: skip
    try:
        yield cp
    finally:
        assert process.stop() == 0, process.log.read_text()


@pytest.fixture(scope="module")
def cp(services: LocalServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cp]:
    """A control plane whose schedule never fires during the tests: what changes, the watch
    made it change."""
    with _started(services, tmp_path_factory.mktemp("mcp-tools"), refresh_seconds=3600) as cp:
        yield cp


class _Keyed:
    """A ``keyed`` MCP server process."""

    def __init__(self, tools: str, port: int = 0) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.mcp_fixture_servers", "keyed",
             "--tools", tools, "--port", str(port)],
            cwd=REPO, env={**os.environ, "MCP_FIXTURE_KEY": KEY},
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def url(self) -> str:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:  # ends when the process exits
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("message") == "mcp server serving":
                return str(record["url"])
        raise AssertionError(f"the keyed server exited with {self.popen.wait()}")

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait()


@pytest.fixture
def keyed() -> Iterator[Callable[..., _Keyed]]:
    started: list[_Keyed] = []

    def start(tools: str, port: int = 0) -> _Keyed:
        started.append(_Keyed(tools, port))
        return started[-1]

    yield start
    for server in started:
        server.close()


def _server(name: str, url: str) -> dict[str, Any]:
    return {
        "apiVersion": "specmesh.io/v1",
        "kind": "McpServer",
        "metadata": {"name": name},
        "spec": {"url": url, "credentialTemplate": {"headers": ["X-Api-Key"]}},
    }


def _agent(name: str, server: str) -> dict[str, Any]:
    return {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "base": {"description": "uses a keyed MCP server", "promptKey": "p"},
            "model": {"model": "m"},
            "mcpServers": [{"mcpServerName": server, "headers": {"X-Api-Key": KEY}}],
        },
    }


def _names(listing: dict[str, Any]) -> list[str]:
    return [t["name"] for t in listing["tools"]]


def test_a_keyed_server_is_listed_with_an_agents_vault_credential_and_refused_without(
    cp: Cp, keyed: Callable[..., _Keyed]
) -> None:
    name, agent = f"keyed-{uuid.uuid4().hex[:6]}", f"keyuser-{uuid.uuid4().hex[:6]}"
    url = keyed("alpha,beta").url()

    cp.apply(_server(name, url))
    refused = cp.listing(name, lambda entry: entry["error"] is not None)
    refused_now = cp.get(f"/api/v1/mcp-servers/{name}/tools")
    cp.apply(_agent(agent, name))
    listed = cp.listing(name, lambda entry: entry["error"] is None)
    listed_now = cp.get(f"/api/v1/mcp-servers/{name}/tools")
    stored = cp.get(f"/api/v1/agents/{agent}")

    assert refused["tools"] == []
    assert refused["credentialsFrom"] is None
    assert "HTTP 401" in refused["error"]
    assert refused_now.status_code == 400 and "HTTP 401" in refused_now.text
    assert _names(listed) == ["alpha", "beta"]
    assert listed["credentialsFrom"] == agent
    assert listed["refreshedAt"] is not None
    assert listed_now.status_code == 200
    assert [t["name"] for t in listed_now.json()["tools"]] == ["alpha", "beta"]
    # the agent's spec holds a Vault reference, which the control plane read
    header = stored.json()["agent"]["spec"]["mcpServers"][0]["headers"]["X-Api-Key"]
    assert header.startswith("vault://")
    for text in (refused_now.text, listed_now.text, json.dumps(listed), json.dumps(refused)):
        assert KEY not in text
    assert KEY not in cp.process.log.read_text()


def test_a_reference_the_control_plane_cannot_read_is_the_error_it_shows(
    cp: Cp, keyed: Callable[..., _Keyed]
) -> None:
    name, agent = f"keyed-{uuid.uuid4().hex[:6]}", f"dangling-{uuid.uuid4().hex[:6]}"
    url = keyed("alpha").url()
    path = f"secret/specmesh/nowhere-{uuid.uuid4().hex[:6]}"
    missing = f"vault://{path}#key"
    manifest = _agent(agent, name)
    manifest["spec"]["mcpServers"][0]["headers"]["X-Api-Key"] = missing
    shared = requests.put(
        f"{cp.url}/api/v1/agents/{agent}/grants",
        json={"secret": f"vault://{path}"},
        headers={"Authorization": f"Bearer {cp.secrets_admin}"},
        timeout=30,
    )  # an agent may name a secret outside its tree once it is shared with it
    assert shared.status_code == 200, shared.text

    cp.apply(_server(name, url))
    cp.apply(manifest)
    shown = cp.listing(name, lambda entry: entry["credentialsFrom"] == agent)

    assert shown["tools"] == []
    assert missing in shown["error"] and "unavailable" in shown["error"]


def test_the_tools_are_listed_again_when_the_registry_entry_changes(
    cp: Cp, keyed: Callable[..., _Keyed]
) -> None:
    name, agent = f"keyed-{uuid.uuid4().hex[:6]}", f"keyuser-{uuid.uuid4().hex[:6]}"
    first, second = keyed("alpha").url(), keyed("gamma,delta").url()
    cp.apply(_server(name, first))
    cp.apply(_agent(agent, name))
    before = cp.listing(name, lambda entry: entry["error"] is None)

    cp.apply(_server(name, second))
    after = cp.listing(name, lambda entry: _names(entry) != ["alpha"])

    assert _names(before) == ["alpha"]
    assert _names(after) == ["gamma", "delta"]
    assert after["error"] is None


def test_the_tools_are_listed_again_on_the_schedule(
    services: LocalServices, tmp_path: Path, keyed: Callable[..., _Keyed]
) -> None:
    port = free_port()
    name, agent = f"late-{uuid.uuid4().hex[:6]}", f"keyuser-{uuid.uuid4().hex[:6]}"
    with _started(services, tmp_path, refresh_seconds=0.5) as fast:
        fast.apply(_server(name, f"http://127.0.0.1:{port}/mcp"))
        fast.apply(_agent(agent, name))
        down = fast.listing(name, lambda entry: entry["error"] is not None)
        keyed("alpha", port).url()  # the server comes up; nothing in etcd changes
        up = fast.listing(name, lambda entry: entry["error"] is None)

    assert down["tools"] == [] and "could not be reached" in down["error"]
    assert _names(up) == ["alpha"]


def test_get_mcpservers_shows_each_servers_tools(
    cp: Cp,
    keyed: Callable[..., _Keyed],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    name, agent = f"keyed-{uuid.uuid4().hex[:6]}", f"keyuser-{uuid.uuid4().hex[:6]}"
    broken = f"broken-{uuid.uuid4().hex[:6]}"
    cp.apply(_server(name, keyed("alpha,beta").url()))
    cp.apply(_agent(agent, name))
    cp.apply(_server(broken, f"http://127.0.0.1:{free_port()}/mcp"))
    cp.listing(name, lambda entry: entry["error"] is None)
    cp.listing(broken, lambda entry: entry["error"] is not None)
    for variable in list(os.environ):
        if variable.startswith(("SPECMESH_", "VAULT_")):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("SPECMESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPECMESH_SERVER", cp.process.grpc)
    monkeypatch.setenv("SPECMESH_TOKEN", cp.admin)

    assert main(["get", "mcpservers"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert main(["get", "mcpservers", "-o", "yaml"]) == 0
    listed = yaml.safe_load(capsys.readouterr().out)
    assert main(["get", "mcpserver", name, "-o", "json"]) == 0
    one = json.loads(capsys.readouterr().out)

    header = table[0].split()
    assert header[-3:] == ["TOOLS", "LAST", "ERROR"]
    (row,) = [line.split() for line in table if line.startswith(name + " ")]
    assert row[3:] == ["2", "-"]
    (bad,) = [line for line in table if line.startswith(broken + " ")]
    assert "0 (stale)" in bad and "could not be reached" in bad
    assert listed[name]["status"]["tools"] == ["alpha", "beta"]
    assert listed[name]["status"]["credentialsFrom"] == agent
    assert listed[name]["url"].endswith("/mcp")  # the entry itself, as before
    assert one["status"]["tools"] == ["alpha", "beta"]
    assert one["spec"]["credentialTemplate"] == {"headers": ["X-Api-Key"], "queryParams": []}
