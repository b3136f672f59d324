"""The local runtime: the supervisor process (:mod:`specmesh.supervisor`) on this machine,
reached over its Unix socket. The supervisor runs the processes; this is only its client,
so a control plane that dies or restarts changes nothing that runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from specmesh.errors import SpecmeshError
from specmesh.names import resource_name
from specmesh.workloads import AgentWorkload, InstanceStatus

__all__ = ["LocalRuntime", "RuntimeRefusedError", "RuntimeUnavailableError"]


class RuntimeUnavailableError(SpecmeshError):
    """The runtime did not answer (the local supervisor is not running)."""

    def __init__(self, *, runtime: str, reason: str) -> None:
        self.runtime = runtime
        super().__init__(f"the {runtime} runtime is unavailable: {reason}")


class RuntimeRefusedError(SpecmeshError):
    """The runtime refused a request (its message says why)."""

    def __init__(self, *, runtime: str, reason: str) -> None:
        self.runtime = runtime
        super().__init__(f"the {runtime} runtime refused it: {reason}")


class LocalRuntime:
    """Client of the local supervisor's API."""

    name = "local"

    def __init__(self, socket: Path, *, timeout: float = 10.0) -> None:
        self.socket = socket
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.socket)), timeout=self._timeout
            )
        return self._session

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self._http().request(method, f"http://supervisor{path}", json=body) as r:
                data = await r.json(content_type=None)
                if r.status >= 400:
                    error = data.get("error") if isinstance(data, dict) else data
                    raise RuntimeRefusedError(
                        runtime=self.name, reason=f"{method} {path} -> {r.status}: {error}"
                    )
                return data
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise RuntimeUnavailableError(
                runtime=self.name, reason=f"supervisor at {self.socket}: {e or type(e).__name__}"
            ) from None

    async def apply(self, workload: AgentWorkload) -> None:
        await self._call("PUT", f"/v1/agents/{workload.name}", workload.to_json())

    async def remove(self, agent: str) -> None:
        await self._call("DELETE", f"/v1/agents/{resource_name(agent)}")

    async def running(self) -> set[str]:
        data = await self._call("GET", "/v1/agents")
        return {name for name, entry in data.items() if entry["workload"] or entry["instances"]}

    async def observe(self, agent: str) -> list[InstanceStatus]:
        data = await self._call("GET", f"/v1/agents/{resource_name(agent)}")
        return [InstanceStatus.from_json(i) for i in data["instances"]]

    async def observe_all(self) -> dict[str, list[InstanceStatus]]:
        data = await self._call("GET", "/v1/agents")
        return {
            name: [InstanceStatus.from_json(i) for i in entry["instances"]]
            for name, entry in data.items()
        }

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
