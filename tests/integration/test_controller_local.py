"""The controller and the local supervisor together (real etcd, OpenBao, sidecar
processes), with an engine that exits at start: the instance crash-loops with a growing
back-off, its status says ``CrashLoop`` and ``specmesh get agents`` shows it; deleting the
agent stops its processes. (The whole fleet, with real engines, is tests/e2e/test_controller.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from control_plane.auth import Role
from control_plane.controller import Controller
from control_plane.runtime.local import (
    LocalRuntime,
    RuntimeRefusedError,
    RuntimeUnavailableError,
)
from localfleet.installer import LocalServices
from specmesh.procs import alive
from specmesh.spec.manifest import LoadedManifest, parse_manifest
from specmesh.spec.models import AgentManifest
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.supervisor import Supervisor, SupervisorConfig
from specmesh.vault import (
    VaultClient,
)
from specmesh.workloads import AgentWorkload
from specmeshctl.main import main as cli
from tests.polling import eventually

from ..conftest import publish_prompt, supervisor_token
from .cp_process import ControlPlaneProcess

pytestmark = pytest.mark.integration

EXITS_AT_START = ("-c", "import sys; sys.stderr.write('engine: cannot start\\n'); sys.exit(3)")


def _agent(name: str, **deployment: Any) -> LoadedManifest:
    doc = {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "base": {"description": "d", "promptKey": "p"},
            "model": {"model": "m", "baseUrl": "http://127.0.0.1:9/v1"},
            "deployment": deployment,
        },
    }
    return LoadedManifest("test", parse_manifest(doc, source="test"))


@pytest.fixture
async def supervisor(
    tmp_path: Path, services: LocalServices, vault: VaultClient, store: SpecStore
) -> AsyncIterator[Supervisor]:
    token = await supervisor_token(vault)
    config = SupervisorConfig(
        home=tmp_path / "home",
        etcd_endpoint=f"http://{services.etcd.host}:{services.etcd.client_port}",
        etcd_prefix=store.keys.prefix,
        vault_addr=services.bao.address,
        vault_token=token,
        mtls=False,
        engine_args=EXITS_AT_START,
    )
    sup = Supervisor(config)
    await sup.start()
    yield sup
    await sup.stop(stop_instances=True)


@pytest.fixture
async def controller(
    supervisor: Supervisor, store: SpecStore
) -> AsyncIterator[tuple[Controller, LocalRuntime]]:
    runtime = LocalRuntime(supervisor.config.socket)
    ctl = Controller(store=store, runtime=runtime, resync_seconds=5, observe_seconds=0.3)
    task = asyncio.create_task(ctl.run())
    yield ctl, runtime
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await runtime.close()


async def test_an_engine_that_exits_at_start_crash_loops_with_back_off_and_shows_it(
    store: SpecStore,
    vault: VaultClient,
    supervisor: Supervisor,
    controller: tuple[Controller, LocalRuntime],
    services: LocalServices,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    await publish_prompt(store)
    specs = SpecService(store=store, vault=vault)
    await specs.apply(_agent("crashy"), actor="test")

    async def crash_looping() -> dict[str, Any] | None:
        status = await store.get_status("crashy")
        return status if status and status["phase"] == "CrashLoop" else None

    status = await eventually(crash_looping, what="the status to say CrashLoop", timeout=30.0)
    (instance,) = status["instances"]
    assert instance["instance"] == "crashy-stable-0" and instance["phase"] == "CrashLoop"
    assert "engine exited with code 3" in status["lastError"]
    assert status["ready"] == "0/1"

    # the back-off grows: over 8 more seconds a process exiting at once is started only a
    # few times (without back-off, at the supervisor's 0.2 s tick, it would be ~40)
    first = supervisor.instances["crashy-stable-0"].engine.restarts
    await asyncio.sleep(8)
    assert supervisor.instances["crashy-stable-0"].engine.restarts - first <= 4
    assert supervisor.instances["crashy-stable-0"].engine.backoff() >= 4

    # `specmesh get agents`, through a control plane on the same store
    process = ControlPlaneProcess(
        services, tmp_path, tokens={"tok-viewer": ("viewer", [Role.VIEWER])},
        prefix=store.keys.prefix,
    )  # fmt: skip
    await asyncio.to_thread(process.start)
    try:
        for name in list(os.environ):
            if name.startswith("SPECMESH_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("SPECMESH_HOME", str(tmp_path / "cli-home"))
        monkeypatch.setenv("SPECMESH_SERVER", process.grpc)
        monkeypatch.setenv("SPECMESH_TOKEN", "tok-viewer")
        assert await asyncio.to_thread(cli, ["get", "agents"]) == 0
    finally:
        process.stop()
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["NAME", "READY", "STATUS"]
    assert out[1].split()[:3] == ["crashy", "0/1", "CrashLoop"]

    # deleted: its processes stop, its status goes
    pids = [(p.pid, p.cmd) for p in (supervisor.instances["crashy-stable-0"].sidecar,)]
    await store.delete_agent("crashy", actor="test")
    await eventually(
        lambda: _gone(supervisor, pids), what="the deleted agent's processes to stop", timeout=15
    )
    assert await eventually(_no_status(store, "crashy"), what="its status to go", timeout=10)


async def _gone(supervisor: Supervisor, pids: list[tuple[int, list[str]]]) -> bool:
    return "crashy-stable-0" not in supervisor.instances and not any(
        alive(pid, cmd) for pid, cmd in pids
    )


def _no_status(store: SpecStore, name: str) -> Any:
    async def check() -> bool:
        return await store.get_status(name) is None

    return check


async def test_the_runtime_refuses_a_bad_workload_and_names_what_is_wrong(
    supervisor: Supervisor,
) -> None:
    runtime = LocalRuntime(supervisor.config.socket)
    try:
        bad = AgentWorkload(agent="x", revision=1, replicas={"blue": 1})
        with pytest.raises(RuntimeRefusedError, match="unknown track"):
            await runtime.apply(bad)
        assert await runtime.running() == set()
    finally:
        await runtime.close()
    gone = LocalRuntime(supervisor.config.socket.with_name("nothing.sock"))
    try:
        with pytest.raises(RuntimeUnavailableError, match="supervisor at"):
            await gone.running()
    finally:
        await gone.close()


def test_the_supervisor_refuses_to_start_without_its_settings() -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "specmeshctl", "supervisor"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "SPECMESH_ETCD_ENDPOINT" in result.stderr and "SPECMESH_VAULT_TOKEN" in result.stderr


async def test_an_empty_store_prunes_nothing(store: SpecStore, supervisor: Supervisor) -> None:
    """A controller whose store holds no agent (pointed at the wrong etcd or prefix) leaves
    what the runtime runs alone; with one agent stored, the others are pruned."""
    runtime = LocalRuntime(supervisor.config.socket)
    try:
        await runtime.apply(AgentWorkload(agent="orphan", revision=1, replicas={"stable": 0}))
        controller = Controller(store=store, runtime=runtime)
        await controller.resync()
        assert await runtime.running() == {"orphan"}

        await publish_prompt(store)
        manifest = _agent("kept").manifest
        assert isinstance(manifest, AgentManifest)
        await store.apply_agent("kept", manifest.spec, actor="test")
        await controller.resync()
        assert await runtime.running() == {"kept"}
    finally:
        await runtime.close()
