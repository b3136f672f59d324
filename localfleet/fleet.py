"""The local fleet (``specmesh up``): every part of specmesh as its own process.

``up`` starts, in order: etcd and OpenBao (:mod:`localfleet.installer`, with Vault PKI for
the agents' mTLS), Redis (the agents' shared memory store), the scripted model server
(unless an LLM provider is configured), the MCP servers the examples use (the project's
``nacos-mcp-tools`` and the third-party ``mcp-server-time`` behind ``specmesh mcp-bridge``)
the supervisor (:mod:`specmesh.supervisor`, the kubelet of this machine) and the control
plane, whose controller hands every stored agent to the supervisor. Into an empty store
(or with ``reset``) it applies the examples through the control plane's API -- they are
ordinary applied specs -- and a store that already holds specs is left as the operator
left it. It returns once every stored agent's instances are ready; the processes run on,
and an agent applied later is started by the controller and the supervisor alone.
``down`` stops the supervisor (which drains and stops its instances), then exactly the
processes recorded in ``<home>/fleet.json`` (checking each one's command line first), then
etcd and OpenBao.

Specs name the fleet's services by stable addresses (:data:`SERVICE_HOSTS`:
``redis://fleet-redis:6379/0``, ``http://nacos-mcp-tools/mcp``); the ports they listen on
change at every start and reach the sidecars and the control plane only as
``SPECMESH_SERVICE_ADDRESSES`` (:mod:`specmesh.addresses`), never a spec.

Each process holds its own Vault identity: the control plane its policy, the supervisor
one that only mints agents' tokens (from the ``specmesh-agent`` token role), each sidecar
its agent's. Engines get no Vault address, token or any secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from localfleet.installer import LocalServices
from specmesh.addresses import format_table
from specmesh.errors import ServiceError, SpecError
from specmesh.names import resource_name
from specmesh.pki import DEFAULT_PKI_MOUNT
from specmesh.ports import free_port
from specmesh.procs import alive, spawn
from specmesh.spec.manifest import load_path
from specmesh.supervisor import socket_path
from specmesh.vault import (
    AGENT_TOKEN_ROLE,
    CONTROL_PLANE_POLICY,
    SUPERVISOR_POLICY,
    agent_token_role_params,
    control_plane_policy,
    supervisor_policy,
)

__all__ = ["Fleet", "FleetOptions"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
_READY_TIMEOUT = 120.0
REDIS_SECRET = "vault://secret/specmesh/shared/fleet-redis#password"
TASK_STORE_USER = "specmesh-tasks"
"""The fleet Redis's ACL user for the agents' A2A tasks: keys ``specmesh:a2a:*`` only, so
the task store never reaches the agents' memory (``default`` user, :data:`REDIS_SECRET`)."""
TASK_STORE_SECRET = "vault://secret/specmesh/infra/task-store#password"
"""Its password: every agent's policy may read it (the control plane adds the path)."""
"""Where the fleet keeps its Redis password (the examples' memory credentials point here;
the sidecars' task-store proxies and the control plane read it too)."""
TOKEN_ISSUER = "specmesh"
"""The control plane's invoke-token issuer name, which every sidecar trusts."""
SERVICE_HOSTS: dict[str, str] = {
    "redis": "fleet-redis:6379",
    "nacos-mcp-tools": "nacos-mcp-tools:80",
    "time": "mcp-time:80",
}
"""The stable ``host:port`` by which specs name each fleet service (resolved at run time)."""
_KIND_ORDER = {"McpServer": 0, "Prompt": 1, "Agent": 2, "Release": 3}


@dataclass
class FleetOptions:
    """What ``specmesh up`` runs."""

    home: Path
    examples: Path = REPO / "examples"
    model_script: Path = REPO / "scripts" / "fleet-model-script.yaml"
    llm_url: str | None = None
    """An OpenAI-compatible provider to use instead of the scripted model server."""
    istio_crds: Path | None = None
    """An Istio CRD file for the control plane to validate with instead of the schemas it
    carries (``SPECMESH_ISTIO_CRDS``); ``None`` keeps its own."""
    reset: bool = False
    """Apply the examples even when the store already holds specs (they overwrite what an
    operator changed in them; other agents are left alone)."""
    jwt_issuers: tuple[dict[str, Any], ...] = ()
    """More issuers of bearer tokens every sidecar trusts, after the control plane's
    (``SPECMESH_JWT_ISSUERS`` entries: ``issuer``, ``jwksUri`` or ``jwks``, ``audiences``)."""


