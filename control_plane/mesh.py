"""The mesh publisher: Istio objects from release policies and the partner graph.

Per agent:

* **VirtualService** -- one set of routes per port of the agent's Service (see below);
* **DestinationRule** -- subsets ``stable`` and ``canary`` selected by the track label
  (:data:`specmesh.k8s.LABEL_TRACK`, the label the Helm chart puts on pods), the
  release's ``outlierDetection`` and ``connectionPool``, ``ISTIO_MUTUAL`` TLS;
* **AuthorizationPolicy** -- ALLOW (see *Who may call* below);
* **RequestAuthentication** -- the trusted JWT issuers (:attr:`MeshSettings.jwt_issuers`,
  :mod:`specmesh.issuers`), each with its ``audiences`` from
  :meth:`~specmesh.issuers.JwtIssuer.audiences_for` -- the list the sidecar accepts -- and
  ``forwardOriginalToken: true`` (the sidecar verifies the token again); rendered when at
  least one issuer is configured.

Plus, namespace-wide, a **PeerAuthentication** in STRICT mode.

With :attr:`MeshSettings.routes` ``gateway-api`` (ambient mode) the VirtualService and the
subset DestinationRule are replaced by Gateway API routes (see *Gateway API* below).

Who may call
------------

The AuthorizationPolicy follows the agent's ``base.callers``
(:class:`~specmesh.spec.models.CallersSpec`, the rule of :mod:`specmesh.callers`). Its rules
(ALLOW when any matches):

* partner agents -- ``source.principals``: the SPIFFE identities (service accounts) of the
  agents that list this one among their partners AND are admitted by ``callers.agents``
  (``*`` or their logical/resource name), plus :attr:`MeshSettings.extra_callers`;
* external callers -- ``source.requestPrincipals`` = ``callers.principals`` (Istio's
  ``<iss>/<sub>`` with the same ``*`` rule). A request principal exists only for a request
  whose token the RequestAuthentication verified: a request without a token never matches
  (and one with an invalid token is refused with 401 before);
* the agent card -- ``GET``/``HEAD`` ``/.well-known/agent-card.json`` on the HTTP port,
  from anyone (no token): a client reads the card to learn how to authenticate.

So an agent nobody lists still answers its card, and the callers its ``principals`` admit.

Routes
------

The agent's Service has two ports, ``http-a2a`` (:data:`~specmesh.k8s.A2A_HTTP_PORT`:
JSON-RPC, REST, the card) and ``grpc-a2a`` (:data:`~specmesh.k8s.A2A_GRPC_PORT`). Every route
matches one ``port`` and sends to that same port: a call never changes binding in the mesh.
Within a port, the first matching class of calls wins; they are told apart by what a proxy
can see (method, path):

* ``http-a2a``: ``stream`` -- a path ending ``:stream`` or ``:subscribe`` (REST); ``read`` --
  ``GET`` and ``HEAD`` (REST task reads, the card); ``call`` -- the rest: REST send and
  cancel, and JSON-RPC ``POST /`` whatever its method (streaming ones included: a proxy
  cannot see the method in the body, so this route is treated as a non-idempotent stream).
* ``grpc-a2a``: ``stream`` -- ``SendStreamingMessage``, ``SubscribeToTask``; ``read`` --
  ``GetTask``, ``ListTasks``, the card, push-config Get / List; ``call`` -- the rest
  (``SendMessage``, ``CancelTask``, push-config Create / Delete).

(gRPC methods of both ``lf.a2a.v1.A2AService`` (A2A 1.0) and ``a2a.v1.A2AService`` (0.3).)
Each class gets the canary header route (when the release sets ``headerMatch``) and then
the weighted stable/canary split (``canaryWeight``), so both apply on both ports.

How the release's resilience fields map (Envoy semantics, as Istio programs them):

* ``retries.attempts`` -- ``retries.attempts`` of every route that retries.
* ``retries.retryOn`` -- as given on ``read`` routes (idempotent calls), plus ``unavailable``
  on the gRPC port when it lists ``5xx`` or ``gateway-error`` (a gRPC failure is an HTTP 200
  with ``grpc-status``; a proxy's own 503 reaches a gRPC caller as ``UNAVAILABLE``). On the
  ``stream`` and ``call`` routes only the conditions that guarantee the agent never saw the
  request are kept: ``connect-failure`` (no connection), ``refused-stream`` (HTTP/2
  ``REFUSED_STREAM``: closed before any processing) and ``reset-before-request`` (reset
  before the request went upstream; Envoy 1.31, Istio 1.23). ``reset``, ``5xx`` and
  ``gateway-error`` also fire after the agent received -- maybe executed -- a
  ``SendMessage``, so each is narrowed to those three; ``unavailable`` and the other
  conditions are dropped (the agent's own ``UNAVAILABLE`` may come after it acted). When
  nothing is left the route says ``attempts: 0``: omitting ``retries`` would let Istio apply
  its default policy (``unavailable`` and 503 included).
* ``retries.perTryTimeoutSeconds`` -- ``perTryTimeout`` of every route that retries. Envoy
  stops the per-try timer once the response starts streaming back (its docs of
  ``per_try_idle_timeout``), so it bounds each attempt's time to the response headers and
  never cuts a stream -- what the sidecar's per-try timeout means too. A route that does not
  retry has no per-try timeout.
* ``timeoutSeconds`` -- the route ``timeout`` (the whole call, retries included) of the
  routes that cannot stream. Envoy's route timeout runs until the *end* of the response, so
  it would cut a long ``message:stream`` or subscription: ``stream`` routes, and the HTTP
  ``call`` route (JSON-RPC streams share ``POST /``), have none (Istio's default: disabled).
* ``retries.budgetPercent`` -- the sidecar's only; a VirtualService has no retry budget.

Gateway API
-----------

For ambient mode (a waypoint proxy instead of sidecars) each agent gets an **HTTPRoute**
(parent: the agent's Service, port ``http-a2a`` 8080) and a **GRPCRoute** (port ``grpc-a2a``
8081) -- GAMMA routes, each sending to the same port of the track Services
``<agent>-stable`` / ``<agent>-canary`` (:func:`track_service_name`; the Helm chart renders
them with ``istio.routes: gateway-api``): the canary header routes first (Gateway API ranks
a rule with more header matches first), then the weighted split. The HTTP ``read`` calls
(``GET``/``HEAD``) get the route ``timeout`` (``timeouts.request``); retries are not
rendered (Gateway API's retry field is not in its standard channel) and the DestinationRules
(one per track Service) carry outlier detection and the connection pool. The
AuthorizationPolicy and RequestAuthentication then name the agent's Services
(``targetRefs``) instead of selecting its pods: in ambient mode the waypoint enforces L7
policy, and ztunnel could not (request principals, paths and methods are L7).

Every object is checked by :class:`IstioValidator` before it is published: against the
``openAPIV3Schema`` of its CustomResourceDefinition as the API server would (unknown
fields refused, ``x-kubernetes-validations`` CEL rules evaluated), and by the checks the
API server leaves to istiod (route weights sum to 100, hosts present, referenced subsets
defined, retry policies istiod accepts).
"""

