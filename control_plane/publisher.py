"""The mesh publisher at work: re-render and publish the Istio objects on every change.

A watch on ``<prefix>/agents/`` (specs, releases, deletions) triggers a render of every
agent's objects from the store (releases, the partner graph, each agent's ``base.callers``:
:func:`read_mesh_state`) (changes arriving together are coalesced), a validation
against the Istio CRD schemas, and a publish to a :class:`MeshSink`: YAML files in a
folder (GitOps) or server-side apply to Kubernetes. Objects of deleted agents are removed.
A render that fails validation is logged and not published; what was published stays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import yaml

from control_plane.mesh import (
    IstioValidator,
    MeshObjectError,
    MeshSettings,
    render_mesh,
    write_yaml,
)
from specmesh.k8s import LABEL_MANAGED_BY, MANAGED_BY
from specmesh.names import resource_name
from specmesh.spec.models import CallersSpec, ReleaseSpec
from specmesh.store import SpecStore
from specmesh.watch import PrefixWatcher

__all__ = [
    "KubernetesMeshSink",
    "MeshPublisher",
    "MeshSink",
    "MeshState",
    "YamlMeshSink",
    "read_mesh_state",
    "render_from_store",
]

logger = logging.getLogger(__name__)

Obj = dict[str, Any]


@dataclass(frozen=True)
class MeshState:
    """What the mesh is rendered from, read from the store."""

    releases: dict[str, ReleaseSpec | None]
    """Agent (logical name) -> its release policy."""
    partner_graph: dict[str, list[str]]
    """Agent -> the partners it lists."""
    callers: dict[str, CallersSpec | None]
    """Agent -> its ``base.callers`` (None: the defaults)."""


async def read_mesh_state(store: SpecStore) -> MeshState:
    """The agents' releases, partner graph and ``base.callers`` (current revisions)."""
    agents = await store.list_agents()
    releases = {a.name: await store.get_release(a.name) for a in agents}
    names = {resource_name(a.name): a.name for a in agents}
    callers: dict[str, CallersSpec | None] = {}
    result = await store.etcd.range(store.keys.agents(), prefix=True)
    for kv in result.kvs:
        if not kv.key.endswith("/spec/base"):
            continue
        rn = kv.key[len(store.keys.agents()) :].split("/", 1)[0]
        if rn in names:
            raw = json.loads(kv.value).get("callers")
            callers[names[rn]] = CallersSpec.model_validate(raw) if raw is not None else None
    return MeshState(releases=releases, partner_graph=await store.partner_graph(), callers=callers)


async def render_from_store(store: SpecStore, settings: MeshSettings) -> list[Obj]:
    """Every mesh object the store's current state renders (not validated)."""
    state = await read_mesh_state(store)
    return render_mesh(
        state.releases, state.partner_graph, settings=settings, callers=state.callers
    )


class MeshSink(Protocol):
    async def publish(self, objects: list[Obj]) -> None:
        """Make exactly ``objects`` the published set (create, update, delete)."""
        ...


