"""Inbound: callers reach this agent's engine through here (``SPECMESH_INBOUND``).

In mTLS mode the listener requires a client certificate from the mesh CA (Vault PKI): a caller
without one, with an expired one or with one from another CA fails the TLS handshake. A caller
with a valid certificate is allowed only if :meth:`~sidecar.callers.CallerPolicy.check_agent`
allows the agent named by its URI SAN (it lists THIS agent among its partners and the
agent's ``callers.agents`` admits it); otherwise 403 with an AIP-193 body (logged). Allowed
requests are streamed to the engine's HTTP listener with ``X-Specmesh-Caller`` set to the
caller. ``X-Specmesh-Principal`` is accepted only from a certificate naming THIS agent (an
entry of another instance forwarding an external call it authenticated); it is removed from
every other request.

In plaintext mode (Istio provides mTLS and the AuthorizationPolicy) the inbound IS the entry:
Istio decides who may connect; here a bearer token, when one is sent, is still verified and
checked against ``callers.principals`` (defence in depth) and becomes
``X-Specmesh-Principal``; the calling agent is taken from Istio's
``X-Forwarded-Client-Cert`` (its last element's URI SAN) into ``X-Specmesh-Caller``.
``Authorization`` is never forwarded in this mode.

A message handed to the engine gets a cost ledger entry (``ledger``, :mod:`sidecar.ledger`):
its budget is the caller's (message metadata, or the calling sidecar's
``X-Specmesh-Budget-Usd``) or the spec's, the smaller; its id goes to the engine as
``X-Specmesh-Ledger``, and it is closed once the answer is relayed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Mapping
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import propagate, trace

from specmesh.callers import CALLER_HEADER, PRINCIPAL_HEADER
from specmesh.names import resource_name
from specmesh.store import SpecStore
from specmesh.watch import PrefixWatcher

from .callers import CARD_PATH, CallerPolicy, CallerRefused
from .engine_calls import EngineCalls
from .ledger import BudgetLedger, forward_message
from .mtls import AgentCertificates, agent_from_cert
from .policy import admit_caller, log_refusal
from .relay import (
    RelayListener,
    active_tracer,
    end_to_end_headers,
    traced,
)

__all__ = [
    "CALLER_HEADER",
    "PRINCIPAL_HEADER",
    "XFCC_HEADER",
    "EtcdPartnerGraph",
    "InMemoryPartnerGraph",
    "InboundServer",
    "PartnerGraph",
]

logger = logging.getLogger(__name__)

XFCC_HEADER = "X-Forwarded-Client-Cert"


class PartnerGraph(Protocol):
    """Agent -> the partners it lists (all by resource name)."""

    def partners(self, agent: str) -> frozenset[str]:
        """Resource names of the partners ``agent`` lists (empty when unknown)."""
        ...


class InMemoryPartnerGraph:
    """A fixed graph (logical or resource names; stored as resource names)."""

    def __init__(self, graph: Mapping[str, Iterable[str]] | None = None) -> None:
        self._graph: dict[str, frozenset[str]] = {}
        for agent, partners in (graph or {}).items():
            self.set(agent, partners)

    def set(self, agent: str, partners: Iterable[str]) -> None:
        self._graph[resource_name(agent)] = frozenset(resource_name(p) for p in partners)

    def partners(self, agent: str) -> frozenset[str]:
        return self._graph.get(resource_name(agent), frozenset())


class EtcdPartnerGraph:
    """The graph from :meth:`SpecStore.partner_graph`, re-read whenever an agent's
    ``partnerAgents`` part or meta changes (a watch on ``<prefix>/agents/``). Run :meth:`run`
    as a task; :meth:`refresh` reads it once."""

    def __init__(self, *, store: SpecStore, watcher: PrefixWatcher | None = None) -> None:
        self._store = store
        self._watcher = watcher
        self._graph = InMemoryPartnerGraph()
        self.ready = asyncio.Event()

    def partners(self, agent: str) -> frozenset[str]:
        return self._graph.partners(agent)

    async def refresh(self) -> None:
        graph = await self._store.partner_graph()
        fresh = InMemoryPartnerGraph(graph)
        self._graph = fresh
        self.ready.set()

    async def run(self) -> None:
        watcher = self._watcher or PrefixWatcher(
            etcd=self._store.etcd, prefix=self._store.keys.agents()
        )
        async for update in watcher.updates():
            relevant = update.reset or any(
                e.key.endswith(("/spec/partnerAgents", "/meta")) for e in update.events
            )
            if relevant:
                await self.refresh()


class InboundServer(RelayListener):
    """The inbound listener; ``certificates=None`` means plaintext mode (Istio).

    ``policy`` decides who may call; without one, a policy over ``graph`` with the default
    ``callers`` and no trusted token issuer."""

    def __init__(
        self,
        *,
        agent_name: str,
        engine_http: str,
        graph: PartnerGraph | None = None,
        certificates: AgentCertificates | None,
        policy: CallerPolicy | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout: float = 300.0,
        tracer: trace.Tracer | None = None,
        calls: EngineCalls | None = None,
        require_identity: bool = False,
        ledger: BudgetLedger | None = None,
    ) -> None:
        super().__init__(host=host, port=port)
        self._tracer = tracer
        self._ledger = ledger
        self.agent = resource_name(agent_name)
        self.engine_url = engine_http if "://" in engine_http else f"http://{engine_http}"
        if policy is None:
            if graph is None:
                raise ValueError("InboundServer needs a policy or a partner graph")
            policy = CallerPolicy(agent=agent_name, graph=graph)
        self.policy = policy
        self._certs = certificates
        self._require_identity = require_identity
        self.read_timeout = read_timeout
        self.calls = calls

    @property
    def secure(self) -> bool:
        return self._certs is not None

    def _server_ssl(self) -> ssl.SSLContext | None:
        return self._certs.server_context if self._certs is not None else None

    def _caller(self, request: web.BaseRequest) -> str | None:
        transport = request.transport
        peer = transport.get_extra_info("peercert") if transport is not None else None
        return agent_from_cert(peer)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """One inbound call, as a SERVER span continuing the caller's trace."""
        return await traced(
            active_tracer(self._tracer), f"inbound {self.agent}", request, self._forward
        )

    async def _forward(self, request: web.BaseRequest, span: trace.Span) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict(end_to_end_headers(request.headers))
        sent_principal = headers.get(PRINCIPAL_HEADER)
        headers.popall(CALLER_HEADER, None)
        headers.popall(PRINCIPAL_HEADER, None)
        if self._certs is None:
            headers.popall("Authorization", None)  # never forwarded in plaintext mode
        try:
            admitted = await admit_caller(
                self.policy,
                secure=self._certs is not None,
                cert_agent=self._caller(request) if self._certs is not None else None,
                sent_principal=sent_principal,
                xfcc=request.headers.get(XFCC_HEADER),
                authorization=request.headers.get("Authorization"),
                require_identity=self._require_identity,
                card=_is_card(request),
            )
        except CallerRefused as e:
            log_refusal("inbound", self.agent, e)
            return e.http_response()
        if admitted.caller is not None:
            headers[CALLER_HEADER] = admitted.caller
            span.set_attribute("specmesh.caller", admitted.caller)
        if admitted.principal is not None:
            headers[PRINCIPAL_HEADER] = admitted.principal
            if self._certs is None:
                span.set_attribute("specmesh.principal", admitted.principal)
        propagate.inject(headers)  # the engine continues from this span
        assert self._session is not None
        body = await request.read() if request.body_exists else None
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


def _is_card(request: web.BaseRequest) -> bool:
    return request.method in ("GET", "HEAD") and request.path == CARD_PATH
