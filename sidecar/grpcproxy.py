"""A2A over gRPC through the sidecar: inbound (mTLS + partner check) and egress (routing).

* :class:`GrpcInbound` listens on ``SPECMESH_INBOUND_GRPC``. In mTLS mode it requires a client
  certificate from the mesh CA; the caller is the agent named by the certificate's URI SAN and
  must be allowed by the shared :class:`~sidecar.callers.CallerPolicy` (it lists THIS agent
  among its partners and ``callers.agents`` admits it), else ``PERMISSION_DENIED``; no usable
  certificate -> ``UNAUTHENTICATED`` (both with ``grpc-status-details-bin``). Allowed calls go,
  as raw bytes, to the engine's gRPC listener (``SPECMESH_ENGINE_GRPC``) with the caller's
  metadata plus ``x-specmesh-caller``; ``x-specmesh-principal`` is kept only from a
  certificate naming THIS agent (an entry of another instance forwarding). Plaintext when
  Istio provides mTLS: a bearer token, when sent, is verified (``x-specmesh-principal``) and
  the caller comes from ``x-forwarded-client-cert``.
  Certificate rotation: the server credentials are dynamic
  (``grpc.dynamic_ssl_server_credentials``): each new handshake presents the current
  certificate; established connections are untouched.
* :class:`GrpcEgress` listens on ``SPECMESH_EGRESS_GRPC`` (loopback, plaintext: the engine's
  side). The metadata key ``x-specmesh-target-agent`` names the partner; it must be declared
  in the current snapshot's ``partnerAgents`` (else ``PERMISSION_DENIED``). An instance with a
  ``grpcEndpoint`` is picked by a :class:`~sidecar.router.Router` over
  :class:`GrpcInstanceSource`, dialled with this agent's certificate (the partner's identity
  checked through ``grpc.ssl_target_name_override``), and the partner's spec ``headers``
  (resolved from Vault) are added as lower-case metadata. Outcomes are reported to the router
  (``UNAVAILABLE`` counts as a gateway error). No retries; ``queryParams`` do not apply.

Every method of the A2A service (read from ``a2a.types.a2a_pb2``'s descriptor; unary-unary and
unary-stream) is relayed without decoding (serializers ``None``). The upstream outcome reaches
the caller intact: status code, details and trailing metadata (:func:`relayed_trailers`), so
``grpc-status-details-bin`` still carries the ``google.rpc.Status`` whose ``ErrorInfo`` lets the
a2a-sdk client raise its typed errors (``TaskNotFoundError``, ...), on unary calls and on
streams, also after messages were relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Self

import grpc
from a2a.types import a2a_pb2
from cryptography import x509

from specmesh.addresses import parse_host_port
from specmesh.callers import CALLER_KEY, PRINCIPAL_KEY
from specmesh.names import resource_name

from .callers import CallerPolicy, CallerRefused
from .credentials import CredentialResolver, CredentialUnavailableError
from .inbound import PartnerGraph
from .mtls import TRUST_DOMAIN, AgentCertificates, agent_dns_name
from .router import InstanceLike, InstanceSource, NoInstanceError, Router, Target
from .state import SnapshotHolder

__all__ = [
    "A2A_METHODS",
    "A2A_SERVICE",
    "AUTHORIZATION_KEY",
    "CALLER_KEY",
    "PRINCIPAL_KEY",
    "TARGET_KEY",
    "ChannelPool",
    "GrpcEgress",
    "GrpcInbound",
    "GrpcInstanceSource",
    "GrpcRelayServer",
    "Handler",
    "Metadata",
    "abort_as",
    "abort_refused",
    "agent_from_pem",
    "bind_server",
    "end_to_end_metadata",
    "first_value",
    "generic_handler",
    "relay_stream",
    "relay_unary",
    "relayed_trailers",
    "split_address",
]

logger = logging.getLogger(__name__)

_SERVICE = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"]
A2A_SERVICE: str = _SERVICE.full_name
"""Fully qualified name of the A2A gRPC service (``lf.a2a.v1.A2AService``)."""
A2A_METHODS: dict[str, bool] = {
    m.name: bool(m.server_streaming) for m in _SERVICE.methods if not m.client_streaming
}
"""Method name -> whether the server streams (no A2A method streams from the client)."""

TARGET_KEY = "x-specmesh-target-agent"
AUTHORIZATION_KEY = "authorization"
XFCC_KEY = "x-forwarded-client-cert"
_SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/agent/"
_HOP_BY_HOP = frozenset(
    {"te", "host", "connection", "content-type", "user-agent", "keep-alive", "upgrade"}
)

_TRANSPORT_TRAILERS = frozenset(
    {
        "grpc-status",
        "grpc-message",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-timeout",  # gRPC core aborts the process when a trailer carries it
        "grpc-previous-rpc-attempts",  # this hop's retries, not the caller's
    }
)

Metadata = list[tuple[str, str | bytes]]
Handler = Callable[[bytes, grpc.aio.ServicerContext], Any]


def agent_from_pem(pem: bytes | str | None) -> str | None:
    """The agent resource name in a PEM certificate's SPIFFE URI SAN."""
    if not pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(_SPIFFE_PREFIX):
            name = uri[len(_SPIFFE_PREFIX) :]
            if name and "/" not in name:
                return name
    return None