from __future__ import annotations

import copy
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import celpy
import jsonschema
import yaml

from control_plane.gatewayapi import CRDS_PATH as GATEWAY_API_CRDS_PATH
from control_plane.istio import CRDS_PATH
from specmesh.errors import SpecmeshError
from specmesh.issuers import JwtIssuer
from specmesh.k8s import (
    A2A_GRPC_PORT,
    A2A_HTTP_PORT,
    LABEL_AGENT,
    LABEL_MANAGED_BY,
    LABEL_TRACK,
    MANAGED_BY,
    service_name,
    spiffe_principal,
)
from specmesh.names import resource_name
from specmesh.spec.models import CallersSpec, ReleaseSpec

__all__ = [
    "AGENT_CARD_PATH",
    "IstioValidator",
    "MeshObjectError",
    "MeshSettings",
    "admitted_agents",
    "render_agent",
    "render_mesh",
    "render_namespace",
    "track_service_name",
    "write_yaml",
]

Obj = dict[str, Any]


class MeshObjectError(SpecmeshError):
    """Rendered Istio objects are invalid; ``problems`` lists ``kind/name: path: message``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid Istio objects:\n" + "\n".join(f"  {p}" for p in self.problems))


AGENT_CARD_PATH = "/.well-known/agent-card.json"
"""The agent card's path: readable without a token."""


