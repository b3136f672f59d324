"""One agent instance as two real processes -- `specmesh sidecar` and `specmesh engine` --
against real etcd and OpenBao, for the tests that need the whole data path (the health
contract, what the model server receives after a rollback)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from localfleet.installer import LocalServices
from sidecar.mtls import setup_pki
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.ports import free_port
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.vault import VaultClient, agent_policy_name
from tests.conftest import REPO
from tests.polling import eventually

__all__ = ["STARTUP", "AgentPair", "prepare_pair", "until"]

T = TypeVar("T")

STARTUP = 90.0
"""Seconds a process may take to start (imports, Vault login) on a loaded machine."""


@dataclass
class AgentPair:
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


async def prepare_pair(
    *,
    agent: str,
    instance: str,
    services: LocalServices,
    store: SpecStore,
    vault: VaultClient,
    keys: Keys,
    etcd: EtcdClient,
    tmp_path: Path,
) -> AgentPair:
    """The pair of an applied agent, with its own Vault identity (not started)."""
    await setup_pki(address=services.bao.address, token=services.bao.root_token)
    await SpecService(store=store, vault=vault, pki_mount="specmesh-pki").write_identity(agent)
    token, _ = await vault.create_identity_token(
        policies=[agent_policy_name(agent)], period="1h", display_name=agent
    )
    ports = {k: free_port() for k in ("egress", "inbound", "ops", "http", "grpc", "redis")}
    common = {
        "agent_NAME": agent,
        "SPECMESH_SYNC_ADDR": f"unix:{tmp_path}/sync.sock",
        "SPECMESH_EGRESS_URL": f"http://127.0.0.1:{ports['egress']}",
        "SPECMESH_ENGINE_HTTP": f"127.0.0.1:{ports['http']}",
        "SPECMESH_ENGINE_GRPC": f"127.0.0.1:{ports['grpc']}",
        "SPECMESH_REDIS_PROXY": f"127.0.0.1:{ports['redis']}",
        "SPECMESH_LOG_LEVEL": "INFO",
    }
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("SPECMESH_", "VAULT_", "agent"))
    }
    (tmp_path / "engine-home").mkdir()
    return AgentPair(
        sidecar_env={
            **base,
            **common,
            "SPECMESH_instance_ID": instance,
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


async def until(
    pair: AgentPair, check: Callable[[], Awaitable[T | None]], *, within: float, what: str
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