def end_to_end_metadata(metadata: Sequence[Any] | None, *drop: str) -> Metadata:
    """Invocation metadata worth forwarding: no pseudo-headers, hop-by-hop or ``grpc-*`` keys,
    nor the keys in ``drop``."""
    dropped = {d.lower() for d in drop}
    out: Metadata = []
    for item in metadata or ():
        key, value = str(item[0]).lower(), item[1]
        if key.startswith((":", "grpc-")) or key in _HOP_BY_HOP or key in dropped:
            continue
        out.append((key, value))
    return out


def first_value(metadata: Sequence[Any] | None, key: str) -> str | None:
    """The first text value of ``key`` in invocation metadata."""
    for item in metadata or ():
        if str(item[0]).lower() == key and isinstance(item[1], str):
            return item[1]
    return None


async def abort_refused(context: grpc.aio.ServicerContext, refused: CallerRefused) -> NoReturn:
    """End the call with the refusal's status (``UNAUTHENTICATED`` / ``PERMISSION_DENIED``)
    and its ``google.rpc.Status`` in ``grpc-status-details-bin``."""
    logger.warning(
        "refused a gRPC call to %s: %s",
        refused.agent,
        refused.message,
        extra={"agent": refused.agent, "reason": refused.reason},
    )
    code = getattr(grpc.StatusCode, refused.reason)
    await context.abort(code, refused.message, refused.grpc_trailers())
    raise AssertionError("ServicerContext.abort returned")  # unreachable: abort raises


def relayed_trailers(metadata: Sequence[Any] | None) -> tuple[tuple[str, str | bytes], ...]:
    """Upstream trailing metadata to hand to the caller: all of it (``grpc-status-details-bin``
    and other ``grpc-*`` keys included) but pseudo-headers, hop-by-hop keys and those gRPC sets
    itself for this hop (status, message, encodings, timeout, retry count, ``grpc-internal-*``).
    A tuple: ``ServicerContext.abort`` refuses anything else."""
    out: list[tuple[str, str | bytes]] = []
    for item in metadata or ():
        key, value = str(item[0]).lower(), item[1]
        if (
            key.startswith((":", "grpc-internal-"))
            or key in _HOP_BY_HOP
            or key in _TRANSPORT_TRAILERS
        ):
            continue
        out.append((key, value))
    return tuple(out)


async def abort_as(context: grpc.aio.ServicerContext, error: grpc.aio.AioRpcError) -> NoReturn:
    """End the call as the upstream call ended: its code, details and trailers."""
    await context.abort(
        error.code(), error.details() or "", relayed_trailers(error.trailing_metadata())
    )
    raise AssertionError("ServicerContext.abort returned")  # unreachable: abort raises


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


def generic_handler(
    unary: Callable[[str], Handler], stream: Callable[[str], Handler]
) -> grpc.GenericRpcHandler:
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, streaming in A2A_METHODS.items():
        if streaming:
            handlers[name] = grpc.unary_stream_rpc_method_handler(stream(name))
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(unary(name))
    return grpc.method_handlers_generic_handler(A2A_SERVICE, handlers)


