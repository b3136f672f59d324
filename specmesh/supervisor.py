"""The local supervisor (``specmesh supervisor``): the kubelet of one machine.

The controller (in the control plane) tells it, per agent, how many instances to run per
release track (:class:`specmesh.workloads.AgentWorkload`); the supervisor makes it so:

* an **instance** is one engine + sidecar pair of processes, named ``<agent>-<track>-<n>``
  (its id in the Agent Registry), with its own ports (kept across restarts: the sidecar's
  public entry -- HTTP and gRPC, what the engine's card names and ``specmesh invoke``
  calls --, its mTLS inbound, egress, ops, Redis and task-store proxies, the engine's
  private listeners) and its own
  Vault token, minted from the ``specmesh-agent`` token role with the agent's policy only
  (the supervisor's own token can do nothing else). The engine gets no secret and no
  Vault address;
* a process that exits is restarted on its own (the other one of the pair keeps running):
  at once when it had run :data:`MIN_HEALTHY` seconds, else after a back-off doubling from
  1 s to :data:`MAX_BACKOFF` -- an instance waiting out a back-off after two quick exits in
  a row is in phase ``CrashLoop``;
* when a sidecar dies its registry entry is deleted at once (routers stop picking it),
  not when its lease runs out;
* scaling down or deleting an agent **drains** an instance: it leaves the supervisor's
  ready set (``<home>/supervisor.json``, what ``specmesh invoke`` picks from) and the
  registry, gets :data:`DRAIN_SECONDS` for calls already routed to it, then SIGTERM
  (SIGKILL after :data:`STOP_TIMEOUT`). Its name (registry key, engine <-> sidecar socket)
  is reused -- a re-created agent, a scale back up -- only once its processes are gone;
* it runs at most :attr:`SupervisorConfig.max_instances` instances over all agents: a
  workload that would take it past them is refused (409) and changes nothing;
* it adopts, from the state file a previous supervisor left, only processes that run its
  own engine or sidecar command with the environment it gives that instance.

It keeps running when the control plane dies (it needs etcd and OpenBao only), and a
control plane that comes back finds the same workloads and changes nothing. Its API is
HTTP on a Unix socket (``<home>/run/supervisor.sock``, mode 0600)::

    GET    /healthz
    GET    /v1/agents                 {name: {"workload": ..., "instances": [...]}}
    GET    /v1/agents/{name}          one agent's instances
    PUT    /v1/agents/{name}          an AgentWorkload (JSON): run exactly that (409 past
                                      the instance limit)
    DELETE /v1/agents/{name}          drain and stop all its instances

Every change of state is also written to ``<home>/supervisor.json`` (0600): the
instances, their endpoints, process ids and log files, for ``specmesh status``, ``logs``,
``invoke`` and ``down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISDIR
from typing import Any

import aiohttp
from aiohttp import web

from specmesh.aio import wait_event
from specmesh.backoff import BackoffPolicy
from specmesh.errors import SecretError
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.names import resource_name
from specmesh.ports import listen_port
from specmesh.procs import alive, spawn
from specmesh.vault import AGENT_TOKEN_ROLE, VaultClient, agent_policy_name, keep_token_alive
from specmesh.workloads import TRACKS, AgentWorkload, InstanceStatus

__all__ = [
    "DEFAULT_MAX_INSTANCES",
    "DRAIN_SECONDS",
    "MAX_BACKOFF",
    "MIN_HEALTHY",
    "STOP_TIMEOUT",
    "Supervisor",
    "SupervisorConfig",
    "main",
]

logger = logging.getLogger(__name__)

MIN_HEALTHY = 10.0
"""Seconds a process must run for its exit not to count as a crash."""
MAX_BACKOFF = 60.0
"""Longest wait before restarting a crash-looping process."""
_RESTART_BACKOFF = BackoffPolicy(initial=1.0, maximum=MAX_BACKOFF, jitter=0.5)
DRAIN_SECONDS = 2.0
"""Time a stopping instance keeps serving after it left the ready set and the registry."""
STOP_TIMEOUT = 6.0
"""Time a process gets between SIGTERM and SIGKILL."""
READY_POLL_SECONDS = 1.0
"""How often an instance with no readiness watch open gets one (or a first probe)."""
READY_WATCH_SECONDS = 10.0
"""Longest a readiness watch waits on a sidecar that has nothing new to say (its
``/readyz?seen=&wait=``): a sidecar that hangs is unready after this (+ 2 s), as one that
stops renewing its registry lease leaves the registry after its TTL."""
_TICK = 0.2
"""Shortest wait between two passes of the loop (and the poll of a process no pidfd
watches)."""
_IDLE_TICK = 5.0
"""Longest wait between two passes: the loop is woken by what changes (a process exit, a
workload, a readiness change, a restart due), this only bounds it."""
_PORTS = (
    "egress", "inbound", "ops", "http", "grpc", "redis", "egress_grpc", "inbound_grpc",
    "entry", "entry_grpc", "task_store",
)  # fmt: skip
_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV")
MAX_WORKLOAD_BYTES = 64 * 1024
DEFAULT_MAX_INSTANCES = 100
"""Default of :attr:`SupervisorConfig.max_instances`."""
_MAX_SOCKET_PATH = 100
"""Longest Unix socket path used (the kernel's limit is 107 bytes plus the NUL)."""


class _OverLimitError(Exception):
    """A workload would take the supervisor past its instance limit (its API says 409)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class SupervisorConfig:
    """Where the supervisor runs its instances and what they connect to."""

    home: Path
    etcd_endpoint: str
    vault_addr: str
    vault_token: str
    """The supervisor's own token (policy ``specmesh-supervisor``)."""
    etcd_prefix: str = "/specmesh"
    token_role: str = AGENT_TOKEN_ROLE
    otlp_endpoint: str | None = None
    llm_override_url: str | None = None
    """The scripted model server that every sidecar sends LLM calls to (local fleet)."""
    service_addresses: str = ""
    """``SPECMESH_SERVICE_ADDRESSES`` for the sidecars."""
    mtls: bool = True
    pki_mount: str = "specmesh-pki"
    python: str = sys.executable
    engine_args: tuple[str, ...] = ("-m", "engine")
    sidecar_args: tuple[str, ...] = ("-m", "sidecar")
    log_level: str = "INFO"
    max_instances: int = DEFAULT_MAX_INSTANCES
    """Most instances (engine + sidecar pairs) run at once over all agents
    (``SPECMESH_SUPERVISOR_MAX_INSTANCES``): a workload that would take the supervisor past
    them is refused, so specs cannot exhaust the machine (each track may ask for 100)."""
    jwt_issuers: str = ""
    """``SPECMESH_JWT_ISSUERS`` for the sidecars (JSON list of ``{issuer, jwksUri, jwks,
    audiences}``): whose bearer tokens their public entries accept. The local fleet names
    the control plane (``specmesh``, its ``/.well-known/jwks.json``, audience ``{agent}``);
    empty: none (the entry refuses every token)."""
    task_store_upstream: str | None = None
    """The shared Redis of the agents' A2A tasks (``SPECMESH_TASK_STORE_UPSTREAM``,
    ``redis://host:port/db``): each sidecar's task-store proxy forwards there and the
    engine's ``SPECMESH_TASK_STORE`` points at that proxy. Unset: engines keep tasks in
    memory."""
    task_store_password: str | None = None
    """``vault://`` reference of that Redis's password (``SPECMESH_TASK_STORE_PASSWORD``),
    read by the sidecar with its agent's token; never in an engine."""

    @property
    def socket(self) -> Path:
        return socket_path(self.home)

    @property
    def state_file(self) -> Path:
        return self.home / "supervisor.json"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> SupervisorConfig:
        env = dict(os.environ if env is None else env)
        missing = [
            k
            for k in ("SPECMESH_ETCD_ENDPOINT", "SPECMESH_VAULT_ADDR", "SPECMESH_VAULT_TOKEN")
            if not env.get(k)
        ]
        if missing:
            raise ValueError(f"the supervisor needs {', '.join(missing)}")
        return cls(
            home=Path(env.get("SPECMESH_HOME", ".specmesh")).resolve(),
            etcd_endpoint=env["SPECMESH_ETCD_ENDPOINT"],
            etcd_prefix=env.get("SPECMESH_ETCD_PREFIX", "/specmesh"),
            vault_addr=env["SPECMESH_VAULT_ADDR"],
            vault_token=env["SPECMESH_VAULT_TOKEN"],
            otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
            llm_override_url=env.get("SPECMESH_LLM_OVERRIDE_URL") or None,
            service_addresses=env.get("SPECMESH_SERVICE_ADDRESSES", ""),
            mtls=env.get("SPECMESH_MTLS", "true").lower() in ("1", "true", "yes"),
            pki_mount=env.get("SPECMESH_VAULT_PKI_MOUNT", "specmesh-pki"),
            log_level=env.get("SPECMESH_LOG_LEVEL", "INFO"),
            max_instances=int(
                env.get("SPECMESH_SUPERVISOR_MAX_INSTANCES") or DEFAULT_MAX_INSTANCES
            ),
            jwt_issuers=env.get("SPECMESH_JWT_ISSUERS", ""),
            task_store_upstream=env.get("SPECMESH_TASK_STORE_UPSTREAM") or None,
            task_store_password=env.get("SPECMESH_TASK_STORE_PASSWORD") or None,
        )


def socket_path(home: Path) -> Path:
    """The supervisor's API socket under ``home``."""
    return home / "run" / "supervisor.sock"


@dataclass
class _Process:
    """One process of an instance, restarted with back-off."""

    role: str  # "engine" | "sidecar"
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    pid: int = 0
    cmd: list[str] = field(default_factory=list)
    started: float = 0.0
    quick_exits: int = 0
    """Exits in a row that came before :data:`MIN_HEALTHY`."""
    restarts: int = 0
    next_start: float = 0.0
    last_error: str | None = None
    exit_fd: int | None = None
    """A pidfd of the running process in the event loop: it wakes the loop at its exit."""

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return bool(self.pid) and alive(self.pid, self.cmd)

    def backoff(self) -> float:
        return 0.0 if self.quick_exits == 0 else _RESTART_BACKOFF.delay(self.quick_exits)

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "pid": self.pid, "cmd": self.cmd, "log": str(self.log)}


