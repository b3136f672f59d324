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
  (``UNAVAILABLE`` counts as a gateway error); ``queryParams`` do not apply.
  Retries follow the partner's retry policy as on HTTP (:class:`~sidecar.policy.Retries`),
  where gRPC allows: a try whose connection to the instance cannot be established (nothing
  was sent, unary or streaming) goes to another instance, within the attempts and the
  retry budget; an ``UNAVAILABLE`` the instance answered is relayed as it is (the request
  may have been acted on).
  A conversation (the request's ``message.context_id``) keeps the partner's track its first
  call went to (``tracks``: :class:`~sidecar.affinity.ConversationTracks`, as the HTTP
  egress). A call is charged to the cost ledger entry its ``x-specmesh-ledger`` names
  (:mod:`sidecar.ledger`), refused (``RESOURCE_EXHAUSTED``, ``BUDGET_EXCEEDED``) when it has
  nothing left, sends the partner what is left as ``x-specmesh-budget-usd``, and is charged
  the ``cost`` its answer carries.

Declared-or-not, credentials, caller authorization, retries and budgets are decided by
:mod:`sidecar.policy`, the same as for the HTTP listeners; refusals are the
:class:`~sidecar.errors.PolicyError` errors of the one table (:func:`abort_policy`: its gRPC
status and ``google.rpc.Status`` with an ``ErrorInfo``).

Every method of the A2A service (read from ``a2a.types.a2a_pb2``'s descriptor; unary-unary and
unary-stream) is relayed without decoding (serializers ``None``). The upstream outcome reaches
the caller intact: status code, details and trailing metadata (:func:`relayed_trailers`), so
``grpc-status-details-bin`` still carries the ``google.rpc.Status`` whose ``ErrorInfo`` lets the
a2a-sdk client raise its typed errors (``TaskNotFoundError``, ...), on unary calls and on
streams, also after messages were relayed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Self

import grpc
from a2a.types import a2a_pb2
from cryptography import x509

from specmesh.addresses import parse_host_port
from specmesh.aio import cancel_and_wait
from specmesh.budget import BUDGET_HEADER, BUDGET_TOTAL_HEADER, LEDGER_HEADER
from specmesh.callers import CALLER_KEY, PRINCIPAL_KEY
from specmesh.names import resource_name
from specmesh.spec.models import ConnectionPoolSpec

from .affinity import ConversationTracks, context_id_of_grpc
from .callers import CallerPolicy
from .credentials import CredentialResolver
from .engine_calls import EngineCalls
from .errors import PolicyError
from .inbound import PartnerGraph
from .ledger import (
    BudgetLedger,
    LedgerEntry,
    caller_budget_grpc,
    grpc_answer_cost,
    open_for_engine,
)
from .mtls import TRUST_DOMAIN, AgentCertificates, agent_dns_name
from .policy import EgressPolicy, Retries, admit_caller, log_refusal
from .router import InstanceLike, InstanceSource, Router, Target
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
    "abort_policy",
    "agent_from_pem",
    "bind_server",
    "counted_stream",
    "counted_unary",
    "end_to_end_metadata",
    "first_value",
    "generic_handler",
    "relay_stream",
    "relay_unary",
    "relayed_trailers",
    "reported_status",
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

_NOT_FORWARDED = frozenset({TARGET_KEY, LEDGER_HEADER, BUDGET_HEADER, BUDGET_TOTAL_HEADER})
"""Egress metadata for this sidecar only: the target and the engine's cost keys."""

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


async def abort_policy(context: grpc.aio.ServicerContext, error: PolicyError) -> NoReturn:
    """End the call as the error table says: its gRPC status and message, and its
    ``google.rpc.Status`` (with the ``ErrorInfo``) in ``grpc-status-details-bin``."""
    await context.abort(error.grpc_code, error.message, error.grpc_trailers())
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


def _no_report(code: grpc.StatusCode) -> None:
    """Nothing to report the outcome to."""


async def relay_unary(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    context: grpc.aio.ServicerContext,
    metadata: Metadata,
    report: Callable[[grpc.StatusCode], None] = _no_report,
) -> bytes:
    """One unary call upstream; its answer's trailing metadata is copied to ``context``, its
    outcome given to ``report``. An upstream error ends the call as it ended upstream."""
    call = channel.unary_unary(f"/{A2A_SERVICE}/{method}")(
        request, metadata=metadata, timeout=_timeout(context)
    )
    try:
        response: bytes = await call
        trailers = await call.trailing_metadata()
    except grpc.aio.AioRpcError as e:
        report(e.code())
        await abort_as(context, e)
    report(grpc.StatusCode.OK)
    context.set_trailing_metadata(relayed_trailers(trailers))
    return response


async def relay_stream(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    context: grpc.aio.ServicerContext,
    metadata: Metadata,
    report: Callable[[grpc.StatusCode], None] = _no_report,
) -> AsyncIterator[bytes]:
    """One server-streaming call upstream, relayed message by message; its final status
    (``CANCELLED`` when the caller left) given to ``report``, and an error ends the call on
    ``context`` as it ended upstream."""
    call = channel.unary_stream(f"/{A2A_SERVICE}/{method}")(
        request, metadata=metadata, timeout=_timeout(context)
    )
    outcome = grpc.StatusCode.CANCELLED
    try:
        async for message in call:
            yield message
        trailers = await call.trailing_metadata()
        outcome = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        outcome = e.code()
        await abort_as(context, e)
    finally:
        call.cancel()  # no-op once done; stops upstream when the caller went away
        report(outcome)
    context.set_trailing_metadata(relayed_trailers(trailers))


async def counted_unary(
    calls: EngineCalls | None,
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    context: grpc.aio.ServicerContext,
    metadata: Metadata,
) -> bytes:
    """:func:`relay_unary` to this instance's engine, counted on ``calls``."""
    if calls is None:
        return await relay_unary(channel, method, request, context, metadata)
    call = calls.begin_grpc(method)
    try:
        response = await relay_unary(channel, method, request, context, metadata, call.grpc_code)
        call.grpc_message(response, streaming=False)
        return response
    finally:
        call.finish_grpc()


async def counted_stream(
    calls: EngineCalls | None,
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    context: grpc.aio.ServicerContext,
    metadata: Metadata,
) -> AsyncIterator[bytes]:
    """:func:`relay_stream` from this instance's engine, counted on ``calls``."""
    call = calls.begin_grpc(method) if calls is not None else None
    report = call.grpc_code if call is not None else _no_report
    try:
        async for message in relay_stream(channel, method, request, context, metadata, report):
            if call is not None:
                call.grpc_message(message, streaming=True)
            yield message
    finally:
        if call is not None:
            call.finish_grpc()


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

    ledger: BudgetLedger | None = None
    """The cost ledger of the messages a listener hands the engine (inbound, entry)."""

    async def _open_entry(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        request: bytes,
        metadata: Metadata,
    ) -> LedgerEntry | None:
        """The ledger entry of a message handed to the engine, named in ``metadata``
        (:func:`~sidecar.ledger.open_for_engine`); or abort the call with its error."""
        try:
            headers = {k: v for k, v in metadata if isinstance(v, str)}
            return open_for_engine(
                self.ledger, caller_budget_grpc(method, request, headers), metadata
            )
        except PolicyError as e:
            await abort_policy(context, e)

    def _close_entry(self, entry: LedgerEntry | None) -> None:
        if entry is not None and self.ledger is not None:
            self.ledger.close(entry)

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
        calls: EngineCalls | None = None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        super().__init__(address=address)
        self.ledger = ledger
        self.agent = resource_name(agent_name)
        self.engine_grpc = engine_grpc
        self.calls = calls
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
        """The metadata to send to the engine, or abort the call
        (:func:`~sidecar.policy.admit_caller`, as the HTTP inbound)."""
        incoming = context.invocation_metadata()
        cert_agent = None
        if self._certs is not None:
            pems = context.auth_context().get("x509_pem_cert") or []
            cert_agent = agent_from_pem(pems[0]) if pems else None
        try:
            admitted = await admit_caller(
                self.policy,
                secure=self._certs is not None,
                cert_agent=cert_agent,
                sent_principal=first_value(incoming, PRINCIPAL_KEY),
                xfcc=first_value(incoming, XFCC_KEY),
                authorization=first_value(incoming, AUTHORIZATION_KEY),
                require_identity=self._require_identity,
            )
        except PolicyError as e:
            log_refusal("inbound gRPC", self.agent, e)
            await abort_policy(context, e)
        drop = (
            (CALLER_KEY, PRINCIPAL_KEY)
            if self._certs
            else (CALLER_KEY, PRINCIPAL_KEY, AUTHORIZATION_KEY)
        )
        metadata = end_to_end_metadata(incoming, *drop)
        if admitted.principal is not None:
            metadata.append((PRINCIPAL_KEY, admitted.principal))
        if admitted.caller is not None:
            metadata.append((CALLER_KEY, admitted.caller))
        return metadata

    def _unary_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = await self._authorize(context)
            assert self._channel is not None
            entry = await self._open_entry(context, method, request, metadata)
            try:
                return await counted_unary(
                    self.calls, self._channel, method, request, context, metadata
                )
            finally:
                self._close_entry(entry)

        return handle

    def _stream_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            metadata = await self._authorize(context)
            assert self._channel is not None
            entry = await self._open_entry(context, method, request, metadata)
            try:
                async for message in counted_stream(
                    self.calls, self._channel, method, request, context, metadata
                ):
                    yield message
            finally:
                self._close_entry(entry)

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


_REPORTED_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
}


