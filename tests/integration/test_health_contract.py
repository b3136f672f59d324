"""The health contract (docs/runtime.md) with real processes: a `specmesh sidecar` and a
`specmesh engine` against real etcd and OpenBao, killed with SIGKILL and started again.

The sidecar's readiness and its registry entry follow its engine's life, the engine is not
ready without its sidecar, and a restarted sidecar learns what the engine serves from the
engine itself (no spec change). Each reaction is polled with the contract's bound.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localfleet.installer import LocalServices
from localfleet.modelserver import ScriptedModelServer
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.spec.models import AgentSpec
from specmesh.store import SpecStore
from specmesh.vault import VaultClient
from tests.conftest import publish_prompt

from .agent_pair import STARTUP, AgentPair, prepare_pair
from .agent_pair import until as _until

pytestmark = pytest.mark.integration

AGENT = "health-helper"
INSTANCE = "health-helper-1"
CONTRACT = 5.0
"""Seconds within which readiness and the registry reflect a process dying or returning."""


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer() as server:
        yield server


@pytest.fixture
async def pair(
    services: LocalServices,
    store: SpecStore,
    vault: VaultClient,
    keys: Keys,
    etcd: EtcdClient,
    model: ScriptedModelServer,
    tmp_path: Path,
) -> AsyncIterator[AgentPair]:
    """A sidecar + engine pair of an agent at revision 2, both started."""
    await publish_prompt(store)
    for description in ("first", "second"):  # revision 2: "the right revision" is not 1
        spec = AgentSpec.model_validate(
            {
                "base": {"description": description, "promptKey": "p"},
                "model": {"model": "scripted", "baseUrl": model.url},
            }
        )
        await store.apply_agent(AGENT, spec, actor="t")
    result = await prepare_pair(
        agent=AGENT,
        instance=INSTANCE,
        services=services,
        store=store,
        vault=vault,
        keys=keys,
        etcd=etcd,
        tmp_path=tmp_path,
    )
    result.start("sidecar")
    result.start("engine")
    try:
        yield result
    finally:
        result.stop_all()


async def _get(http: httpx.AsyncClient, url: str, status: int) -> dict[str, Any] | None:
    r = await http.get(url, timeout=2)
    return dict(r.json()) if r.status_code == status else None


async def _entry(etcd: EtcdClient, keys: Keys, state: str) -> dict[str, Any] | None:
    kv = await etcd.get(keys.registry_instance(AGENT, INSTANCE))
    value = json.loads(kv.value) if kv is not None else None
    return value if value is not None and value["state"] == state else None


async def _serving(pair: AgentPair, http: httpx.AsyncClient, etcd: EtcdClient, keys: Keys) -> None:
    """Both processes up and serving revision 2: sidecar ready, registry ``serving``."""
    ready = await _until(
        pair,
        lambda: _get(http, f"{pair.ops}/readyz", 200),
        within=STARTUP,
        what="sidecar ready",
    )
    assert ready["engine"]["servingRevision"] == 2
    entry = await _until(
        pair, lambda: _entry(etcd, keys, "serving"), within=CONTRACT, what="registry serving"
    )
    assert entry["revision"] == 2


async def test_a_killed_engine_turns_its_sidecar_unready_and_its_entry_engine_down(
    pair: AgentPair, etcd: EtcdClient, keys: Keys
) -> None:
    async with httpx.AsyncClient() as http:
        await _serving(pair, http, etcd, keys)

        pair.kill("engine")
        killed = time.monotonic()

        body = await _until(
            pair,
            lambda: _get(http, f"{pair.ops}/readyz", 503),
            within=CONTRACT,
            what="sidecar readyz 503 after the engine was killed",
        )
        entry = await _until(
            pair,
            lambda: _entry(etcd, keys, "engine-down"),
            within=CONTRACT,
            what="registry engine-down after the engine was killed",
        )
        print(
            f"engine killed -> after {time.monotonic() - killed:.2f} s: sidecar readyz 503 "
            f"{body['missing']}, registry state {entry['state']} revision {entry['revision']}"
        )
        assert body["missing"] == ["engine: not connected (no snapshot stream open)"]
        assert entry["revision"] == 0

        pair.start("engine")

        await _serving(pair, http, etcd, keys)
        answer = await http.post(f"{pair.engine}/v1/invoke", json={"message": "hi"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["revision"] == 2
        print("engine restarted -> sidecar ready, registry serving revision 2, invoke 200")


async def test_an_engine_without_its_sidecar_is_unready_and_reports_to_the_new_one(
    pair: AgentPair, etcd: EtcdClient, keys: Keys
) -> None:
    async with httpx.AsyncClient() as http:
        await _serving(pair, http, etcd, keys)
        assert (await http.get(f"{pair.engine}/readyz")).status_code == 200

        pair.kill("sidecar")
        killed = time.monotonic()

        body = await _until(
            pair,
            lambda: _get(http, f"{pair.engine}/readyz", 503),
            within=CONTRACT,
            what="engine readyz 503 after the sidecar was killed",
        )
        refused = await http.post(f"{pair.engine}/v1/invoke", json={"message": "hi"})
        print(
            f"sidecar killed -> after {time.monotonic() - killed:.2f} s: engine readyz 503 "
            f"{body}, invoke {refused.status_code}"
        )
        assert body["status"] == "not ready"
        assert "sidecar is not connected" in body["reason"]
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "not_ready"

        pair.start("sidecar")

        # the sidecar is up once its registry entry is written; then, without any spec
        # change, the engine's report makes it ready and the entry serving revision 2
        await _until(
            pair,
            lambda: etcd.get(keys.registry_instance(AGENT, INSTANCE)),
            within=STARTUP,
            what="sidecar registered again",
        )
        registered = time.monotonic()
        ready = await _until(
            pair,
            lambda: _get(http, f"{pair.ops}/readyz", 200),
            within=CONTRACT,
            what="sidecar ready after its restart",
        )
        entry = await _until(
            pair,
            lambda: _entry(etcd, keys, "serving"),
            within=CONTRACT,
            what="registry serving after the sidecar's restart",
        )
        engine_ready = await _until(
            pair,
            lambda: _get(http, f"{pair.engine}/readyz", 200),
            within=CONTRACT,
            what="engine ready after the sidecar's restart",
        )
        print(
            f"sidecar restarted -> {time.monotonic() - registered:.2f} s after it registered: "
            f"sidecar engine {ready['engine']}; registry state "
            f"{entry['state']} revision {entry['revision']}; engine readyz {engine_ready}"
        )
        assert ready["engine"]["servingRevision"] == 2
        assert entry["revision"] == 2
        assert engine_ready["revision"] == 2
