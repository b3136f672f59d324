"""The public entry of an agent: external A2A clients reach it here, with a bearer token.

Two plaintext listeners (loopback locally; in a cluster Istio carries them):

* :class:`EntryServer` (``SPECMESH_ENTRY``, HTTP): JSON-RPC at ``/``, HTTP+JSON at
  ``/v1/...``, business REST, and the agent card at :data:`CARD_PATH` -- the card is served
  WITHOUT a token (a client discovers the agent and its security schemes there);
* :class:`GrpcEntry` (``SPECMESH_ENTRY_GRPC``): every method of the A2A gRPC service, relayed
  as raw bytes, status and trailers intact.

Every other call needs ``Authorization: Bearer <JWT>`` that
:meth:`~sidecar.callers.CallerPolicy.external` accepts (a trusted issuer, this agent's
audience, and a principal in ``base.callers.principals``); else 401/403
(``UNAUTHENTICATED``/``PERMISSION_DENIED``) with a ``google.rpc.ErrorInfo``. The call then
goes on without ``Authorization`` (the engine never sees a token) and with
``X-Specmesh-Principal`` / ``x-specmesh-principal`` set to ``<iss>/<sub>`` (values a client
sent, and ``X-Specmesh-Caller``, are removed first).

External calls honour the agent's release: the same :class:`~sidecar.router.Router` the
egress uses picks an instance (weights, header match, outlier ejection). When it picks this
instance -- or lists none serving -- the call goes to the engine beside; otherwise to the
chosen instance's mTLS inbound, as this agent (its client certificate), which accepts the
principal because the certificate names the same agent. A conversation keeps the track its
first message went to (:class:`~sidecar.affinity.ConversationTracks`, when given ``tracks``):
the entry reads the message's contextId from the body it already holds (HTTP) or the request
message (gRPC, unary request) -- nothing is buffered for it that was not already -- and names
the conversation a message starts (it writes a new contextId into it).

A message this instance's engine answers gets a cost ledger entry (``ledger``,
:mod:`sidecar.ledger`), as at the inbound; one sent on to another instance gets its entry
there.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

import aiohttp
import grpc
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import propagate, trace

from specmesh.budget import LEDGER_HEADER
from specmesh.callers import CALLER_HEADER, CALLER_KEY, PRINCIPAL_HEADER, PRINCIPAL_KEY
from specmesh.names import resource_name

from .affinity import (
    ConversationTracks,
    MessageContext,
    message_context_grpc,
    message_context_http,
    new_context_id,
)
from .callers import CARD_PATH, CallerPolicy, CallerRefused
from .engine_calls import EngineCalls
from .errors import PolicyError
from .grpcproxy import (
    AUTHORIZATION_KEY,
    ChannelPool,
    GrpcRelayServer,
    Handler,
    Metadata,
    abort_policy,
    counted_stream,
    counted_unary,
    end_to_end_metadata,
    first_value,
    relay_stream,
    relay_unary,
    reported_status,
)
from .ledger import BudgetLedger, forward_message
from .mtls import AgentCertificates, agent_dns_name
from .policy import log_refusal
from .relay import (
    RelayListener,
    active_tracer,
    end_to_end_headers,
    relay,
    traced,
)
from .router import NoInstanceError, Router, Target

__all__ = ["CARD_PATH", "EVALUATION_ATTRIBUTE", "EntryServer", "GrpcEntry"]

logger = logging.getLogger(__name__)


_DROPPED = (CALLER_HEADER, PRINCIPAL_HEADER, "Authorization")

EVALUATION_ATTRIBUTE = "specmesh.evaluation.track"
"""Entry span attribute of a call the control plane's evaluation token sent to a track."""