_DEFAULT_POOL = ConnectionPoolSpec()


def reported_status(code: grpc.StatusCode) -> int:
    """The HTTP status a gRPC outcome counts as for outlier detection (``UNAVAILABLE``:
    503, a gateway error; an application error: 400, no failure of the instance)."""
    return _REPORTED_STATUS.get(code, 400)


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
            await cancel_and_wait(task)


async def _connected(channel: grpc.aio.Channel, timeout: float) -> bool:
    """Whether ``channel`` is (or gets) connected: ``False`` once a connection attempt
    failed (``TRANSIENT_FAILURE``) or none succeeded within ``timeout`` -- the one gRPC
    failure known to come before anything was sent. One state read when already connected."""
    state = channel.get_state(try_to_connect=True)
    if state is grpc.ChannelConnectivity.READY:
        return True
    try:
        async with asyncio.timeout(timeout):
            while state is not grpc.ChannelConnectivity.READY:
                if state in (
                    grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                    grpc.ChannelConnectivity.SHUTDOWN,
                ):
                    return False
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return True


class GrpcEgress(GrpcRelayServer):
    """The engine's A2A gRPC way out (loopback, plaintext): an adapter over
    :class:`~sidecar.policy.EgressPolicy` and :class:`~sidecar.policy.Retries`."""

    def __init__(
        self,
        *,
        snapshots: SnapshotHolder,
        credentials: CredentialResolver,
        router: Router,
        certificates: AgentCertificates | None,
        address: str = "127.0.0.1:0",
        channel_grace: float = 30.0,
        connect_timeout: float = 5.0,
        on_retry: Callable[[str], None] | None = None,
        tracks: ConversationTracks | None = None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        super().__init__(address=address)
        self._snapshots = snapshots
        self.policy = EgressPolicy(credentials=credentials, tracks=tracks, ledger=ledger)
        self._router = router
        self._certs = certificates
        self._channels = ChannelPool(certificates=certificates, grace=channel_grace)
        self.connect_timeout = connect_timeout
        self._on_retry = on_retry

    async def _close(self) -> None:
        await self._channels.close()

    async def _prepare(
        self, context: grpc.aio.ServicerContext, context_id: str | None = None
    ) -> tuple[str, Metadata, Retries, LedgerEntry | None]:
        """(target agent, metadata to send, its retries, the ledger entry charged); raises
        :class:`PolicyError`. ``context_id``: the call's conversation (:meth:`_context_id`)."""
        incoming = end_to_end_metadata(context.invocation_metadata())
        snapshot = self._snapshots.current
        if snapshot is None:
            raise PolicyError("NO_SNAPSHOT", "the sidecar has no spec yet")
        wanted = first_value(incoming, TARGET_KEY) or ""
        if not wanted:
            raise PolicyError(
                "INVALID_TARGET", f"metadata {TARGET_KEY!r} names no agent", target=""
            )
        agent, partner = self.policy.partner(snapshot, wanted)
        entry = self.policy.partner_budget(agent, {k: v for k, v in incoming if isinstance(v, str)})
        metadata = [(k, v) for k, v in incoming if k not in _NOT_FORWARDED]
        left = entry.remaining_usd if entry is not None else None
        if left is not None:
            metadata.append((BUDGET_TOTAL_HEADER, repr(left)))  # the partner's whole budget
        for name, value in await self.policy.secrets(partner.headers):
            metadata.append((name.lower(), value))
        release = self._router.release(agent)
        self.policy.enter(agent, release.connection_pool if release else _DEFAULT_POOL)
        tracks = self.policy.tracks
        retries = Retries(
            self._router, agent, on_retry=self._on_retry, tracks=tracks, context_id=context_id
        )
        return agent, metadata, retries, entry

    def _context_id(self, method: str, request: bytes) -> str | None:
        """The conversation of a partner call, read as the entry reads it; None when
        nothing pins partner conversations."""
        if self.policy.tracks is None:
            return None
        return context_id_of_grpc(method, request)

    async def _connect(
        self, agent: str, retries: Retries, context: grpc.aio.ServicerContext
    ) -> tuple[Target, grpc.aio.Channel]:
        """An instance picked for the call and a connected channel to it: a try that cannot
        connect is retried on another instance as the retry policy allows, else
        ``UPSTREAM_UNREACHABLE`` (as the HTTP egress answers)."""
        headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        while True:
            target = retries.pick(headers)
            channel = self._channels.get(target)
            if await _connected(channel, self.connect_timeout):
                return target, channel
            if not retries.failed(target, "connect"):
                raise PolicyError(
                    "UPSTREAM_UNREACHABLE",
                    f"instance {target.instance} of agent {agent!r} is unreachable "
                    f"(gRPC {_grpc_target(target.url)}: no connection)",
                    agent=agent,
                )

    def _reporter(self, target: Target) -> Callable[[grpc.StatusCode], None]:
        router = self._router
        return lambda code: router.report(target, reported_status(code))

    async def _begin(
        self, context: grpc.aio.ServicerContext, context_id: str | None = None
    ) -> tuple[str, Metadata, Target, grpc.aio.Channel, LedgerEntry | None]:
        """(agent, metadata, target, connected channel, ledger entry) of one call, counted
        in flight (the caller calls ``policy.leave(agent)``); or abort it with its policy
        error."""
        try:
            agent, metadata, retries, entry = await self._prepare(context, context_id)
        except PolicyError as e:
            await abort_policy(context, e)
        try:
            target, channel = await self._connect(agent, retries, context)
        except PolicyError as e:
            self.policy.leave(agent)
            await abort_policy(context, e)
        return agent, metadata, target, channel, entry

    def _unary_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            agent, metadata, target, channel, entry = await self._begin(
                context, self._context_id(method, request)
            )
            try:
                answer = await relay_unary(
                    channel, method, request, context, metadata, self._reporter(target)
                )
            finally:
                self.policy.leave(agent)
            if entry is not None:
                entry.charge(grpc_answer_cost(method, answer))
            return answer

        return handle

    def _stream_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            agent, metadata, target, channel, entry = await self._begin(
                context, self._context_id(method, request)
            )
            charged = 0.0  # the largest chain total an event carried
            try:
                async for message in relay_stream(
                    channel, method, request, context, metadata, self._reporter(target)
                ):
                    if entry is not None:
                        charged = max(charged, grpc_answer_cost(method, message))
                    yield message
            finally:
                self.policy.leave(agent)
                if entry is not None:
                    entry.charge(charged)

        return handle