async def relay_unary(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    context: grpc.aio.ServicerContext,
    metadata: Metadata,
) -> bytes:
    """One unary call upstream; its answer's trailing metadata is copied to ``context``. An
    upstream error is raised as :class:`grpc.aio.AioRpcError` (end the call with
    :func:`abort_as`)."""
    call = channel.unary_unary(f"/{A2A_SERVICE}/{method}")(
        request, metadata=metadata, timeout=_timeout(context)
    )
    response: bytes = await call
    context.set_trailing_metadata(relayed_trailers(await call.trailing_metadata()))
    return response


async def relay_stream(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    context: grpc.aio.ServicerContext,
    metadata: Metadata,
    outcome: list[grpc.StatusCode],
) -> AsyncIterator[bytes]:
    """One server-streaming call upstream, relayed message by message; the final status goes
    into ``outcome``, and an error ends the call on ``context`` as it ended upstream."""
    call = channel.unary_stream(f"/{A2A_SERVICE}/{method}")(
        request, metadata=metadata, timeout=_timeout(context)
    )
    try:
        async for message in call:
            yield message
        trailers = await call.trailing_metadata()
    except grpc.aio.AioRpcError as e:
        outcome.append(e.code())
        await abort_as(context, e)
    finally:
        call.cancel()  # no-op once done; stops upstream when the caller went away
    outcome.append(grpc.StatusCode.OK)
    context.set_trailing_metadata(relayed_trailers(trailers))


async def bind_server(server: grpc.aio.Server, address: str, creds: Any | None) -> int:
    port: int = (
        server.add_secure_port(address, creds)
        if creds is not None
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return port


def split_address(address: str) -> tuple[str, int]:
    return parse_host_port(address, setting="gRPC listen address", listen=True)


# ---------------------------------------------------------------- inbound


class GrpcRelayServer:
    """A gRPC server that relays every method as raw bytes through the subclass's
    ``_unary_handler`` / ``_stream_handler`` (the inbound, the egress and the entry); an
    async context manager. ``_server_credentials`` gives TLS (``None``: plaintext); ``_open`` and
    ``_close`` set up and release what the handlers relay to."""

    def __init__(self, *, address: str) -> None:
        self.host, self.port = split_address(address)
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        """``host:port`` it listens on (the actual port after :meth:`start`)."""
        return f"{self.host}:{self.port}"

    def _unary_handler(self, method: str) -> Handler:
        raise NotImplementedError

    def _stream_handler(self, method: str) -> Handler:
        raise NotImplementedError

    def _server_credentials(self) -> Any | None:
        return None

    async def _open(self) -> None:
        """Before the server starts."""

    async def _close(self) -> None:
        """After the server stopped."""

    async def start(self) -> None:
        await self._open()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (generic_handler(self._unary_handler, self._stream_handler),)
        )
        self.port = await bind_server(server, self.target, self._server_credentials())
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting; calls in flight get ``grace`` seconds."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self._close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class GrpcInbound(GrpcRelayServer):
    """The A2A gRPC inbound; ``certificates=None`` means plaintext mode (Istio).

    ``policy`` decides who may call (shared with the HTTP listeners); without one, a policy
    over ``graph`` with the default ``callers`` and no trusted token issuer."""

    def __init__(
        self,
        *,
        agent_name: str,
        engine_grpc: str,
        graph: PartnerGraph | None = None,
        certificates: AgentCertificates | None,
        policy: CallerPolicy | None = None,
        address: str = "127.0.0.1:0",
        require_identity: bool = False,
    ) -> None:
        super().__init__(address=address)
        self.agent = resource_name(agent_name)
        self.engine_grpc = engine_grpc
        self._require_identity = require_identity
        if policy is None:
            if graph is None:
                raise ValueError("GrpcInbound needs a policy or a partner graph")
            policy = CallerPolicy(agent=agent_name, graph=graph)
        self.policy = policy
        self._certs = certificates
        self._channel: grpc.aio.Channel | None = None
        self._cert_config: tuple[str, Any] | None = None

    def _certificate_config(self) -> Any:
        assert self._certs is not None
        cert = self._certs.current
        if self._cert_config is None or self._cert_config[0] != cert.serial:
            chain = (cert.certificate + "\n" + cert.ca_chain + "\n").encode()
            config = grpc.ssl_server_certificate_configuration(
                [(cert.private_key.encode(), chain)], root_certificates=self._certs.ca_pem.encode()
            )
            self._cert_config = (cert.serial, config)
        return self._cert_config[1]

    def _fetch_config(self) -> Any:
        """Called by gRPC before each handshake: a new config only after a rotation."""
        previous = self._cert_config[0] if self._cert_config else None
        config = self._certificate_config()
        assert self._cert_config is not None
        return config if self._cert_config[0] != previous else None

    def _server_credentials(self) -> Any | None:
        if self._certs is None:
            return None
        return grpc.dynamic_ssl_server_credentials(
            self._certificate_config(), self._fetch_config, require_client_authentication=True
        )

    async def _open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.engine_grpc)

    async def _close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _authorize(self, context: grpc.aio.ServicerContext) -> Metadata:
        """The metadata to send to the engine, or abort the call (the same rules as the
        HTTP inbound, :class:`~sidecar.inbound.InboundServer`)."""
        incoming = context.invocation_metadata()
        sent = first_value(incoming, PRINCIPAL_KEY)
        metadata = end_to_end_metadata(incoming, CALLER_KEY, PRINCIPAL_KEY)
        try:
            if self._certs is not None:
                pems = context.auth_context().get("x509_pem_cert") or []
                caller = agent_from_pem(pems[0]) if pems else None
                if caller is None:
                    raise self.policy.refused(
                        "UNAUTHENTICATED", "the client certificate names no agent"
                    )
                if caller == self.agent and sent:
                    metadata.append((PRINCIPAL_KEY, sent))  # an entry of this agent forwarding
                else:
                    self.policy.check_agent(caller)
                metadata.append((CALLER_KEY, caller))
            else:
                caller = self.policy.mesh_caller(first_value(incoming, XFCC_KEY))
                if caller is not None:
                    self.policy.check_agent(caller)
                    metadata.append((CALLER_KEY, caller))
                authorization = first_value(incoming, AUTHORIZATION_KEY)
                metadata = [(k, v) for k, v in metadata if k != AUTHORIZATION_KEY]
                if authorization:
                    metadata.append((PRINCIPAL_KEY, await self.policy.external(authorization)))
                elif caller is None and self._require_identity:
                    await self.policy.authenticate(None)  # neither an agent nor a token
        except CallerRefused as e:
            await abort_refused(context, e)
        return metadata

    def _unary_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = await self._authorize(context)
            assert self._channel is not None
            try:
                return await relay_unary(self._channel, method, request, context, metadata)
            except grpc.aio.AioRpcError as e:
                await abort_as(context, e)

        return handle

    def _stream_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            metadata = await self._authorize(context)
            assert self._channel is not None
            async for message in relay_stream(
                self._channel, method, request, context, metadata, []
            ):
                yield message

        return handle