def _pick_other(
    router: Router | None,
    agent: str,
    instance_id: str,
    headers: Mapping[str, str],
    *,
    tracks: ConversationTracks | None = None,
    context_id: str | None = None,
    only: Literal["stable", "canary"] | None = None,
) -> Target | None:
    """The instance an external call goes to, or None for this instance's own engine; a
    known conversation keeps its track, a new one is remembered on the track it got.
    ``only`` (the control plane's evaluation token): that track's instances alone, never
    remembered; :class:`NoInstanceError` when none serves (or no router knows tracks)."""
    if only is not None:
        if router is None:
            raise NoInstanceError(agent=agent, reason=f"this entry routes no track ({only!r})")
        target = router.pick(agent, headers, only=only)
        return None if target.instance in (None, instance_id) else target
    if router is None:
        return None
    release = router.release(agent)
    pinned = tracks.track(context_id, release) if tracks is not None else None
    try:
        target = router.pick(agent, headers, pinned=pinned)
    except NoInstanceError as e:
        logger.debug("entry: %s; serving from this instance", e)
        return None
    if tracks is not None and pinned is None:
        tracks.remember(context_id, target.track, release)
    if target.instance is None or target.instance == instance_id:
        return None
    return target


def _unavailable(reason: str, message: str, **fields: str) -> web.Response:
    return PolicyError(reason, message, **fields).http_response()


class EntryServer(RelayListener):
    """The HTTP entry (``SPECMESH_ENTRY``); an async context manager."""

    def __init__(
        self,
        *,
        agent_name: str,
        instance_id: str,
        engine_http: str,
        policy: CallerPolicy,
        router: Router | None = None,
        client_ssl: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout: float = 300.0,
        tracer: trace.Tracer | None = None,
        calls: EngineCalls | None = None,
        tracks: ConversationTracks | None = None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        super().__init__(host=host, port=port)
        self._ledger = ledger
        self.agent = resource_name(agent_name)
        self.instance_id = instance_id
        self.engine_url = engine_http if "://" in engine_http else f"http://{engine_http}"
        self.policy = policy
        self._router = router
        self._tracks = tracks
        self._client_ssl = client_ssl
        self.read_timeout = read_timeout
        self.calls = calls
        self._tracer = tracer

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """One external call, as a SERVER span continuing the client's trace."""
        return await traced(
            active_tracer(self._tracer), f"entry {self.agent}", request, self._forward
        )

    async def _forward(self, request: web.BaseRequest, span: trace.Span) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict(end_to_end_headers(request.headers))
        for name in _DROPPED:
            headers.popall(name, None)
        card = request.method in ("GET", "HEAD") and request.path == CARD_PATH
        target: Target | None = None
        body: bytes | None = None
        if not card:
            try:
                caller = await self.policy.external_call(request.headers.get("Authorization"))
            except CallerRefused as e:
                log_refusal("external", self.agent, e)
                return e.http_response()
            headers[PRINCIPAL_HEADER] = caller.principal
            span.set_attribute("specmesh.principal", caller.principal)
            if caller.track is not None:
                span.set_attribute(EVALUATION_ATTRIBUTE, caller.track)
            body = await request.read() if request.body_exists else None
            call = MessageContext()
            if self._tracks is not None:
                call = message_context_http(
                    request.method, request.path, body, assign=new_context_id
                )
                if call.rewritten is not None:  # the entry named the conversation
                    body = call.rewritten
                    headers.popall("Content-Length", None)
            try:
                target = _pick_other(
                    self._router,
                    self.agent,
                    self.instance_id,
                    request.headers,
                    tracks=self._tracks,
                    context_id=call.context_id,
                    only=caller.track,
                )
            except NoInstanceError as e:
                return _unavailable("NO_INSTANCE", str(e), agent=self.agent)
        propagate.inject(headers)
        if body is None and request.body_exists:
            body = await request.read()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.read_timeout)
        assert self._session is not None
        if target is None:
            return await forward_message(
                self._ledger,
                self._session,
                request,
                headers,
                body,
                self.engine_url,
                self.read_timeout,
                self.calls,
            )
        headers.popall(LEDGER_HEADER, None)  # the other instance's inbound opens the entry
        span.set_attribute("specmesh.instance", target.instance or "")
        https = target.url.startswith("https://")
        try:
            upstream = await self._session.request(
                request.method,
                target.url + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
                ssl=self._client_ssl if https and self._client_ssl is not None else True,
                server_hostname=agent_dns_name(self.agent) if https else None,
            )
        except (aiohttp.ClientError, TimeoutError) as e:
            assert self._router is not None
            self._router.report_failure(target, timeout=isinstance(e, TimeoutError))
            return _unavailable(
                "UPSTREAM_UNREACHABLE",
                f"instance {target.instance} of agent {self.agent!r} is unreachable "
                f"({type(e).__name__})",
                agent=self.agent,
            )
        assert self._router is not None
        self._router.report(target, upstream.status)
        return await relay(request, upstream, downstream="caller")