@dataclass
class _Proc:
    name: str
    pid: int
    cmd: list[str]
    log: str
    role: str
    agent: str | None = None
    track: str | None = None
    endpoints: dict[str, str] = field(default_factory=dict)


class Fleet:
    """Start, inspect and stop the local fleet whose state lives in ``home``."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.home = options.home.resolve()
        self.state_file = self.home / "fleet.json"
        self.logs = self.home / "logs"
        self._popen: dict[int, subprocess.Popen[bytes]] = {}
        self._accessors: list[str] = []
        """Accessors of the Vault tokens ``up`` made (one per process identity), revoked by
        ``down``."""

    # ------------------------------------------------------------ state

    def _read(self) -> dict[str, Any]:
        if self.state_file.exists():
            data: dict[str, Any] = json.loads(self.state_file.read_text())
            return data
        return {"processes": []}

    def _write(self, state: dict[str, Any]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.state_file)

    # ------------------------------------------------------------ processes

    def _spawn(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str],
        role: str,
        executable: str | None = None,
        cwd: Path = REPO,
        **extra: Any,
    ) -> _Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        cmd = [executable or sys.executable, *args]
        proc = spawn(cmd, env=env, log=log, cwd=cwd)
        self._popen[proc.pid] = proc
        return _Proc(name=name, pid=proc.pid, cmd=cmd, log=str(log), role=role, **extra)

    def _wait(self, proc: _Proc, check: Any, what: str) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            popen = self._popen.get(proc.pid)
            exited = popen.poll() is not None if popen else not alive(proc.pid, proc.cmd)
            if exited:
                tail = Path(proc.log).read_text(errors="replace")[-3000:]
                raise ServiceError(service=proc.name, reason=f"exited before ready:\n{tail}")
            try:
                if check():
                    return
            except (requests.RequestException, OSError):
                pass
            time.sleep(0.1)
        raise ServiceError(
            service=proc.name,
            reason=f"{what} not ready after {_READY_TIMEOUT:.0f}s (log: {proc.log})",
        )

    # ------------------------------------------------------------ up

    def up(self) -> dict[str, Any]:
        state = self._read()
        if any(alive(p["pid"], p["cmd"]) for p in state["processes"]):
            raise ServiceError(
                service="fleet",
                reason=f"already running (see {self.state_file}); run `specmesh down` first",
            )
        loaded = load_path(self.options.examples)  # every example is valid before anything runs
        procs: list[_Proc] = []
        state = {"processes": [], "home": str(self.home)}
        try:
            services = LocalServices(home=self.home).start()
            import asyncio

            from specmesh.pki import setup_pki

            asyncio.run(setup_pki(address=services["baoAddress"], token=services["baoToken"]))
            cp_token = self._identity(
                services,
                CONTROL_PLANE_POLICY,
                "control-plane",
                policy_hcl=control_plane_policy(pki_mount=DEFAULT_PKI_MOUNT),
            )
            admin_token = self._tokens()
            redis_proc, redis_url = self._start_redis(services)
            procs.append(redis_proc)
            base_env = {**os.environ, "SPECMESH_HOME": str(self.home), "SPECMESH_LOG_LEVEL": "INFO"}
            endpoints: dict[str, Any] = {
                "etcd": services["etcdEndpoint"],
                "openbao": services["baoAddress"],
                "redis": redis_url,
            }

            llm_url = self.options.llm_url
            if llm_url is None:
                port = free_port()
                p = self._spawn(
                    "model-server",
                    [
                        "-m",
                        "specmeshctl",
                        "model-server",
                        "--port",
                        str(port),
                        "--script",
                        str(self.options.model_script),
                    ],
                    env=base_env,
                    role="model",
                )
                procs.append(p)
                llm_url = f"http://127.0.0.1:{port}/v1"
                self._wait(
                    p,
                    lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok,
                    "model server",
                )
            endpoints["llm"] = llm_url

            mcp_urls: dict[str, str] = {}
            port = free_port()
            p = self._spawn(
                "mcp-nacos-mcp-tools",
                ["-m", "examples.mcp_servers.nacos_tools", "--port", str(port)],
                env=base_env,
                role="mcp",
            )
            procs.append(p)
            mcp_urls["nacos-mcp-tools"] = f"http://127.0.0.1:{port}/mcp"
            self._wait(p, lambda port=port: _tcp(port), "nacos-mcp-tools")
            port = free_port()
            p = self._spawn(
                "mcp-time",
                [
                    "-m",
                    "specmeshctl",
                    "mcp-bridge",
                    "--port",
                    str(port),
                    "--",
                    str(Path(sys.executable).parent / "mcp-server-time"),
                ],
                env=base_env,
                role="mcp",
            )
            procs.append(p)
            mcp_urls["time"] = f"http://127.0.0.1:{port}/mcp"
            self._wait(p, lambda port=port: _tcp(port), "time MCP bridge")
            endpoints["mcp"] = mcp_urls
            running = {"redis": redis_url, **mcp_urls}
            addresses = {SERVICE_HOSTS[n]: urlsplit(u).netloc for n, u in running.items()}
            base_env["SPECMESH_SERVICE_ADDRESSES"] = format_table(addresses)
            endpoints["serviceAddresses"] = addresses

            cp_port, cp_grpc, cp_otlp = free_port(), free_port(), free_port()
            otlp = f"http://127.0.0.1:{cp_otlp}"
            supervisor = self._start_supervisor(
                services,
                base_env,
                llm_url,
                otlp,
                jwks_uri=f"http://127.0.0.1:{cp_port}/.well-known/jwks.json",
                task_store=redis_url.replace("redis://", f"redis://{TASK_STORE_USER}@", 1),
            )
            procs.append(supervisor)
            cp_env = {
                **base_env,
                "SPECMESH_ETCD_ENDPOINT": services["etcdEndpoint"],
                "SPECMESH_VAULT_ADDR": services["baoAddress"],
                "SPECMESH_VAULT_TOKEN": cp_token,  # its own policy, not root
                "SPECMESH_VAULT_PKI_MOUNT": DEFAULT_PKI_MOUNT,
                "SPECMESH_TOKENS_FILE": str(self.home / "tokens.json"),
                "SPECMESH_GRPC_LISTEN": f"127.0.0.1:{cp_grpc}",
                "SPECMESH_OTLP_LISTEN": f"127.0.0.1:{cp_otlp}",
                "SPECMESH_TRACES_DB": str(self.home / "traces.db"),
                "SPECMESH_RUNTIME": "local",
                "SPECMESH_SUPERVISOR_SOCKET": str(socket_path(self.home)),
                "SPECMESH_TOKEN_ISSUER": TOKEN_ISSUER,
                "SPECMESH_TASK_STORE_PASSWORD": TASK_STORE_SECRET,
            }
            if self.options.istio_crds and self.options.istio_crds.exists():
                cp_env["SPECMESH_ISTIO_CRDS"] = str(self.options.istio_crds)
            p = self._spawn(
                "control-plane",
                ["-m", "specmeshctl", "control-plane", "--listen", f"127.0.0.1:{cp_port}"],
                env=cp_env,
                role="control-plane",
            )
            procs.append(p)
            api = f"http://127.0.0.1:{cp_port}"
            self._wait(p, lambda: requests.get(f"{api}/healthz", timeout=1).ok, "control plane")
            endpoints.update(
                controlPlane=api,
                controlPlaneGrpc=f"127.0.0.1:{cp_grpc}",
                otlp=otlp,
                supervisor=str(socket_path(self.home)),
            )

            seeded = self._seed(api, admin_token, loaded)
            listed = self._api_get(api, admin_token, "/api/v1/agents?pageSize=1000")["agents"]
            stored = {resource_name(a["name"]) for a in listed}
            not_ready = self._wait_agents(supervisor, stored)
            state.update(
                processes=[p.__dict__ for p in procs],
                vaultAccessors=self._accessors,
                endpoints=endpoints,
                adminTokenFile=str(self.home / "admin-token"),
                seeded=seeded,
                notReady=not_ready,
            )
            self._write(state)
            return self._with_instances(state)
        except BaseException:
            state["processes"] = [p.__dict__ for p in procs]
            state["vaultAccessors"] = self._accessors
            self._write(state)
            self.down()
            raise

    def _identity(
        self,
        services: dict[str, Any],
        policy: str,
        display_name: str,
        *,
        policy_hcl: str | None = None,
    ) -> str:
        """A Vault token of one process's own, holding ``policy`` only (written first when
        ``policy_hcl`` is given): made here with the services' root token -- set-up is the
        one user of it -- renewed by the process, revoked by ``down``."""
        import asyncio

        from specmesh.vault import VaultClient

        async def make() -> str:
            root = VaultClient(address=services["baoAddress"], token=services["baoToken"])
            try:
                if policy_hcl is not None:
                    await root.put_policy(policy, policy_hcl)
                token, accessor = await root.create_identity_token(
                    policies=[policy], period="1h", display_name=display_name
                )
            finally:
                await root.close()
            self._accessors.append(accessor)
            return token

        return asyncio.run(make())

    def _tokens(self) -> str:
        """An admin token for local sign-in, kept in ``<home>/admin-token`` (0600), and one
        token per narrower role (``<home>/tokens-viewer``, ``-operator``, ``-secrets-admin``,
        ``-invoker``) to try the Studio, or ``specmesh invoke``, as someone who may do less."""

        def token_in(file: Path) -> str:
            if file.exists():
                return file.read_text().strip()
            token = "smt_" + secrets.token_urlsafe(32)
            file.write_text(token + "\n")
            file.chmod(0o600)
            return token

        token = token_in(self.home / "admin-token")
        entries = [("local-admin", token, ["admin", "secrets-admin"])]
        for role in ("viewer", "operator", "secrets-admin", "invoker"):
            entries.append((f"local-{role}", token_in(self.home / f"tokens-{role}"), [role]))
        tokens = {
            "tokens": [
                {"name": name, "sha256": hashlib.sha256(t.encode()).hexdigest(), "roles": roles}
                for name, t, roles in entries
            ]
        }
        path = self.home / "tokens.json"
        path.write_text(json.dumps(tokens, indent=2))
        path.chmod(0o600)
        return token

    def _start_redis(self, services: dict[str, Any]) -> tuple[_Proc, str]:
        """The fleet's shared Redis (agents' memory, and their A2A tasks under the ACL user
        :data:`TASK_STORE_USER`): its password lives in Vault at
        :data:`REDIS_SECRET`, which the examples reference; never in a spec or an engine."""
        import asyncio

        import redis

        from localfleet.installer import ensure_redis
        from specmesh.secrets import VaultRef
        from specmesh.vault import VaultClient

        password = secrets.token_urlsafe(24)
        port = free_port()
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        args = [
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--requirepass",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        proc = self._spawn(
            "redis", args, env=dict(os.environ), role="redis", executable=ensure_redis()
        )
        self._wait(proc, lambda: _tcp(port), "redis")

        tasks_password = secrets.token_urlsafe(24)
        admin = redis.Redis(host="127.0.0.1", port=port, password=password)
        try:
            admin.acl_setuser(
                TASK_STORE_USER,
                enabled=True,
                reset=True,
                passwords=[f"+{tasks_password}"],
                keys=["specmesh:a2a:*"],
                reset_channels=True,
                categories=["+@all", "-@dangerous"],
            )
        finally:
            admin.close()

        async def store() -> None:
            vault = VaultClient(address=services["baoAddress"], token=services["baoToken"])
            try:
                await vault.write(VaultRef.parse(REDIS_SECRET), password)
                await vault.write(VaultRef.parse(TASK_STORE_SECRET), tasks_password)
            finally:
                await vault.close()

        asyncio.run(store())
        return proc, f"redis://127.0.0.1:{port}/0"

    @staticmethod
    def _api_get(api: str, token: str, path: str) -> Any:
        r = requests.get(f"{api}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        r.raise_for_status()
        return r.json()

    def _seed(self, api: str, token: str, loaded: list[Any]) -> bool:
        """Apply the examples into an empty store (or always, with ``reset``); return
        whether they were applied. A store holding any agent, prompt or MCP server is the
        operator's: it is left as it is."""
        if not self.options.reset:
            lists = {"agents": "agents", "prompts": "prompts", "mcp-servers": "mcpServers"}
            # one item of a list (pageSize=1) says whether the store holds any
            if any(
                self._api_get(api, token, f"/api/v1/{path}?pageSize=1")[key]
                for path, key in lists.items()
            ):
                return False
        headers = {"Authorization": f"Bearer {token}"}
        for agent, secret in _shared_secrets(loaded):
            # the fleet's own shared secrets (its Redis password), shared as a secrets-admin
            # would: before the agents that reference them are applied
            r = requests.put(
                f"{api}/api/v1/agents/{agent}/grants",
                json={"secret": secret},
                headers=headers,
                timeout=30,
            )
            if r.status_code != 200:
                raise SpecError([], source=f"sharing {secret} with {agent} was refused: {r.text}")
        for m in sorted(loaded, key=lambda m: _KIND_ORDER[m.kind]):
            doc = m.manifest.model_dump(mode="json", by_alias=True)
            r = requests.post(
                f"{api}/api/v1/apply", json={"manifest": doc}, headers=headers, timeout=60
            )
            if r.status_code != 200:
                raise SpecError([], source=f"{m.source}: the control plane refused it: {r.text}")
        return True

    def _start_supervisor(
        self,
        services: dict[str, Any],
        base_env: dict[str, str],
        llm_url: str,
        otlp: str,
        *,
        jwks_uri: str,
        task_store: str,
    ) -> _Proc:
        """The supervisor, with a Vault identity that only mints agents' tokens (from the
        ``specmesh-agent`` token role, written here with the root token). Its sidecars
        trust the control plane's invoke tokens (``jwks_uri``; the control plane starts
        after it) and keep the agents' A2A tasks in the fleet's Redis (``task_store``,
        user :data:`TASK_STORE_USER`, password :data:`TASK_STORE_SECRET`)."""
        import asyncio

        from specmesh.vault import VaultClient

        async def token_role() -> None:
            root = VaultClient(address=services["baoAddress"], token=services["baoToken"])
            try:
                await root.put_token_role(AGENT_TOKEN_ROLE, agent_token_role_params())
            finally:
                await root.close()

        asyncio.run(token_role())
        token = self._identity(
            services, SUPERVISOR_POLICY, "supervisor", policy_hcl=supervisor_policy()
        )
        env = {
            **base_env,
            "SPECMESH_ETCD_ENDPOINT": services["etcdEndpoint"],
            "SPECMESH_VAULT_ADDR": services["baoAddress"],
            "SPECMESH_VAULT_TOKEN": token,
            "SPECMESH_VAULT_PKI_MOUNT": DEFAULT_PKI_MOUNT,
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
            "SPECMESH_JWT_ISSUERS": json.dumps(
                [
                    {
                        "issuer": TOKEN_ISSUER,
                        "jwksUri": jwks_uri,
                        "jwks": None,
                        "audiences": ["{agent}"],
                        "controlPlane": True,
                    },
                    *self.options.jwt_issuers,
                ]
            ),
            "SPECMESH_TASK_STORE_UPSTREAM": task_store,
            "SPECMESH_TASK_STORE_PASSWORD": TASK_STORE_SECRET,
        }
        if self.options.llm_url is None:
            env["SPECMESH_LLM_OVERRIDE_URL"] = llm_url
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.home).unlink()  # a dead supervisor's: wait for the new one's
        proc = self._spawn(
            "supervisor", ["-m", "specmeshctl", "supervisor"], env=env, role="supervisor"
        )
        self._wait(proc, lambda: socket_path(self.home).exists(), "supervisor")
        return proc

    def _supervised(self) -> dict[str, Any]:
        """The supervisor's state file (its instances), or an empty one."""
        path = self.home / "supervisor.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {"instances": [], "workloads": {}}
        return data

    def _not_ready(self, agents: set[str]) -> list[str]:
        """The agents in ``agents`` the supervisor does not run with every instance ready."""
        state = self._supervised()
        workloads = state.get("workloads", {})
        waiting = []
        for name in sorted(agents):
            if name not in workloads:
                waiting.append(name)
                continue
            want = sum(workloads[name]["replicas"].values())
            ready = [
                i for i in state["instances"] if resource_name(i["agent"]) == name and i["ready"]
            ]
            if len(ready) < want:
                waiting.append(name)
        return waiting

    def _wait_agents(self, supervisor: _Proc, agents: set[str]) -> list[str]:
        """Wait for every stored agent to be ready; return those that are not after
        :data:`_READY_TIMEOUT` (an agent that crash-loops must not keep the fleet down:
        ``specmesh get agents`` and ``describe`` show why)."""
        try:
            self._wait(supervisor, lambda: not self._not_ready(agents), "the agents' instances")
        except ServiceError:
            if not alive(supervisor.pid, supervisor.cmd):
                raise
        return self._not_ready(agents)

    def _with_instances(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` plus what the supervisor runs: its processes (role ``engine`` /
        ``sidecar``, with agent, track and instance) and ``agents`` (agent -> track -> the
        endpoints of its first ready instance) and ``instances``."""
        supervised = self._supervised()
        processes = [
            p for p in state.get("processes", []) if p["role"] not in ("engine", "sidecar")
        ]
        agents: dict[str, dict[str, Any]] = {}
        for inst in supervised.get("instances", []):
            for p in inst["processes"]:
                processes.append(
                    {
                        "name": f"{inst['instance']}-{p['role']}",
                        "pid": p["pid"],
                        "cmd": p["cmd"],
                        "log": p["log"],
                        "role": p["role"],
                        "agent": inst["agent"],
                        "track": inst["track"],
                        "instance": inst["instance"],
                        "endpoints": inst["endpoints"],
                    }
                )
            tracks = agents.setdefault(inst["agent"], {})
            if inst["ready"] or inst["track"] not in tracks:
                tracks.setdefault(inst["track"], inst["endpoints"])
        return {
            **state,
            "processes": processes,
            "agents": agents,
            "instances": supervised.get("instances", []),
        }

    # ------------------------------------------------------------ status, down

    def status(self) -> dict[str, Any]:
        state = self._with_instances(self._read())
        for p in state.get("processes", []):
            p["running"] = bool(p["pid"]) and alive(p["pid"], p["cmd"])
        services = LocalServices(home=self.home).status() if self.home.exists() else {}
        return {**state, "services": services}

    def down(self) -> list[str]:
        """Stop what ``up`` started (and nothing else); return the names stopped."""
        state = self._read()
        stopped = []
        # the supervisor first (it drains and stops its instances), then any instance a
        # dead supervisor left behind, then what they use; each group stops in parallel
        state["processes"] = self._with_instances(state)["processes"]
        groups = (
            ("supervisor",),
            ("engine", "sidecar"),
            ("control-plane", "mcp", "model"),
            ("redis",),
        )
        for roles in groups:
            running = [
                p
                for p in reversed(state.get("processes", []))
                if p["role"] in roles and p["pid"] and alive(p["pid"], p["cmd"])
            ]
            for p in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p["pid"], signal.SIGTERM)
            for p in running:
                _terminate(p["pid"])
                stopped.append(p["name"])
        state["processes"] = []
        accessors = state.pop("vaultAccessors", [])
        if accessors and (self.home / "services.json").exists():
            self._revoke(accessors)
        if self.state_file.exists():
            self._write(state)
        if (self.home / "services.json").exists():
            LocalServices(home=self.home).stop()
            stopped.append("etcd, openbao")
        return stopped

    def _revoke(self, accessors: list[str]) -> None:
        """Revoke the processes' Vault tokens (OpenBao still runs: it stops after)."""
        import asyncio

        from specmesh.vault import VaultClient

        services = json.loads((self.home / "services.json").read_text())

        async def revoke() -> None:
            root = VaultClient(address=services["baoAddress"], token=services["baoToken"])
            try:
                for accessor in accessors:
                    await root.revoke_accessor(accessor)
            finally:
                await root.close()

        try:
            asyncio.run(revoke())
        except Exception as e:  # OpenBao not answering: the tokens lapse at their period (1 h)
            logger.warning("could not revoke the fleet's Vault tokens: %s", e)


def _shared_secrets(loaded: list[Any]) -> list[tuple[str, str]]:
    """``(agent, vault://mount/path)`` of every reference an example agent makes outside
    the agents' own trees (what a secrets-admin must share with it)."""
    from specmesh.secrets import VaultRef, is_reference
    from specmesh.spec.secretpaths import iter_secrets

    out: set[tuple[str, str]] = set()
    for m in loaded:
        if m.kind != "Agent":
            continue
        for _, value in iter_secrets(m.manifest.spec):
            if is_reference(value):
                ref = VaultRef.parse(value)
                if not ref.path.startswith("specmesh/agents/"):
                    out.add((m.name, f"vault://{ref.mount}/{ref.path}"))
    return sorted(out)


def _tcp(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _terminate(pid: int, timeout: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