@dataclass
class _Instance:
    agent: str
    track: str
    ordinal: int
    ports: dict[str, int]
    engine: _Process
    sidecar: _Process
    created: str = field(default_factory=_now)
    phase: str = "Starting"
    since: str = field(default_factory=_now)
    ready: bool = False
    was_ready: bool = False
    ready_etag: str = ""
    """The ETag of the sidecar's last readiness report ("" after a failed probe)."""
    revision: int = 0
    stopping: bool = False
    failed: str | None = None

    @property
    def name(self) -> str:
        return f"{resource_name(self.agent)}-{self.track}-{self.ordinal}"

    @property
    def endpoints(self) -> dict[str, str]:
        p = self.ports
        return {
            "entry": f"http://127.0.0.1:{p['entry']}",
            "entryGrpc": f"127.0.0.1:{p['entry_grpc']}",
            "a2a": f"http://127.0.0.1:{p['http']}",
            "a2aGrpc": f"127.0.0.1:{p['grpc']}",
            "inbound": f"https://127.0.0.1:{p['inbound']}",
            "inboundGrpc": f"127.0.0.1:{p['inbound_grpc']}",
            "egressGrpc": f"127.0.0.1:{p['egress_grpc']}",
            "ops": f"http://127.0.0.1:{p['ops']}",
            "egress": f"http://127.0.0.1:{p['egress']}",
        }

    def set_phase(self, phase: str) -> None:
        if phase != self.phase:
            logger.info("instance %s: %s -> %s", self.name, self.phase, phase)
            self.phase = phase
            self.since = _now()

    def status(self) -> InstanceStatus:
        errors = [p.last_error for p in (self.sidecar, self.engine) if p.last_error]
        return InstanceStatus(
            instance=self.name,
            track=self.track,
            phase=self.phase,
            ready=self.ready and not self.stopping,
            revision=self.revision,
            restarts=self.engine.restarts + self.sidecar.restarts,
            last_error=self.failed or (errors[0] if errors else None),
            since=self.since,
            endpoints=self.endpoints,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **self.status().to_json(),
            "agent": self.agent,
            "ordinal": self.ordinal,
            "ports": self.ports,
            "created": self.created,
            "processes": [self.sidecar.to_json(), self.engine.to_json()],
        }