@dataclass(frozen=True)
class MeshSettings:
    """Where and how objects are rendered."""

    namespace: str = "specmesh"
    trust_domain: str = "cluster.local"
    extra_callers: tuple[str, ...] = ()
    """Principals allowed to call every agent (e.g. the ingress gateway's)."""
    jwt_issuers: tuple[JwtIssuer, ...] = ()
    """Trusted JWT issuers: every agent's RequestAuthentication (``SPECMESH_JWT_ISSUERS``)."""
    routes: Literal["virtualservice", "gateway-api"] = "virtualservice"
    """Route objects: Istio's VirtualService + subsets, or Gateway API HTTPRoute/GRPCRoute
    over per-track Services (ambient mode) (``SPECMESH_MESH_ROUTES``)."""


def track_service_name(agent: str, track: str) -> str:
    """The Service of one track of an agent (Gateway API routes send to it)."""
    return f"{service_name(agent)}-{track}"


def admitted_agents(partners_of: Iterable[str], callers: CallersSpec | None) -> list[str]:
    """The agents among ``partners_of`` (those listing this agent as a partner) that
    ``callers.agents`` admits: all with ``*`` (the default), else those named by logical
    or resource name."""
    spec = callers or CallersSpec()
    if "*" in spec.agents:
        return sorted(set(partners_of))
    named = {resource_name(a) for a in spec.agents}
    return sorted({a for a in partners_of if resource_name(a) in named})


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _metadata(name: str, agent: str | None, settings: MeshSettings) -> Obj:
    labels = {LABEL_MANAGED_BY: MANAGED_BY}
    if agent is not None:
        labels[LABEL_AGENT] = resource_name(agent)
    return {"name": name, "namespace": settings.namespace, "labels": labels}


@dataclass(frozen=True)
class _CallClass:
    """Calls of one port that share a retry and timeout policy."""

    name: str
    matches: tuple[Obj, ...]
    """Istio match conditions (any of them); empty for the rest of the port."""
    idempotent: bool
    """Retrying after the agent received the call is harmless."""
    streaming: bool
    """The response may be a stream: no route timeout."""


_GRPC_METHOD = r"/(lf\.)?a2a\.v1\.A2AService/"
_PORTS: tuple[tuple[int, str, tuple[_CallClass, ...]], ...] = (
    (
        A2A_HTTP_PORT,
        "http-a2a",
        (
            _CallClass("stream", ({"uri": {"regex": ".*:(stream|subscribe)"}},), False, True),
            _CallClass(
                "read", ({"method": {"exact": "GET"}}, {"method": {"exact": "HEAD"}}), True, False
            ),
            _CallClass("call", (), False, True),
        ),
    ),
    (
        A2A_GRPC_PORT,
        "grpc-a2a",
        (
            _CallClass(
                "stream",
                ({"uri": {"regex": _GRPC_METHOD + "(SendStreamingMessage|SubscribeToTask"
                          "|TaskSubscription)"}},),
                False,
                True,
            ),
            _CallClass(
                "read",
                ({"uri": {"regex": _GRPC_METHOD + "(GetTask|ListTasks|GetExtendedAgentCard"
                          "|GetAgentCard|GetTaskPushNotificationConfig"
                          "|ListTaskPushNotificationConfigs?)"}},),
                True,
                False,
            ),
            _CallClass("call", (), False, False),
        ),
    ),
)  # fmt: skip
"""Per Service port, its call classes in match order (see the module docstring)."""

_NOT_SENT = ("connect-failure", "refused-stream", "reset-before-request")
"""Envoy retry conditions that fire only when the agent never received the request."""
_NARROWED: dict[str, tuple[str, ...]] = {
    "connect-failure": ("connect-failure",),
    "refused-stream": ("refused-stream",),
    "reset-before-request": ("reset-before-request",),
    "reset": _NOT_SENT,
    "5xx": _NOT_SENT,
    "gateway-error": _NOT_SENT,
}
"""What each release condition keeps on a non-idempotent route."""


def _retry_on(retry_on: str, *, idempotent: bool, grpc: bool) -> list[str]:
    """The retry conditions of one route (see the module docstring)."""
    given = [c.strip() for c in retry_on.split(",") if c.strip()]
    if idempotent:
        extra = ["unavailable"] if grpc and {"5xx", "gateway-error"} & set(given) else []
        return list(dict.fromkeys(given + extra))
    kept = {n for c in given for n in _NARROWED.get(c, ())}
    return [c for c in _NOT_SENT if c in kept]