class YamlMeshSink:
    """One YAML file per object in a folder (for GitOps)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def publish(self, objects: list[Obj]) -> None:
        await asyncio.to_thread(write_yaml, objects, self.folder)


_KINDS: dict[str, tuple[str, str]] = {
    "VirtualService": ("networking.istio.io/v1", "virtualservices"),
    "DestinationRule": ("networking.istio.io/v1", "destinationrules"),
    "AuthorizationPolicy": ("security.istio.io/v1", "authorizationpolicies"),
    "PeerAuthentication": ("security.istio.io/v1", "peerauthentications"),
    "RequestAuthentication": ("security.istio.io/v1", "requestauthentications"),
    "HTTPRoute": ("gateway.networking.k8s.io/v1", "httproutes"),
    "GRPCRoute": ("gateway.networking.k8s.io/v1", "grpcroutes"),
}
"""Every kind the publisher renders (either route mode): kind -> (apiVersion, plural)."""


class KubernetesMeshSink:
    """Server-side apply to the cluster the control plane runs in (its service account),
    and deletion of specmesh-managed objects no longer rendered -- of every kind the
    publisher renders, so switching the route mode removes the other mode's routes (a kind
    the cluster does not serve, or the RBAC does not grant, lists as empty).

    Talks to the API server directly over HTTPS (the SSA call is one PATCH with
    ``application/apply-patch+yaml``); tested against ``tests/unit/kube_api.py``'s fake.
    """

    def __init__(
        self,
        *,
        namespace: str,
        api: str = "https://kubernetes.default.svc",
        sa_dir: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount"),
        field_manager: str = "specmesh-control-plane",
    ) -> None:
        self.namespace = namespace
        self.api = api
        self.sa_dir = sa_dir
        self.field_manager = field_manager

    def _url(self, api_version: str, kind: str, name: str | None = None) -> str:
        base = f"{self.api}/apis/{api_version}/namespaces/{self.namespace}/{_KINDS[kind][1]}"
        return f"{base}/{name}" if name else base

    async def publish(self, objects: list[Obj]) -> None:
        token = (self.sa_dir / "token").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(self.sa_dir / "ca.crt"))
        headers = {"Authorization": f"Bearer {token}"}
        wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects}
        async with aiohttp.ClientSession(headers=headers) as session:
            for obj in objects:
                url = self._url(obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
                params = {"fieldManager": self.field_manager, "force": "true"}
                async with session.patch(
                    url,
                    params=params,
                    data=yaml.safe_dump(obj),
                    ssl=ctx,
                    headers={"Content-Type": "application/apply-patch+yaml"},
                ) as r:
                    if r.status >= 300:
                        raise RuntimeError(
                            f"apply {obj['kind']}/{obj['metadata']['name']}: "
                            f"HTTP {r.status} {await r.text()}"
                        )
            kinds = {(o["apiVersion"], o["kind"]) for o in objects}
            kinds |= {(api_version, kind) for kind, (api_version, _) in _KINDS.items()}
            for api_version, kind in sorted(kinds):
                selector = {"labelSelector": f"{LABEL_MANAGED_BY}={MANAGED_BY}"}
                async with session.get(self._url(api_version, kind), params=selector, ssl=ctx) as r:
                    items = (await r.json()).get("items", []) if r.status == 200 else []
                for item in items:
                    name = item["metadata"]["name"]
                    if (api_version, kind, name) not in wanted:
                        async with session.delete(self._url(api_version, kind, name), ssl=ctx):
                            logger.info("deleted %s/%s (its agent is gone)", kind, name)


class MeshPublisher:
    """Watches the agents and keeps the sink's objects equal to the rendered mesh."""

    def __init__(
        self,
        *,
        store: SpecStore,
        sink: MeshSink,
        settings: MeshSettings,
        validator: IstioValidator | None = None,
        coalesce_seconds: float = 0.2,
    ) -> None:
        self.store = store
        self.sink = sink
        self.settings = settings
        self.validator = validator
        self.coalesce_seconds = coalesce_seconds
        self.publishes = 0
        self.failures = 0
        self.last_error: str | None = None
        self.published: list[Obj] = []
        self.changed = asyncio.Event()

    async def render(self) -> list[Obj]:
        objects = await render_from_store(self.store, self.settings)
        if self.validator is not None:
            self.validator.check(objects)
        return objects

    async def publish_once(self) -> bool:
        """Render, validate and publish; return whether anything was published."""
        try:
            objects = await self.render()
        except MeshObjectError as e:
            self.failures += 1
            self.last_error = str(e)
            logger.error("not publishing invalid Istio objects: %s", e)
            return False
        if json.dumps(objects, sort_keys=True) == json.dumps(self.published, sort_keys=True):
            return False
        await self.sink.publish(objects)
        self.published = objects
        self.publishes += 1
        self.last_error = None
        self.changed.set()
        logger.info("published %d Istio objects", len(objects))
        return True

    async def run(self) -> None:
        """Publish now, then after every change under the agents' prefix."""
        watcher = PrefixWatcher(etcd=self.store.etcd, prefix=self.store.keys.agents())
        try:
            async for _ in watcher.updates():
                await asyncio.sleep(self.coalesce_seconds)  # let a burst of changes land
                try:
                    await self.publish_once()
                except Exception:
                    self.failures += 1
                    logger.exception("publishing the mesh failed; retrying on the next change")
        finally:
            watcher.close()
