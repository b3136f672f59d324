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
                                           the partner's ``headers`` / ``queryParams``
=========================================  ==============================================

The engine's own ``Authorization`` (the dummy key), ``x-api-key`` and ``api-key`` are dropped;
every other end-to-end header (``traceparent``, ``tracestate``, ``X-Specmesh-Call-Depth``...)
passes through. Responses are streamed through as they arrive (SSE, chunked), never buffered.

Errors answer JSON ``{"error": {"code", "message", ...}}`` and never hold a secret::

    EgressError               (status, code, message)
    +-- 403 not_declared      the spec names no such MCP server / partner (also logged)
    +-- 404 unknown_route     not an egress route, or no such fallback
    +-- 502 upstream_*        upstream unreachable / reset / misconfigured, or a partner
    |                         whose certificate is not the partner's (upstream_identity)
    +-- 503 credential_unavailable   a reference cannot be resolved (names the reference)
    +-- 503 no_snapshot / no_instance / overflow
    +-- 504 upstream_timeout

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
from specmesh.names import resource_name
from specmesh.snapshot import ResolvedSnapshot
from specmesh.spec.models import ConnectionPoolSpec, PartnerAgentRef

from .credentials import CredentialResolver, CredentialUnavailableError
from .mtls import agent_dns_name
from .relay import RelayListener, active_tracer, end_to_end_headers, relay
from .router import NoInstanceError, Router
from .state import SnapshotHolder

__all__ = [
    "EgressError",
    "EgressMetrics",
    "EgressProxy",
    "RouteKind",
    "llm_upstream_base",
]

logger = logging.getLogger(__name__)

RouteKind = Literal["llm", "llm_fallback", "embeddings", "mcp", "a2a", "unknown"]

_ENGINE_CREDENTIALS = frozenset({"authorization", "x-api-key", "api-key"})
_VERSIONED = re.compile(r"/v\d+[a-z0-9]*$")
_DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
}
_FAILURE_KINDS: dict[str, Literal["connect", "reset", "timeout"]] = {
    "upstream_unreachable": "connect",
    "upstream_identity": "connect",
    "upstream_timeout": "timeout",
}
_ROUTES: list[tuple[RouteKind, re.Pattern[str]]] = [
    ("llm", re.compile(r"^/llm/v1(?P<rest>/.*)?$")),
    ("llm_fallback", re.compile(r"^/llm/fallbacks/(?P<name>\d+)/v1(?P<rest>/.*)?$")),
    ("embeddings", re.compile(r"^/llm/embeddings/v1(?P<rest>/.*)?$")),
    ("mcp", re.compile(r"^/mcp/(?P<name>[^/]+)(?P<rest>/.*)?$")),
    ("a2a", re.compile(r"^/a2a/(?P<name>[^/]+)(?P<rest>/.*)?$")),
]
_A2A_ROUTE = _ROUTES[-1][1]