def _headers(release: ReleaseSpec) -> Obj:
    return {
        h.name.lower(): {
            k: v
            for k, v in (("exact", h.exact), ("prefix", h.prefix), ("regex", h.regex))
            if v is not None
        }
        for h in release.header_match
    }


def _matches(port: int, cls: _CallClass, headers: Obj | None) -> list[Obj]:
    """The match conditions of a route of ``cls`` on ``port`` (fresh objects: the rendered
    YAML has no aliases and callers may change it)."""
    out: list[Obj] = [{"port": port, **copy.deepcopy(m)} for m in cls.matches] or [{"port": port}]
    if headers is not None:
        for m in out:
            m["headers"] = copy.deepcopy(headers)
    return out


def render_agent(
    agent: str,
    *,
    release: ReleaseSpec | None,
    callers: Iterable[str],
    settings: MeshSettings,
    callers_spec: CallersSpec | None = None,
) -> list[Obj]:
    """The objects of one agent: its routes (VirtualService, or HTTPRoute and GRPCRoute),
    DestinationRule(s), AuthorizationPolicy and, with issuers, RequestAuthentication.

    ``callers`` are the agents that list ``agent`` among their partners; ``callers_spec``
    is the agent's ``base.callers`` (None: the defaults)."""
    policy = release or ReleaseSpec()
    if settings.routes == "gateway-api":
        out = _gateway_routes(agent, release, settings)
        out.extend(
            _destination_rule(agent, track_service_name(agent, track), policy, settings, None)
            for track in ("stable", "canary")
        )
    else:
        out = [
            _virtual_service(agent, release, settings),
            _destination_rule(agent, service_name(agent), policy, settings, ("stable", "canary")),
        ]
    out.append(_authorization_policy(agent, callers, callers_spec, settings))
    if settings.jwt_issuers:
        out.append(_request_authentication(agent, settings))
    return out


def _virtual_service(agent: str, release: ReleaseSpec | None, settings: MeshSettings) -> Obj:
    host = service_name(agent)
    policy = release or ReleaseSpec()
    weight = release.canary_weight if release is not None else 0
    headers = _headers(release) if release is not None and release.header_match else None

    http: list[Obj] = []
    for port, port_name, classes in _PORTS:

        def dest(subset: str, port: int = port) -> Obj:
            return {"host": host, "subset": subset, "port": {"number": port}}

        split = [{"destination": dest("stable"), "weight": 100 - weight}]
        if weight:
            split.append({"destination": dest("canary"), "weight": weight})
        for cls in classes:
            on = _retry_on(
                policy.retries.retry_on, idempotent=cls.idempotent, grpc=port == A2A_GRPC_PORT
            )
            retries: Obj = {"attempts": 0}
            if on and policy.retries.attempts:
                retries = {
                    "attempts": policy.retries.attempts,
                    "perTryTimeout": _duration(policy.retries.per_try_timeout_seconds),
                    "retryOn": ",".join(on),
                }
            common: Obj = {"retries": retries}
            if not cls.streaming:
                common["timeout"] = _duration(policy.timeout_seconds)
            name = f"{port_name}-{cls.name}"
            if headers is not None:
                http.append(
                    {
                        "name": f"{name}-canary-by-header",
                        "match": _matches(port, cls, headers),
                        "route": [{"destination": dest("canary")}],
                        **copy.deepcopy(common),
                    }
                )
            http.append(
                {
                    "name": name,
                    "match": _matches(port, cls, None),
                    "route": copy.deepcopy(split),
                    **copy.deepcopy(common),
                }
            )
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _metadata(host, agent, settings),
        "spec": {"hosts": [host], "http": http},
    }


def _destination_rule(
    agent: str,
    host: str,
    policy: ReleaseSpec,
    settings: MeshSettings,
    subsets: tuple[str, ...] | None,
) -> Obj:
    od = policy.outlier_detection
    outlier: Obj = {
        "consecutive5xxErrors": od.consecutive_5xx_errors,
        "interval": _duration(od.interval_seconds),
        "baseEjectionTime": _duration(od.base_ejection_time_seconds),
        "maxEjectionPercent": od.max_ejection_percent,
    }
    if od.consecutive_gateway_errors:
        outlier["consecutiveGatewayErrors"] = od.consecutive_gateway_errors
    spec: Obj = {
        "host": host,
        "trafficPolicy": {
            "tls": {"mode": "ISTIO_MUTUAL"},
            "connectionPool": {
                "tcp": {"maxConnections": policy.connection_pool.max_connections},
                "http": {"http1MaxPendingRequests": policy.connection_pool.max_pending_requests},
            },
            "outlierDetection": outlier,
        },
    }
    if subsets:
        spec["subsets"] = [{"name": track, "labels": {LABEL_TRACK: track}} for track in subsets]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": _metadata(host, agent, settings),
        "spec": spec,
    }


