"""Rollback restores the prompt version and the keys (issue 17's acceptance): a real
`specmesh sidecar` and `specmesh engine` against real etcd and OpenBao call the scripted
model server, which records the system prompt and the ``Authorization`` it received."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localfleet.installer import LocalServices
from localfleet.modelserver import ScriptedModelServer
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.spec.manifest import LoadedManifest, parse_manifest
from specmesh.spec.models import PromptEntry
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

from .agent_pair import STARTUP, AgentPair, prepare_pair, until

pytestmark = pytest.mark.integration

AGENT = "rollback-helper"
RELOAD = 30.0
"""Seconds within which a new revision reaches the engine."""


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer() as server:
        yield server


def _agent(model: ScriptedModelServer, api_key: str) -> LoadedManifest:
    doc = {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": AGENT},
        "spec": {
            "base": {"description": "answers", "promptKey": AGENT},
            "model": {"model": "scripted", "baseUrl": model.url, "apiKey": api_key},
        },
    }
    return LoadedManifest("test", parse_manifest(doc, source="test"))


async def _publish(store: SpecStore, version: str, text: str) -> None:
    entry = PromptEntry(prompt_key=AGENT, version=version, template=text)
    await store.put_prompt_version(entry, actor="pat")


async def _ask(
    pair: AgentPair, http: httpx.AsyncClient, revision: int, *, within: float
) -> dict[str, Any]:
    """One turn answered by ``revision`` (polled: the engine may not serve it yet)."""

    async def answered() -> dict[str, Any] | None:
        r = await http.post(f"{pair.engine}/v1/invoke", json={"message": "hi"}, timeout=30)
        if r.status_code != 200:
            return None
        body = dict(r.json())
        return body if body["revision"] == revision else None

    return await until(pair, answered, within=within, what=f"a turn of revision {revision}")


def _received(model: ScriptedModelServer) -> tuple[str, str | None]:
    """The system prompt and Authorization of the model server's last request."""
    last = model.requests(include_auth=True)[-1]
    system = next(m["content"] for m in last.messages if m["role"] == "system")
    return system, last.authorization


async def test_rollback_restores_the_prompt_version_and_the_key_the_model_receives(
    services: LocalServices,
    store: SpecStore,
    vault: VaultClient,
    keys: Keys,
    etcd: EtcdClient,
    model: ScriptedModelServer,
    tmp_path: Path,
) -> None:
    service = SpecService(store=store, vault=vault)  # the pair sets up its PKI role
    await _publish(store, "1.0.0", "You are the first prompt.")
    r1 = await service.apply(_agent(model, "key-A"), actor="alice")
    await _publish(store, "1.1.0", "You are the second prompt.")  # revision 2: action prompt
    r2 = await service.apply(_agent(model, "key-B"), actor="alice")
    assert (r1.revision, r2.revision) == (1, 3)
    pair = await prepare_pair(
        agent=AGENT,
        instance=f"{AGENT}-1",
        services=services,
        store=store,
        vault=vault,
        keys=keys,
        etcd=etcd,
        tmp_path=tmp_path,
    )
    pair.start("sidecar")
    pair.start("engine")
    try:
        async with httpx.AsyncClient() as http:
            before = await _ask(pair, http, 3, within=STARTUP)
            assert before["promptVersion"] == "1.1.0"
            assert _received(model) == ("You are the second prompt.", "Bearer key-B")

            rolled = await store.rollback(AGENT, 1, actor="alice")

            after = await _ask(pair, http, rolled.revision, within=RELOAD)
            assert after["promptVersion"] == "1.0.0"
            assert _received(model) == ("You are the first prompt.", "Bearer key-A")
    finally:
        pair.stop_all()
