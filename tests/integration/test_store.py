"""The spec store against a real etcd."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from localfleet.installer import LocalServices
from specmesh.errors import ConflictError, NameCollisionError, NotFoundError, SpecError
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.spec.models import AgentSpec
from specmesh.store import SpecStore

pytestmark = pytest.mark.integration


def _spec(temperature: float = 0.5, prompt: str = "helper", **extra: Any) -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "base": {"description": "test agent", "promptKey": prompt},
            "model": {"model": "scripted", "temperature": temperature},
            **extra,
        }
    )


async def _dump(etcd: EtcdClient, keys: Keys) -> dict[str, bytes]:
    result = await etcd.range(keys.prefix + "/", prefix=True)
    return {kv.key: kv.value for kv in result.kvs}


async def test_apply_creates_revision_parts_and_audit(store: SpecStore) -> None:
    result = await store.apply_agent("helper", _spec(), actor="alice")

    assert (result.revision, result.changed) == (1, True)
    record = await store.get_agent("helper")
    assert record.revision == 1 and record.author == "alice"
    assert record.spec["model"]["temperature"] == 0.5
    audit = await store.audit_entries(name="helper")
    assert [(a.action, a.actor, a.revision) for a in audit] == [("apply", "alice", 1)]


async def test_apply_of_same_spec_writes_nothing(store: SpecStore, etcd: EtcdClient) -> None:
    await store.apply_agent("helper", _spec(), actor="alice")
    before = await etcd.revision()

    result = await store.apply_agent("helper", _spec(), actor="alice")

    assert (result.changed, result.revision) == (False, 1)
    assert await etcd.revision() == before


async def test_apply_writes_only_changed_parts(store: SpecStore, etcd: EtcdClient) -> None:
    await store.apply_agent("helper", _spec(0.5), actor="alice")
    base_before = await etcd.get(store.keys.agent_part("helper", "base"))

    result = await store.apply_agent("helper", _spec(0.9), actor="bob")

    base_after = await etcd.get(store.keys.agent_part("helper", "base"))
    model_after = await etcd.get(store.keys.agent_part("helper", "model"))
    assert base_before is not None and base_after is not None and model_after is not None
    assert base_after.mod_revision == base_before.mod_revision
    assert model_after.mod_revision == result.etcd_revision
    assert [c.path for c in result.changes] == ["model.temperature"]


async def test_concurrent_applies_with_same_expected_revision_one_wins(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await store.apply_agent("helper", _spec(0.1), actor="setup")
    other = SpecStore(etcd=EtcdClient(host=etcd.host, port=etcd.port), keys=keys)
    try:
        outcomes = await asyncio.gather(
            *(
                s.apply_agent("helper", _spec(t), actor=f"writer-{t}", expected_revision=1)
                for s, t in [(store, 0.2), (other, 0.3)] * 4
            ),
            return_exceptions=True,
        )
    finally:
        await other.etcd.close()

    wins = [o for o in outcomes if not isinstance(o, BaseException)]
    conflicts = [o for o in outcomes if isinstance(o, ConflictError)]
    assert len(wins) == 1 and len(conflicts) == 7, outcomes
    assert "expected revision 1, current revision is 2" in str(conflicts[0])
    # nothing partial: exactly two revisions, two audit entries, parts equal revision 2
    dump = await _dump(etcd, keys)
    revisions = sorted(k for k in dump if "/revisions/" in k)
    assert len(revisions) == 2
    assert len([k for k in dump if "/audit/" in k]) == 2
    latest = json.loads(dump[revisions[-1]])
    parts = {k.rsplit("/", 1)[1]: json.loads(v) for k, v in dump.items() if "/spec/" in k}
    assert parts == latest["spec"]


async def test_stale_expected_revision_is_refused(store: SpecStore) -> None:
    await store.apply_agent("helper", _spec(0.1), actor="a")
    await store.apply_agent("helper", _spec(0.2), actor="a")

    with pytest.raises(ConflictError) as info:
        await store.apply_agent("helper", _spec(0.3), actor="a", expected_revision=1)

    assert (info.value.expected, info.value.actual) == (1, 2)
    assert (await store.get_agent("helper")).spec["model"]["temperature"] == 0.2


async def test_create_with_expected_zero_conflicts_when_it_exists(store: SpecStore) -> None:
    await store.apply_agent("helper", _spec(), actor="a", expected_revision=0)
    with pytest.raises(ConflictError):
        await store.apply_agent("helper", _spec(0.9), actor="a", expected_revision=0)


async def test_rollback_gives_equal_bundle_as_new_audited_revision(store: SpecStore) -> None:
    for t in (0.1, 0.2, 0.3):
        await store.apply_agent("helper", _spec(t), actor="alice")

    result = await store.rollback("helper", 1, actor="bob")

    assert result.revision == 4
    old, new = await store.get_agent("helper", 1), await store.get_agent("helper")
    assert new.revision == 4 and new.spec == old.spec
    assert (new.action, new.rolled_back_from, new.author) == ("rollback", 1, "bob")
    audit = await store.audit_entries(name="helper")
    assert audit[0].action == "rollback" and audit[0].revision == 4
    assert [c["path"] for c in audit[0].changes] == ["model.temperature"]
    assert [r.revision for r in await store.history("helper")] == [1, 2, 3, 4]
    assert [c.path for c in await store.diff("helper", 3, 4)] == ["model.temperature"]


async def test_names_that_collide_after_mapping_are_refused(store: SpecStore) -> None:
    await store.apply_agent("scheduleX-assistant", _spec(), actor="a")

    with pytest.raises(NameCollisionError) as info:
        await store.apply_agent("schedulex_assistant", _spec(), actor="a")

    assert info.value.resource_name == "schedulex-assistant"


async def test_store_refuses_plaintext_secrets(store: SpecStore) -> None:
    spec = (
        _spec(model_extra=None)
        if False
        else AgentSpec.model_validate(
            {
                "base": {"description": "d", "promptKey": "p"},
                "model": {"model": "m", "apiKey": "sk-plaintext"},
            }
        )
    )
    with pytest.raises(SpecError, match=r"model.apiKey: plaintext secret refused"):
        await store.apply_agent("helper", spec, actor="a")


async def test_missing_agent_and_revision_are_not_found(store: SpecStore) -> None:
    with pytest.raises(NotFoundError):
        await store.get_agent("nobody")
    await store.apply_agent("helper", _spec(), actor="a")
    with pytest.raises(NotFoundError, match="helper@7"):
        await store.get_agent("helper", 7)


async def test_delete_removes_everything_but_the_audit(
    store: SpecStore, etcd: EtcdClient, keys: Keys
) -> None:
    await store.apply_agent("helper", _spec(), actor="a")
    await store.delete_agent("helper", actor="a")

    dump = await _dump(etcd, keys)
    assert [k for k in dump if "/agents/" in k] == []
    assert [a.action for a in await store.audit_entries(name="helper")] == ["delete", "apply"]


def test_one_client_serves_one_event_loop_after_another(services: LocalServices) -> None:
    """A script that runs ``asyncio.run`` more than once (the benchmarks do) can keep one
    client: each loop gets its own HTTP session."""
    client = EtcdClient(host=services.etcd.host, port=services.etcd.client_port)
    key = "/specmesh-test/loops/k"

    async def put(value: str) -> None:
        await client.put(key, value)

    async def get() -> bytes | None:
        kv = await client.get(key)
        return None if kv is None else kv.value

    asyncio.run(put("one"))
    asyncio.run(put("two"))
    assert asyncio.run(get()) == b"two"
    asyncio.run(client.close())
