"""The health contract (docs/runtime.md) with real processes: a `specmesh sidecar` and a
`specmesh engine` against real etcd and OpenBao, killed with SIGKILL and started again.

The sidecar's readiness and its registry entry follow its engine's life, the engine is not
ready without its sidecar, and a restarted sidecar learns what the engine serves from the
engine itself (no spec change). Each reaction is polled with the contract's bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from localfleet.installer import LocalServices
from localfleet.modelserver import ScriptedModelServer
from sidecar.mtls import setup_pki
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.ports import free_port
from specmesh.spec.models import AgentSpec
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.vault import VaultClient, agent_policy_name
from tests.conftest import REPO, publish_prompt
from tests.polling import eventually

pytestmark = pytest.mark.integration

AGENT = "health-helper"
INSTANCE = "health-helper-1"
CONTRACT = 5.0
"""Seconds within which readiness and the registry reflect a process dying or returning."""
STARTUP = 90.0
"""Seconds a process may take to start (imports, Vault login) on a loaded machine."""

T = TypeVar("T")


@dataclass
class _Pair:
    """One agent instance as two real processes, each started, killed and restarted."""

    sidecar_env: dict[str, str]
    engine_env: dict[str, str]
    logs: Path
    ops: str
    engine: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, role: str) -> None:
        env = self.sidecar_env if role == "sidecar" else self.engine_env
        with (self.logs / f"{role}.log").open("ab") as out:
            self.procs[role] = subprocess.Popen(
                [sys.executable, "-m", "specmeshctl", role],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self, role: str) -> None:
        """SIGKILL: no shutdown code runs, as when the process crashes."""
        proc = self.procs.pop(role)
        proc.kill()
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for role in list(self.procs):
            self.kill(role)

    def log(self, role: str) -> str:
        path = self.logs / f"{role}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def check_alive(self) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"the {role} exited ({proc.returncode}):\n{self.log(role)}")


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
) -> AsyncIterator[_Pair]:
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
    await setup_pki(address=services.bao.address, token=services.bao.root_token)
    await SpecService(store=store, vault=vault, pki_mount="specmesh-pki").write_identity(AGENT)
    token, _ = await vault.create_identity_token(
        policies=[agent_policy_name(AGENT)], period="1h", display_name=AGENT
    )
    ports = {k: free_port() for k in ("egress", "inbound", "ops", "http", "grpc", "redis")}
    common = {
        "AGENT_NAME": AGENT,
        "SPECMESH_SYNC_ADDR": f"unix:{tmp_path}/sync.sock",
        "SPECMESH_EGRESS_URL": f"http://127.0.0.1:{ports['egress']}",
        "SPECMESH_ENGINE_HTTP": f"127.0.0.1:{ports['http']}",
        "SPECMESH_ENGINE_GRPC": f"127.0.0.1:{ports['grpc']}",
        "SPECMESH_REDIS_PROXY": f"127.0.0.1:{ports['redis']}",
        "SPECMESH_LOG_LEVEL": "INFO",
    }
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("SPECMESH_", "VAULT_", "AGENT"))
    }
    (tmp_path / "engine-home").mkdir()
    result = _Pair(
        sidecar_env={
            **base,
            **common,
            "SPECMESH_INSTANCE_ID": INSTANCE,
            "SPECMESH_INBOUND": f"127.0.0.1:{ports['inbound']}",
            "SPECMESH_OPS": f"127.0.0.1:{ports['ops']}",
            "SPECMESH_HOME": str(tmp_path / "sidecar-home"),
            "SPECMESH_ETCD_ENDPOINT": etcd.endpoint,
            "SPECMESH_ETCD_PREFIX": keys.prefix,
            "SPECMESH_VAULT_ADDR": services.bao.address,
            "SPECMESH_VAULT_TOKEN": token,
            "SPECMESH_MTLS": "false",
        },
        engine_env={
            **base,
            **common,
            "HOME": str(tmp_path / "engine-home"),
            "SPECMESH_DATA_DIR": str(tmp_path / "engine-data"),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        },
        logs=tmp_path,
        ops=f"http://127.0.0.1:{ports['ops']}",
        engine=f"http://127.0.0.1:{ports['http']}",
    )
    result.start("sidecar")
    result.start("engine")
    try:
        yield result
    finally:
        result.stop_all()


async def _until(
    pair: _Pair, check: Callable[[], Awaitable[T | None]], *, within: float, what: str
) -> T:
    """``check()``'s first truthy answer, polled until ``within`` seconds have passed."""
    last: Any = None

    async def answer() -> T | None:
        nonlocal last
        pair.check_alive()
        try:
            last = await check()
        except httpx.TransportError as e:
            last = e
            return None
        return last

    try:
        return await eventually(answer, timeout=within, what=what)
    except AssertionError as e:
        raise AssertionError(
            f"{e} (last: {last!r})\n"
            f"sidecar log:\n{pair.log('sidecar')}\nengine log:\n{pair.log('engine')}"
        ) from None


async def _get(http: httpx.AsyncClient, url: str, status: int) -> dict[str, Any] | None:
    r = await http.get(url, timeout=2)
    return dict(r.json()) if r.status_code == status else None


async def _entry(etcd: EtcdClient, keys: Keys, state: str) -> dict[str, Any] | None:
    kv = await etcd.get(keys.registry_instance(AGENT, INSTANCE))
    value = json.loads(kv.value) if kv is not None else None
    return value if value is not None and value["state"] == state else None


async def _serving(pair: _Pair, http: httpx.AsyncClient, etcd: EtcdClient, keys: Keys) -> None:
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
    pair: _Pair, etcd: EtcdClient, keys: Keys
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
    pair: _Pair, etcd: EtcdClient, keys: Keys
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
