"""What the CLI says when something a newcomer meets goes wrong: the fleet is down, the
reader of its output leaves, an agent does not answer. Each message says what to do."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specmesh.ports import free_port
from specmeshctl.fleet import up_banner
from specmeshctl.main import main

from ..conftest import REPO


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith(("SPECMESH_", "VAULT_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SPECMESH_HOME", str(home))
    return home


def _stopped_fleet(home: Path) -> None:
    """What `specmesh down` leaves: the services' file (ports nobody listens on) and a
    fleet file without processes."""
    dead = free_port()
    services = {"etcdEndpoint": f"http://127.0.0.1:{dead}", "baoAddress": f"http://127.0.0.1:{dead}",
                "baoToken": "t"}  # fmt: skip
    (home / "services.json").write_text(json.dumps(services))
    (home / "fleet.json").write_text(json.dumps({"processes": [], "endpoints": {}}))


def test_apply_with_the_fleet_down_says_how_to_start_it(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _stopped_fleet(home)

    code = main(["apply", "-f", str(REPO / "examples" / "prompts")])

    err = capsys.readouterr().err
    assert code == 5
    assert "`specmesh apply` talks to the control plane, and none is configured" in err
    assert "the local fleet is not running (start it with `./scripts/up`" in err


def test_a_fleet_whose_control_plane_died_gets_the_way_to_start_it(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    state = {"processes": [{"name": "control-plane", "role": "control-plane", "pid": 1}],
             "endpoints": {"controlPlaneGrpc": dead}}  # fmt: skip
    (home / "fleet.json").write_text(json.dumps(state))

    code = main(["get", "agents"])

    err = capsys.readouterr().err
    assert code == 5
    assert f"control plane at {dead} is unavailable" in err
    assert "the local fleet's control plane, the fleet is not running" in err


@pytest.mark.parametrize("argv", [["status"], ["status", "-o", "json"], ["logs", "x"]])
def test_status_and_logs_with_the_fleet_down_exit_5_with_the_way_to_start_it(
    home: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    _stopped_fleet(home)

    code = main(argv)

    captured = capsys.readouterr()
    assert code == 5
    assert captured.out == ""
    assert f"the local fleet ({home}) is not running" in captured.err
    assert "uv run specmesh up" in captured.err


def test_invoke_with_the_fleet_down_says_so(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["invoke", "mse-nacos-helper", "hello"])
    assert code == 5
    assert "is not running" in capsys.readouterr().err


def _fleet_state(home: Path) -> dict[str, Any]:
    """A fleet file whose one recorded process is this test process (so it "runs")."""
    cmd = [a.decode() for a in Path(f"/proc/{os.getpid()}/cmdline").read_bytes().split(b"\0") if a]
    agent = {
        "entry": "http://127.0.0.1:1008",
        "entryGrpc": "127.0.0.1:1009",
        "a2a": "http://127.0.0.1:1001",
        "a2aGrpc": "127.0.0.1:1002",
        "inbound": "https://127.0.0.1:1003",
        "inboundGrpc": "127.0.0.1:1004",
        "egressGrpc": "127.0.0.1:1005",
        "ops": "http://127.0.0.1:1006",
        "egress": "http://127.0.0.1:1007",
    }
    return {
        "processes": [{"name": "control-plane", "pid": os.getpid(), "cmd": cmd, "log": "x",
                       "role": "control-plane"}],
        "endpoints": {
            "etcd": "http://127.0.0.1:2000", "openbao": "http://127.0.0.1:2001",
            "redis": "redis://127.0.0.1:2002/0", "llm": "http://127.0.0.1:2003/v1",
            "controlPlane": "http://127.0.0.1:2004", "controlPlaneGrpc": "127.0.0.1:2005",
            "otlp": "http://127.0.0.1:2006",
            "mcp": {"nacos-mcp-tools": "http://127.0.0.1:2007/mcp",
                    "time": "http://127.0.0.1:2008/mcp"},
        },
        "agents": {"mse-nacos-helper": {"stable": agent},
                   "schedulex-assistant": {"stable": agent, "canary": agent}},
        "adminTokenFile": str(home / "admin-token"),
        "seeded": False,
    }  # fmt: skip


def test_status_json_lists_mcp_servers_and_every_sidecar_endpoint(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / "fleet.json").write_text(json.dumps(_fleet_state(home)))
    agent = _fleet_state(home)["agents"]["mse-nacos-helper"]["stable"]
    instances = [
        {"instance": f"{name}-{track}-0", "agent": name, "track": track, "ready": True,
         "phase": "Running", "endpoints": agent,
         "processes": [{"role": role, "pid": 0, "cmd": ["x"], "log": "x"}
                       for role in ("sidecar", "engine")]}
        for name, track in (("mse-nacos-helper", "stable"), ("schedulex-assistant", "stable"),
                            ("schedulex-assistant", "canary"))
    ]  # fmt: skip
    (home / "supervisor.json").write_text(json.dumps({"instances": instances, "workloads": {}}))

    code = main(["--server", "", "status", "-o", "json"])

    status = json.loads(capsys.readouterr().out)
    assert code == 0
    assert status["mcp"] == {"nacos-mcp-tools": "http://127.0.0.1:2007/mcp",
                             "time": "http://127.0.0.1:2008/mcp"}  # fmt: skip
    canary = status["agents"]["schedulex-assistant"]["canary"]
    assert {"entry", "entryGrpc", "inbound", "inboundGrpc", "egress", "egressGrpc", "ops"} <= set(
        canary
    )
    assert status["processes"][0]["running"] is True
    engines = [p for p in status["processes"] if p["role"] == "engine"]
    assert [p["instance"] for p in engines] == [i["instance"] for i in instances]


def test_the_up_banner_separates_every_label_from_its_value(home: Path) -> None:
    banner = up_banner(_fleet_state(home))

    lines = banner.splitlines()
    rows = [line for line in lines if line.startswith("  ")]
    assert len(rows) == 7 + 2 + 1 + 3  # services, two MCP servers, supervisor, 3 agent tracks
    value_column = {re.match(r"  .*?\S( {2,})\S", line).end(1) for line in rows}  # type: ignore[union-attr]
    assert len(value_column) == 1  # one aligned column, whatever the label's length
    assert "  MCP nacos-mcp-tools" in banner and "nacos-mcp-toolshttp" not in banner
    assert lines[-1] == (
        'try: uv run specmesh invoke mse-nacos-helper "Which Nacos services are registered?"'
    )
    assert "uv run specmesh up --reset" in banner
    assert "gRPC 127.0.0.1:2005  (REST http://127.0.0.1:2004/api/v1)" in banner
    # the way in for clients is each agent's entry, not its engine
    assert "entry http://127.0.0.1:1008 (gRPC 127.0.0.1:1009)" in banner
    assert "http://127.0.0.1:1001" not in banner


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(1500):  # ~100 KB of `valid: ...` lines: more than a pipe holds
        (folder / f"p{i:04d}.yaml").write_text(
            f"apiVersion: specmesh.io/v1\nkind: Prompt\nmetadata: {{name: p{i}}}\n"
            "spec: {version: '1.0.0', template: t}\n"
        )
    proc = subprocess.Popen(
        [sys.executable, "-m", "specmeshctl", "validate", "-f", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # what `| head -1` does, then it closes the pipe
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)

    assert first.startswith(b"valid: Prompt/p0")
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert proc.returncode == 141


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    for s in held:
        s.close()
    server.close()


def test_invoke_track_is_refused_with_what_to_do_instead(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["invoke", "a", "hello", "--track", "canary", "--url", "http://127.0.0.1:9"])

    err = capsys.readouterr().err
    assert code == 2
    assert "follow its release" in err and "--url" in err


def test_invoke_gives_up_at_its_deadline_with_a_clear_error(
    home: Path, silent_server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{silent_server}"

    code = main(["invoke", "quiet-agent", "hello", "--url", url, "--timeout", "0.5"])

    err = capsys.readouterr().err
    assert code == 5
    assert f"quiet-agent ({url}) did not finish answering within 0.5s" in err


@pytest.fixture
def refusing_entry() -> Iterator[str]:
    """An HTTP server in the shape of an agent's entry that refuses every call: its card
    (served without a token) names itself and a Bearer scheme; every A2A call gets 401 with
    the design's google.rpc.Status body."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any], **headers: str) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            self._send(200, {
                "name": "locked", "description": "d", "version": "1",
                "supportedInterfaces": [{"url": f"{base}/", "protocolBinding": "JSONRPC",
                                         "protocolVersion": "1.0"}],
                "capabilities": {"streaming": True},
                "securitySchemes": {"bearer": {"httpAuthSecurityScheme": {
                    "scheme": "Bearer", "bearerFormat": "JWT"}}},
                "securityRequirements": [{"schemes": {"bearer": {}}}],
                "defaultInputModes": ["text/plain"], "defaultOutputModes": ["text/plain"],
                "skills": [{"id": "s", "name": "s", "description": "d", "tags": ["t"]}],
            })  # fmt: skip

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(401, {"error": {"code": 401, "status": "UNAUTHENTICATED",
                                       "message": "missing bearer token"}},
                       WWW_Authenticate='Bearer realm="specmesh"')  # fmt: skip

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_invoke_refused_by_the_entry_exits_7_and_says_what_callers_must_admit(
    home: Path, refusing_entry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["invoke", "locked", "hello", "--url", refusing_entry, "--timeout", "20"])

    err = capsys.readouterr().err
    assert code == 7, err
    assert "calling locked" in err and "401" in err
    assert "callers.principals must admit specmesh/" in err
