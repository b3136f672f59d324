"""A small client of the control plane's REST API (``/api/v1``), used by the CLI.

Every call sends ``Authorization: Bearer <token>`` and has a timeout. Errors are
translated here, at one boundary, into specmesh errors so callers map them as they map
the direct etcd/Vault path's::

    SpecmeshError
    +-- SpecError                     400 (invalid_spec with its issues; bad_request, ...)
    +-- ConflictError
    |   +-- RemoteConflictError       409 conflict
    +-- NameCollisionError
    |   +-- RemoteNameCollisionError  409 name_collision
    +-- NotFoundError
    |   +-- RemoteNotFoundError       404
    +-- ApiError                      any other answer (500, unexpected body) (``status``, ``code``)
        +-- NotAllowedError           401 (no or unknown token), 403 (the role may not)
        +-- ControlPlaneUnavailableError
                                      503, or the server cannot be reached (refused, timeout)

The ``Remote*`` errors keep the server's message and carry ``status`` and ``code``; the
fields of the core error they derive from are unknown on this side and left empty.
Errors of httpx never leave this module: each is translated with ``raise ... from e``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import quote

import httpx

from specmesh.errors import (
    ConflictError,
    NameCollisionError,
    NotFoundError,
    SpecError,
    SpecIssue,
    SpecmeshError,
)

__all__ = [
    "ApiClient",
    "ApiError",
    "ControlPlaneUnavailableError",
    "NotAllowedError",
    "RemoteConflictError",
    "RemoteNameCollisionError",
    "RemoteNotFoundError",
]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class ApiError(SpecmeshError):
    """The control plane answered with an error this client has no better type for."""

    def __init__(self, *, status: int, code: str, message: str, text: str | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(text or f"control plane: {message} (HTTP {status}, {code})")


class NotAllowedError(ApiError):
    """401 (no or unknown bearer token) or 403 (the caller's roles may not do this)."""

    def __init__(self, *, status: int, code: str, message: str, server: str) -> None:
        self.server = server
        if status == 401:
            hint = "set SPECMESH_TOKEN (or SPECMESH_TOKEN_FILE, or --token)"
            text = f"not signed in to the control plane at {server}: {message}; {hint}"
        else:
            text = f"not allowed by the control plane at {server}: {message}"
        super().__init__(status=status, code=code, message=message, text=text)


class ControlPlaneUnavailableError(ApiError):
    """The control plane cannot be reached, or answered 503 (its etcd or Vault is down)."""

    def __init__(
        self, *, server: str, reason: str, status: int = 0, code: str = "unavailable"
    ) -> None:
        self.server = server
        self.reason = reason
        text = f"control plane at {server} is unavailable: {reason}"
        super().__init__(status=status, code=code, message=reason, text=text)


class RemoteConflictError(ConflictError):
    """409 ``conflict``: the expected revision is stale (the server's message)."""

    def __init__(self, *, message: str, code: str = "conflict") -> None:
        self.kind, self.name, self.expected, self.actual = "", "", None, None
        self.status, self.code = 409, code
        SpecmeshError.__init__(self, message)


class RemoteNameCollisionError(NameCollisionError):
    """409 ``name_collision``: two logical names map to one resource name."""

    def __init__(self, *, message: str, code: str = "name_collision") -> None:
        self.name, self.existing, self.resource_name = "", "", ""
        self.status, self.code = 409, code
        SpecmeshError.__init__(self, message)


class RemoteNotFoundError(NotFoundError):
    """404: no such object (the server's message)."""

    def __init__(self, *, message: str, code: str = "not_found") -> None:
        self.kind, self.name = "", ""
        self.status, self.code = 404, code
        SpecmeshError.__init__(self, message)


def _issues(raw: Any) -> list[SpecIssue]:
    if not isinstance(raw, list):
        return []
    return [
        SpecIssue(
            path=str(i.get("path", "")),
            rule=str(i.get("rule", "")),
            message=str(i.get("message", "")),
            severity=str(i.get("severity", "error")),
        )
        for i in raw
        if isinstance(i, dict)
    ]


def error_from_response(
    status: int, body: Any, *, server: str, source: str | None = None
) -> SpecmeshError:
    """The specmesh error of an error answer ``{"error": {"code", "message", "issues"?}}``."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {}
    code = str(err.get("code") or f"http_{status}")
    message = str(err.get("message") or f"HTTP {status} without an error body")
    if status == 400:
        issues = _issues(err.get("issues"))
        if not issues:
            issues = [SpecIssue(path="", rule=code, message=message)]
        return SpecError(issues, source=source)
    if status in (401, 403):
        return NotAllowedError(status=status, code=code, message=message, server=server)
    if status == 404:
        return RemoteNotFoundError(message=message, code=code)
    if status == 409:
        if code == "name_collision":
            return RemoteNameCollisionError(message=message, code=code)
        return RemoteConflictError(message=message, code=code)
    if status in (502, 503, 504):
        return ControlPlaneUnavailableError(server=server, reason=message, status=status, code=code)
    return ApiError(status=status, code=code, message=message)


class ApiClient:
    """The control plane's REST API. An async context manager; whoever creates it closes it.

    ``transport`` replaces the network (an ``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        *,
        server: str,
        token: str | None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "specmesh-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(
            base_url=self.server, headers=headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ transport

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        source: str | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON answer or raise a specmesh error."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = await self._http.request(method, path, params=clean or None, json=body)
        except httpx.TimeoutException as e:
            raise ControlPlaneUnavailableError(
                server=self.server, reason=f"timed out ({type(e).__name__})"
            ) from e
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            self._bad_url(e)
        except httpx.TransportError as e:
            raise ControlPlaneUnavailableError(server=self.server, reason=_reason(e)) from e
        try:
            data = response.json() if response.content else None
        except ValueError as e:
            if response.is_success:
                raise ApiError(
                    status=response.status_code, code="bad_response", message="answer is not JSON"
                ) from e
            data = None
        if response.is_success:
            return data
        raise error_from_response(response.status_code, data, server=self.server, source=source)

    def _bad_url(self, e: Exception) -> NoReturn:
        raise ApiError(
            status=0,
            code="bad_server_url",
            message=f"{self.server!r} is not an http(s) URL of a control plane ({e})",
        ) from e

    # ------------------------------------------------------------ calls

    async def apply(
        self,
        manifest: dict[str, Any],
        *,
        expected_revision: int | None = None,
        dry_run: bool = False,
        source: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"manifest": manifest, "dryRun": dry_run}
        if expected_revision is not None:
            body["expectedRevision"] = expected_revision
        result: dict[str, Any] = await self.request(
            "POST", "/api/v1/apply", body=body, source=source
        )
        return result

    async def list_agents(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/api/v1/agents")
        return result

    async def get_agent(self, name: str, revision: int | None = None) -> dict[str, Any]:
        params = {"revision": revision} if revision is not None else None
        result: dict[str, Any] = await self.request(
            "GET", f"/api/v1/agents/{_seg(name)}", params=params
        )
        return result

    async def delete_agent(self, name: str, *, expected_revision: int | None = None) -> None:
        params = {"expectedRevision": expected_revision} if expected_revision is not None else None
        await self.request("DELETE", f"/api/v1/agents/{_seg(name)}", params=params)

    async def history(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request(
            "GET", f"/api/v1/agents/{_seg(name)}/revisions"
        )
        return result

    async def diff(self, name: str, a: int, b: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request(
            "GET", f"/api/v1/agents/{_seg(name)}/diff", params={"from": a, "to": b}
        )
        return result

    async def rollback(
        self, name: str, revision: int, *, expected_revision: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"revision": revision}
        if expected_revision is not None:
            body["expectedRevision"] = expected_revision
        result: dict[str, Any] = await self.request(
            "POST", f"/api/v1/agents/{_seg(name)}/rollback", body=body
        )
        return result

    async def scale(
        self,
        name: str,
        replicas: int,
        *,
        track: str = "stable",
        expected_revision: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"replicas": replicas, "track": track}
        if expected_revision is not None:
            body["expectedRevision"] = expected_revision
        result: dict[str, Any] = await self.request(
            "POST", f"/api/v1/agents/{_seg(name)}/scale", body=body
        )
        return result

    async def agent_status(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/api/v1/agents/{_seg(name)}/status")
        return result

    async def get_release(self, agent: str) -> dict[str, Any] | None:
        result = await self.request("GET", f"/api/v1/agents/{_seg(agent)}/release")
        release: dict[str, Any] | None = result.get("release") if result else None
        return release

    async def set_release(self, agent: str, release: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "PUT", f"/api/v1/agents/{_seg(agent)}/release", body=release
        )
        return result

    async def promote(self, agent: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", f"/api/v1/agents/{_seg(agent)}/release/promote"
        )
        return result

    async def abort(self, agent: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", f"/api/v1/agents/{_seg(agent)}/release/abort"
        )
        return result

    async def list_prompts(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = await self.request("GET", "/api/v1/prompts")
        return result

    async def get_prompt(self, key: str) -> dict[str, Any]:
        """``{promptKey, versions: [entry...], release}``; 404 when it has no version."""
        result: dict[str, Any] = await self.request("GET", f"/api/v1/prompts/{_seg(key)}")
        return result

    async def list_mcp_servers(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = await self.request("GET", "/api/v1/mcp-servers")
        return result

    async def mcp_tool_listings(self) -> dict[str, dict[str, Any]]:
        """Each MCP server's tools as the control plane last listed them:
        ``{name: {tools, refreshedAt, checkedAt, error, credentialsFrom}}``."""
        result: dict[str, dict[str, Any]] = await self.request("GET", "/api/v1/mcp-tools")
        return result

    async def collect_garbage(self, grace_seconds: float) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", "/api/v1/secrets/gc", body={"graceSeconds": grace_seconds}
        )
        return result

    async def list_grants(self, agent: str | None = None) -> list[dict[str, Any]]:
        params = {"agent": agent} if agent else None
        result: list[dict[str, Any]] = await self.request("GET", "/api/v1/grants", params=params)
        return result

    async def share_secret(self, agent: str, secret: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "PUT", f"/api/v1/agents/{_seg(agent)}/grants", body={"secret": secret}
        )
        return result

    async def unshare_secret(self, agent: str, secret: str) -> None:
        await self.request(
            "DELETE", f"/api/v1/agents/{_seg(agent)}/grants", params={"secret": secret}
        )

    async def list_instances(self, agent: str | None = None) -> list[dict[str, Any]]:
        params = {"agent": agent} if agent else None
        result: list[dict[str, Any]] = await self.request("GET", "/api/v1/instances", params=params)
        return result

    async def agent_card(self, name: str) -> dict[str, Any]:
        """The A2A card a live instance of the agent published (its public entry's URLs)."""
        result: dict[str, Any] = await self.request("GET", f"/api/v1/agents/{_seg(name)}/card")
        return result

    async def invoke_token(self, name: str) -> dict[str, Any]:
        """A short-lived JWT to call the agent through its entry as this API principal:
        ``{"token", "expiresAt", "issuer", "subject", "audience"}``."""
        result: dict[str, Any] = await self.request(
            "POST", f"/api/v1/agents/{_seg(name)}/invoke-token"
        )
        return result

    async def audit(
        self, *, name: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        params: dict[str, str | int] = {"limit": limit}
        if name:
            params["name"] = name
        if kind:
            params["kind"] = kind
        result: list[dict[str, Any]] = await self.request("GET", "/api/v1/audit", params=params)
        return result

    async def mesh(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/api/v1/mesh")
        return result

    async def create_token(
        self, name: str, roles: list[str], *, ttl_seconds: int | None = None
    ) -> dict[str, Any]:
        """A new API token: its record and, under ``token``, its secret (shown only now)."""
        body: dict[str, Any] = {"name": name, "roles": roles}
        if ttl_seconds is not None:
            body["ttlSeconds"] = ttl_seconds
        result: dict[str, Any] = await self.request("POST", "/api/v1/tokens", body=body)
        return result

    async def list_tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/api/v1/tokens")
        return result

    async def revoke_token(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("DELETE", f"/api/v1/tokens/{_seg(token_id)}")
        return result


def _seg(name: str) -> str:
    """A name as one URL path segment."""
    return quote(name, safe="")


def _reason(e: httpx.TransportError) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({text})"
    return text
