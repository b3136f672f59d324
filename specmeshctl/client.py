"""The control plane's gRPC API as the CLI uses it: the generated stubs of
``proto/specmesh/v1/control_plane.proto`` over one channel.

Every call sends the bearer token as ``authorization`` metadata and has a deadline; a gRPC
error is translated here, at one boundary, into :class:`~specmeshctl.errors.ControlPlaneError`
(its status, message -- with an invalid spec's issues -- and the server's reason trailer).
The channel is plaintext for ``host:port`` and TLS for ``grpcs://host:port``, as the control
plane serves it.

Protobuf messages leave this module as they are; :func:`as_json` turns one into the JSON
the ``-o json|yaml`` outputs print (camelCase, the proto's JSON mapping);
:mod:`specmesh.protojson` converts the ``google.protobuf.Struct`` documents (specs,
manifests) both ways.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from specmesh.protojson import message_json
from specmesh.v1 import control_plane_pb2_grpc as rpc
from specmeshctl.errors import ControlPlaneError, UsageError

__all__ = ["DEFAULT_TIMEOUT", "ControlPlaneClient", "as_json", "pages"]

DEFAULT_TIMEOUT = 30.0
"""Seconds one call may take."""

REASON_METADATA = "specmesh-error-reason"

_R = TypeVar("_R")


def as_json(message: Message) -> dict[str, Any]:
    """A message as the proto's JSON mapping (camelCase; defaults left out), with the whole
    numbers a ``google.protobuf.Struct`` carries as doubles turned back into integers."""
    data: dict[str, Any] = message_json(message)
    return data


def _target(server: str) -> tuple[str, bool]:
    """``(host:port, tls)`` of a ``--server`` value."""
    tls = server.startswith("grpcs://")
    server = server.removeprefix("grpcs://").removeprefix("grpc://")
    if "://" in server or not server.rpartition(":")[2].isdigit():
        raise UsageError(
            f"--server {server!r}: expected the control plane's gRPC address, host:port "
            "(plaintext) or grpcs://host:port (TLS)"
        )
    return server.rstrip("/"), tls


class ControlPlaneClient:
    """One channel to the control plane and a stub per service; whoever creates it closes
    it (:meth:`aclose`)."""

    def __init__(
        self,
        *,
        server: str,
        token: str | None,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.server = server
        target, tls = _target(server)
        if tls:
            roots = ca_file.read_bytes() if ca_file is not None else None
            self._channel = grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=roots)
            )
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self.identity = rpc.IdentityServiceStub(self._channel)
        self.manifests = rpc.ManifestServiceStub(self._channel)
        self.agents = rpc.AgentServiceStub(self._channel)
        self.prompts = rpc.PromptServiceStub(self._channel)
        self.mcp = rpc.McpRegistryServiceStub(self._channel)
        self.registry = rpc.AgentRegistryServiceStub(self._channel)
        self.releases = rpc.ReleaseServiceStub(self._channel)
        self.credentials = rpc.CredentialServiceStub(self._channel)
        self.grants = rpc.GrantServiceStub(self._channel)
        self.audit = rpc.AuditServiceStub(self._channel)
        self.mesh = rpc.MeshServiceStub(self._channel)
        self.traces = rpc.TraceServiceStub(self._channel)
        self.tokens = rpc.TokenServiceStub(self._channel)

    async def aclose(self) -> None:
        """Close the channel (``contextlib.aclosing(client)`` does it at the block's end)."""
        await self._channel.close()

    async def call(
        self,
        method: Callable[..., Awaitable[_R]],
        request: Message,
        *,
        timeout: float | None = None,
    ) -> _R:
        """One unary call: ``await client.call(client.agents.GetAgent, GetAgentRequest(...))``."""
        try:
            return await method(request, metadata=self._metadata, timeout=timeout or self._timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e

    def _error(self, e: grpc.aio.AioRpcError) -> ControlPlaneError:
        trailers = e.trailing_metadata() or ()
        reason = next((str(v) for k, v in trailers if k == REASON_METADATA), "")
        message = e.details() or e.code().name
        if e.code() == grpc.StatusCode.UNAVAILABLE and not reason:
            message = f"cannot connect ({message.splitlines()[0]})"
        return ControlPlaneError(server=self.server, code=e.code(), message=message, reason=reason)


async def pages(
    client: ControlPlaneClient, method: Callable[..., Awaitable[Any]], request: Any, field: str
) -> list[Any]:
    """Every item of a paged list call: ``field`` of each page, following next_page_token."""
    items: list[Any] = []
    while True:
        reply = await client.call(method, request)
        items.extend(getattr(reply, field))
        if not reply.next_page_token:
            return items
        request.page_token = reply.next_page_token
