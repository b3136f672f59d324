"""The ``specmesh`` command against real etcd and OpenBao."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from specmesh.cli import main
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.services import LocalServices
from specmesh.spec.models import PromptEntry
from specmesh.store import SpecStore

from ..conftest import REPO

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


@pytest.fixture
def env(services: LocalServices, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    prefix = f"/cli-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("SPECMESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPECMESH_ETCD_ENDPOINT", services.etcd.endpoint)
    monkeypatch.setenv("SPECMESH_ETCD_PREFIX", prefix)
    monkeypatch.setenv("SPECMESH_VAULT_ADDR", services.bao.address)
    monkeypatch.setenv("SPECMESH_VAULT_TOKEN", services.bao.root_token)
    monkeypatch.setenv("SPECMESH_ACTOR", "ci-user")
    asyncio.run(_publish_prompt(services, prefix, "p"))  # the prompt the test agents name
    return prefix


async def _publish_prompt(services: LocalServices, prefix: str, key: str) -> None:
    client = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
    try:
        store = SpecStore(etcd=client, keys=Keys(prefix=prefix))
        entry = PromptEntry(prompt_key=key, version="1.0.0", template="You help.")
        await store.put_prompt_version(entry, actor="fixture")
        # what a secrets-admin shares for the examples (the fleet's Redis password)
        await store.put_grant(
            "mse-nacos-helper", "secret", "specmesh/shared/fleet-redis", actor="fixture"
        )
    finally:
        await client.close()


def _dump(services: LocalServices, prefix: str) -> str:
    async def read() -> str:
        client = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
        try:
            result = await client.range(prefix + "/", prefix=True)
        finally:
            await client.close()
        return "\n".join(f"{kv.key}={kv.value.decode()}" for kv in result.kvs)

    return asyncio.run(read())


def test_apply_examples_leaves_no_secret_in_etcd(
    env: str, services: LocalServices, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["apply", "-f", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert "agent/mse-nacos-helper configured (revision 1)" in out
    assert "secret moved to Vault: model.apiKey" in out

    dump = _dump(services, env)

    assert "/agents/mse-nacos-helper/revisions/0000000001" in dump
    assert "/agents/schedulex-assistant/meta" in dump
    assert [s for s in PLAINTEXT_IN_EXAMPLES if s in dump] == []
    assert "vault://secret/specmesh/agents/mse-nacos-helper/model/apiKey#value" in dump


def test_get_history_diff_rollback(
    env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "helper"
    folder.mkdir()
    (folder / "agent-base.json").write_text('{"description": "d", "promptKey": "p"}')
    for t in ("0.1", "0.2"):
        (folder / "model.json").write_text(f'{{"model": "m", "temperature": {t}}}')
        assert main(["apply", "-f", str(folder)]) == 0
    capsys.readouterr()

    assert main(["get", "agents", "-o", "json"]) == 0
    agents = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["revision"]) for a in agents] == [("helper", 2)]
    assert main(["history", "helper"]) == 0
    assert "ci-user" in capsys.readouterr().out
    assert main(["diff", "helper", "1", "2"]) == 0
    assert capsys.readouterr().out == "~ model.temperature: 0.1 -> 0.2\n"
    assert main(["rollback", "helper", "1"]) == 0
    assert "as revision 3" in capsys.readouterr().out
    assert main(["get", "agent", "helper", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["model"]["temperature"] == 0.1
    assert main(["audit", "--name", "helper", "-o", "json"]) == 0
    actions = [e["action"] for e in json.loads(capsys.readouterr().out)]
    assert actions == ["rollback", "apply", "apply"]


def test_exit_codes(env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: specmesh.io/v1\nkind: Agent\nmetadata: {name: a}\n"
        "spec:\n  base: {description: d, promptKey: p}\n  model: {model: m, temperature: 7}\n"
    )
    assert main(["validate", "-f", str(bad)]) == 1
    assert "spec.model.temperature: must be <= 2 (got 7)" in capsys.readouterr().err
    assert main(["get", "agent", "nobody"]) == 4
    good = tmp_path / "good.yaml"
    good.write_text(bad.read_text().replace("temperature: 7", "temperature: 1"))
    assert main(["apply", "-f", str(good)]) == 0
    assert main(["apply", "-f", str(good), "--expected-revision", "0"]) == 3
    assert "conflict on agent 'a'" in capsys.readouterr().err