def _authorization_policy(
    agent: str,
    callers: Iterable[str],
    callers_spec: CallersSpec | None,
    settings: MeshSettings,
) -> Obj:
    """ALLOW: admitted partner agents, the request principals of ``callers.principals``,
    and the agent card for anyone (see *Who may call* in the module docstring)."""
    principals = sorted(
        {spiffe_principal(c, namespace=settings.namespace, trust_domain=settings.trust_domain)
         for c in admitted_agents(callers, callers_spec)}
        | set(settings.extra_callers)
    )  # fmt: skip
    rules: list[Obj] = []
    if principals:
        rules.append({"from": [{"source": {"principals": principals}}]})
    request_principals = sorted(set((callers_spec or CallersSpec()).principals))
    if request_principals:
        rules.append({"from": [{"source": {"requestPrincipals": request_principals}}]})
    rules.append(
        {
            "to": [
                {
                    "operation": {
                        "ports": [str(A2A_HTTP_PORT)],
                        "methods": ["GET", "HEAD"],
                        "paths": [AGENT_CARD_PATH],
                    }
                }
            ]
        }
    )
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _metadata(service_name(agent), agent, settings),
        "spec": {**_policy_target(agent, settings), "action": "ALLOW", "rules": rules},
    }


def _policy_target(agent: str, settings: MeshSettings) -> Obj:
    """What a security policy applies to: the agent's pods (``selector``: their sidecars
    enforce it), or in ambient mode its Services (``targetRefs``: the waypoint enforces it;
    ztunnel cannot see request principals, paths or methods)."""
    if settings.routes == "gateway-api":
        names = [service_name(agent)] + [track_service_name(agent, t) for t in ("stable", "canary")]
        return {"targetRefs": [{"group": "", "kind": "Service", "name": n} for n in names]}
    return {"selector": {"matchLabels": {LABEL_AGENT: resource_name(agent)}}}


def _request_authentication(agent: str, settings: MeshSettings) -> Obj:
    """The trusted issuers, for this agent's audiences; the token stays on the request."""
    rules: list[Obj] = []
    for issuer in settings.jwt_issuers:
        rule: Obj = {"issuer": issuer.issuer}
        if issuer.jwks_uri is not None:
            rule["jwksUri"] = issuer.jwks_uri
        elif issuer.jwks is not None:
            rule["jwks"] = json.dumps(issuer.jwks, sort_keys=True)
        # never empty (Istio would take any audience): the sidecar's list, to the letter
        rule["audiences"] = issuer.audiences_for(agent)
        rule["forwardOriginalToken"] = True
        rules.append(rule)
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": _metadata(service_name(agent), agent, settings),
        "spec": {**_policy_target(agent, settings), "jwtRules": rules},
    }


def _gateway_headers(release: ReleaseSpec) -> list[Obj]:
    """The release's canary header match as Gateway API header matches (a prefix becomes
    a regular expression: Gateway API has Exact and RegularExpression only)."""
    out: list[Obj] = []
    for h in release.header_match:
        if h.exact is not None:
            out.append({"type": "Exact", "name": h.name, "value": h.exact})
        elif h.prefix is not None:
            out.append({"type": "RegularExpression", "name": h.name,
                        "value": "^" + re.escape(h.prefix) + ".*"})  # fmt: skip
        elif h.regex is not None:
            out.append({"type": "RegularExpression", "name": h.name, "value": h.regex})
    return out


