"""A real ``specmesh control-plane`` process on the session's etcd and OpenBao, for the tests
that drive it from outside (the CLI, schemathesis, kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

from control_plane.auth import Role, StaticTokenAuthenticator
from localfleet.installer import LocalServices
from specmesh.ports import free_port
from tests.polling import eventually_sync

__all__ = ["ControlPlaneProcess"]


class ControlPlaneProcess:
    """Start (and restart) one control plane with its own etcd prefix and token file."""

    def __init__(
        self,
        services: LocalServices,
        folder: Path,
        *,
        tokens: Mapping[str, tuple[str, Sequence[Role]]],
        vault_token: str | None = None,
        prefix: str | None = None,
    ) -> None:
        self.folder = folder
        self.prefix = prefix or f"/cp-{uuid.uuid4().hex[:8]}"
        tokens_file = folder / "tokens.json"
        StaticTokenAuthenticator.write_file(
            tokens_file, {t: (name, list(roles)) for t, (name, roles) in tokens.items()}
        )
        self.env = {
            **os.environ,
            "SPECMESH_ETCD_ENDPOINT": services.etcd.endpoint,
            "SPECMESH_ETCD_PREFIX": self.prefix,
            "SPECMESH_VAULT_ADDR": services.bao.address,
            "SPECMESH_VAULT_TOKEN": vault_token or services.bao.root_token,
            "SPECMESH_TOKENS_FILE": str(tokens_file),
            "SPECMESH_OTLP_LISTEN": "",
            "SPECMESH_TRACES_DB": str(folder / "traces.db"),
        }
        self._procs: list[subprocess.Popen[bytes]] = []
        self.url = ""
        self.grpc = ""

    @property
    def log(self) -> Path:
        return self.folder / f"cp-{len(self._procs)}.log"

    def start(self) -> str:
        """Start a process (a new one after a kill) and wait until it answers; its URL."""
        port = free_port()
        self.grpc = self.env["SPECMESH_GRPC_LISTEN"] = f"127.0.0.1:{free_port()}"
        with (self.folder / f"cp-{len(self._procs) + 1}.log").open("wb") as log:
            self._procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "specmeshctl", "control-plane", "--listen",
                     f"127.0.0.1:{port}"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if self._procs[-1].poll() is not None:
                raise AssertionError(f"control plane exited: {self.log.read_text()}")
            try:
                return requests.get(f"{self.url}/healthz", timeout=1).ok
            except requests.RequestException:
                return False

        try:
            eventually_sync(healthy, timeout=30, what="the control plane's /healthz")
        except AssertionError as e:
            self._procs[-1].kill()
            raise AssertionError(f"control plane did not start: {self.log.read_text()}") from e
        return self.url

    def kill(self) -> None:
        """kill -9 the running process."""
        self._procs[-1].send_signal(signal.SIGKILL)
        self._procs[-1].wait(timeout=10)

    def stop(self) -> int | None:
        """Stop every process still running; the last one's exit code (None if killed)."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        return self._procs[-1].returncode if self._procs else None
