"""The egress: the engine's only way out, on loopback (see ``docs/runtime.md``).

=========================================  ==============================================
engine calls                               forwarded to (credentials added)
=========================================  ==============================================
``/llm/v1/...``                            ``model.baseUrl`` (+ ``/v1`` unless it ends in a
                                           version segment) + rest; ``model.apiKey``
``/llm/fallbacks/<i>/v1/...``              ``model.fallbacks[i]``, the same way
``/llm/embeddings/v1/...``                 ``knowledge.embeddingModel`` (default: the model)
``/mcp/<name>[/...]``                      the MCP Registry entry's ``url`` + rest; the
                                           spec's ``headers`` and ``queryParams``
``/a2a/<agent>/...``                       an instance chosen by :class:`~sidecar.router.Router`
                                           (mTLS with the agent's client certificate);
                                           the partner's ``headers`` / ``queryParams``;
                                           a conversation (``contextId``) keeps its track
=========================================  ==============================================

The engine's own ``Authorization`` (the dummy key), ``x-api-key`` and ``api-key`` are dropped,
and so are the cost headers (``X-Specmesh-Ledger``, ``X-Specmesh-Budget-*``: a partner gets
its budget from this sidecar's ledger, see :mod:`sidecar.ledger`); every other end-to-end
header (``traceparent``, ``tracestate``, ``X-Specmesh-Call-Depth``...) passes through.
Responses are streamed through as they arrive (SSE, chunked), never buffered.

What may be called, with which credentials, retries and budgets is decided by
:class:`~sidecar.policy.EgressPolicy` and :class:`~sidecar.policy.Retries` (shared with the
gRPC egress); refusals and failures are :class:`~sidecar.errors.PolicyError` errors of the one
error table, answered as AIP-193 JSON and never holding a secret: ``INVALID_TARGET`` 400,
``NOT_DECLARED`` 403 (also logged), ``BUDGET_EXCEEDED`` 402 (a model or partner call that
could pass what the ledger entry it names has left, :mod:`sidecar.ledger`; each such call
is charged to it from its answer), ``UNKNOWN_ROUTE`` 404,
``UPSTREAM_*`` 502 (unreachable, reset, misconfigured, or a partner whose certificate is
not the partner's: ``UPSTREAM_IDENTITY``), ``CREDENTIAL_UNAVAILABLE`` / ``NO_SNAPSHOT`` /
``NO_INSTANCE`` / ``OVERFLOW`` 503, ``UPSTREAM_TIMEOUT`` 504.

Metrics (on the :class:`prometheus_client.CollectorRegistry` given, default the global one):
``specmesh_sidecar_egress_requests_total{kind,status}``,
``specmesh_sidecar_egress_request_duration_seconds{kind}`` (until the response headers),
``specmesh_sidecar_egress_retries_total{agent}``, ``specmesh_sidecar_ejections_total{agent}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiDict
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from yarl import URL

from specmesh.addresses import resolve_url
from specmesh.budget import BUDGET_HEADER, BUDGET_TOTAL_HEADER, LEDGER_HEADER
from specmesh.snapshot import ResolvedSnapshot
from specmesh.spec.models import ConnectionPoolSpec

from .affinity import ConversationTracks, context_id_of_http
from .credentials import CredentialResolver
from .errors import PolicyError
from .ledger import BudgetLedger, CostTap, LedgerEntry, UsageTap
from .mtls import agent_dns_name
from .policy import FAILURE_KINDS, EgressPolicy, FailureKind, Retries
from .relay import RelayListener, active_tracer, end_to_end_headers, relay
from .router import Router
from .state import SnapshotHolder

__all__ = [
    "EgressMetrics",
    "EgressProxy",
    "RouteKind",
    "llm_upstream_base",
]

logger = logging.getLogger(__name__)

RouteKind = Literal["llm", "llm_fallback", "embeddings", "mcp", "a2a", "unknown"]

_ENGINE_CREDENTIALS = frozenset({"authorization", "x-api-key", "api-key"})
_DROPPED = _ENGINE_CREDENTIALS | {LEDGER_HEADER, BUDGET_HEADER, BUDGET_TOTAL_HEADER}
"""Never forwarded: the engine's credentials, and its cost headers (for this sidecar)."""
_READABLE = "identity"
"""What a charged call accepts: an answer the ledger can read (no compression)."""
_VERSIONED = re.compile(r"/v\d+[a-z0-9]*$")
_DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
}
_ROUTES: list[tuple[RouteKind, re.Pattern[str]]] = [
    ("llm", re.compile(r"^/llm/v1(?P<rest>/.*)?$")),
    ("llm_fallback", re.compile(r"^/llm/fallbacks/(?P<name>\d+)/v1(?P<rest>/.*)?$")),
    ("embeddings", re.compile(r"^/llm/embeddings/v1(?P<rest>/.*)?$")),
    ("mcp", re.compile(r"^/mcp/(?P<name>[^/]+)(?P<rest>/.*)?$")),
    ("a2a", re.compile(r"^/a2a/(?P<name>[^/]+)(?P<rest>/.*)?$")),
]
_A2A_ROUTE = _ROUTES[-1][1]