def _gateway_routes(agent: str, release: ReleaseSpec | None, settings: MeshSettings) -> list[Obj]:
    """HTTPRoute (port 8080 -> 8080) and GRPCRoute (8081 -> 8081) of one agent, attached to
    its Service (GAMMA), sending to the track Services."""
    host = service_name(agent)
    policy = release or ReleaseSpec()
    weight = release.canary_weight if release is not None else 0
    headers = _gateway_headers(release) if release is not None and release.header_match else []
    timeout = {"request": _duration(policy.timeout_seconds)}

    def backends(port: int, canary_only: bool = False) -> list[Obj]:
        if canary_only:
            return [{"name": track_service_name(agent, "canary"), "port": port}]
        out = [{"name": track_service_name(agent, "stable"), "port": port, "weight": 100 - weight}]
        if weight:
            out.append({"name": track_service_name(agent, "canary"), "port": port,
                        "weight": weight})  # fmt: skip
        return out

    def parent(port: int) -> list[Obj]:
        return [{"group": "", "kind": "Service", "name": host, "port": port}]

    http_rules: list[Obj] = []
    reads = [{"method": "GET"}, {"method": "HEAD"}]
    if headers:
        http_rules.append(
            {
                "name": "http-a2a-read-canary-by-header",
                "matches": [{**m, "headers": copy.deepcopy(headers)} for m in reads],
                "backendRefs": backends(A2A_HTTP_PORT, canary_only=True),
                "timeouts": dict(timeout),
            }
        )
        http_rules.append(
            {
                "name": "http-a2a-canary-by-header",
                "matches": [{"headers": copy.deepcopy(headers)}],
                "backendRefs": backends(A2A_HTTP_PORT, canary_only=True),
            }
        )
    http_rules.append(
        {
            "name": "http-a2a-read",
            "matches": copy.deepcopy(reads),
            "backendRefs": backends(A2A_HTTP_PORT),
            "timeouts": dict(timeout),
        }
    )
    http_rules.append(
        {
            "name": "http-a2a",
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": backends(A2A_HTTP_PORT),
        }
    )
    grpc_rules: list[Obj] = []
    if headers:
        grpc_rules.append(
            {
                "name": "grpc-a2a-canary-by-header",
                "matches": [{"headers": copy.deepcopy(headers)}],
                "backendRefs": backends(A2A_GRPC_PORT, canary_only=True),
            }
        )
    grpc_rules.append({"name": "grpc-a2a", "backendRefs": backends(A2A_GRPC_PORT)})
    return [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": _metadata(host, agent, settings),
            "spec": {"parentRefs": parent(A2A_HTTP_PORT), "rules": http_rules},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": _metadata(host, agent, settings),
            "spec": {"parentRefs": parent(A2A_GRPC_PORT), "rules": grpc_rules},
        },
    ]


def render_namespace(settings: MeshSettings) -> list[Obj]:
    """Namespace-wide objects: PeerAuthentication STRICT."""
    return [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": _metadata("default", None, settings),
            "spec": {"mtls": {"mode": "STRICT"}},
        }
    ]


def render_mesh(
    agents: Mapping[str, ReleaseSpec | None],
    partner_graph: Mapping[str, Sequence[str]],
    *,
    settings: MeshSettings,
    callers: Mapping[str, CallersSpec | None] | None = None,
) -> list[Obj]:
    """Every object for the given agents (name -> release policy), partner graph and
    ``callers`` (name -> its ``base.callers``; absent: the defaults)."""
    partners_of: dict[str, set[str]] = {resource_name(a): set() for a in agents}
    for caller, partners in partner_graph.items():
        for partner in partners:
            partners_of.setdefault(resource_name(partner), set()).add(caller)
    specs = {resource_name(a): c for a, c in (callers or {}).items()}
    out = render_namespace(settings)
    for agent, release in sorted(agents.items()):
        rn = resource_name(agent)
        out.extend(
            render_agent(
                agent,
                release=release,
                callers=partners_of[rn],
                settings=settings,
                callers_spec=specs.get(rn),
            )
        )
    return out


# ---------------------------------------------------------------- validation


def _closed(schema: Any) -> Any:
    """A copy of an OpenAPI schema where objects with ``properties`` refuse unknown fields
    (the API server's strict field validation), unless they preserve unknown fields."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _defaulted(schema: Any, value: Any) -> Any:
    """``value`` with the schema's ``default``s filled in, as the API server does before it
    validates (CEL rules read defaulted fields, e.g. a backendRef's ``group``)."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        merged = {k: copy.deepcopy(sub["default"]) for k, sub in props.items()
                  if k not in value and isinstance(sub, dict) and "default" in sub}  # fmt: skip
        merged.update(value)
        return {
            k: _defaulted(props.get(k, extra if isinstance(extra, dict) else None), v)
            for k, v in merged.items()
        }
    if isinstance(value, list):
        return [_defaulted(schema.get("items"), v) for v in value]
    return value


