"""The ``specmesh`` command through the control plane's gRPC API: a real control-plane
process on real etcd and OpenBao, the CLI driven in-process with SPECMESH_SERVER (the gRPC
address) and SPECMESH_TOKEN. The error table of :mod:`specmeshctl.client` is checked in
tests/unit/test_cli_client.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from control_plane.auth import Role
from localfleet.installer import LocalServices
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.names import resource_name
from specmesh.ports import free_port
from specmesh.protojson import to_struct
from specmesh.store import SpecStore
from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import ControlPlaneClient
from specmeshctl.main import main
from specmeshctl.settings import Settings

from ..conftest import REPO
from ..polling import eventually_sync
from .cp_process import ControlPlaneProcess
from .release_support import observe_tracks

pytestmark = pytest.mark.integration

EXAMPLES = REPO / "examples"
PLAINTEXT_IN_EXAMPLES = [
    "sk-51668897d94****",
    "51668897d94*******",
    "51668897d9410********",
    "8897d941******c7465cff2",
    "sk-gateway-example-0001",
    "sk-schedulex-example-0002",
]


@dataclass(frozen=True)
class ControlPlane:
    url: str
    grpc: str
    prefix: str
    admin: str
    operator: str
    viewer: str
    secrets_admin: str = ""


@pytest.fixture(scope="module")
def control_plane(
    services: LocalServices, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    tmp = tmp_path_factory.mktemp("cli-api")
    admin, operator, viewer, secrets_admin = (
        f"tok-{r}-{uuid.uuid4().hex}" for r in ("a", "o", "v", "s")
    )
    process = ControlPlaneProcess(
        services,
        tmp,
        tokens={
            admin: ("ci-admin", [Role.ADMIN]),  # the examples register MCP servers (admin only)
            operator: ("ci-operator", [Role.OPERATOR]),
            viewer: ("ci-viewer", [Role.VIEWER]),
            secrets_admin: ("ci-secrets", [Role.SECRETS_ADMIN]),
        },
        prefix=f"/cli-api-{uuid.uuid4().hex[:8]}",
    )
    url, prefix = process.start(), process.prefix
    prompt = {"apiVersion": "specmesh.io/v1", "kind": "Prompt", "metadata": {"name": "p"},
              "spec": {"version": "1.0.0", "template": "You help."}}  # fmt: skip
    _call(
        process.grpc,
        admin,
        "manifests",
        "ApplyManifest",
        pb.ApplyManifestRequest(manifest=to_struct(prompt)),
    )  # the prompt the agents name
    _call(
        process.grpc,
        secrets_admin,
        "grants",
        "ShareSecret",
        pb.ShareSecretRequest(
            agent_name="mse-nacos-helper", secret="vault://secret/specmesh/shared/fleet-redis"
        ),
    )  # what the examples reference outside their trees
    yield ControlPlane(url, process.grpc, prefix, admin, operator, viewer, secrets_admin)
    assert process.stop() == 0, process.log.read_text()


@pytest.fixture
def cp(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> ControlPlane:
    """The CLI's environment: the control plane as operator; no fleet."""
    for name in list(os.environ):
        if name.startswith(("SPECMESH_", "VAULT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SPECMESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPECMESH_SERVER", control_plane.grpc)
    monkeypatch.setenv("SPECMESH_TOKEN", control_plane.operator)
    return control_plane


def _call(server: str, token: str, service: str, method: str, request: Any) -> Any:
    """One call to the control plane with the CLI's generated client (fixtures' setup)."""

    async def call() -> Any:
        async with aclosing(ControlPlaneClient(server=server, token=token)) as cp:
            return await cp.call(getattr(getattr(cp, service), method), request)

    return asyncio.run(call())


def _agent_folder(tmp_path: Path, name: str, temperature: str) -> Path:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "agent-base.json").write_text('{"description": "d", "promptKey": "p"}')
    (folder / "model.json").write_text(f'{{"model": "m", "temperature": {temperature}}}')
    return folder


