"""``specmesh token create|list|revoke`` through a real control-plane process on real etcd
and OpenBao, the CLI driven in-process over the control plane's gRPC API (as in
test_cli_api.py)."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from control_plane.auth import Role
from localfleet.installer import LocalServices
from specmeshctl.main import main

from .cp_process import ControlPlaneProcess

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Server:
    grpc: str
    boss: str  # admin + secrets-admin (as the local fleet's admin token)
    secrets: str  # secrets-admin only
    operator: str


@pytest.fixture(scope="module")
def server(services: LocalServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cli-tokens")
    boss, secrets, operator = (f"tok-{r}-{uuid.uuid4().hex}" for r in "bso")
    process = ControlPlaneProcess(
        services,
        tmp,
        tokens={
            boss: ("ci-boss", [Role.ADMIN, Role.SECRETS_ADMIN]),
            secrets: ("ci-secrets", [Role.SECRETS_ADMIN]),
            operator: ("ci-operator", [Role.OPERATOR]),
        },
    )
    process.start()
    yield Server(process.grpc, boss, secrets, operator)
    assert process.stop() == 0, process.log.read_text()


@pytest.fixture
def cli(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Server:
    for name in list(os.environ):
        if name.startswith(("SPECMESH_", "VAULT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SPECMESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPECMESH_SERVER", server.grpc)
    monkeypatch.setenv("SPECMESH_TOKEN", server.boss)
    return server


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_token_create_use_list_revoke(
    cli: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "token", "create", "cli-bot", "--role", "viewer", "--ttl", "1h")

    assert code == 0, err
    first, secret = out.splitlines()
    token_id = first.split()[0].removeprefix("token/")
    assert "created for cli-bot (roles viewer), expires at" in first
    assert secret.startswith("smt_") and "shown only now" in err
    monkeypatch.setenv("SPECMESH_TOKEN", secret)
    assert _run(capsys, "get", "agents", "-o", "json")[0] == 0
    code, out, _ = _run(capsys, "whoami", "-o", "json")
    me = json.loads(out)
    assert (code, me["name"], me["roles"]) == (0, "cli-bot", ["viewer"])
    assert "agents.read" in me["can"] and "agents.write" not in me["can"]
    assert _run(capsys, "token", "list")[0] == 7  # a viewer may not

    monkeypatch.setenv("SPECMESH_TOKEN", cli.boss)
    code, out, _ = _run(capsys, "token", "list")
    assert code == 0 and out.split()[:5] == ["ID", "NAME", "ROLES", "EXPIRES", "STATE"]
    row = next(line.split() for line in out.splitlines() if line.startswith(token_id))
    assert row[1:3] == ["cli-bot", "viewer"] and row[-1] == "active"
    assert secret not in out
    code, out, _ = _run(capsys, "token", "list", "-o", "json")
    listed = {t["id"]: t for t in json.loads(out)}
    assert listed[token_id]["name"] == "cli-bot" and secret not in out
    assert {t["name"] for t in listed.values() if t["source"] == "file"} == {
        "ci-boss", "ci-secrets", "ci-operator"
    }  # fmt: skip

    code, out, _ = _run(capsys, "token", "revoke", token_id)
    assert (code, out) == (0, f"token/{token_id} (cli-bot) revoked\n")

    monkeypatch.setenv("SPECMESH_TOKEN", secret)
    deadline = time.monotonic() + 5
    while (result := _run(capsys, "get", "agents"))[0] != 7:
        assert time.monotonic() < deadline, result  # polling a condition with a deadline
    assert "token revoked at" in result[2]


def test_token_commands_need_secrets_admin_and_no_escalation(
    cli: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPECMESH_TOKEN", cli.operator)
    code, _, err = _run(capsys, "token", "create", "x", "--role", "viewer")
    assert code == 7 and "'ci-operator' may not tokens.write" in err
    assert _run(capsys, "token", "list")[0] == 7
    assert _run(capsys, "token", "revoke", "0123456789ab")[0] == 7

    monkeypatch.setenv("SPECMESH_TOKEN", cli.secrets)
    code, _, err = _run(capsys, "token", "create", "x", "--role", "viewer")
    assert code == 7 and "may not mint a token with role viewer" in err
    code, out, _ = _run(capsys, "token", "create", "peer", "--role", "secrets-admin", "-o", "json")
    assert code == 0 and json.loads(out)["token"].startswith("smt_")
    assert _run(capsys, "token", "revoke", "0123456789ab")[0] == 4
    assert _run(capsys, "token", "create", "x", "--role", "viewer", "--ttl", "2w")[0] == 2
    code, _, err = _run(capsys, "token", "create", "x", "--role", "secrets-admin", "--ttl", "91d")
    assert code == 1 and ("ttlSeconds" in err or "ttl_seconds" in err), err