# ---------------------------------------------------------------- egress


@dataclass(frozen=True)
class _GrpcInstance:
    instance: str
    agent: str
    endpoint: str
    track: str
    state: str


class GrpcInstanceSource:
    """Instances that serve gRPC, with their ``grpc_endpoint`` as the router's endpoint
    (instances registered without one are skipped)."""

    def __init__(self, source: InstanceSource) -> None:
        self._source = source

    def instances(self, agent: str) -> Sequence[InstanceLike]:
        out: list[InstanceLike] = []
        for inst in self._source.instances(agent):
            endpoint = getattr(inst, "grpc_endpoint", None)
            if endpoint:
                out.append(
                    _GrpcInstance(inst.instance, inst.agent, str(endpoint), inst.track, inst.state)
                )
        return out


_REPORTED_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
}


def _grpc_target(url: str) -> str:
    for scheme in ("grpcs://", "grpc://", "https://", "http://"):
        if url.startswith(scheme):
            return url[len(scheme) :]
    return url


class ChannelPool:
    """Channels to other instances' gRPC inbounds, dialled with this agent's certificate
    (the target agent's identity checked through ``grpc.ssl_target_name_override``); one
    channel per (address, agent, certificate): a rotation opens new channels and closes the
    old ones after ``grace`` seconds. Plaintext when ``certificates`` is None."""

    def __init__(self, *, certificates: AgentCertificates | None, grace: float = 30.0) -> None:
        self._certs = certificates
        self.grace = grace
        self._channels: dict[tuple[str, str, str], grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, target: Target) -> grpc.aio.Channel:
        address = _grpc_target(target.url)
        serial = self._certs.current.serial if self._certs is not None else ""
        key = (address, target.agent, serial)
        channel = self._channels.get(key)
        if channel is not None:
            return channel
        for old_key in [k for k in self._channels if k[:2] == key[:2]]:
            old = self._channels.pop(old_key)
            task = asyncio.create_task(old.close(self.grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if self._certs is None:
            channel = grpc.aio.insecure_channel(address)
        else:
            cert = self._certs.current
            creds = grpc.ssl_channel_credentials(
                root_certificates=self._certs.ca_pem.encode(),
                private_key=cert.private_key.encode(),
                certificate_chain=(cert.certificate + "\n" + cert.ca_chain + "\n").encode(),
            )
            channel = grpc.aio.secure_channel(
                address,
                creds,
                options=[("grpc.ssl_target_name_override", agent_dns_name(target.agent))],
            )
        self._channels[key] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class GrpcEgress(GrpcRelayServer):
    """The engine's A2A gRPC way out (loopback, plaintext)."""

    def __init__(
        self,
        *,
        snapshots: SnapshotHolder,
        credentials: CredentialResolver,
        router: Router,
        certificates: AgentCertificates | None,
        address: str = "127.0.0.1:0",
        channel_grace: float = 30.0,
    ) -> None:
        super().__init__(address=address)
        self._snapshots = snapshots
        self._credentials = credentials
        self._router = router
        self._certs = certificates
        self._channels = ChannelPool(certificates=certificates, grace=channel_grace)

    async def _close(self) -> None:
        await self._channels.close()

    async def _prepare(
        self, context: grpc.aio.ServicerContext
    ) -> tuple[str, Metadata, dict[str, str]]:
        """(target agent, metadata to send, metadata as a dict for header matches), or abort."""
        incoming = end_to_end_metadata(context.invocation_metadata())
        by_key = {k: v for k, v in incoming if isinstance(v, str)}
        wanted = by_key.get(TARGET_KEY, "")
        snapshot = self._snapshots.current
        if snapshot is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar has no spec yet")
        assert snapshot is not None
        if not wanted:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"metadata {TARGET_KEY!r} names no agent"
            )
        partner = next(
            (
                p
                for p in snapshot.spec.partner_agents
                if resource_name(p.agent_name) == resource_name(wanted)
            ),
            None,
        )
        if partner is None:
            logger.warning(
                "refused a gRPC call to partner agent %r: agent %s's spec does not name it",
                wanted,
                snapshot.agent_name,
                extra={"refused": "partner agent", "target": wanted},
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"partner agent {wanted!r} is not declared in agent {snapshot.agent_name!r}'s spec",
            )
        assert partner is not None
        metadata = [(k, v) for k, v in incoming if k != TARGET_KEY]
        try:
            for name, value in partner.headers.items():
                metadata.append((name.lower(), await self._credentials.resolve(value)))
        except CredentialUnavailableError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return resource_name(partner.agent_name), metadata, by_key

    async def _pick(self, agent: str, headers: dict[str, str], context: Any) -> Target:
        try:
            self._router.record_request(agent)
            return self._router.pick(agent, headers)
        except NoInstanceError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            raise  # unreachable: abort raises

    def _report(self, target: Target, code: grpc.StatusCode) -> None:
        self._router.report(target, _REPORTED_STATUS.get(code, 400))

    def _unary_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            agent, metadata, headers = await self._prepare(context)
            target = await self._pick(agent, headers, context)
            try:
                response = await relay_unary(
                    self._channels.get(target), method, request, context, metadata
                )
            except grpc.aio.AioRpcError as e:
                self._report(target, e.code())
                await abort_as(context, e)
            self._report(target, grpc.StatusCode.OK)
            return response

        return handle

    def _stream_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            agent, metadata, headers = await self._prepare(context)
            target = await self._pick(agent, headers, context)
            outcome: list[grpc.StatusCode] = []
            try:
                async for message in relay_stream(
                    self._channels.get(target), method, request, context, metadata, outcome
                ):
                    yield message
            finally:
                self._report(target, outcome[0] if outcome else grpc.StatusCode.CANCELLED)

        return handle