class GrpcEntry(GrpcRelayServer):
    """The A2A gRPC entry (``SPECMESH_ENTRY_GRPC``, plaintext); an async context manager.
    ``router`` picks among instances with a ``grpcEndpoint``
    (:class:`~sidecar.grpcproxy.GrpcInstanceSource`)."""

    def __init__(
        self,
        *,
        agent_name: str,
        instance_id: str,
        engine_grpc: str,
        policy: CallerPolicy,
        router: Router | None = None,
        certificates: AgentCertificates | None = None,
        address: str = "127.0.0.1:0",
        tracks: ConversationTracks | None = None,
        calls: EngineCalls | None = None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        super().__init__(address=address)
        self.calls = calls
        self.ledger = ledger
        self.agent = resource_name(agent_name)
        self.instance_id = instance_id
        self.engine_grpc = engine_grpc
        self.policy = policy
        self._router = router
        self._tracks = tracks
        self._pool = ChannelPool(certificates=certificates)
        self._engine: grpc.aio.Channel | None = None

    async def _open(self) -> None:
        self._engine = grpc.aio.insecure_channel(self.engine_grpc)

    async def _close(self) -> None:
        if self._engine is not None:
            await self._engine.close()
            self._engine = None
        await self._pool.close()

    async def _prepare(
        self, context: grpc.aio.ServicerContext, method: str, request: bytes
    ) -> tuple[Metadata, grpc.aio.Channel, Target | None, bytes]:
        """(metadata to send, channel, the other instance or None, the request to send),
        or abort the call."""
        incoming = context.invocation_metadata()
        try:
            caller = await self.policy.external_call(first_value(incoming, AUTHORIZATION_KEY))
        except CallerRefused as e:
            log_refusal("external gRPC", self.agent, e)
            await abort_policy(context, e)
        metadata = end_to_end_metadata(incoming, CALLER_KEY, PRINCIPAL_KEY, AUTHORIZATION_KEY)
        metadata.append((PRINCIPAL_KEY, caller.principal))
        headers = {k: v for k, v in metadata if isinstance(v, str)}
        call = MessageContext()
        if self._tracks is not None:
            call = message_context_grpc(method, request, assign=new_context_id)
            request = call.rewritten or request
        try:
            target = _pick_other(
                self._router,
                self.agent,
                self.instance_id,
                headers,
                tracks=self._tracks,
                context_id=call.context_id,
                only=caller.track,
            )
        except NoInstanceError as e:
            await abort_policy(context, PolicyError("NO_INSTANCE", str(e), agent=self.agent))
        if target is None:
            assert self._engine is not None
            return metadata, self._engine, None, request
        metadata = [(k, v) for k, v in metadata if k != LEDGER_HEADER]  # opened over there
        return metadata, self._pool.get(target), target, request

    def _reporter(self, target: Target | None) -> Callable[[grpc.StatusCode], None]:
        router = self._router
        if target is None or router is None:
            return _ignore
        return lambda code: router.report(target, reported_status(code))

    def _unary_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata, channel, target, request = await self._prepare(context, method, request)
            if target is not None:
                return await relay_unary(
                    channel, method, request, context, metadata, self._reporter(target)
                )
            entry = await self._open_entry(context, method, request, metadata)
            try:  # the engine beside: counted, with its ledger entry
                return await counted_unary(self.calls, channel, method, request, context, metadata)
            finally:
                self._close_entry(entry)

        return handle

    def _stream_handler(self, method: str) -> Handler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metadata, channel, target, request = await self._prepare(context, method, request)
            entry = None
            if target is None:  # the engine beside: counted, with its ledger entry
                entry = await self._open_entry(context, method, request, metadata)
            relayed = (
                counted_stream(self.calls, channel, method, request, context, metadata)
                if target is None
                else relay_stream(
                    channel, method, request, context, metadata, self._reporter(target)
                )
            )
            try:
                async for message in relayed:
                    yield message
            finally:
                self._close_entry(entry)

        return handle


def _ignore(code: grpc.StatusCode) -> None:
    """No instance to report to (the engine beside)."""