class Supervisor:
    """Runs the instances of every agent it is told about; see the module docstring."""

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.keys = Keys(prefix=config.etcd_prefix)
        self.workloads: dict[str, AgentWorkload] = {}
        self.instances: dict[str, _Instance] = {}
        self._lock = asyncio.Lock()
        self._vault: VaultClient | None = None
        self._etcd: EtcdClient | None = None
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._dirty = True
        self._wake = asyncio.Event()
        """Set by whatever the loop must look at now (see :data:`_IDLE_TICK`)."""

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        cfg.home.mkdir(parents=True, exist_ok=True)
        run = cfg.socket.parent
        run.mkdir(parents=True, exist_ok=True)
        run.chmod(0o700)
        self._vault = VaultClient(address=cfg.vault_addr, token=cfg.vault_token)
        self._etcd = EtcdClient.from_endpoint(cfg.etcd_endpoint)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # one watch open per instance
            timeout=aiohttp.ClientTimeout(total=2),
        )
        self._adopt()
        app = web.Application(client_max_size=MAX_WORKLOAD_BYTES)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/agents", self._list)
        app.router.add_get("/v1/agents/{name}", self._get)
        app.router.add_put("/v1/agents/{name}", self._put)
        app.router.add_delete("/v1/agents/{name}", self._delete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        with contextlib.suppress(FileNotFoundError):
            cfg.socket.unlink()
        site = web.UnixSite(self._runner, str(cfg.socket))
        await site.start()
        cfg.socket.chmod(0o600)
        self._tasks = [
            asyncio.create_task(self._loop(), name="supervise"),
            asyncio.create_task(self._readiness_loop(), name="readiness"),
            asyncio.create_task(keep_token_alive(self._vault), name="vault-token"),
        ]
        logger.info("supervisor listening on %s", cfg.socket)

    async def stop(self, *, stop_instances: bool = True) -> None:
        """Stop the API; with ``stop_instances``, drain and stop every instance too."""
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if stop_instances:
            await asyncio.gather(
                *(self._stop_instance(i, drain=0.0) for i in list(self.instances.values()))
            )
            self.instances.clear()
            self.workloads.clear()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        for inst in self.instances.values():  # left running: no longer watched from here
            for proc in (inst.sidecar, inst.engine):
                self._unwatch(proc)
        self._write_state()
        for closer in (self._http, self._etcd, self._vault):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.close()

    # ------------------------------------------------------------ API

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True, "instances": len(self.instances)})

    def _agent_json(self, name: str, instances: list[_Instance] | None = None) -> dict[str, Any]:
        workload = self.workloads.get(name)
        if instances is None:
            instances = [i for i in self.instances.values() if resource_name(i.agent) == name]
        return {
            "workload": workload.to_json() if workload else None,
            "instances": [i.status().to_json() for i in sorted(instances, key=lambda i: i.name)],
        }

    async def _list(self, _: web.Request) -> web.Response:
        # every agent's instances in one pass (the controller lists them every few seconds)
        by_agent: dict[str, list[_Instance]] = {name: [] for name in self.workloads}
        for inst in self.instances.values():
            by_agent.setdefault(resource_name(inst.agent), []).append(inst)
        return web.json_response({n: self._agent_json(n, by_agent[n]) for n in sorted(by_agent)})

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(self._agent_json(request.match_info["name"]))

    async def _put(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            workload = AgentWorkload.from_json(await request.json())
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": f"bad workload: {e}"}, status=400)
        if workload.name != name:
            return web.json_response(
                {"error": f"workload of {workload.agent!r} PUT at {name!r}"}, status=400
            )
        try:
            await self.apply(workload)
        except _OverLimitError as e:
            return web.json_response({"error": str(e)}, status=409)
        return web.json_response(self._agent_json(name))

    async def _delete(self, request: web.Request) -> web.Response:
        await self.remove(request.match_info["name"])
        return web.json_response({"removed": request.match_info["name"]})

    # ------------------------------------------------------------ desired state

    async def apply(self, workload: AgentWorkload) -> None:
        """Run exactly ``workload``'s instances: start missing ordinals, drain extra ones.
        Raises :class:`_OverLimitError` (nothing changed) when all agents' instances would
        be more than :attr:`SupervisorConfig.max_instances`."""
        async with self._lock:
            name = workload.name
            others = sum(sum(w.replicas.values()) for n, w in self.workloads.items() if n != name)
            total = others + sum(workload.replicas.values())
            if total > self.config.max_instances:
                raise _OverLimitError(
                    f"{workload.agent}: this would run {total} instances over all agents; "
                    f"the supervisor's limit is {self.config.max_instances} "
                    "(SPECMESH_SUPERVISOR_MAX_INSTANCES)"
                )
            previous, had = self.workloads.get(name), set(self.instances)
            self.workloads[name] = workload
            self._converge(workload)
            if previous != workload or set(self.instances) != had:  # not a mere resync
                self._dirty = True
                self._wake.set()

    def _converge(self, workload: AgentWorkload) -> None:
        """Create the missing ordinals and begin stopping the extra ones (under the lock).
        A name an instance still stopping holds (its registry key, its engine <-> sidecar
        socket) is not reused until that instance is gone: the loop creates it then."""
        name = workload.name
        for track in TRACKS:
            want = workload.replicas.get(track, 0)
            mine = [
                i
                for i in self.instances.values()
                if resource_name(i.agent) == name and i.track == track and not i.stopping
            ]
            have = {i.ordinal for i in mine}
            for ordinal in range(want):
                if ordinal not in have and f"{name}-{track}-{ordinal}" not in self.instances:
                    self._create(workload.agent, track, ordinal)
            for inst in mine:
                if inst.ordinal >= want:
                    self._begin_stop(inst)

    async def remove(self, name: str) -> None:
        """Drain and stop every instance of the agent ``name`` (a resource name)."""
        async with self._lock:
            self.workloads.pop(name, None)
            for inst in list(self.instances.values()):
                if resource_name(inst.agent) == name and not inst.stopping:
                    self._begin_stop(inst)
            self._dirty = True
            self._wake.set()

    def _create(self, agent: str, track: str, ordinal: int) -> None:
        logs = self.config.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        base = f"{resource_name(agent)}-{track}-{ordinal}"
        inst = _Instance(
            agent=agent,
            track=track,
            ordinal=ordinal,
            ports=self._ports(),
            engine=_Process(role="engine", log=logs / f"{base}-engine.log"),
            sidecar=_Process(role="sidecar", log=logs / f"{base}-sidecar.log"),
        )
        self.instances[inst.name] = inst
        logger.info("instance %s created", inst.name)

    def _ports(self) -> dict[str, int]:
        """Ports for a new instance: below the ephemeral range (no outgoing connection
        takes one before its listener binds it), none another instance holds."""
        taken = {port for inst in self.instances.values() for port in inst.ports.values()}
        ports: dict[str, int] = {}
        for key in _PORTS:
            ports[key] = listen_port(avoid=taken)
            taken.add(ports[key])
        return ports

    def _begin_stop(self, inst: _Instance) -> None:
        inst.stopping = True
        inst.set_phase("Stopping")
        task = asyncio.create_task(self._stop_instance(inst, drain=DRAIN_SECONDS))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_instance(self, inst: _Instance, *, drain: float) -> None:
        inst.stopping = True
        inst.set_phase("Stopping")
        self._dirty = True
        self._write_state()
        await self._deregister(inst)
        if drain:
            await asyncio.sleep(drain)
        # the engine first: it finishes what it is doing, through its sidecar's egress;
        # then the sidecar (already out of the registry, nothing left to drain)
        for proc in (inst.engine, inst.sidecar):
            await asyncio.to_thread(_terminate, proc, STOP_TIMEOUT)
        if self.instances.get(inst.name) is inst:
            del self.instances[inst.name]
        self._dirty = True
        self._write_state()
        self._wake.set()  # its name may be due again (a re-created agent, a scale back up)
        logger.info("instance %s stopped", inst.name)

    # ------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                async with self._lock:
                    for workload in list(self.workloads.values()):
                        self._converge(workload)
                    for inst in list(self.instances.values()):
                        if not inst.stopping:
                            await self._tend(inst)
                if self._dirty:
                    self._write_state()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("supervisor loop")
            await wait_event(self._wake, self._next_pass())

    def _next_pass(self) -> float:
        """Seconds the loop may wait unless woken: until the next restart due, a tick for
        a process no pidfd watches, at most :data:`_IDLE_TICK`."""
        now, wait = time.monotonic(), _IDLE_TICK
        for inst in self.instances.values():
            if inst.stopping:
                continue
            for proc in (inst.sidecar, inst.engine):
                if not proc.pid:
                    wait = min(wait, proc.next_start - now)
                elif proc.exit_fd is None:
                    wait = min(wait, _TICK)
        return max(wait, _TICK)

    def _watch_exit(self, proc: _Process) -> None:
        """Wake the loop when ``proc`` exits: a pidfd in the event loop (Linux >= 5.3;
        without one the loop polls the process every :data:`_TICK`)."""
        if proc.exit_fd is not None or not proc.pid:
            return
        try:
            fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux, an old kernel, or gone already
            return
        loop = asyncio.get_running_loop()

        def exited() -> None:
            self._unwatch(proc)
            self._wake.set()

        loop.add_reader(fd, exited)
        proc.exit_fd = fd

    def _unwatch(self, proc: _Process) -> None:
        fd, proc.exit_fd = proc.exit_fd, None
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def _tend(self, inst: _Instance) -> None:
        now = time.monotonic()
        crash = False
        for proc in (inst.sidecar, inst.engine):
            if proc.pid and not proc.alive():
                ran = now - proc.started
                code = proc.popen.poll() if proc.popen is not None else None
                proc.last_error = (
                    f"{proc.role} exited with {_describe_exit(code)} after {ran:.1f}s"
                    f" (log: {proc.log})"
                )
                logger.warning("instance %s: %s", inst.name, proc.last_error)
                proc.quick_exits = proc.quick_exits + 1 if ran < MIN_HEALTHY else 0
                proc.next_start = now + proc.backoff()
                proc.pid = 0
                proc.popen = None
                inst.ready = False
                self._dirty = True
                self._unwatch(proc)
                if proc.role == "sidecar":
                    await self._deregister(inst)
            if not proc.pid:
                crash = crash or proc.quick_exits >= 2
                if now >= proc.next_start:
                    try:
                        await self._start_process(inst, proc)
                    except Exception as e:
                        inst.failed = f"cannot start its {proc.role}: {e}"
                        proc.quick_exits += 1
                        proc.next_start = now + proc.backoff()
                        logger.warning("instance %s: %s", inst.name, inst.failed)
                        self._dirty = True
            elif proc.quick_exits and now - proc.started >= MIN_HEALTHY:
                proc.quick_exits = 0  # ran long enough: the streak is over
            self._watch_exit(proc)
        if crash and not (inst.sidecar.pid and inst.engine.pid):
            inst.set_phase("CrashLoop")
        elif not (inst.sidecar.pid and inst.engine.pid):
            inst.set_phase("Starting")
        elif inst.ready:
            inst.set_phase("Running")
        elif inst.was_ready:
            inst.set_phase("Unready")
        else:
            inst.set_phase("CrashLoop" if crash else "Starting")

    async def _start_process(self, inst: _Instance, proc: _Process) -> None:
        cfg = self.config
        if proc.role == "sidecar":
            env, cwd = await self._sidecar_env(inst), cfg.home
            args = cfg.sidecar_args
        else:
            env, cwd = self._engine_env(inst), cfg.home / "engines" / inst.name
            args = cfg.engine_args
            cwd.mkdir(parents=True, exist_ok=True)
        cmd = [cfg.python, *args]
        popen = spawn(cmd, env=env, log=proc.log, cwd=cwd)
        if proc.started:
            proc.restarts += 1
        proc.popen, proc.pid, proc.cmd, proc.started = popen, popen.pid, cmd, time.monotonic()
        inst.failed = None
        self._dirty = True
        logger.info("instance %s: %s started (pid %d)", inst.name, proc.role, popen.pid)

    def _command(self, proc: _Process) -> list[str]:
        cfg = self.config
        return [cfg.python, *(cfg.sidecar_args if proc.role == "sidecar" else cfg.engine_args)]

    def _started_here(self, inst: _Instance, proc: _Process, pid: int) -> bool:
        """Whether ``pid`` runs this supervisor's command for ``proc`` with the environment
        it gives ``inst``'s processes (its engine <-> sidecar socket): not a process a state
        file names that some other program, or another supervisor, started."""
        if not alive(pid, self._command(proc)):
            return False
        marker = f"SPECMESH_SYNC_ADDR=unix:{self._sync_socket(inst)}".encode()
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return marker in f.read().split(b"\0")
        except OSError:
            return False

    def _common_env(self, inst: _Instance) -> dict[str, str]:
        p = inst.ports
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
        env.update(
            AGENT_NAME=inst.agent,
            SPECMESH_LOG_LEVEL=self.config.log_level,
            SPECMESH_SYNC_ADDR=f"unix:{self._sync_socket(inst)}",
            SPECMESH_EGRESS_URL=f"http://127.0.0.1:{p['egress']}",
            SPECMESH_ENGINE_HTTP=f"127.0.0.1:{p['http']}",
            SPECMESH_ENGINE_GRPC=f"127.0.0.1:{p['grpc']}",
            SPECMESH_REDIS_PROXY=f"127.0.0.1:{p['redis']}",
        )
        if self.config.otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.config.otlp_endpoint
        return env

    def _sync_socket(self, inst: _Instance) -> Path:
        """The engine <-> sidecar socket: ``<home>/run/<instance>.sock``, or a short name
        when that path is longer than a Unix socket path may be (108 bytes)."""
        path = self.config.home / "run" / f"{inst.name}.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha256(inst.name.encode()).hexdigest()[:12]
        path = self.config.home / "run" / f"{digest}.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        home = hashlib.sha256(str(self.config.home).encode()).hexdigest()[:12]
        folder = Path(tempfile.gettempdir()) / f"specmesh-{os.getuid()}-{home}"
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077 or not S_ISDIR(st.st_mode):
            raise OSError(f"{folder} is not a private folder of this user: not using it")
        return folder / f"{digest}.sock"

    async def _sidecar_env(self, inst: _Instance) -> dict[str, str]:
        cfg, p = self.config, inst.ports
        assert self._vault is not None
        # the agent's own identity, fresh at every start: its policy reads its secrets and
        # issues its certificate; the sidecar renews it; a dead one's lapses in its period
        token, _ = await self._vault.create_role_token(
            role=cfg.token_role,
            policies=[agent_policy_name(inst.agent)],
            display_name=inst.name,
        )
        env = self._common_env(inst)
        env.update(
            HOME=str(cfg.home),
            SPECMESH_HOME=str(cfg.home),
            SPECMESH_TRACK=inst.track,
            SPECMESH_INSTANCE_ID=inst.name,
            SPECMESH_INBOUND=f"127.0.0.1:{p['inbound']}",
            SPECMESH_INBOUND_GRPC=f"127.0.0.1:{p['inbound_grpc']}",
            SPECMESH_EGRESS_GRPC=f"127.0.0.1:{p['egress_grpc']}",
            SPECMESH_OPS=f"127.0.0.1:{p['ops']}",
            SPECMESH_ETCD_ENDPOINT=cfg.etcd_endpoint,
            SPECMESH_ETCD_PREFIX=cfg.etcd_prefix,
            SPECMESH_VAULT_ADDR=cfg.vault_addr,
            SPECMESH_VAULT_TOKEN=token,
            SPECMESH_VAULT_REVOKE_ON_STOP="true",
            SPECMESH_VAULT_PKI_MOUNT=cfg.pki_mount,
            SPECMESH_MTLS="true" if cfg.mtls else "false",
            SPECMESH_SERVICE_ADDRESSES=cfg.service_addresses,
            SPECMESH_ENTRY=f"127.0.0.1:{p['entry']}",
            SPECMESH_ENTRY_GRPC=f"127.0.0.1:{p['entry_grpc']}",
        )
        if cfg.jwt_issuers:
            env["SPECMESH_JWT_ISSUERS"] = cfg.jwt_issuers
        if cfg.task_store_upstream:
            env.update(
                SPECMESH_TASK_STORE_PROXY=f"127.0.0.1:{p['task_store']}",
                SPECMESH_TASK_STORE_UPSTREAM=cfg.task_store_upstream,
            )
            if cfg.task_store_password:
                env["SPECMESH_TASK_STORE_PASSWORD"] = cfg.task_store_password
        if cfg.llm_override_url:
            env["SPECMESH_LLM_OVERRIDE_URL"] = cfg.llm_override_url
        return env

    def _engine_env(self, inst: _Instance) -> dict[str, str]:
        """No Vault address, token or any secret: only where its sidecar is. Its card
        names the sidecar's public entry (callers never dial the engine), and its tasks go
        to the sidecar's task-store proxy when the fleet shares a task store."""
        home, p = self.config.home / "engines" / inst.name, inst.ports
        env = self._common_env(inst)
        env.update(
            HOME=str(home),
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            OTEL_SERVICE_NAME=f"agent-{resource_name(inst.agent)}",
            SPECMESH_DATA_DIR=str(self.config.home / "data" / inst.name),
            SPECMESH_ENGINE_PUBLIC_HTTP_URL=f"http://127.0.0.1:{p['entry']}",
            SPECMESH_ENGINE_PUBLIC_GRPC_URL=f"127.0.0.1:{p['entry_grpc']}",
        )
        if self.config.task_store_upstream:
            env["SPECMESH_TASK_STORE"] = f"redis://127.0.0.1:{p['task_store']}/0"
        return env

    async def _deregister(self, inst: _Instance) -> None:
        """Delete the instance's registry entry now (its lease would keep it for its TTL)."""
        if self._etcd is None:
            return
        key = self.keys.registry_instance(inst.agent, inst.name)
        try:
            await self._etcd.delete(key)
        except Exception as e:  # etcd down: the entry lapses with its lease
            logger.warning("could not delete %s from the registry: %s", inst.name, e)

    # ------------------------------------------------------------ readiness

    async def _readiness_loop(self) -> None:
        """One probe in flight per instance: a watch (answered when the sidecar's report
        changes, else after :data:`READY_WATCH_SECONDS`) once an answer came, a plain
        probe until then; a finished one is followed within :data:`READY_POLL_SECONDS`."""
        probes: dict[str, tuple[_Instance, asyncio.Task[None]]] = {}
        try:
            while True:
                try:
                    for name, (inst, task) in list(probes.items()):
                        gone = self.instances.get(name) is not inst or inst.stopping
                        if gone or task.done():
                            task.cancel()
                            del probes[name]
                            if task.done() and not task.cancelled() and task.exception():
                                logger.error(
                                    "readiness probe of %s", name, exc_info=task.exception()
                                )
                    for inst in list(self.instances.values()):
                        if inst.name not in probes and not inst.stopping and inst.sidecar.pid:
                            task = asyncio.create_task(self._probe(inst))
                            probes[inst.name] = (inst, task)
                except Exception:
                    logger.exception("readiness probes")
                await asyncio.sleep(READY_POLL_SECONDS)
        finally:
            tasks = [task for _, task in probes.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _probe(self, inst: _Instance) -> None:
        assert self._http is not None
        ready, revision, etag = False, inst.revision, ""
        url, query = f"{inst.endpoints['ops']}/readyz", {}
        timeout = aiohttp.ClientTimeout(total=2)
        if inst.ready_etag:
            query = {"seen": inst.ready_etag, "wait": str(READY_WATCH_SECONDS)}
            timeout = aiohttp.ClientTimeout(total=READY_WATCH_SECONDS + 2)
        try:
            async with self._http.get(url, params=query, timeout=timeout) as r:
                body = await r.json(content_type=None)
                ready, etag = r.status == 200, r.headers.get("ETag", "")
                engine = body.get("engine") if isinstance(body, dict) else None
                if isinstance(engine, dict):
                    revision = int(engine.get("servingRevision") or revision)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ready = False
        inst.ready_etag = etag
        if (ready, revision) != (inst.ready, inst.revision):
            inst.ready, inst.revision = ready, revision
            inst.was_ready = inst.was_ready or ready
            self._dirty = True
            self._wake.set()  # its phase follows

    # ------------------------------------------------------------ state file

    def _write_state(self) -> None:
        self._dirty = False
        state = {
            "pid": os.getpid(),
            "socket": str(self.config.socket),
            "updatedAt": _now(),
            "workloads": {n: w.to_json() for n, w in sorted(self.workloads.items())},
            "instances": [i.to_json() for i in sorted(self.instances.values(), key=_key)],
        }
        path = self.config.state_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.chmod(0o600)
        tmp.replace(path)

    def _adopt(self) -> None:
        """Take over the instances a previous supervisor left running (its state file): their
        processes keep running and are watched by pid from now on."""
        path = self.config.state_file
        if not path.exists():
            return
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        for name, data in state.get("workloads", {}).items():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.workloads[name] = AgentWorkload.from_json(data)
        logs = self.config.home / "logs"
        for data in state.get("instances", []):
            try:
                procs = {p["role"]: p for p in data["processes"]}
                inst = _Instance(
                    agent=data["agent"],
                    track=data["track"],
                    ordinal=int(data["ordinal"]),
                    ports={k: int(data["ports"][k]) for k in _PORTS},
                    engine=_Process(role="engine", log=Path()),
                    sidecar=_Process(role="sidecar", log=Path()),
                    created=data.get("created", _now()),
                )
                if inst.track not in TRACKS or inst.ordinal < 0:
                    raise ValueError(f"track {inst.track!r}, ordinal {inst.ordinal}")
                name = inst.name  # a valid agent name, or ValueError
            except (KeyError, TypeError, ValueError) as e:
                logger.warning("not adopting an instance of %s: %s", path, e)
                continue
            for proc in (inst.engine, inst.sidecar):
                # its own log and command, whatever the file says; only a process this
                # supervisor started for this instance is adopted (so stopped, later)
                proc.log = logs / f"{name}-{proc.role}.log"
                p = procs.get(proc.role) or {}
                with contextlib.suppress(TypeError, ValueError):
                    pid = int(p.get("pid") or 0)
                    if pid and self._started_here(inst, proc, pid):
                        proc.pid, proc.cmd, proc.started = pid, self._command(proc), 1.0
            if data.get("phase") == "Stopping":
                inst.stopping = True
            self.instances[inst.name] = inst
            logger.info("adopted instance %s", inst.name)
        for inst in [i for i in self.instances.values() if i.stopping]:
            self.instances.pop(inst.name)
            for proc in (inst.sidecar, inst.engine):
                _terminate(proc, STOP_TIMEOUT)


def _key(inst: _Instance) -> tuple[str, int, int]:
    return (resource_name(inst.agent), TRACKS.index(inst.track), inst.ordinal)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _terminate(proc: _Process, timeout: float) -> None:
    """SIGTERM ``proc``, SIGKILL after ``timeout``; reap it when it is a child."""
    pid = proc.pid
    if not pid or not proc.alive():
        proc.pid = 0
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        time.sleep(0.05)
    if proc.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
    proc.pid = 0
    proc.popen = None


async def _serve(config: SupervisorConfig) -> None:
    supervisor = Supervisor(config)
    await supervisor.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await supervisor.stop(stop_instances=True)


def main(argv: list[str] | None = None) -> int:
    """``specmesh supervisor``, configured by environment (:meth:`SupervisorConfig.from_env`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="specmesh supervisor", description=__doc__)
    parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SPECMESH_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = SupervisorConfig.from_env()
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    try:
        asyncio.run(_serve(config))
    except SecretError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0
