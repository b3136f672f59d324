"""The mesh publisher re-publishes on every change and removes a deleted agent's objects
(real etcd; YAML sink; every object validated against the Istio CRD schemas)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from control_plane.istio import CRDS_PATH
from control_plane.mesh import IstioValidator, MeshSettings
from control_plane.publisher import MeshPublisher, YamlMeshSink
from specmesh.spec.models import AgentSpec, ReleaseSpec
from specmesh.store import SpecStore

pytestmark = pytest.mark.integration


def _spec(
    partners: list[str], t: float = 0.5, callers: dict[str, list[str]] | None = None
) -> AgentSpec:
    base: dict[str, object] = {"description": "d", "promptKey": "p"}
    if callers is not None:
        base["callers"] = callers
    return AgentSpec.model_validate(
        {
            "base": base,
            "model": {"model": "m", "temperature": t},
            "partnerAgents": [{"agentName": p} for p in partners],
        }
    )


async def _until(publisher: MeshPublisher, check: Callable[[], bool], timeout: float = 20) -> None:
    """Wait, publish by publish, until ``check`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            publisher.changed.clear()
            if check():
                return
            await publisher.changed.wait()


async def test_publishes_on_change_and_removes_deleted_agents(
    store: SpecStore, tmp_path: Path
) -> None:
    await store.apply_agent("front", _spec(["back"]), actor="t")
    await store.apply_agent("back", _spec([]), actor="t")
    validator = IstioValidator(CRDS_PATH)
    publisher = MeshPublisher(
        store=store,
        sink=YamlMeshSink(tmp_path),
        settings=MeshSettings(namespace="ns"),
        validator=validator,
        coalesce_seconds=0.05,
    )
    task = asyncio.create_task(publisher.run())
    try:
        vs = tmp_path / "virtualservice-back.yaml"
        await _until(publisher, vs.exists)
        ap = yaml.safe_load((tmp_path / "authorizationpolicy-back.yaml").read_text())
        assert ap["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
            "cluster.local/ns/ns/sa/specmesh-agent-front"
        ]

        await store.apply_agent("back", _spec([], 0.9), actor="t")
        await store.put_release(
            "back", ReleaseSpec(stable_revision=1, canary_revision=2, canary_weight=25), actor="t"
        )

        def split() -> list[int]:
            doc = yaml.safe_load(vs.read_text())
            return [d.get("weight", 0) for d in doc["spec"]["http"][-1]["route"]]

        await _until(publisher, lambda: split() == [75, 25])

        await store.delete_agent("front", actor="t")
        await _until(publisher, lambda: not (tmp_path / "virtualservice-front.yaml").exists())
        ap = yaml.safe_load((tmp_path / "authorizationpolicy-back.yaml").read_text())
        # nobody lists back as a partner any more: only its card stays readable
        assert [r for r in ap["spec"]["rules"] if "from" in r] == []
        assert publisher.failures == 0 and publisher.publishes >= 3
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_publishes_the_callers_of_each_agent_spec(store: SpecStore, tmp_path: Path) -> None:
    await store.apply_agent("front", _spec(["back"]), actor="t")
    await store.apply_agent(
        "back", _spec([], callers={"agents": [], "principals": ["specmesh/alice"]}), actor="t"
    )
    publisher = MeshPublisher(
        store=store,
        sink=YamlMeshSink(tmp_path),
        settings=MeshSettings(namespace="ns"),
        validator=IstioValidator(CRDS_PATH),
        coalesce_seconds=0.05,
    )
    path = tmp_path / "authorizationpolicy-back.yaml"

    def sources() -> list[dict[str, list[str]]]:
        if not path.exists():
            return []
        ap = yaml.safe_load(path.read_text())
        return [f["source"] for r in ap["spec"]["rules"] for f in r.get("from", [])]

    task = asyncio.create_task(publisher.run())
    try:
        # front lists back, but back's callers.agents is []: only the request principal
        await _until(publisher, lambda: sources() == [{"requestPrincipals": ["specmesh/alice"]}])
        await store.apply_agent("back", _spec([], callers={"agents": ["front"]}), actor="t")
        await _until(
            publisher,
            lambda: sources() == [{"principals": ["cluster.local/ns/ns/sa/specmesh-agent-front"]}],
        )
        assert publisher.failures == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
