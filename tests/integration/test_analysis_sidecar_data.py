"""Release analysis reads what the sidecars saw, not what the engines say: two real
instances (`specmesh sidecar` + `specmesh engine` processes; stable on revision 1, canary on
revision 2) against real etcd and OpenBao and the scripted model server. The sidecars count
the turns they relay to their engines by revision and outcome; the control plane reads them
from every instance's ``/metrics`` (its registry entry's ``opsEndpoint``). The trace store
stays empty throughout: no engine's word is used. When the canary's engine dies while its
sidecar lives -- killed, or stopped (SIGSTOP: it accepts connections and never answers) --
its turns fail at the sidecar (``unreachable``, ``timeout``) and the error gate aborts the
release."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.analysis_loop import ANALYSIS_PRINCIPAL, AnalysisLoop
from control_plane.api import ControlPlane
from control_plane.sidecar_metrics import SidecarScraper
from control_plane.traces import InMemoryTraceStore
from localfleet.installer import LocalServices
from localfleet.modelserver import ScriptedModelServer
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.spec.manifest import LoadedManifest, parse_manifest
from specmesh.spec.models import PromptEntry, ReleaseSpec
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.vault import VaultClient
from tests.polling import eventually

from .agent_pair import STARTUP, AgentPair, prepare_pair, until

pytestmark = pytest.mark.integration

AGENT = "measured"
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ANALYSIS = {
    "steps": [{"weight": 10, "minCanaryRequests": 20}],
    "gates": {"maxErrorRateIncrease": 0.05},
    "minSamplePerTrack": 20,
}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer() as server:
        yield server


def _agent(model: ScriptedModelServer, description: str) -> LoadedManifest:
    doc = {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": AGENT},
        "spec": {
            "base": {"description": description, "promptKey": AGENT},
            "model": {"model": "scripted", "baseUrl": model.url, "maxRetries": 0},
        },
    }
    return LoadedManifest("test", parse_manifest(doc, source="test"))


def _inbound(pair: AgentPair) -> str:
    return f"http://{pair.sidecar_env['SPECMESH_INBOUND']}"


async def _turns(http: httpx.AsyncClient, pair: AgentPair, n: int) -> list[int]:
    """``n`` turns at once through the instance's sidecar (its inbound); their statuses."""

    async def one(i: int) -> int:
        r = await http.post(f"{_inbound(pair)}/v1/invoke", json={"message": f"q{i}"}, timeout=60)
        return r.status_code

    return list(await asyncio.gather(*(one(i) for i in range(n))))


HUNG_ENGINE_TIMEOUT = "2"
"""The canary sidecar's ``SPECMESH_ENGINE_TIMEOUT``: how long it waits for a stopped engine."""


async def _serving(pair: AgentPair, http: httpx.AsyncClient, revision: int) -> None:
    async def answered() -> bool:
        r = await http.post(f"{_inbound(pair)}/v1/invoke", json={"message": "hi"}, timeout=30)
        return r.status_code == 200 and r.json().get("revision") == revision

    await until(pair, answered, within=STARTUP, what=f"revision {revision} served")