class EgressMetrics:
    """The egress's Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.requests = Counter(
            "specmesh_sidecar_egress_requests",
            "Egress requests by route kind and status",
            ["kind", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "specmesh_sidecar_egress_request_duration_seconds",
            "Time from an egress request to its response headers",
            ["kind"],
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
            registry=reg,
        )
        self.retries = Counter(
            "specmesh_sidecar_egress_retries", "Retries of A2A calls", ["agent"], registry=reg
        )
        self.ejections = Counter(
            "specmesh_sidecar_ejections",
            "Instances ejected by outlier detection",
            ["agent"],
            registry=reg,
        )

        self._counted: dict[tuple[str, int], Any] = {}
        self._timed: dict[str, Any] = {}

    def count(self, kind: str, status: int) -> None:
        """One request of ``kind`` answered ``status`` (the labelled child is kept)."""
        child = self._counted.get((kind, status))
        if child is None:
            child = self._counted[(kind, status)] = self.requests.labels(
                kind=kind, status=str(status)
            )
        child.inc()

    def observe(self, kind: str, seconds: float) -> None:
        """Time of one request of ``kind`` until its response headers."""
        child = self._timed.get(kind)
        if child is None:
            child = self._timed[kind] = self.latency.labels(kind=kind)
        child.observe(seconds)

    def on_retry(self, agent: str) -> None:
        """Hook for :class:`~sidecar.policy.Retries` (``on_retry=``): one retry to ``agent``."""
        self.retries.labels(agent=agent).inc()

    def on_ejection(self, agent: str, instance: str) -> None:
        """Hook for :class:`~sidecar.router.Router` (``on_ejection=``)."""
        logger.warning("ejected instance %s of agent %s (outlier detection)", instance, agent)
        self.ejections.labels(agent=agent).inc()


def llm_upstream_base(base_url: str | None, provider: str | None) -> str:
    """The base an LLM call's rest of path is appended to: ``baseUrl`` + ``/v1`` unless it
    already ends in a version segment (``/v1``, ``/v4``, ``/api/v3``, ``/v1beta``)."""
    base = base_url or _DEFAULT_BASE_URLS.get(provider or "openai")
    if base is None:
        raise PolicyError("UPSTREAM_MISCONFIGURED", f"model provider {provider!r} has no baseUrl")
    base = base.rstrip("/")
    if not _VERSIONED.search(urlsplit(base).path):
        base += "/v1"
    return base


def _credential_header(provider: str | None, key: str) -> tuple[str, str]:
    if provider == "anthropic":
        return "x-api-key", key
    if provider == "azure":
        return "api-key", key
    return "Authorization", f"Bearer {key}"


@dataclass
class _Outbound:
    """One request to forward (before the URL base is known, for A2A)."""

    kind: RouteKind
    name: str
    rest: str
    headers: CIMultiDict[str]
    params: MultiDict[str]


class EgressProxy(RelayListener):
    """The egress HTTP server. Use as an async context manager (``start``/``stop``)."""

    def __init__(
        self,
        *,
        snapshots: SnapshotHolder,
        credentials: CredentialResolver,
        router: Router | None = None,
        client_ssl: ssl.SSLContext | None = None,
        metrics: EgressMetrics | None = None,
        registry: CollectorRegistry | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 5.0,
        mcp_read_timeout: float = 300.0,
        connection_pool: ConnectionPoolSpec | None = None,
        llm_override: str | None = None,
        service_addresses: Mapping[str, str] | None = None,
        tracer: trace.Tracer | None = None,
        tracks: ConversationTracks | None = None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        super().__init__(host=host, port=port)
        self._snapshots = snapshots
        self._tracer = tracer
        self.llm_override = llm_override
        """Send every LLM call here instead of the spec's baseUrl (the offline fleet's
        scripted model server); credentials are injected as usual."""
        self._service_addresses = dict(service_addresses or {})
        self._credentials = credentials
        self._router = router
        self._client_ssl = client_ssl
        self.metrics = metrics or EgressMetrics(registry)
        self.connect_timeout = connect_timeout
        self.mcp_read_timeout = mcp_read_timeout
        self._pool = connection_pool or ConnectionPoolSpec()
        self.policy = EgressPolicy(credentials=credentials, tracks=tracks, ledger=ledger)

    # ------------------------------------------------------------ lifecycle

    def _connector(self) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(
            limit=0, limit_per_host=self._pool.max_connections, enable_cleanup_closed=True
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() first"
        return self._session

    # ------------------------------------------------------------ dispatch

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """One proxied call, as a CLIENT span continuing the engine's trace; the upstream
        gets this span as its parent (``traceparent`` is rewritten)."""
        tracer = active_tracer(self._tracer)
        if tracer is None:  # tracing off: no span; traceparent passes through as it came
            return await self._proxy(request, trace.INVALID_SPAN)
        parent = propagate.extract(request.headers)
        with tracer.start_as_current_span("egress", context=parent, kind=SpanKind.CLIENT) as span:
            response = await self._proxy(request, span)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def _proxy(self, request: web.BaseRequest, span: trace.Span) -> web.StreamResponse:
        started = time.perf_counter()
        kind: RouteKind = "unknown"
        status = 500
        try:
            kind, name, rest = self._route(request.rel_url.raw_path)
            if span.is_recording():
                span.update_name(f"egress {kind} {name}".rstrip())
                span.set_attribute("specmesh.egress.kind", kind)
                span.set_attribute("specmesh.egress.target", name)
                span.set_attribute("http.request.method", request.method)
            snapshot = self._snapshots.current
            if snapshot is None:
                raise PolicyError("NO_SNAPSHOT", "the sidecar has no spec yet")
            out = _Outbound(
                kind=kind,
                name=name,
                rest=rest,
                headers=self._forward_headers(request.headers),
                params=MultiDict(request.rel_url.query if request.rel_url.raw_query_string else ()),
            )
            propagate.inject(out.headers)  # the upstream continues from this span
            body = await request.read() if request.body_exists else None
            entry: LedgerEntry | None = None
            fallback = int(name) if kind == "llm_fallback" else None
            if kind in ("llm", "llm_fallback"):
                entry = await self.policy.model_budget(snapshot, fallback, body, request.headers)
                if entry is not None:
                    out.headers["Accept-Encoding"] = _READABLE  # to read its usage
            if kind in ("llm", "llm_fallback", "embeddings"):
                url = await self._prepare_llm(snapshot, out)
                upstream = await self._send(
                    request.method, url, out, body, timeout=self._llm_timeout(snapshot)
                )
            elif kind == "mcp":
                url = await self._prepare_mcp(snapshot, out)
                timeout = aiohttp.ClientTimeout(
                    total=None, sock_connect=self.connect_timeout, sock_read=self.mcp_read_timeout
                )
                upstream = await self._send(request.method, url, out, body, timeout=timeout)
            else:
                entry, upstream = await self._a2a(request, snapshot, out, body)
            status = upstream.status
            self.metrics.observe(kind, time.perf_counter() - started)
            if entry is None:
                return await relay(request, upstream, downstream="engine")
            if kind == "a2a":
                cost = CostTap()
                response = await relay(request, upstream, downstream="engine", tap=cost)
                entry.charge(cost.total_usd())
                return response
            usage = UsageTap()
            response = await relay(request, upstream, downstream="engine", tap=usage)
            if status < 400:
                await self.policy.charge_model(entry, snapshot, fallback, body, usage)
            return response
        except PolicyError as e:
            status = e.http_status
            return e.http_response()
        except Exception:
            logger.exception("egress request failed (%s %s)", request.method, request.path)
            status = 500
            return PolicyError(
                "INTERNAL", "the sidecar failed to handle the request"
            ).http_response()
        finally:
            self.metrics.count(kind, status)

    def _route(self, path: str) -> tuple[RouteKind, str, str]:
        if path.startswith("/a2a/"):  # the busiest route: try it first
            m = _A2A_ROUTE.fullmatch(path)
            if m:
                return "a2a", m.group("name"), m.group("rest") or ""
        for kind, pattern in _ROUTES:
            m = pattern.fullmatch(path)  # not match: its `$` lets a trailing newline by
            if m:
                return kind, m.groupdict().get("name") or "", m.group("rest") or ""
        raise PolicyError("UNKNOWN_ROUTE", f"no egress route for {path!r}", path=path)

    @staticmethod
    def _forward_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
        kept = end_to_end_headers(headers)
        return CIMultiDict([(k, v) for k, v in kept if k.lower() not in _DROPPED])

    async def _add_secrets(
        self, out: _Outbound, headers: Mapping[str, str], params: Mapping[str, str]
    ) -> None:
        for key, value in await self.policy.secrets(headers):
            out.headers[key] = value
        for key, value in await self.policy.secrets(params):
            out.params[key] = value

    # ------------------------------------------------------------ LLM and MCP

    def _llm_timeout(self, snapshot: ResolvedSnapshot) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.connect_timeout,
            sock_read=snapshot.spec.model.timeout_seconds,
        )

    async def _prepare_llm(self, snapshot: ResolvedSnapshot, out: _Outbound) -> str:
        model = snapshot.spec.model
        provider, base_url, api_key = model.provider, model.base_url, model.api_key
        if out.kind == "llm_fallback":
            index = int(out.name)
            if index >= len(model.fallbacks):
                raise PolicyError("UNKNOWN_ROUTE", f"the model has no fallback {index}")
            fb = model.fallbacks[index]
            provider, base_url, api_key = fb.provider, fb.base_url, fb.api_key
        elif out.kind == "embeddings":
            emb = snapshot.spec.knowledge.embedding_model
            if emb is not None:
                provider = emb.provider or provider
                base_url = emb.base_url or base_url
                api_key = emb.api_key or api_key
        base = llm_upstream_base(self.llm_override or base_url, provider)
        if api_key is not None:
            header, value = _credential_header(provider, await self.policy.resolve(api_key))
            out.headers[header] = value
        return base + out.rest

    async def _prepare_mcp(self, snapshot: ResolvedSnapshot, out: _Outbound) -> str:
        ref = self.policy.mcp_server(snapshot, out.name)
        entry = snapshot.mcp_servers.get(ref.mcp_server_name)
        if entry is None:
            raise PolicyError(
                "UPSTREAM_MISCONFIGURED",
                f"MCP server {ref.mcp_server_name!r} is not in the MCP Registry",
                target=ref.mcp_server_name,
            )
        await self._add_secrets(out, ref.headers, ref.query_params)
        url = resolve_url(entry.url, self._service_addresses)
        return url.rstrip("/") + out.rest if out.rest else url

    # ------------------------------------------------------------ sending

    async def _send(
        self,
        method: str,
        url: str,
        out: _Outbound,
        body: bytes | None,
        *,
        timeout: aiohttp.ClientTimeout,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> aiohttp.ClientResponse:
        target = URL(url, encoded=True)
        if out.params:
            target = target.update_query(out.params)
        shown = f"{out.kind} upstream {url.split('?', 1)[0]}"
        try:
            return await self.session.request(
                method,
                target,
                headers=out.headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
                ssl=ssl_context if ssl_context is not None else True,
                server_hostname=server_hostname,
            )
        except aiohttp.ClientConnectorCertificateError as e:
            raise PolicyError(
                "UPSTREAM_IDENTITY",
                f"{shown} did not present the expected certificate"
                + (f" ({server_hostname})" if server_hostname else ""),
            ) from e
        except aiohttp.ClientConnectorError as e:
            raise PolicyError(
                "UPSTREAM_UNREACHABLE", f"{shown} is unreachable ({type(e).__name__})"
            ) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise PolicyError(
                "UPSTREAM_RESET", f"{shown} closed the connection ({type(e).__name__})"
            ) from e
        except TimeoutError as e:
            raise PolicyError("UPSTREAM_TIMEOUT", f"{shown} timed out") from e
        except aiohttp.ClientError as e:
            raise PolicyError("UPSTREAM_ERROR", f"{shown} failed ({type(e).__name__})") from e

    # ------------------------------------------------------------ A2A

    async def _a2a(
        self,
        request: web.BaseRequest,
        snapshot: ResolvedSnapshot,
        out: _Outbound,
        body: bytes | None,
    ) -> tuple[LedgerEntry | None, aiohttp.ClientResponse]:
        """(the ledger entry charged, the partner's answer); a GET (the agent card) is no
        partner message: not charged."""
        agent, partner = self.policy.partner(snapshot, out.name)
        entry = None
        if request.method != "GET":
            entry = self.policy.partner_budget(agent, request.headers)
        if entry is not None:
            out.headers["Accept-Encoding"] = _READABLE  # to read the cost it carries
        left = entry.remaining_usd if entry is not None else None
        if left is not None:
            out.headers[BUDGET_TOTAL_HEADER] = repr(left)  # the partner's whole budget
        if self._router is None:
            raise PolicyError("NO_INSTANCE", "the sidecar has no router", agent=agent)
        await self._add_secrets(out, partner.headers, partner.query_params)
        release = self._router.release(agent)
        self.policy.enter(agent, release.connection_pool if release else self._pool)
        try:
            overall = release.timeout_seconds if release else 300.0
            async with asyncio.timeout(overall):
                return entry, await self._a2a_tries(request, agent, out, body, overall)
        except TimeoutError as e:
            raise PolicyError(
                "UPSTREAM_TIMEOUT", f"call to {agent!r} timed out", agent=agent
            ) from e
        finally:
            self.policy.leave(agent)

    def _context_id(self, method: str, rest: str, body: bytes | None) -> str | None:
        """The conversation of a partner call (``rest``: its path at the partner), read as
        the entry reads it; None when nothing pins partner conversations."""
        if self.policy.tracks is None:
            return None
        return context_id_of_http(method, rest or "/", body)

    async def _a2a_tries(
        self,
        request: web.BaseRequest,
        agent: str,
        out: _Outbound,
        body: bytes | None,
        overall: float,
    ) -> aiohttp.ClientResponse:
        assert self._router is not None
        retries = Retries(
            self._router,
            agent,
            on_retry=self.metrics.on_retry,
            tracks=self.policy.tracks,
            context_id=self._context_id(request.method, out.rest, body),
        )
        per_try = retries.policy.per_try_timeout
        while True:
            target = retries.pick(request.headers)
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=min(self.connect_timeout, per_try), sock_read=overall
            )
            https = target.url.startswith("https://")
            failure: FailureKind
            try:
                async with asyncio.timeout(per_try):
                    upstream = await self._send(
                        request.method,
                        target.url + out.rest,
                        out,
                        body,
                        timeout=timeout,
                        ssl_context=self._client_ssl if https else None,
                        server_hostname=agent_dns_name(agent) if https else None,
                    )
            except TimeoutError:
                failure = "timeout"
                error = PolicyError(
                    "UPSTREAM_TIMEOUT", f"instance of {agent!r} timed out (per try)", agent=agent
                )
            except PolicyError as e:
                error = e
                failure = FAILURE_KINDS.get(e.reason, "reset")
            else:
                if retries.answered(target, upstream.status):
                    upstream.release()
                    continue
                return upstream
            if not retries.failed(target, failure):
                raise error
