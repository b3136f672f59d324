"""Egress to partner agents: routing, header match, ejection of a killed instance, retries,
and the target's release policy read from real etcd."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from localfleet.installer import LocalServices
from sidecar.credentials import CredentialResolver
from sidecar.egress import EgressMetrics, EgressProxy
from sidecar.router import (
    EtcdReleaseSource,
    InMemoryInstanceSource,
    InMemoryReleaseSource,
    Instance,
    Router,
)
from sidecar.state import SnapshotHolder
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.secrets import VaultRef
from specmesh.spec.models import AgentSpec, ReleaseSpec
from specmesh.store import SpecStore
from specmesh.vault import VaultClient
from specmesh.watch import PrefixWatcher
from specmeshctl.a2aclient import invoke
from tests.integration.test_engine_server_main import _serving_line, start_scripted_engine
from tests.integration.test_sidecar_egress import (
    Upstream,
    _agent,
    _agent_token,
    _ref,
    _snapshot,
    _spec,
)
from tests.polling import eventually

pytestmark = pytest.mark.integration

PARTNER = "Partner_X"


@dataclass
class A2ARig:
    egress: EgressProxy
    router: Router
    instances: InMemoryInstanceSource
    releases: InMemoryReleaseSource
    registry: CollectorRegistry
    client: aiohttp.ClientSession


@pytest.fixture
async def partners() -> AsyncIterator[dict[str, Upstream]]:
    ups = {name: Upstream() for name in ("a", "b", "canary")}
    for up in ups.values():
        await up.start()
    yield ups
    for up in ups.values():
        await up.stop()


@pytest.fixture
async def a2a_rig(
    services: LocalServices, vault: VaultClient, partners: dict[str, Upstream]
) -> AsyncIterator[A2ARig]:
    agent = _agent()
    await vault.write(VaultRef.parse(_ref(agent, "partner-header")), "partner-hdr-secret")
    await vault.write(VaultRef.parse(_ref(agent, "partner-query")), "partner-qp-secret")
    spec = _spec(
        agent,
        "http://127.0.0.1:9",
        partnerAgents=[
            {
                "agentName": PARTNER,
                "headers": {"X-Partner-Key": _ref(agent, "partner-header")},
                "queryParams": {"tenant": _ref(agent, "partner-query")},
            }
        ],
    )
    token = await _agent_token(vault, agent)
    source = VaultClient(address=services.bao.address, token=token)
    resolver = CredentialResolver(source=source)
    holder = SnapshotHolder()
    await holder.set(_snapshot(agent, spec, {}), etcd_revision=1)
    instances = InMemoryInstanceSource(
        [
            Instance("a", PARTNER, partners["a"].url, "stable"),
            Instance("b", PARTNER, partners["b"].url, "stable"),
            Instance("c", PARTNER, partners["canary"].url, "canary"),
        ]
    )
    releases = InMemoryReleaseSource()
    registry = CollectorRegistry()
    metrics = EgressMetrics(registry)
    router = Router(instances=instances, releases=releases, on_ejection=metrics.on_ejection)
    egress = EgressProxy(snapshots=holder, credentials=resolver, router=router, metrics=metrics)
    await egress.start()
    client = aiohttp.ClientSession()
    yield A2ARig(egress, router, instances, releases, registry, client)
    await client.close()
    await egress.stop()
    await resolver.close()
    await source.close()


async def test_partner_call_routes_with_headers_query_and_header_match(
    a2a_rig: A2ARig, partners: dict[str, Upstream]
) -> None:
    a2a_rig.releases.set(
        PARTNER,
        ReleaseSpec.model_validate(
            {"canaryRevision": 2, "headerMatch": [{"name": "x-canary", "exact": "yes"}]}
        ),
    )
    url = a2a_rig.egress.url + "/a2a/partner-x/v1/message:send?trace=1"

    for _ in range(10):
        async with a2a_rig.client.post(url, json={"q": 1}, headers={"x-canary": "yes"}) as r:
            assert r.status == 200
    for _ in range(10):
        async with a2a_rig.client.post(url, json={"q": 1}) as r:
            assert r.status == 200

    assert len(partners["canary"].seen) == 10
    assert len(partners["a"].seen) + len(partners["b"].seen) == 10
    seen = partners["canary"].seen[0]
    assert seen.path == "/v1/message:send"
    assert seen.query == {"trace": "1", "tenant": "partner-qp-secret"}
    assert seen.headers["X-Partner-Key"] == "partner-hdr-secret"


async def test_killed_instance_is_ejected_traffic_moves_and_it_returns(
    a2a_rig: A2ARig, partners: dict[str, Upstream]
) -> None:
    base_ejection = 1.0
    a2a_rig.instances.remove(PARTNER, "c")
    a2a_rig.releases.set(
        PARTNER,
        ReleaseSpec.model_validate(
            {
                "outlierDetection": {
                    "consecutive5xxErrors": 3,
                    "consecutiveGatewayErrors": 3,
                    "intervalSeconds": 0.05,
                    "baseEjectionTimeSeconds": base_ejection,
                    "maxEjectionPercent": 50,
                },
                "retries": {"attempts": 2, "perTryTimeoutSeconds": 2, "budgetPercent": 50},
            }
        ),
    )
    url = a2a_rig.egress.url + "/a2a/Partner_X/v1/message:send"
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            async with a2a_rig.client.post(url, json={}) as r:
                statuses.append(r.status)
                await r.read()

    workers = [asyncio.create_task(load()) for _ in range(3)]
    try:

        async def both_serving() -> bool:
            return len(partners["a"].seen) >= 5 and len(partners["b"].seen) >= 5

        await eventually(both_serving, timeout=10, what="both instances to serve")
        port_b = partners["b"].port
        await partners["b"].stop()  # killed mid-load
        detector = a2a_rig.router.detector(PARTNER)

        async def b_ejected() -> bool:
            return detector.is_ejected("b")

        await eventually(b_ejected, timeout=10, what="instance b to be ejected")
        retries_before = a2a_rig.registry.get_sample_value(
            "specmesh_sidecar_egress_retries_total", {"agent": "partner-x"}
        )
        served_by_a = len(partners["a"].seen)

        async def a_took_more() -> bool:
            return len(partners["a"].seen) >= served_by_a + 20

        await eventually(a_took_more, timeout=10, what="instance a to take the traffic")
        if detector.is_ejected("b"):
            # while b is out, nothing is tried on it: no retries were needed
            assert (
                a2a_rig.registry.get_sample_value(
                    "specmesh_sidecar_egress_retries_total", {"agent": "partner-x"}
                )
                == retries_before
            )

        revived = Upstream()
        await revived.start(port=port_b)
        partners["revived"] = revived

        async def b_serves_again() -> bool:
            return len(revived.seen) > 0

        await eventually(b_serves_again, timeout=15, what="instance b to return")
    finally:
        stop.set()
        await asyncio.gather(*workers)

    # how long an ejection lasts (base time x ejections) is the detector's, checked with an
    # injected clock in tests/unit/test_sidecar_outlier.py; here: b is ejected and returns
    assert set(statuses) == {200}, "retries to the healthy instance hid the failures"
    ejections = a2a_rig.registry.get_sample_value(
        "specmesh_sidecar_ejections_total", {"agent": "partner-x"}
    )
    assert ejections is not None and ejections >= 1
    requests_total = a2a_rig.registry.get_sample_value(
        "specmesh_sidecar_egress_requests_total", {"kind": "a2a", "status": "200"}
    )
    assert requests_total == len(statuses)


async def test_no_instance_is_a_clear_503(a2a_rig: A2ARig) -> None:
    for name in ("a", "b", "c"):
        a2a_rig.instances.remove(PARTNER, name)

    async with a2a_rig.client.post(a2a_rig.egress.url + "/a2a/partner-x/v1/x") as r:
        status, body = r.status, await r.json()

    assert status == 503
    assert body["error"]["details"][0]["reason"] == "NO_INSTANCE"


async def test_target_release_policy_is_read_from_etcd(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    target = f"target-{uuid.uuid4().hex[:6]}"
    spec = AgentSpec.model_validate(
        {
            "base": {"description": "t", "promptKey": "p"},
            "model": {"model": "m"},
        }
    )
    await store.apply_agent(target, spec, actor="test")
    await store.apply_agent(
        target,
        spec.model_copy(update={"model": spec.model.model_copy(update={"temperature": 0.1})}),
        actor="test",
    )
    watcher = PrefixWatcher(etcd=etcd, prefix=keys.agents())
    source = EtcdReleaseSource(watcher=watcher, keys=keys)
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(source.wait_ready(), 10)
        assert source.release(target) is None

        await store.put_release(
            target, ReleaseSpec(canary_revision=2, canary_weight=30), actor="test"
        )

        async def seen(weight: int) -> bool:
            release: Any = source.release(target)
            return release is not None and release.canary_weight == weight

        await eventually(lambda: seen(30), timeout=10, what="the release to arrive")
        await store.put_release(
            target, ReleaseSpec(canary_revision=2, canary_weight=100), actor="test"
        )
        await eventually(lambda: seen(100), timeout=10, what="the release update to arrive")
        router = Router(
            instances=InMemoryInstanceSource(
                [
                    Instance("s", target, "http://127.0.0.1:1", "stable"),
                    Instance("c", target, "http://127.0.0.1:2", "canary"),
                ]
            ),
            releases=source,
        )
        assert {router.pick(target, {}).instance for _ in range(50)} == {"c"}
    finally:
        watcher.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def engine_partner(a2a_rig: A2ARig) -> AsyncIterator[str]:
    """A real engine process (its A2A server; the scripted runner echoes) as the partner's
    only instance; its card names the egress route as its public way in."""
    public = f"{a2a_rig.egress.url}/a2a/partner-x/"
    env = {
        **os.environ,
        "AGENT_NAME": "partner-x",
        "SPECMESH_ENGINE_PUBLIC_HTTP_URL": public,
        "SPECMESH_ENGINE_DRAIN_SECONDS": "2",
    }
    process = await asyncio.to_thread(start_scripted_engine, env)
    try:
        serving = await asyncio.to_thread(_serving_line, process, time.monotonic() + 30)
        for name in ("a", "b", "c"):  # the recording instances make way for the engine
            a2a_rig.instances.remove(PARTNER, name)
        a2a_rig.instances.add(Instance("engine", PARTNER, str(serving["http"]), "stable"))
        yield public
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)


async def test_a_real_engine_behind_the_egress_answers_the_a2a_client(
    a2a_rig: A2ARig, engine_partner: str
) -> None:
    streamed: list[str] = []

    # the SDK's client reads the card through the egress and sends there (the card's URL)
    result = await asyncio.wait_for(invoke(engine_partner, "hello", on_text=streamed.append), 30)

    assert (result.state, result.text) == ("completed", "echo: hello")
    requests_total = a2a_rig.registry.get_sample_value(
        "specmesh_sidecar_egress_requests_total", {"kind": "a2a", "status": "200"}
    )
    assert requests_total is not None and requests_total >= 2  # the card and the message