async def _outcome_count(pair: AgentPair, outcome: str) -> float:
    """The instance's ``/metrics`` count of turns of revision 2 with ``outcome``."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{pair.ops}/metrics", timeout=10)).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "specmesh_sidecar_engine_requests_total"
        and s.labels == {"revision": "2", "kind": "message", "outcome": outcome}
    )


@pytest.mark.parametrize("failure", ["killed", "stopped"])
async def test_the_analysis_judges_the_sidecars_counts_and_aborts_a_canary_whose_engine_failed(
    failure: str,
    services: LocalServices,
    store: SpecStore,
    vault: VaultClient,
    keys: Keys,
    etcd: EtcdClient,
    model: ScriptedModelServer,
    tmp_path: Path,
) -> None:
    await store.put_prompt_version(
        PromptEntry(prompt_key=AGENT, version="1.0.0", template="You answer."), actor="pat"
    )
    service = SpecService(store=store, vault=vault)
    assert (await service.apply(_agent(model, "first"), actor="alice")).revision == 1
    assert (await service.apply(_agent(model, "second"), actor="alice")).revision == 2
    release = {"stableRevision": 1, "canaryRevision": 2, "analysis": ANALYSIS}
    await store.put_release(AGENT, ReleaseSpec.model_validate(release), actor="alice")
    pairs: dict[str, AgentPair] = {}
    for track in ("stable", "canary"):
        (tmp_path / track).mkdir()
        pairs[track] = await prepare_pair(
            agent=AGENT,
            instance=f"{AGENT}-{track}-0",
            services=services,
            store=store,
            vault=vault,
            keys=keys,
            etcd=etcd,
            tmp_path=tmp_path / track,
        )
        pairs[track].sidecar_env["SPECMESH_TRACK"] = track
    pairs["canary"].sidecar_env["SPECMESH_ENGINE_TIMEOUT"] = HUNG_ENGINE_TIMEOUT
    stable, canary = pairs["stable"], pairs["canary"]
    for pair in pairs.values():
        pair.start("sidecar")
        pair.start("engine")
    try:
        async with httpx.AsyncClient() as http:
            await _serving(stable, http, 1)
            await _serving(canary, http, 2)

            async def registered() -> list[dict[str, Any]] | None:
                entries = await store.list_instances(AGENT)
                with_ops = [e for e in entries if e.get("opsEndpoint")]
                return with_ops if len(with_ops) == 2 else None

            entries = await eventually(registered, timeout=STARTUP, what="both instances")
            assert {e["opsEndpoint"] for e in entries} == {stable.ops, canary.ops}

            clock = Clock()
            traces = InMemoryTraceStore()  # no engine's spans at all
            cp = ControlPlane(store=store, vault=vault)
            loop = AnalysisLoop(
                control_plane=cp,
                turns=traces,
                requests=SidecarScraper(store=store),
                clock=clock,
            )
            state = await loop.analyse(AGENT)
            assert state is not None and state["phase"] == "running"
            assert set(state["window"]["instances"]) == {f"{AGENT}-stable-0", f"{AGENT}-canary-0"}
            shown = await cp.release_analysis(ANALYSIS_PRINCIPAL, AGENT)
            assert shown is not None and "window" not in shown  # bookkeeping, not shown

            assert await _turns(http, stable, 10) == [200] * 10
            assert await _turns(http, canary, 10) == [200] * 10
            clock.now = T0 + timedelta(seconds=10)
            state = await loop.analyse(AGENT)
            assert state is not None and state["phase"] == "running"  # 10 of 20 canary turns
            figures = state["timeline"][-1]["figures"]
            # what the sidecars counted since the step began, by revision (the turns made
            # before it, to see each instance serve, are not in the window)
            assert (figures["stable"]["requests"], figures["stable"]["errors"]) == (10, 0)
            assert (figures["canary"]["requests"], figures["canary"]["errors"]) == (10, 0)
            assert figures["canary"]["p95Seconds"] is not None

            # its sidecar lives on, and still takes calls
            outcome = "unreachable" if failure == "killed" else "timeout"
            before = await _outcome_count(canary, outcome)  # calls while it was starting
            if failure == "killed":
                canary.kill("engine")
            else:
                canary.procs["engine"].send_signal(signal.SIGSTOP)
            assert await _turns(http, canary, 12) == [502] * 12  # ENGINE_UNREACHABLE
            assert await _turns(http, stable, 12) == [200] * 12
            clock.now = T0 + timedelta(seconds=20)
            state = await loop.analyse(AGENT)

        assert state is not None and state["phase"] == "aborted", state
        after = await store.get_release(AGENT)
        assert after is not None
        assert (after.stable_revision, after.canary_revision, after.canary_weight) == (1, None, 0)
        (entry,) = [
            e
            for e in await store.audit_entries(name=AGENT, kind="Release")
            if e.action == "release.auto-abort"
        ]
        assert entry.details is not None
        assert (entry.details["canary"]["requests"], entry.details["canary"]["errors"]) == (22, 12)
        assert (entry.details["stable"]["requests"], entry.details["stable"]["errors"]) == (22, 0)
        assert entry.details["gates"][0]["gate"] == "errorRate"
        assert entry.details["gates"][0]["failed"] is True
        assert await _outcome_count(canary, outcome) == before + 12
    finally:
        for pair in pairs.values():
            pair.stop_all()
