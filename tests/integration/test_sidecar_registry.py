"""The Agent Registry against real etcd: leases, keep-alive, expiry, re-registration."""

from __future__ import annotations

import asyncio
import json

import pytest

from localfleet.installer import EtcdProcess
from sidecar.ops import SidecarMetrics
from sidecar.registry import Instance, InstanceRegistration, RegistryView
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.ports import free_port
from tests.polling import eventually

pytestmark = pytest.mark.integration


def _instance(name: str, agent: str = "Reg_Agent", track: str = "stable") -> Instance:
    return Instance(
        instance=name,
        agent=agent,
        endpoint=f"https://127.0.0.1:{free_port()}",
        track=track,
        revision=1,
        state="starting",
        started_at="2026-11-01T00:00:00+00:00",
    )


async def test_entry_is_held_under_a_lease_and_removed_on_deregister(
    etcd: EtcdClient, keys: Keys
) -> None:
    metrics = SidecarMetrics()
    reg = InstanceRegistration(etcd=etcd, keys=keys, instance=_instance("i-1"), metrics=metrics)
    await reg.start()
    await asyncio.wait_for(reg.wait_registered(), 20)
    kv = await etcd.get(keys.registry_instance("Reg_Agent", "i-1"))
    assert kv is not None and kv.lease != 0 and kv.lease == reg.lease_id
    assert kv.key == f"{keys.prefix}/registry/reg-agent/i-1"
    value = json.loads(kv.value)
    assert value == {
        "instance": "i-1",
        "agent": "Reg_Agent",
        "endpoint": reg.instance.endpoint,
        "track": "stable",
        "revision": 1,
        "state": "starting",
        "startedAt": "2026-11-01T00:00:00+00:00",
    }

    # the served revision changes: written at once under the same lease
    reg.update(revision=2, state="serving")

    async def updated() -> bool:
        kv = await etcd.get(reg.key)
        return kv is not None and json.loads(kv.value)["revision"] == 2

    await eventually(updated, what="revision 2 in the registry", timeout=20)
    kv = await etcd.get(reg.key)
    assert kv is not None and kv.lease == reg.lease_id
    assert json.loads(kv.value)["state"] == "serving"

    await reg.stop()
    assert await etcd.get(reg.key) is None
    assert not reg.registered


async def test_entry_expires_after_ttl_when_keepalive_stops(etcd: EtcdClient, keys: Keys) -> None:
    reg = InstanceRegistration(etcd=etcd, keys=keys, instance=_instance("i-2"), ttl=2)
    await reg.start()
    await asyncio.wait_for(reg.wait_registered(), 20)
    # keep-alive keeps it past several TTLs
    lease = reg.lease_id
    assert lease is not None
    loop = asyncio.get_running_loop()
    until = loop.time() + 5
    while loop.time() < until:
        assert await etcd.get(reg.key) is not None
        await asyncio.sleep(0.25)

    task = reg.keepalive_task
    assert task is not None
    task.cancel()

    async def gone() -> bool:
        return await etcd.get(reg.key) is None

    await eventually(gone, timeout=15, what="the entry to expire")
    await reg.stop()  # revoking an expired lease is harmless


async def test_expired_lease_is_granted_again_and_the_entry_rewritten(
    etcd: EtcdClient, keys: Keys
) -> None:
    metrics = SidecarMetrics()
    reg = InstanceRegistration(
        etcd=etcd, keys=keys, instance=_instance("i-3"), ttl=3, metrics=metrics
    )
    await reg.start()
    await asyncio.wait_for(reg.wait_registered(), 20)
    first = reg.lease_id
    assert first is not None
    # the lease ends behind the sidecar's back (as when etcd was away longer than the TTL)
    await etcd.lease_revoke(first)
    assert await etcd.get(reg.key) is None

    async def back() -> bool:
        # the key is visible to another client a moment before the put returns to `reg`
        kv = await etcd.get(reg.key)
        return kv is not None and kv.lease not in (0, first) and reg.registered

    await eventually(back, timeout=15, what="re-registration under a new lease")
    assert reg.registered and reg.lease_id != first
    await reg.stop()
    assert await etcd.get(reg.key) is None


async def test_registration_survives_an_etcd_restart(own_etcd: EtcdProcess) -> None:
    keys = Keys(prefix="/reg")
    etcd = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    reader = EtcdClient(host=own_etcd.host, port=own_etcd.client_port, timeout=2)
    metrics = SidecarMetrics()
    reg = InstanceRegistration(
        etcd=etcd, keys=keys, instance=_instance("i-4"), ttl=2, metrics=metrics
    )
    await reg.start()
    try:
        await asyncio.wait_for(reg.wait_registered(), 20)
        await asyncio.to_thread(own_etcd.stop)
        await eventually(
            lambda: (
                (
                    metrics.registry.get_sample_value(
                        "specmesh_sidecar_registry_keepalive_failures_total"
                    )
                    or 0
                )
                >= 1
            ),
            what="a failed keep-alive",
            timeout=20,
        )
        reg.update(state="serving")  # made while etcd is away
        await asyncio.to_thread(own_etcd.start)

        async def serving_under_live_lease() -> bool:
            kv = await reader.get(reg.key)
            return (
                kv is not None
                and json.loads(kv.value)["state"] == "serving"
                and reg.lease_id is not None
                and kv.lease == reg.lease_id
            )

        await eventually(serving_under_live_lease, timeout=30, what="the entry back after restart")
        # and it stays: the keep-alive works against the restarted etcd
        loop = asyncio.get_running_loop()
        until = loop.time() + 3
        while loop.time() < until:
            assert await reader.get(reg.key) is not None
            await asyncio.sleep(0.25)
    finally:
        await reg.stop()
        await etcd.close()
        await reader.close()


async def test_registry_view_sees_instances_come_and_go(etcd: EtcdClient, keys: Keys) -> None:
    view = RegistryView(etcd=etcd, keys=keys)
    await view.start()
    await asyncio.wait_for(view.wait_synced(), 20)
    assert view.instances("Reg_Agent") == []
    changes: list[int] = []
    view.add_listener(lambda: changes.append(view.version))

    a = InstanceRegistration(etcd=etcd, keys=keys, instance=_instance("a"))
    b = InstanceRegistration(etcd=etcd, keys=keys, instance=_instance("b", track="canary"))
    other = InstanceRegistration(etcd=etcd, keys=keys, instance=_instance("x", agent="other"))
    for reg in (a, b, other):
        await reg.start()
    try:
        await eventually(
            lambda: len(view.instances("Reg_Agent")) == 2, what="two instances", timeout=20
        )
        got = view.instances("reg-agent")  # resource name works too
        assert [(i.instance, i.track) for i in got] == [("a", "stable"), ("b", "canary")]
        assert [i.instance for i in view.instances("other")] == ["x"]
        assert changes

        version = view.version
        b.update(revision=5)
        await asyncio.wait_for(view.wait_changed(version), 20)
        await eventually(
            lambda: [i.revision for i in view.instances("Reg_Agent")] == [1, 5],
            what="b at revision 5",
            timeout=20,
        )

        await a.stop()
        await eventually(
            lambda: [i.instance for i in view.instances("Reg_Agent")] == ["b"],
            what="a gone",
            timeout=20,
        )
    finally:
        for reg in (a, b, other):
            await reg.stop()
        await eventually(lambda: view.instances("Reg_Agent") == [], what="all gone", timeout=20)
        await view.stop()
