"""A fake Kubernetes API server that speaks the real REST protocol, just as much of it as
the Kubernetes runtime uses through lightkube (an aiohttp app on 127.0.0.1).

Served, under the real paths (``/api/v1/namespaces/{ns}/{plural}[/{name}]``,
``/apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]``) for the kinds in
:data:`KINDS`:

- ``PATCH`` with ``Content-Type: application/apply-patch+yaml`` (server-side apply): needs
  the ``fieldManager`` query parameter (400 without, like the real server), creates (201)
  or replaces the object (200); an object another field manager holds is a 409 conflict
  unless ``force=true``; the body's kind, name and namespace must match the URL.
- ``GET`` of a collection with ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``,
  ``!k``); items carry no ``kind``/``apiVersion``, as the real server's lists.
- ``GET`` and ``DELETE`` of one object (404 ``Status`` when missing).

Errors are ``Status`` objects served as ``application/json`` (lightkube maps only those to
``ApiError``). Not modelled: field-level merging of several managers (one manager's apply
replaces the object), ``resourceVersion`` preconditions, watches, dry runs, admission and
validation (objects are checked separately with kubernetes-validate), garbage collection
(deleting a Deployment leaves its pods here).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

Obj = dict[str, Any]

KINDS: dict[tuple[str, str, str], str] = {
    ("", "v1", "services"): "Service",
    ("", "v1", "serviceaccounts"): "ServiceAccount",
    ("", "v1", "pods"): "Pod",
    ("apps", "v1", "deployments"): "Deployment",
    ("autoscaling", "v2", "horizontalpodautoscalers"): "HorizontalPodAutoscaler",
    ("policy", "v1", "poddisruptionbudgets"): "PodDisruptionBudget",
    ("networking.k8s.io", "v1", "networkpolicies"): "NetworkPolicy",
    # what the mesh publisher applies
    ("networking.istio.io", "v1", "virtualservices"): "VirtualService",
    ("networking.istio.io", "v1", "destinationrules"): "DestinationRule",
    ("security.istio.io", "v1", "authorizationpolicies"): "AuthorizationPolicy",
    ("security.istio.io", "v1", "peerauthentications"): "PeerAuthentication",
    ("security.istio.io", "v1", "requestauthentications"): "RequestAuthentication",
    ("gateway.networking.k8s.io", "v1", "httproutes"): "HTTPRoute",
    ("gateway.networking.k8s.io", "v1", "grpcroutes"): "GRPCRoute",
}
APPLY_PATCH = "application/apply-patch+yaml"


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str]
    content_type: str = ""
    authorization: str = ""

    @property
    def plural(self) -> str:
        return self.path.split("/namespaces/", 1)[1].split("/")[1]

    @property
    def name(self) -> str | None:
        parts = self.path.split("/namespaces/", 1)[1].split("/")
        return parts[2] if len(parts) > 2 else None


def _matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if " in " in term or " notin " in term:
            raise ValueError(f"set-based selector not served here: {term}")
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class FakeKubeApi:
    """The store (``(group, version, plural, namespace, name)`` -> object) and every
    request made, in order."""

    objects: dict[tuple[str, str, str, str, str], Obj] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    refuse: dict[tuple[str, str], int] = field(default_factory=dict)
    """``(method, plural)`` -> status to answer instead (e.g. 403 for RBAC)."""
    _version: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # ------------------------------------------------------------ helpers for tests

    def put(self, obj: Obj, *, manager: str = "kubectl") -> None:
        """Store ``obj`` as if another client had applied it."""
        group, _, version = obj["apiVersion"].rpartition("/")
        plural = next(p for (g, v, p), k in KINDS.items() if (g, v, k) == (group, version,
                      obj["kind"]))  # fmt: skip
        meta = obj["metadata"]
        self._store((group, version, plural, meta["namespace"], meta["name"]), obj, manager)

    def names(self, plural: str, namespace: str = "agents") -> set[str]:
        return {k[4] for k in self.objects if k[2] == plural and k[3] == namespace}

    def get(self, plural: str, name: str, namespace: str = "agents") -> Obj:
        return next(o for k, o in self.objects.items() if k[2:] == (plural, namespace, name))

    def mutations(self) -> list[Call]:
        return [c for c in self.calls if c.method in ("PATCH", "DELETE", "POST", "PUT")]

    # ------------------------------------------------------------ the protocol

    def _store(self, key: tuple[str, str, str, str, str], obj: Obj, manager: str) -> Obj:
        self._version += 1
        old = self.objects.get(key)
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        meta["namespace"] = key[3]
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        meta["creationTimestamp"] = (
            old["metadata"]["creationTimestamp"] if old else "2026-11-30T00:00:00Z"
        )
        meta["resourceVersion"] = str(self._version)
        meta["managedFields"] = [
            {"manager": manager, "operation": "Apply", "apiVersion": stored["apiVersion"]}
        ]
        self.objects[key] = stored
        return stored

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}  # fmt: skip
        return web.Response(
            status=code, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )

    @staticmethod
    def _json(obj: Obj, status: int = 200) -> web.Response:
        return web.Response(
            status=status, body=json.dumps(obj), headers={"Content-Type": "application/json"}
        )

    async def _handle(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.calls.append(
            Call(
                request.method,
                request.path,
                query,
                request.headers.get("Content-Type", ""),
                request.headers.get("Authorization", ""),
            )
        )
        parts = request.path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return self._status(404, "NotFound", "the server could not find the requested resource")
        if len(rest) not in (3, 4) or rest[0] != "namespaces":
            return self._status(404, "NotFound", "the server could not find the requested resource")
        namespace, plural = rest[1], rest[2]
        name = rest[3] if len(rest) == 4 else None
        kind = KINDS.get((group, version, plural))
        if kind is None:
            return self._status(404, "NotFound", "the server could not find the requested resource")
        if (request.method, plural) in self.refuse:
            code = self.refuse[(request.method, plural)]
            return self._status(code, "Forbidden", f"{plural} is forbidden: refused by the test")
        api_version = f"{group}/{version}" if group else version

        if name is None and request.method == "GET":
            try:
                items = [
                    {k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                    for key, o in sorted(self.objects.items())
                    if key[:4] == (group, version, plural, namespace)
                    and _matches(query.get("labelSelector", ""), o["metadata"].get("labels", {}))
                ]
            except ValueError as e:
                return self._status(400, "BadRequest", str(e))
            return self._json({"kind": f"{kind}List", "apiVersion": api_version,
                               "metadata": {"resourceVersion": str(self._version)},
                               "items": items})  # fmt: skip
        if name is None:
            return self._status(405, "MethodNotAllowed", f"{request.method} on a collection")

        key = (group, version, plural, namespace, name)
        if request.method == "GET":
            if key not in self.objects:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            return self._json(self.objects[key])
        if request.method == "DELETE":
            if key not in self.objects:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            del self.objects[key]
            return self._json({"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Success", "details": {"name": name,
                               "kind": plural}})  # fmt: skip
        if request.method == "PATCH":
            if request.headers.get("Content-Type") != APPLY_PATCH:
                return self._status(415, "UnsupportedMediaType", "only apply patches here")
            manager = query.get("fieldManager")
            if not manager:
                return self._status(
                    400, "BadRequest", "fieldManager: Required value: is required for apply patch"
                )
            obj = yaml.safe_load(await request.text())
            meta = obj.get("metadata", {})
            if (obj.get("apiVersion"), obj.get("kind")) != (api_version, kind):
                return self._status(400, "BadRequest", "apiVersion/kind do not match the URL")
            if meta.get("name") != name:
                return self._status(
                    400,
                    "BadRequest",
                    f"the name of the object ({meta.get('name')}) does not match the name on "
                    f"the URL ({name})",
                )
            if meta.get("namespace", namespace) != namespace:
                return self._status(
                    400, "BadRequest", "the namespace of the object does not match the URL"
                )
            old = self.objects.get(key)
            if old is not None and query.get("force") != "true":
                holders = {m["manager"] for m in old["metadata"].get("managedFields", [])}
                if holders - {manager}:
                    return self._status(
                        409, "Conflict", f"Apply failed with conflicts with {sorted(holders)}"
                    )
            stored = self._store(key, obj, manager)
            return self._json(stored, 200 if old is not None else 201)
        return self._status(405, "MethodNotAllowed", request.method)


@asynccontextmanager
async def serving(fake: FakeKubeApi) -> AsyncIterator[str]:
    """``fake`` served on a free local port; its base URL."""
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def role_grants(role: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) an RBAC Role's rules grant."""
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
