"""The local supervisor's own guarantees (real etcd and OpenBao; the engine and sidecar are
small Python processes, so what is tested is the supervisor, not them):

- two instances never share a name: an instance that is still stopping (drain, SIGTERM)
  keeps its name -- its registry key and its engine <-> sidecar socket -- until its
  processes are gone; the new one of that name (delete then re-create, or scale down then
  up) starts after;
- it runs at most ``max_instances`` instances over all agents: a workload that would take
  it past them is refused (409), and nothing of it starts;
- adopting a state file starts, stops and watches only processes it started itself: a
  process named in ``supervisor.json`` that is not one of its instances' is left alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from control_plane.runtime.local import LocalRuntime, RuntimeRefusedError
from localfleet.installer import LocalServices
from specmesh.procs import alive
from specmesh.supervisor import Supervisor, SupervisorConfig
from specmesh.vault import (
    VaultClient,
)
from specmesh.workloads import AgentWorkload
from tests.polling import eventually

from ..conftest import supervisor_token

pytestmark = pytest.mark.integration

RUNS = ("-c", "import time; time.sleep(120)")
"""An engine that runs until it is stopped."""
SLOW_TO_STOP = (
    "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), sys.exit(0)))\n"
    "time.sleep(120)\n",
)
"""A sidecar that takes 1.5 s to stop after SIGTERM (as a draining one does)."""

Factory = Callable[..., Awaitable[Supervisor]]


@pytest.fixture
async def make_supervisor(
    tmp_path: Path, services: LocalServices, vault: VaultClient
) -> AsyncIterator[Factory]:
    token = await supervisor_token(vault)
    started: list[Supervisor] = []

    async def make(**overrides: Any) -> Supervisor:
        config = SupervisorConfig(
            home=tmp_path / "home",
            etcd_endpoint=f"http://{services.etcd.host}:{services.etcd.client_port}",
            etcd_prefix="/supervisor-test",
            vault_addr=services.bao.address,
            vault_token=token,
            mtls=False,
            engine_args=RUNS,
            sidecar_args=SLOW_TO_STOP,
            **overrides,
        )
        sup = Supervisor(config)
        await sup.start()
        started.append(sup)
        return sup

    yield make
    for sup in started:
        if sup._runner is not None and sup._tasks and not sup._tasks[0].done():
            await sup.stop(stop_instances=True)


def _running(sup: Supervisor, name: str) -> bool:
    inst = sup.instances.get(name)
    return inst is not None and all(p.pid and p.alive() for p in (inst.engine, inst.sidecar))


async def test_a_name_is_not_reused_while_its_instance_still_stops(
    make_supervisor: Factory,
) -> None:
    sup = await make_supervisor()
    workload = AgentWorkload(agent="reborn", revision=1, replicas={"stable": 1})
    await sup.apply(workload)
    await eventually(
        lambda: _running(sup, "reborn-stable-0"), what="the instance to run", timeout=20.0
    )
    old = sup.instances["reborn-stable-0"]
    old_processes = [(p.pid, p.cmd) for p in (old.engine, old.sidecar)]

    # deleted and at once applied again (the same goes for scale 1 -> 0 -> 1)
    await sup.remove("reborn")
    await sup.apply(replace(workload, revision=2))

    def old_alive() -> bool:
        return any(alive(pid, cmd) for pid, cmd in old_processes)

    def old_stopped() -> bool:
        # the new instance's processes first, the old ones' after: a new one seen running,
        # then an old one seen alive, ran at the same time (a started process stays up here,
        # a stopped one never comes back); the other order could see the old one die and the
        # new one start in between
        current = sup.instances.get("reborn-stable-0")
        new_runs = (
            current is not None
            and current is not old
            and any(p.pid and p.alive() for p in (current.engine, current.sidecar))
        )
        still_stopping = old_alive()
        assert not (new_runs and still_stopping), (
            "a second reborn-stable-0 runs while the first one still stops"
        )
        return not still_stopping

    await eventually(old_stopped, timeout=20, what="the first reborn-stable-0 to stop")
    await eventually(
        lambda: (
            sup.instances.get("reborn-stable-0") not in (None, old)
            and _running(sup, "reborn-stable-0")
        ),
        what="the new instance of that name to run once the old one stopped",
        timeout=20.0,
    )


async def test_a_workload_past_the_instance_limit_is_refused_and_nothing_starts(
    make_supervisor: Factory,
) -> None:
    sup = await make_supervisor(max_instances=3)
    runtime = LocalRuntime(sup.config.socket)
    try:
        await runtime.apply(AgentWorkload(agent="a", revision=1, replicas={"stable": 2}))
        with pytest.raises(RuntimeRefusedError, match=r"409.*4 instances.*limit is 3"):
            await runtime.apply(
                AgentWorkload(agent="b", revision=1, replicas={"stable": 1, "canary": 1})
            )
        assert {i.agent for i in sup.instances.values()} == {"a"}
        assert "b" not in await runtime.running()
        # within the limit, and scaling an agent counts its own instances once
        await runtime.apply(AgentWorkload(agent="a", revision=2, replicas={"stable": 3}))
        await runtime.apply(AgentWorkload(agent="a", revision=3, replicas={"stable": 1}))
        await runtime.apply(AgentWorkload(agent="b", revision=1, replicas={"stable": 2}))
        assert await runtime.running() == {"a", "b"}
    finally:
        await runtime.close()
    assert (
        SupervisorConfig.from_env(
            {
                "SPECMESH_ETCD_ENDPOINT": "http://127.0.0.1:2379",
                "SPECMESH_VAULT_ADDR": "http://127.0.0.1:8200",
                "SPECMESH_VAULT_TOKEN": "t",
                "SPECMESH_SUPERVISOR_MAX_INSTANCES": "7",
            }
        ).max_instances
        == 7
    )


async def test_adoption_takes_over_its_own_processes_and_leaves_alone_any_other(
    make_supervisor: Factory,
) -> None:
    first = await make_supervisor()
    await first.apply(AgentWorkload(agent="kept", revision=1, replicas={"stable": 1}))
    await eventually(
        lambda: _running(first, "kept-stable-0"), what="the instance to run", timeout=20.0
    )
    kept = {p.role: p.pid for p in (first.instances["kept-stable-0"].engine,
                                    first.instances["kept-stable-0"].sidecar)}  # fmt: skip
    await first.stop(stop_instances=False)  # as a supervisor killed or restarted
    state_file = first.config.state_file
    state = json.loads(state_file.read_text())
    (entry,) = state["instances"]

    # A process of the same user, named in the state file (tampered, or stale with its pid
    # reused) as the engine and sidecar of an instance that was stopping, and as the
    # engine of one running.
    foreign = subprocess.Popen([sys.executable, *RUNS])  # noqa: ASYNC220 -- fork+exec, not a wait
    try:
        named = {"pid": foreign.pid, "cmd": [sys.executable, *RUNS]}
        ghost = {**entry, "agent": "ghost", "phase": "Stopping", "processes": [
            {**p, **named} for p in entry["processes"]]}  # fmt: skip
        squatter = {**entry, "agent": "squatter", "processes": [
            {**p, "pid": foreign.pid} for p in entry["processes"]]}  # fmt: skip
        state["instances"] += [ghost, squatter]
        state_file.write_text(json.dumps(state))

        second = await make_supervisor()

        assert foreign.poll() is None, "the supervisor killed a process it did not start"
        assert "ghost-stable-0" not in second.instances
        assert second.instances["squatter-stable-0"].engine.pid != foreign.pid
        adopted = second.instances["kept-stable-0"]
        assert {p.role: p.pid for p in (adopted.engine, adopted.sidecar)} == kept
        assert adopted.engine.restarts == adopted.sidecar.restarts == 0
        await second.remove("squatter")
        await eventually(
            lambda: "squatter-stable-0" not in second.instances,
            what="squatter to stop",
            timeout=20.0,
        )
        assert foreign.poll() is None
    finally:
        foreign.kill()
        foreign.wait()


async def test_children_get_a_minimal_environment_and_never_the_supervisors_token(
    make_supervisor: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", "sk-of-the-user")  # the supervisor's env
    sup = await make_supervisor()
    await sup.apply(AgentWorkload(agent="plain", revision=1, replicas={"stable": 1}))
    await eventually(
        lambda: _running(sup, "plain-stable-0"), what="the instance to run", timeout=20.0
    )
    inst = sup.instances["plain-stable-0"]

    def environ(pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(e.decode().split("=", 1) for e in raw if e)

    engine, sidecar = environ(inst.engine.pid), environ(inst.sidecar.pid)
    own = sup.config.vault_token
    for env in (engine, sidecar):
        assert own not in env.values()
        assert "SOME_PROVIDER_API_KEY" not in env
    assert not [k for k in engine if "VAULT" in k]
    assert sidecar["SPECMESH_VAULT_TOKEN"] not in ("", own)
    assert engine["HOME"] == str(sup.config.home / "engines" / "plain-stable-0")


async def test_the_engine_card_names_the_sidecars_entry_and_tasks_go_through_its_proxy(
    make_supervisor: Factory,
) -> None:
    issuers = json.dumps([{"issuer": "specmesh", "jwksUri": "http://127.0.0.1:1/jwks",
                           "jwks": None, "audiences": ["{agent}"]}])  # fmt: skip
    password = "vault://secret/specmesh/shared/fleet-redis#password"
    sup = await make_supervisor(
        jwt_issuers=issuers,
        task_store_upstream="redis://127.0.0.1:6390/0",
        task_store_password=password,
    )
    await sup.apply(AgentWorkload(agent="Wired_Up", revision=1, replicas={"stable": 2}))
    await eventually(
        lambda: _running(sup, "wired-up-stable-0") and _running(sup, "wired-up-stable-1"),
        what="both instances to run",
        timeout=20.0,
    )
    first, second = sup.instances["wired-up-stable-0"], sup.instances["wired-up-stable-1"]

    engine, sidecar = _environ(first.engine.pid), _environ(first.sidecar.pid)
    entry, entry_grpc = sidecar["SPECMESH_ENTRY"], sidecar["SPECMESH_ENTRY_GRPC"]
    proxy = sidecar["SPECMESH_TASK_STORE_PROXY"]
    assert engine["SPECMESH_ENGINE_PUBLIC_HTTP_URL"] == f"http://{entry}"
    assert engine["SPECMESH_ENGINE_PUBLIC_GRPC_URL"] == entry_grpc
    assert engine["SPECMESH_TASK_STORE"] == f"redis://{proxy}/0"
    assert (sidecar["SPECMESH_JWT_ISSUERS"], sidecar["SPECMESH_TASK_STORE_PASSWORD"]) == (
        issuers,
        password,
    )
    assert sidecar["SPECMESH_TASK_STORE_UPSTREAM"] == "redis://127.0.0.1:6390/0"
    # the engine gets neither the upstream nor the password reference
    assert not {"SPECMESH_TASK_STORE_UPSTREAM", "SPECMESH_TASK_STORE_PASSWORD"} & set(engine)
    # every listener of both instances has a port of its own
    ports = [*first.ports.values(), *second.ports.values()]
    assert len(set(ports)) == len(ports)
    # what `specmesh status` and `invoke --url` read
    state = json.loads(sup.config.state_file.read_text())
    endpoints = {i["instance"]: i["endpoints"] for i in state["instances"]}
    assert endpoints["wired-up-stable-0"]["entry"] == f"http://{entry}"
    assert endpoints["wired-up-stable-0"]["entryGrpc"] == entry_grpc


async def test_without_a_shared_task_store_the_engine_keeps_tasks_in_memory(
    make_supervisor: Factory,
) -> None:
    sup = await make_supervisor()
    await sup.apply(AgentWorkload(agent="alone", revision=1, replicas={"stable": 1}))
    await eventually(
        lambda: _running(sup, "alone-stable-0"), what="the instance to run", timeout=20.0
    )
    inst = sup.instances["alone-stable-0"]

    engine, sidecar = _environ(inst.engine.pid), _environ(inst.sidecar.pid)

    assert not [k for k in engine if k.startswith("SPECMESH_TASK_STORE")]
    assert not [k for k in sidecar if k.startswith(("SPECMESH_TASK_STORE", "SPECMESH_JWT"))]
    assert sidecar["SPECMESH_ENTRY"].startswith("127.0.0.1:")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if e)