@dataclass
class IstioValidator:
    """Validates mesh objects against CRD files: by default the vendored Istio CRD schemas
    (:data:`control_plane.istio.CRDS_PATH`) plus the vendored Gateway API routes
    (:data:`control_plane.gatewayapi.CRDS_PATH`)."""

    crd_path: Path = CRDS_PATH
    extra_crd_paths: tuple[Path, ...] = (GATEWAY_API_CRDS_PATH,)
    """Further CRD files (Gateway API's); a kind in two files: the later one wins."""
    _schemas: dict[tuple[str, str], Any] = field(default_factory=dict, init=False)
    _programs: dict[str, Any] = field(default_factory=dict, init=False)
    _cel: Any = field(default_factory=celpy.Environment, init=False)

    def __post_init__(self) -> None:
        for path in (self.crd_path, *self.extra_crd_paths):
            with path.open() as f:
                for crd in yaml.safe_load_all(f):
                    if not crd or crd.get("kind") != "CustomResourceDefinition":
                        continue
                    group = crd["spec"]["group"]
                    kind = crd["spec"]["names"]["kind"]
                    for version in crd["spec"]["versions"]:
                        schema = version.get("schema", {}).get("openAPIV3Schema")
                        if schema:
                            self._schemas[(f"{group}/{version['name']}", kind)] = _closed(
                                copy.deepcopy(schema)
                            )

    def kinds(self) -> list[tuple[str, str]]:
        return sorted(self._schemas)

    def problems(self, obj: Obj) -> list[str]:
        """Everything wrong with one object (empty when valid)."""
        kind = obj.get("kind", "?")
        name = obj.get("metadata", {}).get("name", "?")
        where = f"{kind}/{name}"
        schema = self._schemas.get((obj.get("apiVersion", ""), kind))
        if schema is None:
            return [f"{where}: no CRD schema for apiVersion {obj.get('apiVersion')!r}"]
        out = []
        body = _defaulted(
            schema, {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        )
        validator = jsonschema.Draft7Validator(schema)
        for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in error.absolute_path) or "(root)"
            out.append(f"{where}: {path}: {error.message}")
        if not obj.get("metadata", {}).get("name"):
            out.append(f"{where}: metadata.name: required")
        if not out:  # CEL rules assume a structurally valid object
            out.extend(f"{where}: {p}" for p in self._cel_problems(schema, body, ""))
        out.extend(f"{where}: {p}" for p in _semantic_problems(obj))
        return out

    def _cel_problems(self, schema: Any, value: Any, path: str) -> list[str]:
        """Evaluate the ``x-kubernetes-validations`` CEL rules along ``value``."""
        if not isinstance(schema, dict) or value is None:
            return []
        out = []
        for rule in schema.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue  # transition rules need the stored object
            try:
                this = celpy.json_to_cel(value)  # type: ignore[attr-defined]
                ok = self._program(rule["rule"]).evaluate({"self": this})
            except Exception as e:  # a rule that errors is a failed rule
                ok = e
            if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
                message = rule.get("message") or f"failed rule {rule['rule']}"
                out.append(f"{path or '(root)'}: {message}")
        if isinstance(value, dict):
            props = schema.get("properties", {})
            extra = schema.get("additionalProperties")
            for key, item in value.items():
                sub = props.get(key, extra if isinstance(extra, dict) else None)
                out.extend(self._cel_problems(sub, item, f"{path}.{key}" if path else key))
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                out.extend(self._cel_problems(schema["items"], item, f"{path}[{i}]"))
        return out

    def _program(self, rule: str) -> Any:
        program = self._programs.get(rule)
        if program is None:
            program = self._cel.program(self._cel.compile(rule), functions=_K8S_CEL_FUNCTIONS)
            self._programs[rule] = program
        return program

    def check(self, objects: Iterable[Obj]) -> None:
        """Raise :class:`MeshObjectError` unless every object (and their references) is valid."""
        objects = list(objects)
        problems = [p for obj in objects for p in self.problems(obj)]
        problems.extend(_cross_problems(objects))
        if problems:
            raise MeshObjectError(problems)


def _cel_url(value: Any) -> Any:
    """Kubernetes' CEL ``url()``: the string itself, when it is an absolute URL."""
    if not urllib.parse.urlsplit(str(value)).scheme:
        raise ValueError(f"not an absolute URL: {value!r}")
    return celpy.celtypes.StringType(value)