def _two_revisions(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    for t in ("0.1", "0.2"):
        folder = _agent_folder(tmp_path, name, t)
        assert main(["apply", "-f", str(folder)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return folder


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _dump(services: LocalServices, prefix: str) -> str:
    async def read() -> str:
        client = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
        try:
            result = await client.range(prefix + "/", prefix=True)
        finally:
            await client.close()
        return "\n".join(f"{kv.key}={kv.value.decode()}" for kv in result.kvs)

    return asyncio.run(read())


def _observe(services: LocalServices, prefix: str, agent: str, *, canary: int) -> None:
    """Write the agent's status as a controller would (this control plane runs none)."""

    async def write() -> None:
        client = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
        try:
            await observe_tracks(SpecStore(etcd=client, keys=Keys(prefix)), agent, canary=canary)
        finally:
            await client.close()

    asyncio.run(write())


# ---------------------------------------------------------------- through the API


def test_apply_examples_through_the_api_moves_secrets_to_vault(
    cp: ControlPlane,
    services: LocalServices,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPECMESH_TOKEN", cp.admin)

    code, out, err = _run(capsys, "apply", "-f", str(EXAMPLES))

    assert code == 0, err
    assert "agent/mse-nacos-helper configured (revision 1)" in out
    assert "secret moved to Vault: model.apiKey" in out
    dump = _dump(services, cp.prefix)
    assert "/agents/mse-nacos-helper/revisions/0000000001" in dump
    assert [s for s in PLAINTEXT_IN_EXAMPLES if s in dump] == []
    assert "vault://secret/specmesh/agents/mse-nacos-helper/model/apiKey#value" in dump
    code, out, _ = _run(capsys, "get", "agents", "-o", "json")
    assert code == 0
    names = {a["name"] for a in json.loads(out)}
    assert {"mse-nacos-helper", "mse-gateway-assistant", "schedulex-assistant"} <= names
    code, out, _ = _run(capsys, "audit", "--name", "mse-nacos-helper", "-o", "json")
    actors = {e["kind"]: e["actor"] for e in json.loads(out)}
    assert actors == {"Agent": "ci-admin", "Grant": "ci-secrets"}  # the tokens, not $USER


def test_get_describe_history_diff_rollback(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _two_revisions(tmp_path, "cli-lifecycle", capsys)

    code, out, _ = _run(capsys, "get", "agents", "-o", "json")
    assert code == 0
    assert ("cli-lifecycle", 2) in [(a["name"], a["revision"]) for a in json.loads(out)]
    code, out, _ = _run(capsys, "get", "agents")
    assert out.splitlines()[0].split() == ["NAME", "READY", "STATUS", "REVISION", "UPDATED", "BY"]
    # this control plane runs no controller: nothing reports on the agent's workload
    assert any(line.split()[:4] == ["cli-lifecycle", "-", "-", "2"] for line in out.splitlines())
    code, out, _ = _run(capsys, "describe", "agent", "cli-lifecycle")
    assert code == 0
    assert "Revision:     2 (by ci-operator" in out
    assert "Release:      none" in out
    assert "temperature: 0.2" in out
    code, out, _ = _run(capsys, "describe", "agent", "cli-lifecycle", "-o", "yaml")
    described = yaml.safe_load(out)
    assert described["agent"]["revision"] == 2
    assert [r["revision"] for r in described["history"]] == [1, 2]
    assert described["release"] is None and described["instances"] == []
    code, out, _ = _run(capsys, "history", "cli-lifecycle")
    assert code == 0 and "ci-operator" in out
    code, out, _ = _run(capsys, "diff", "cli-lifecycle", "1", "2")
    assert (code, out) == (0, "~ model.temperature: 0.1 -> 0.2\n")
    code, out, _ = _run(capsys, "rollback", "cli-lifecycle", "1")
    assert code == 0 and "as revision 3" in out
    code, out, _ = _run(capsys, "get", "agent", "cli-lifecycle", "-o", "json")
    assert json.loads(out)["spec"]["model"]["temperature"] == 0.1
    code, out, _ = _run(capsys, "audit", "--name", "cli-lifecycle", "-o", "json")
    assert [e["action"] for e in json.loads(out)] == ["rollback", "apply", "apply"]
    code, out, _ = _run(capsys, "get", "instances", "cli-lifecycle", "-o", "json")
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = _run(capsys, "delete", "agent", "cli-lifecycle", "--expected-revision", "3")
    assert (code, out) == (0, "agent/cli-lifecycle deleted\n")
    assert _run(capsys, "get", "agent", "cli-lifecycle")[0] == 4


def test_release_set_promote_abort_and_mesh_render(
    cp: ControlPlane,
    services: LocalServices,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _two_revisions(tmp_path, "cli-canary", capsys)
    split = ("release", "set", "cli-canary", "--canary-revision", "2", "--weight", "10")

    code, _, err = _run(capsys, *split)  # no controller reported on the agent
    assert code == 1 and "ready instances are unknown" in err and "--allow-empty" in err
    _observe(services, cp.prefix, "cli-canary", canary=1)
    code, out, err = _run(
        capsys, "release", "set", "cli-canary",
        "--canary-revision", "2", "--weight", "10", "--stable-revision", "1",
    )  # fmt: skip
    assert code == 0, err
    assert out == "release/cli-canary: stable revision 1, canary revision 2 at 10%\n"

    code, out, err = _run(capsys, "mesh", "render")
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    vs = next(
        d for d in docs
        if d["kind"] == "VirtualService" and d["metadata"]["name"] == resource_name("cli-canary")
    )  # fmt: skip
    weights = [(r["destination"]["subset"], r["weight"]) for r in vs["spec"]["http"][-1]["route"]]
    assert weights == [("stable", 90), ("canary", 10)]
    code, out, _ = _run(capsys, "mesh", "render", "-o", "json")
    assert {d["kind"] for d in json.loads(out)} >= {"VirtualService", "DestinationRule"}

    code, out, _ = _run(capsys, "release", "promote", "cli-canary", "-o", "json")
    promoted = json.loads(out)
    assert (promoted["stableRevision"], promoted["canaryRevision"]) == (2, None)
    code, out, _ = _run(
        capsys, "release", "set", "cli-canary", "--canary-revision", "1",
        "--header", "x-canary=yes",
    )  # fmt: skip
    assert out == (
        "release/cli-canary: stable revision 2, canary revision 1 at 0%, "
        "and calls with x-canary=yes\n"
    )
    code, out, _ = _run(capsys, "release", "abort", "cli-canary")
    assert (code, out) == (0, "release/cli-canary: stable revision 2, no canary\n")
    code, out, _ = _run(capsys, "release", "get", "cli-canary", "-o", "json")
    assert json.loads(out)["canaryWeight"] == 0 and json.loads(out)["version"] == 4
    code, out, _ = _run(capsys, "release", "get", "cli-canary")
    assert out == "release/cli-canary: stable revision 2, no canary (version 4)\n"
    code, _, err = _run(capsys, "release", "abort", "cli-canary")
    assert code == 1 and "has no canary" in err
    code, _, err = _run(
        capsys, "release", "set", "cli-canary", "--canary-revision", "2", "--weight", "150"
    )
    assert code == 1 and "canaryWeight: must be <= 100 (got 150)" in err  # the server's issue
    assert _run(capsys, "release", "set", "cli-canary", "--canary-revision", "2",
                "--header", "no-equals-sign")[0] == 2  # fmt: skip

    code, _, err = _run(capsys, *split, "--expected-version", "3")
    assert code == 3 and "expected version 3, current version is 4" in err

    _observe(services, cp.prefix, "cli-canary", canary=0)
    code, _, err = _run(capsys, *split)
    assert code == 1 and "track canary, which has 0 ready of 1 desired" in err
    assert "--weight 0" in err  # how to start the canary first
    code, out, err = _run(capsys, *split, "--allow-empty", "--expected-version", "4")
    assert code == 0, err
    code, out, _ = _run(capsys, "audit", "--name", "cli-canary", "--kind", "Release")
    actions = [line.split()[2] for line in out.splitlines()[1:]]
    assert actions == ["release.set", "release.abort", "release.set", "release.promote",
                       "release.set"]  # fmt: skip


def test_release_get_shows_the_analysis_timeline_the_control_plane_keeps(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _two_revisions(tmp_path, "cli-analysed", capsys)
    release = tmp_path / "release.yaml"
    release.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "specmesh.io/v1",
                "kind": "Release",
                "metadata": {"name": "cli-analysed"},
                "spec": {
                    "stableRevision": 1,
                    "canaryRevision": 2,
                    "analysis": {
                        "steps": [
                            {"weight": 10, "durationSeconds": 1},
                            {"weight": 50, "durationSeconds": 1},
                        ],
                        "gates": {"maxErrorRateIncrease": 0.05},
                    },
                },
            }
        )
    )
    assert _run(capsys, "apply", "-f", str(release))[0] == 0

    def shows_the_first_step() -> str | None:
        code, out, err = _run(capsys, "release", "get", "cli-analysed")
        assert code == 0, err
        return out if "not enough data" in out else None

    # the control plane's analysis loop (every 5 s) sets the first step's weight, then holds
    # it: no turn reached the trace store
    out = eventually_sync(shows_the_first_step, what="the analysis timeline", timeout=30)
    lines = out.splitlines()
    # version 2: the manifest's policy, then the loop's first step
    assert lines[0] == (
        "release/cli-analysed: stable revision 1, canary revision 2 at 10% (version 2)"
    )
    assert lines[1] == (
        "analysis of canary revision 2 against stable revision 1: running (step 1 of 2)"
    )
    assert lines[2].startswith("  step 1 at 10%: hold -- stable 0 turns, 0 errors")
    assert "not enough data: stable 0, canary 0 turns (at least 30 each)" in out
    code, out, err = _run(capsys, "get", "release", "cli-analysed", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["spec"]["analysis"]["steps"][0]["weight"] == 10
    timeline = doc["status"]["analysis"]["timeline"]
    assert [(e["weight"], e["decision"]) for e in timeline] == [(10, "hold")]
    out = _run(capsys, "audit", "--name", "cli-analysed", "-o", "json")[1]
    sets = [e["actor"] for e in json.loads(out) if e["action"] == "release.set"]
    assert sets == ["specmesh-analysis", "ci-operator"]  # newest first: the step, the manifest


# ---------------------------------------------------------------- exit codes


def test_a_bad_manifest_exits_1_with_the_path(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: specmesh.io/v1\nkind: Agent\nmetadata: {name: cli-bad}\n"
        "spec:\n  base: {description: d, promptKey: p}\n  model: {model: m, temperature: 7}\n"
    )

    code, out, err = _run(capsys, "apply", "-f", str(bad))

    assert code == 1
    assert "spec.model.temperature: must be <= 2 (got 7)" in err
    assert out == ""


def test_a_stale_expected_revision_exits_3(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _two_revisions(tmp_path, "cli-stale", capsys)

    code, _, err = _run(capsys, "apply", "-f", str(folder), "--expected-revision", "1")
    assert code == 3
    assert "conflict on agent 'cli-stale'" in err
    assert _run(capsys, "rollback", "cli-stale", "1", "--expected-revision", "1")[0] == 3
    _agent_folder(tmp_path, "cli-stale", "0.3")
    assert _run(capsys, "apply", "-f", str(folder), "--expected-revision", "2")[0] == 0


def test_not_found_exits_4(cp: ControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "get", "agent", "cli-nobody")
    assert code == 4 and "'cli-nobody' not found" in err
    assert _run(capsys, "describe", "agent", "cli-nobody")[0] == 4
    assert _run(capsys, "history", "cli-nobody")[0] == 4


def test_a_viewer_reads_but_may_not_apply_exit_7(
    cp: ControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _two_revisions(tmp_path, "cli-viewed", capsys)
    monkeypatch.setenv("SPECMESH_TOKEN", cp.viewer)

    assert _run(capsys, "get", "agent", "cli-viewed", "-o", "json")[0] == 0
    code, _, err = _run(capsys, "apply", "-f", str(folder))
    assert code == 7
    assert "'ci-viewer' may not agents.write" in err
    assert _run(capsys, "release", "promote", "cli-viewed")[0] == 7
    assert _run(capsys, "get", "agents", "--token", "not-a-token")[0] == 7
    monkeypatch.delenv("SPECMESH_TOKEN")
    code, _, err = _run(capsys, "get", "agents")
    assert code == 7 and "SPECMESH_TOKEN" in err
    token_file = tmp_path / "token"
    token_file.write_text(cp.viewer + "\n")
    monkeypatch.setenv("SPECMESH_TOKEN_FILE", str(token_file))
    assert _run(capsys, "get", "agents")[0] == 0
    monkeypatch.setenv("SPECMESH_TOKEN_FILE", str(tmp_path / "missing"))
    code, _, err = _run(capsys, "get", "agents")
    assert code == 2 and "cannot read the token file" in err


def test_a_control_plane_that_is_down_exits_5(
    cp: ControlPlane, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    down = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("SPECMESH_SERVER", down)

    code, out, err = _run(capsys, "get", "agents")

    assert code == 5
    assert f"control plane at {down} is unavailable" in err
    assert out == ""
    assert _run(capsys, "apply", "-f", str(EXAMPLES / "prompts"))[0] == 5


def test_the_local_fleet_is_the_default_server(
    control_plane: ControlPlane,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in list(os.environ):
        if name.startswith("SPECMESH_"):
            monkeypatch.delenv(name)
    home = tmp_path / "fleet"
    home.mkdir()
    state = {
        "endpoints": {"controlPlane": control_plane.url, "controlPlaneGrpc": control_plane.grpc},
        "processes": [{"name": "control-plane", "role": "control-plane", "pid": 1}],
    }
    (home / "fleet.json").write_text(json.dumps(state))
    (home / "admin-token").write_text(control_plane.viewer + "\n")
    monkeypatch.setenv("SPECMESH_HOME", str(home))

    assert _run(capsys, "get", "agents", "-o", "json")[0] == 0
    assert Settings().server == control_plane.grpc

    (home / "fleet.json").write_text(json.dumps({**state, "processes": []}))  # `specmesh down`
    assert Settings().server is None
    code, _, err = _run(capsys, "mesh", "render")
    assert code == 5 and "the local fleet is not running" in err and "SPECMESH_SERVER" in err


def test_without_a_control_plane_every_spec_command_exits_5_and_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("SPECMESH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SPECMESH_HOME", str(tmp_path / "home"))

    for argv in (
        ["apply", "-f", str(EXAMPLES / "prompts")],
        ["get", "agents"],
        ["history", "a"],
        ["audit"],
        ["release", "get", "a"],
        ["release", "set", "a", "--canary-revision", "2", "--weight", "10"],
        ["mesh", "render"],
        ["describe", "agent", "a"],
        ["get", "instances"],
    ):
        code, _, err = _run(capsys, *argv)
        assert code == 5, argv
        assert "./scripts/up" in err and "SPECMESH_SERVER" in err, argv


def test_a_server_that_is_not_a_grpc_address_is_a_usage_error(
    cp: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "get", "agents", "--server", cp.url)

    assert code == 2
    assert "expected the control plane's gRPC address" in err


# ---------------------------------------------------------------- round trips (kubectl's contract)


def _apply_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    return _run(capsys, "apply", "-f", "-")


def test_get_yaml_applies_back_unchanged_for_every_kind(
    cp: ControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPECMESH_TOKEN", cp.admin)  # McpServer is admin-only
    name = f"rt-{uuid.uuid4().hex[:6]}"
    manifest = tmp_path / "all.yaml"
    manifest.write_text(
        f"""apiVersion: specmesh.io/v1
kind: McpServer
metadata: {{name: {name}-mcp}}
spec: {{url: "http://{name}-mcp/mcp", credentialTemplate: {{headers: [key]}}}}
---
apiVersion: specmesh.io/v1
kind: Prompt
metadata: {{name: {name}}}
spec: {{version: "1.0.0", template: "You are {{{{who}}}}.", variables: {{who: first}}}}
---
apiVersion: specmesh.io/v1
kind: Prompt
metadata: {{name: {name}}}
spec:
  version: "1.1.0"
  template: "You are {{{{who}}}}, again."
  release: {{labels: {{prod: "1.0.0"}}, weights: {{"1.0.0": 50, "1.1.0": 50}}}}
---
apiVersion: specmesh.io/v1
kind: Agent
metadata: {{name: {name}}}
spec:
  base: {{description: round trip, promptKey: {name}, promptVersion: "1.0.0"}}
  model: {{model: m, apiKey: sk-round-trip-plaintext}}
  mcpServers: [{{mcpServerName: {name}-mcp, headers: {{key: k-plain}}}}]
---
apiVersion: specmesh.io/v1
kind: Release
metadata: {{name: {name}}}
spec: {{stableRevision: 1, retries: {{attempts: 1}}}}
"""
    )
    code, out, err = _run(capsys, "apply", "-f", str(manifest))
    assert code == 0, err

    for argv in (
        ["agent", name],
        ["prompt", name],
        ["prompt", name, "--version", "1.1.0"],
        ["mcpserver", f"{name}-mcp"],
        ["release", name],
    ):
        code, printed, err = _run(capsys, "get", *argv, "-o", "yaml")
        assert code == 0, (argv, err)
        assert "sk-round-trip-plaintext" not in printed
        code, out, err = _apply_stdin(capsys, monkeypatch, printed)
        assert code == 0, (argv, err)
        lines = out.splitlines()
        assert lines and all(" unchanged" in line for line in lines), (argv, out)
        # and -o json is the same object
        code, printed, _ = _run(capsys, "get", *argv, "-o", "json")
        docs = json.loads(printed)
        first = docs[0] if isinstance(docs, list) else docs
        assert first["kind"] in ("Agent", "Prompt", "McpServer", "Release")

    code, out, _ = _run(capsys, "history", name, "-o", "json")
    assert [r["revision"] for r in json.loads(out)] == [1]  # nothing re-applied made a revision


def test_get_prompt_shows_its_versions_and_a_versions_text(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = f"pv-{uuid.uuid4().hex[:6]}"
    for v, text in (("1.0.0", "First text."), ("2.0.0", "Second text.\nTwo lines.")):
        f = tmp_path / f"{v}.yaml"
        f.write_text(
            yaml.safe_dump(
                {"apiVersion": "specmesh.io/v1", "kind": "Prompt", "metadata": {"name": key},
                 "spec": {"version": v, "template": text, "description": f"v{v}"}}
            )
        )  # fmt: skip
        assert _run(capsys, "apply", "-f", str(f))[0] == 0

    code, out, _ = _run(capsys, "get", "prompt", key)
    assert code == 0
    rows = [line.split()[:1] for line in out.splitlines()]
    assert rows == [["VERSION"], ["1.0.0"], ["2.0.0"]]
    code, out, _ = _run(capsys, "get", "prompt", key, "--version", "2.0.0")
    assert (code, out) == (0, "Second text.\nTwo lines.\n")
    code, _, err = _run(capsys, "get", "prompt", key, "--version", "9.9.9")
    assert code == 4 and f"{key}@9.9.9" in err
    code, _, err = _run(capsys, "get", "prompt", "no-such-prompt")
    assert code == 4 and "no-such-prompt" in err


def test_prompt_rollback_and_history_and_the_prompt_of_each_agent_revision(
    cp: ControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = f"rb-{uuid.uuid4().hex[:6]}"
    for v in ("1.0.0", "1.1.0"):
        f = tmp_path / f"{v}.yaml"
        f.write_text(
            yaml.safe_dump(
                {"apiVersion": "specmesh.io/v1", "kind": "Prompt", "metadata": {"name": key},
                 "spec": {"version": v, "template": f"Text {v}."}}
            )
        )  # fmt: skip
        assert _run(capsys, "apply", "-f", str(f))[0] == 0
    folder = tmp_path / key
    folder.mkdir()
    (folder / "agent-base.json").write_text(f'{{"description": "d", "promptKey": "{key}"}}')
    (folder / "model.json").write_text('{"model": "m"}')
    assert _run(capsys, "apply", "-f", str(folder))[0] == 0

    code, out, err = _run(capsys, "prompt", "rollback", key, "1.0.0", "-m", "bad tone")

    assert code == 0, err
    assert out.startswith(f"prompt/{key}: version 1.0.0 serves again")
    code, out, _ = _run(capsys, "history", key)
    lines = out.splitlines()
    assert lines[0].split() == ["REVISION", "CREATED", "AUTHOR", "PROMPT", "MESSAGE"]
    assert [line.split()[3] for line in lines[1:]] == ["1.1.0", "1.0.0"]
    assert lines[2].endswith(f"prompt {key} rolled back to 1.0.0: bad tone")
    code, out, _ = _run(capsys, "get", "agent", key, "-o", "json")
    resolved = json.loads(out)["status"]["resolved"]
    assert resolved["prompt"] == {"key": key, "versions": ["1.0.0"]}
    code, out, _ = _run(capsys, "get", "prompt", key, "-o", "json")
    assert json.loads(out)[-1]["spec"]["release"] == {
        "labels": {},
        "weights": {},
        "current": "1.0.0",
    }
    code, out, _ = _run(capsys, "prompt", "history", key, "-o", "json")
    history = json.loads(out)
    assert [(v["version"], v["author"]) for v in history["versions"]] == [
        ("1.0.0", "ci-operator"),
        ("1.1.0", "ci-operator"),
    ]
    assert [(c["kind"], c["action"], c["message"]) for c in history["releaseChanges"]] == [
        ("Prompt", "rollback", "rollback to 1.0.0: bad tone")
    ]
    code, out, _ = _run(capsys, "prompt", "history", key)
    assert code == 0 and any(line.split()[1:3] == ["rollback", "ci-operator"]
                             for line in out.splitlines())  # fmt: skip
    assert _run(capsys, "prompt", "rollback", key, "9.9.9")[0] == 4
    monkeypatch.setenv("SPECMESH_TOKEN", cp.viewer)
    assert _run(capsys, "prompt", "history", key)[0] == 0
    assert _run(capsys, "prompt", "rollback", key, "1.1.0")[0] == 7


def test_diff_prints_values_as_json_and_unset_as_add_or_remove(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"diff-{uuid.uuid4().hex[:6]}"
    folder = _agent_folder(tmp_path, name, "0.1")
    assert _run(capsys, "apply", "-f", str(folder))[0] == 0
    (folder / "agent-base.json").write_text(
        '{"description": "d", "promptKey": "p", "promptVersion": "1.0.0"}'
    )
    assert _run(capsys, "apply", "-f", str(folder))[0] == 0

    code, out, _ = _run(capsys, "diff", name, "1", "2")
    assert (code, out) == (0, '+ base.promptVersion: "1.0.0"\n')
    code, out, _ = _run(capsys, "diff", name, "2", "1")
    assert (code, out) == (0, '- base.promptVersion: "1.0.0"\n')
    assert "None" not in out


# ---------------------------------------------------------------- references


def test_apply_refuses_an_unknown_prompt_key_or_version(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"np-{uuid.uuid4().hex[:6]}"
    folder = _agent_folder(tmp_path, name, "0.1")
    (folder / "agent-base.json").write_text('{"description": "d", "promptKey": "no-such-p"}')

    code, _, err = _run(capsys, "apply", "-f", str(folder))

    assert code == 1
    assert "spec.base.promptKey" in err and "no prompt 'no-such-p'" in err
    assert _run(capsys, "get", "agent", name)[0] == 4  # nothing stored
    (folder / "agent-base.json").write_text(
        '{"description": "d", "promptKey": "p", "promptVersion": "7.0.0"}'
    )
    code, _, err = _run(capsys, "apply", "-f", str(folder))
    assert code == 1 and "spec.base.promptVersion" in err and "no version '7.0.0'" in err


def test_a_dangling_partner_or_mcp_server_is_a_warning_in_apply_and_describe(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"dangle-{uuid.uuid4().hex[:6]}"
    folder = _agent_folder(tmp_path, name, "0.1")
    (folder / "partner-agents.json").write_text('{"agents": [{"agentName": "nobody-yet"}]}')
    (folder / "mcp-servers.json").write_text('{"mcpServers": [{"mcpServerName": "no-mcp-yet"}]}')

    code, out, err = _run(capsys, "apply", "-f", str(folder))

    assert code == 0, err
    assert f"agent/{name} configured (revision 1)" in out
    assert "warning: spec.partnerAgents[0].agentName: partner agent 'nobody-yet' is not" in out
    assert "warning: spec.mcpServers[0].mcpServerName: MCP server 'no-mcp-yet'" in out
    code, out, _ = _run(capsys, "describe", "agent", name)
    assert code == 0
    assert "Warnings (2):" in out and "nobody-yet" in out and "no-mcp-yet" in out
    code, out, _ = _run(capsys, "describe", "agent", name, "-o", "json")
    assert len(json.loads(out)["warnings"]) == 2


# ---------------------------------------------------------------- shared secrets


def test_only_a_secrets_admin_shares_a_secret_and_an_agent_uses_only_what_is_shared(
    cp: ControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"share-{uuid.uuid4().hex[:6]}"
    secret = f"vault://secret/specmesh/shared/{name}"
    folder = _agent_folder(tmp_path, name, "0.1")
    (folder / "model.json").write_text(f'{{"model": "m", "apiKey": "{secret}#token"}}')

    code, _, err = _run(capsys, "apply", "-f", str(folder))  # as operator: not shared yet
    assert code == 1 and "not shared with it" in err and f"grant create {name}" in err
    code, _, err = _run(capsys, "grant", "create", name, secret)
    assert code == 7, err  # an operator cannot share a secret

    monkeypatch.setenv("SPECMESH_TOKEN", cp.secrets_admin)
    code, out, err = _run(capsys, "grant", "create", name, secret)
    assert (code, out) == (0, f"shared {secret} with agent/{name}\n"), err
    for bad, reason in (
        ("vault://sys/policies#x", "mount 'sys' is not allowed"),
        ("vault://secret/specmesh/agents/other/model/apiKey", "never shared"),
        ("vault://secret/a/../b", "path segment '..' is not allowed"),
    ):
        code, _, err = _run(capsys, "grant", "create", name, bad)
        assert code == 1 and reason in err, (bad, err)
    code, out, _ = _run(capsys, "grant", "list", name, "-o", "json")
    assert [g["secret"] for g in json.loads(out)] == [secret]

    monkeypatch.setenv("SPECMESH_TOKEN", cp.operator)
    code, out, err = _run(capsys, "apply", "-f", str(folder))
    assert code == 0, err
    code, out, _ = _run(capsys, "describe", "agent", name)
    assert f"Shared:       {secret} (by ci-secrets)" in out
    (folder / "model.json").write_text('{"model": "m", "apiKey": "vault://sys/policies#x"}')
    code, _, err = _run(capsys, "apply", "-f", str(folder))
    assert code == 1 and "spec.model.apiKey" in err and "mount 'sys' is not allowed" in err
    code, out, _ = _run(capsys, "audit", "--kind", "Grant", "--name", name, "-o", "json")
    assert [(e["action"], e["actor"]) for e in json.loads(out)] == [("grant", "ci-secrets")]


def test_secret_garbage_collection_is_for_secrets_admins(
    cp: ControlPlane, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, "secrets", "gc")[0] == 7  # operator
    monkeypatch.setenv("SPECMESH_TOKEN", cp.secrets_admin)
    # a grace longer than the session: other tests' versions (other etcd prefixes, one
    # Vault) are never touched; the sweep itself runs for real
    code, out, err = _run(capsys, "secrets", "gc", "--grace", "1000000")
    assert code == 0, err
    assert out.endswith("kept\n") and out.startswith("0 unreferenced versions destroyed")


def test_invoke_calls_the_card_the_control_plane_serves_with_an_invoke_token(
    cp: ControlPlane,
    services: LocalServices,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No fleet and no URL: the CLI learns where the agent is from the card a live instance
    published (here an engine process serving a scripted runner), mints an invoke token
    as its API principal, and talks A2A with the SDK client built from that card."""
    import subprocess
    import time

    from specmesh.keys import Keys

    from .test_engine_server_main import _SCRIPT, _serving_line

    assert main(["apply", "-f", str(_agent_folder(tmp_path, "cli-invoked", "0.1"))]) == 0
    env = {**os.environ, "AGENT_NAME": "cli-invoked"}
    engine = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        http_url = _serving_line(engine, time.monotonic() + 30)["http"]
        card = httpx.get(f"{http_url}/.well-known/agent-card.json", timeout=10).json()
        instance = {"instance": "cli-invoked-stable-0", "track": "stable", "card": card}

        async def publish() -> None:
            etcd = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
            try:
                key = Keys(prefix=cp.prefix).registry_instance("cli-invoked", instance["instance"])
                await etcd.put(key, json.dumps(instance))
            finally:
                await etcd.close()

        asyncio.run(publish())
        capsys.readouterr()

        code = main(["invoke", "cli-invoked", "hello there"])

        out, err = capsys.readouterr()
        assert code == 0, err
        assert "echo: hello there" in out
        audit = _call(cp.grpc, cp.admin, "audit", "ListAuditEntries",
                      pb.ListAuditEntriesRequest(name="cli-invoked")).entries  # fmt: skip
        assert [e.actor for e in audit if e.action == "invoke-token"] == ["ci-operator"]

        monkeypatch.setenv("SPECMESH_TOKEN", cp.viewer)  # a viewer gets no invoke token
        assert main(["invoke", "cli-invoked", "hello"]) == 7
        assert "agents.invoke" in capsys.readouterr().err
    finally:
        engine.terminate()
        engine.wait(timeout=30)