class EgressError(Exception):
    """A request the egress answers itself (see the module docstring for the table)."""

    def __init__(self, status: int, code: str, message: str, **fields: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        super().__init__(message)

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": self.message, **self.fields}}
        return web.json_response(body, status=self.status)


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

    def on_ejection(self, agent: str, instance: str) -> None:
        """Hook for :class:`~sidecar.router.Router` (``on_ejection=``)."""
        logger.warning("ejected instance %s of agent %s (outlier detection)", instance, agent)
        self.ejections.labels(agent=agent).inc()


def llm_upstream_base(base_url: str | None, provider: str | None) -> str:
    """The base an LLM call's rest of path is appended to: ``baseUrl`` + ``/v1`` unless it
    already ends in a version segment (``/v1``, ``/v4``, ``/api/v3``, ``/v1beta``)."""
    base = base_url or _DEFAULT_BASE_URLS.get(provider or "openai")
    if base is None:
        raise EgressError(
            502, "upstream_misconfigured", f"model provider {provider!r} has no baseUrl"
        )
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


def _declared(names: list[str], wanted: str) -> int | None:
    """Index of ``wanted`` in ``names``, compared by resource name."""
    try:
        rn = resource_name(wanted)
    except ValueError:
        return None
    for i, name in enumerate(names):
        if resource_name(name) == rn:
            return i
    return None


class _PartnerTable:
    """The current snapshot's ``partnerAgents`` by resource name, built once per snapshot
    (a snapshot is immutable; a reload brings a new one), so a call does not map every
    declared name again."""

    def __init__(self) -> None:
        self._snapshot: ResolvedSnapshot | None = None
        self._by_name: dict[str, tuple[str, PartnerAgentRef]] = {}
        self._asked: dict[str, tuple[str, PartnerAgentRef] | None] = {}

    def get(self, snapshot: ResolvedSnapshot, wanted: str) -> tuple[str, PartnerAgentRef] | None:
        """The partner declared under ``wanted``'s resource name, with that resource name
        (None: not declared)."""
        if snapshot is not self._snapshot:
            by_name: dict[str, tuple[str, PartnerAgentRef]] = {}
            for partner in snapshot.spec.partner_agents:
                rn = resource_name(partner.agent_name)
                by_name.setdefault(rn, (rn, partner))
            self._snapshot, self._by_name, self._asked = snapshot, by_name, {}
        try:
            return self._asked[wanted]
        except KeyError:
            pass
        try:
            found = self._by_name.get(resource_name(wanted))
        except ValueError:
            found = None
        if len(self._asked) < 1024:  # names asked for, bounded (callers choose them)
            self._asked[wanted] = found
        return found


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
        self._inflight: dict[str, int] = {}
        self._partners = _PartnerTable()

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
                raise EgressError(503, "no_snapshot", "the sidecar has no spec yet")
            out = _Outbound(
                kind=kind,
                name=name,
                rest=rest,
                headers=self._forward_headers(request.headers),
                params=MultiDict(request.rel_url.query if request.rel_url.raw_query_string else ()),
            )
            propagate.inject(out.headers)  # the upstream continues from this span
            body = await request.read() if request.body_exists else None
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
                upstream = await self._a2a(request, snapshot, out, body)
            status = upstream.status
            self.metrics.observe(kind, time.perf_counter() - started)
            return await relay(request, upstream, downstream="engine")
        except EgressError as e:
            status = e.status
            return e.response()
        except Exception:
            logger.exception("egress request failed (%s %s)", request.method, request.path)
            status = 500
            return EgressError(
                500, "internal", "the sidecar failed to handle the request"
            ).response()
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
        raise EgressError(404, "unknown_route", f"no egress route for {path!r}")

    @staticmethod
    def _forward_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
        kept = end_to_end_headers(headers)
        return CIMultiDict([(k, v) for k, v in kept if k.lower() not in _ENGINE_CREDENTIALS])

    async def _resolve(self, value: str) -> str:
        try:
            return await self._credentials.resolve(value)
        except CredentialUnavailableError as e:
            raise EgressError(503, "credential_unavailable", str(e), reference=e.reference) from e

    async def _add_secrets(
        self, out: _Outbound, headers: Mapping[str, str], params: Mapping[str, str]
    ) -> None:
        for key, value in headers.items():
            out.headers[key] = await self._resolve(value)
        for key, value in params.items():
            out.params[key] = await self._resolve(value)

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
                raise EgressError(404, "unknown_route", f"the model has no fallback {index}")
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
            header, value = _credential_header(provider, await self._resolve(api_key))
            out.headers[header] = value
        return base + out.rest

    async def _prepare_mcp(self, snapshot: ResolvedSnapshot, out: _Outbound) -> str:
        declared = snapshot.spec.mcp_servers
        index = _declared([s.mcp_server_name for s in declared], out.name)
        if index is None:
            self._refuse("MCP server", out.name, snapshot)
        ref = declared[index]  # type: ignore[index]
        entry = snapshot.mcp_servers.get(ref.mcp_server_name)
        if entry is None:
            raise EgressError(
                502,
                "upstream_misconfigured",
                f"MCP server {ref.mcp_server_name!r} is not in the MCP Registry",
            )
        await self._add_secrets(out, ref.headers, ref.query_params)
        url = resolve_url(entry.url, self._service_addresses)
        return url.rstrip("/") + out.rest if out.rest else url

    def _refuse(self, what: str, name: str, snapshot: ResolvedSnapshot) -> None:
        logger.warning(
            "refused a call to %s %r: agent %s's spec does not name it",
            what,
            name,
            snapshot.agent_name,
            extra={"refused": what, "target": name, "agent": snapshot.agent_name},
        )
        raise EgressError(
            403,
            "not_declared",
            f"{what} {name!r} is not declared in agent {snapshot.agent_name!r}'s spec",
            target=name,
        )

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
            raise EgressError(
                502,
                "upstream_identity",
                f"{shown} did not present the expected certificate"
                + (f" ({server_hostname})" if server_hostname else ""),
            ) from e
        except aiohttp.ClientConnectorError as e:
            raise EgressError(
                502, "upstream_unreachable", f"{shown} is unreachable ({type(e).__name__})"
            ) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise EgressError(
                502, "upstream_reset", f"{shown} closed the connection ({type(e).__name__})"
            ) from e
        except TimeoutError as e:
            raise EgressError(504, "upstream_timeout", f"{shown} timed out") from e
        except aiohttp.ClientError as e:
            raise EgressError(502, "upstream_error", f"{shown} failed ({type(e).__name__})") from e

    # ------------------------------------------------------------ A2A

    async def _a2a(
        self,
        request: web.BaseRequest,
        snapshot: ResolvedSnapshot,
        out: _Outbound,
        body: bytes | None,
    ) -> aiohttp.ClientResponse:
        found = self._partners.get(snapshot, out.name)
        if found is None:
            self._refuse("partner agent", out.name, snapshot)
        assert found is not None
        agent, partner = found
        if self._router is None:
            raise EgressError(503, "no_instance", "the sidecar has no router")
        await self._add_secrets(out, partner.headers, partner.query_params)
        release = self._router.release(agent)
        pool = release.connection_pool if release else self._pool
        limit = pool.max_connections + pool.max_pending_requests
        if self._inflight.get(agent, 0) >= limit:
            raise EgressError(503, "overflow", f"too many calls in flight to {agent!r}")
        self._inflight[agent] = self._inflight.get(agent, 0) + 1
        try:
            overall = release.timeout_seconds if release else 300.0
            async with asyncio.timeout(overall):
                return await self._a2a_tries(request, agent, out, body, overall)
        except TimeoutError as e:
            raise EgressError(504, "upstream_timeout", f"call to {agent!r} timed out") from e
        finally:
            self._inflight[agent] -= 1

    async def _a2a_tries(
        self,
        request: web.BaseRequest,
        agent: str,
        out: _Outbound,
        body: bytes | None,
        overall: float,
    ) -> aiohttp.ClientResponse:
        assert self._router is not None
        router = self._router
        policy = router.retry_policy(agent)
        router.record_request(agent)
        tried: list[str] = []
        retries = 0
        while True:
            try:
                target = router.pick(agent, request.headers, exclude=tried)
            except NoInstanceError as e:
                raise EgressError(503, "no_instance", str(e)) from e
            if target.instance is not None:
                tried.append(target.instance)
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=min(self.connect_timeout, policy.per_try_timeout),
                sock_read=overall,
            )
            https = target.url.startswith("https://")
            failure: Literal["connect", "reset", "timeout"] | None = None
            error: EgressError
            try:
                async with asyncio.timeout(policy.per_try_timeout):
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
                error = EgressError(
                    504, "upstream_timeout", f"instance of {agent!r} timed out (per try)"
                )
            except EgressError as e:
                error = e
                failure = _FAILURE_KINDS.get(e.code, "reset")
            else:
                router.report(target, upstream.status)
                if (
                    policy.retriable_status(upstream.status)
                    and retries < policy.attempts
                    and router.try_retry(agent)
                ):
                    upstream.release()
                    retries += 1
                    self.metrics.retries.labels(agent=agent).inc()
                    continue
                return upstream
            router.report_failure(target, timeout=failure == "timeout")
            if (
                failure is not None
                and policy.retriable_failure(failure)
                and retries < policy.attempts
                and router.try_retry(agent)
            ):
                retries += 1
                self.metrics.retries.labels(agent=agent).inc()
                continue
            raise error
