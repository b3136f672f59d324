"""`specmesh up` a second time keeps what the operator changed: the examples are seeded
only into an empty store, and the per-run ports of Redis and the MCP servers never enter a
spec (the sidecars resolve the specs' stable names at run time)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hvac
import pytest

from localfleet.fleet import Fleet, FleetOptions
from specmeshctl.main import main as cli

from .test_fleet import _api, _ask

pytestmark = pytest.mark.e2e


def _revisions(state: dict[str, Any]) -> dict[str, int]:
    agents = _api(state, "/api/v1/agents")["agents"]
    return {a["name"]: int(a["revisionInfo"]["revision"]) for a in agents}


def test_up_twice_keeps_a_prompt_pin_and_adds_no_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith(("SPECMESH_", "VAULT_")):
            monkeypatch.delenv(name)
    home = tmp_path / "fleet"
    monkeypatch.setenv("SPECMESH_HOME", str(home))
    fleet = Fleet(FleetOptions(home=home))
    try:
        first = fleet.up()
        assert first["seeded"] is True
        # the operator pins mse-gateway-assistant's prompt through the CLI (the fleet's API)
        assert cli(["get", "agent", "mse-gateway-assistant", "-o", "json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        doc["spec"]["base"]["promptVersion"] = "1.0.0"
        pinned = tmp_path / "pinned.json"
        pinned.write_text(json.dumps(doc))
        assert cli(["apply", "-f", str(pinned)]) == 0
        assert "configured (revision 2)" in capsys.readouterr().out
        before = _revisions(first)
        sidecar = next(p for p in first["processes"] if p["role"] == "sidecar")
        raw = Path(f"/proc/{sidecar['pid']}/environ").read_bytes().split(b"\0")
        old_token = dict(e.decode().split("=", 1) for e in raw if b"=" in e)["SPECMESH_VAULT_TOKEN"]
        fleet.down()

        second = fleet.up()

        assert second["seeded"] is False
        assert _revisions(second) == before  # no agent got a revision from the restart
        agent = _api(second, "/api/v1/agents/mse-gateway-assistant")["agent"]
        assert agent["spec"]["base"]["promptVersion"] == "1.0.0"
        # new ports, same specs: the sidecars reach Redis and the MCP servers by name
        assert second["endpoints"]["redis"] != first["endpoints"]["redis"]
        result = _ask(second, "mse-nacos-helper", "Which Nacos services are registered?")
        assert result.state == "completed"
        assert "nacos-mcp-tools__list_services" in result.tool_calls
        # `down` revoked the identities it handed out
        with pytest.raises(hvac.exceptions.Forbidden):
            hvac.Client(
                url=second["endpoints"]["openbao"], token=old_token
            ).auth.token.lookup_self()
        stored = json.dumps(_api(second, "/api/v1/mcp-servers"))
        assert "127.0.0.1" not in stored  # registry entries name services, not ports
    finally:
        fleet.down()