_K8S_CEL_FUNCTIONS: dict[str, Any] = {
    "url": _cel_url,
    "getScheme": lambda u: celpy.celtypes.StringType(urllib.parse.urlsplit(str(u)).scheme),
    "getHost": lambda u: celpy.celtypes.StringType(urllib.parse.urlsplit(str(u)).netloc),
    "getEscapedPath": lambda u: celpy.celtypes.StringType(urllib.parse.urlsplit(str(u)).path),
}
"""The parts of Kubernetes' CEL URL library the CRDs' rules use (Istio's ``jwksUri``)."""


def _semantic_problems(obj: Obj) -> list[str]:
    spec = obj.get("spec", {})
    out: list[str] = []
    if obj.get("kind") == "VirtualService":
        if not spec.get("hosts"):
            out.append("spec.hosts: at least one host is required")
        for i, route in enumerate(spec.get("http", [])):
            dests = route.get("route", [])
            if not dests:
                out.append(f"spec.http[{i}].route: at least one destination is required")
            if len(dests) > 1 or any("weight" in d for d in dests):
                total = sum(d.get("weight", 0) for d in dests)
                if total != 100:
                    out.append(f"spec.http[{i}].route: weights must sum to 100 (got {total})")
            for j, d in enumerate(dests):
                if not d.get("destination", {}).get("host"):
                    out.append(f"spec.http[{i}].route[{j}].destination.host: required")
            out.extend(f"spec.http[{i}].retries{p}" for p in _retry_problems(route.get("retries")))
    if obj.get("kind") == "DestinationRule" and not spec.get("host"):
        out.append("spec.host: required")
    return out


_ISTIO_RETRY_ON = frozenset(
    {
        # x-envoy-retry-on
        "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
        "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
        "envoy-ratelimited", "http3-post-connect-failure",
        # x-envoy-retry-grpc-on
        "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
    }
)  # fmt: skip
"""The ``retryOn`` policies istiod accepts (besides HTTP status codes)."""


def _retry_problems(retries: Obj | None) -> list[str]:
    """istiod's checks of a route's ``retries`` (its validation webhook, not the CRD)."""
    if not retries:
        return []
    out = []
    attempts = retries.get("attempts", 0)
    if attempts < 0:
        out.append(".attempts: cannot be negative")
    configured = [k for k in ("perTryTimeout", "retryOn", "retryRemoteLocalities") if k in retries]
    if attempts == 0 and configured:
        out.append(f": {', '.join(configured)} set while attempts is 0 (retries disabled)")
    for policy in str(retries.get("retryOn", "")).split(","):
        if policy and policy not in _ISTIO_RETRY_ON and not _http_status(policy):
            out.append(f".retryOn: {policy!r} is not a valid retryOn policy")
    return out


def _http_status(text: str) -> bool:
    try:
        return int(text) in {s.value for s in HTTPStatus}
    except ValueError:
        return False


def _cross_problems(objects: list[Obj]) -> list[str]:
    subsets: dict[str, set[str]] = {}
    for obj in objects:
        if obj.get("kind") == "DestinationRule":
            spec = obj.get("spec", {})
            subsets[spec.get("host", "")] = {s.get("name") for s in spec.get("subsets", [])}
    out = []
    for obj in objects:
        if obj.get("kind") != "VirtualService":
            continue
        name = obj["metadata"].get("name")
        for i, route in enumerate(obj.get("spec", {}).get("http", [])):
            for j, d in enumerate(route.get("route", [])):
                dest = d.get("destination", {})
                subset = dest.get("subset")
                if subset and subset not in subsets.get(dest.get("host", ""), set()):
                    out.append(
                        f"VirtualService/{name}: spec.http[{i}].route[{j}].destination.subset: "
                        f"subset {subset!r} is not defined by a DestinationRule for "
                        f"host {dest.get('host')!r}"
                    )
    return out


def write_yaml(objects: Iterable[Obj], folder: Path) -> list[Path]:
    """Write one YAML file per object (GitOps); remove files of objects no longer rendered."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for obj in objects:
        path = folder / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        written.append(path)
    for stale in set(folder.glob("*.yaml")) - set(written):
        if f"{LABEL_MANAGED_BY}: {MANAGED_BY}" in stale.read_text():
            stale.unlink()
    return written
