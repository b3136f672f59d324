"""The Kubernetes runtime: each agent is the Helm chart's agent objects, rendered from the
chart's own templates and applied with server-side apply.

One template source: :class:`ChartRenderer` runs ``helm/specmesh``'s templates through
Helm's SDK (``helm_python``) with the chart's install values (the ConfigMap the chart gives
the control plane) plus ``agents: [<one entry>]`` (:func:`agent_entry`, from the
workload) and the control plane's own objects switched off. What Helm would install for
that entry is, object for object, what this runtime applies -- among it what the agent's
card and its sidecar need to know of the cluster: the engine's public URLs
(``SPECMESH_ENGINE_PUBLIC_HTTP_URL`` = ``http://<svc>.<ns>.svc.cluster.local:8080``,
``SPECMESH_ENGINE_PUBLIC_GRPC_URL`` = ``<svc>.<ns>.svc.cluster.local:8081``: the agent's
Service), ``SPECMESH_CARD_SECURITY=bearer,mtls`` with Istio, the sidecar's trusted issuers
(``SPECMESH_JWT_ISSUERS``, from the chart's ``jwt`` values), and with ``istio.routes:
gateway-api`` the track Services ``<svc>-stable`` / ``<svc>-canary`` the Gateway API routes
send to (applied and pruned with the agent like its other objects).

:class:`KubernetesRuntime` applies each rendered object (``lightkube``, field manager
``specmesh-controller``, ``force``), then prunes: every object of the managed kinds that
carries ``app.kubernetes.io/managed-by=specmesh``, the release's ``app.kubernetes.io/instance``
and the agent's ``specmesh.io/agent`` label but was not rendered (the canary Deployment once
the canary track is at 0, the HPAs once autoscaling is off) is deleted. An object of a
rendered name that exists without those three labels (the control plane's own Service, an
administrator's NetworkPolicy, another release's agent) is never taken over: the apply is
refused before anything is written (:class:`ObjectNotOwnedError`). It also keeps the
agent's Vault Kubernetes-auth role (its ServiceAccount in the namespace -> its policy).
Pods map onto :data:`specmesh.workloads.PHASES` in :func:`pod_instance`.

Errors::

    SpecmeshError
    +-- KubernetesRuntimeError        base: ``operation`` and ``reason``
        +-- ChartRenderError          the chart refused the agent's values, or rendered
        |                             something this runtime does not manage
        +-- KubernetesRefusedError    the API server answered with an error (``status``)
        +-- KubernetesUnavailableError  no answer (connection refused, timeout, TLS)
        +-- ObjectNotOwnedError       an object the agent would apply exists and is not
                                      this release's object of that agent (``kind``, ``name``)
    (itself: an answer that does not decode as the object asked for)

Vault errors come through :class:`specmesh.vault.VaultClient` as :mod:`specmesh.errors`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import helm_python
import httpx2
import yaml
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.core.resource import NamespacedResource
from lightkube.operators import exists
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import Pod, Service, ServiceAccount
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import CascadeType, PatchType

from control_plane.settings import KubernetesRuntimeSettings
from specmesh.errors import SpecmeshError
from specmesh.k8s import (
    A2A_HTTP_PORT,
    LABEL_AGENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_TRACK,
    MANAGED_BY,
    service_account_name,
)
from specmesh.names import resource_name
from specmesh.vault import VaultClient, agent_policy_name
from specmesh.workloads import AgentWorkload, InstanceStatus

__all__ = [
    "FIELD_MANAGER",
    "KINDS",
    "ChartRenderError",
    "ChartRenderer",
    "KubernetesRefusedError",
    "KubernetesRuntime",
    "KubernetesRuntimeError",
    "KubernetesUnavailableError",
    "ObjectNotOwnedError",
    "VaultRoles",
    "agent_entry",
    "kubernetes_runtime_from_env",
    "pod_instance",
]

logger = logging.getLogger(__name__)

Obj = dict[str, Any]

FIELD_MANAGER = "specmesh-controller"
"""The server-side apply field manager of everything this runtime applies."""

KINDS: dict[tuple[str, str], type[NamespacedResource]] = {
    ("networking.k8s.io/v1", "NetworkPolicy"): NetworkPolicy,
    ("policy/v1", "PodDisruptionBudget"): PodDisruptionBudget,
    ("v1", "ServiceAccount"): ServiceAccount,
    ("v1", "Service"): Service,
    ("apps/v1", "Deployment"): Deployment,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): HorizontalPodAutoscaler,
}
"""Every kind the chart renders for an agent, in apply order (Helm's install order: the
NetworkPolicy before the pods, the HPA after its Deployment). Pruned in reverse; a rendered
kind missing here is refused (it could never be pruned)."""

_ENGINE_CONTAINERS = ("engine", "sidecar")
_OWNER_LABELS = (LABEL_MANAGED_BY, LABEL_INSTANCE, LABEL_AGENT)
_OPS_PORT = 9090


# ---------------------------------------------------------------- errors


class KubernetesRuntimeError(SpecmeshError):
    """The Kubernetes runtime could not do ``operation``."""

    def __init__(self, *, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"kubernetes: {operation}: {reason}")


class ChartRenderError(KubernetesRuntimeError):
    """The chart refused an agent's values, or rendered what the runtime cannot own."""


class KubernetesRefusedError(KubernetesRuntimeError):
    """The API server answered ``status`` (403: the control plane's RBAC; 422: invalid)."""

    def __init__(self, *, operation: str, status: int, reason: str) -> None:
        self.status = status
        super().__init__(operation=operation, reason=f"{status} {reason}")


class KubernetesUnavailableError(KubernetesRuntimeError):
    """The API server did not answer."""


class ObjectNotOwnedError(KubernetesRuntimeError):
    """An object of the agent's name exists in the namespace and is not this release's
    object of that agent (the control plane's own Service, an administrator's
    NetworkPolicy, another release's agent): it is neither taken over nor pruned."""

    def __init__(self, *, operation: str, kind: str, name: str, labels: Mapping[str, str]) -> None:
        self.kind = kind
        self.name = name
        owner = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k in _OWNER_LABELS)
        super().__init__(
            operation=operation,
            reason=f"{kind}/{name} exists and is not this agent's ({owner or 'no specmesh labels'})"
            "; rename the agent or remove that object",
        )


async def _call(operation: str, coro: Any) -> Any:
    """Await one lightkube call, its errors translated (one boundary)."""
    try:
        return await coro
    except ApiError as e:
        status = e.status
        raise KubernetesRefusedError(
            operation=operation,
            status=int(status.code or e.response.status_code),
            reason=f"{status.reason or ''}: {status.message or ''}".strip(": "),
        ) from e
    except httpx2.HTTPStatusError as e:  # an error body that is not a Status (a proxy's)
        raise KubernetesRefusedError(
            operation=operation, status=e.response.status_code, reason=e.response.reason_phrase
        ) from e
    except (httpx2.TransportError, OSError) as e:
        raise KubernetesUnavailableError(
            operation=operation, reason=str(e) or type(e).__name__
        ) from e
    except ValueError as e:  # msgspec: an answer that is not the object asked for
        raise KubernetesRuntimeError(operation=operation, reason=f"unexpected answer: {e}") from e


async def _list(operation: str, client: AsyncClient, res: Any, **kwargs: Any) -> list[Any]:
    async def collect() -> list[Any]:
        return [obj async for obj in client.list(res, **kwargs)]

    result: list[Any] = await _call(operation, collect())
    return result


# ---------------------------------------------------------------- rendering


def agent_entry(workload: AgentWorkload) -> Obj:
    """The chart's ``agents[]`` entry for ``workload``: its replicas per track (the
    workload's, authoritative: the canary runs when it asks for canary instances),
    autoscaling, and the resources its spec sets (the chart deep-merges them over
    ``agentDefaults.resources``)."""
    spec = workload.deployment
    stable = workload.replicas.get("stable", 0)
    canary = workload.replicas.get("canary", 0)
    entry: Obj = {
        "name": workload.agent,
        "tracks": {
            "stable": {"replicas": stable},
            "canary": {"enabled": True, "replicas": canary} if canary > 0 else {"enabled": False},
        },
    }
    scaling = spec.autoscaling
    entry["autoscaling"] = (
        {
            "enabled": True,
            "min": scaling.min,
            "max": scaling.max,
            "targetCPU": scaling.target_cpu,
        }
        if scaling.enabled
        else {"enabled": False}
    )
    resources: Obj = {}
    for container in _ENGINE_CONTAINERS:
        wanted = getattr(spec.resources, container)
        if wanted is None:
            continue
        amounts = {
            kind: getattr(wanted, kind).model_dump(exclude_none=True)
            for kind in ("requests", "limits")
        }
        amounts = {k: v for k, v in amounts.items() if v}
        if amounts:
            resources[container] = amounts
    if resources:
        entry["resources"] = resources
    return entry


_SUFFIXES = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6),
    "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip


def _quantity(value: object) -> Decimal | None:
    """A Kubernetes quantity as a number (None: a form this does not read)."""
    text = str(value)
    number = text.rstrip("kMGTPEimn")
    suffix = text[len(number) :]
    if suffix not in _SUFFIXES:
        return None
    try:
        return Decimal(number) * _SUFFIXES[suffix]
    except InvalidOperation:
        return None


def _request_above_limit(obj: Obj) -> list[str]:
    """The API server refuses a container whose request is above its limit; say which,
    before applying (a spec's request can meet a limit from ``agentDefaults``)."""
    problems: list[str] = []
    containers = obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    for c in containers:
        res = c.get("resources") or {}
        for name, limit in (res.get("limits") or {}).items():
            request = (res.get("requests") or {}).get(name)
            if request is None:
                continue
            r, lim = _quantity(request), _quantity(limit)
            if r is not None and lim is not None and r > lim:
                problems.append(
                    f"deployment.resources.{c['name']}: requests.{name} {request} is above "
                    f"limits.{name} {limit} (set limits.{name} too)"
                )
    return problems


class ChartRenderer:
    """Renders one agent's objects from the Helm chart's own templates.

    ``values`` are the chart's install values (``agents`` aside); ``release`` and
    ``namespace`` are the release's, since labels and selectors name them.
    """

    def __init__(
        self,
        *,
        chart_path: Path,
        values: Mapping[str, Any],
        release: str,
        namespace: str,
    ) -> None:
        self.chart_path = chart_path
        self.values = copy.deepcopy(dict(values))
        self.values.pop("agents", None)
        self.release = release
        self.namespace = namespace
        try:
            self._chart = helm_python.Chart.load(chart_path)
        except helm_python.HelmError as e:
            raise ChartRenderError(operation=f"load chart {chart_path}", reason=str(e)) from e

    @classmethod
    def from_values_file(
        cls, *, chart_path: Path, values_file: Path, release: str, namespace: str
    ) -> ChartRenderer:
        try:
            values = yaml.safe_load(values_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ChartRenderError(
                operation=f"read chart values {values_file}", reason=str(e)
            ) from e
        if not isinstance(values, dict):
            raise ChartRenderError(
                operation=f"read chart values {values_file}", reason="not a YAML mapping"
            )
        return cls(chart_path=chart_path, values=values, release=release, namespace=namespace)

    def values_for(self, workload: AgentWorkload) -> Obj:
        """The install values with ``agents: [<workload's entry>]``, control plane off."""
        values = copy.deepcopy(self.values)
        values["agents"] = [agent_entry(workload)]
        values["controlPlane"] = {**values.get("controlPlane", {}), "enabled": False}
        return values

    def render(self, workload: AgentWorkload) -> list[Obj]:
        """The agent's objects, in apply order (synchronous: Helm's SDK is a native call;
        :class:`KubernetesRuntime` runs it in a thread)."""
        operation = f"render agent {workload.agent!r}"
        try:
            manifests = self._chart.render(
                self.values_for(workload), name=self.release, namespace=self.namespace
            )
        except helm_python.HelmError as e:
            raise ChartRenderError(operation=operation, reason=str(e)) from e
        rn = workload.name
        objects: list[Obj] = []
        for template, text in sorted(manifests.items()):
            if not template.endswith((".yaml", ".yml")):
                continue  # NOTES.txt
            for doc in yaml.safe_load_all(text):
                if not doc:
                    continue
                labels = doc.get("metadata", {}).get("labels") or {}
                if labels.get(LABEL_AGENT) != rn:
                    continue  # not one of the agent's objects
                where = f"{doc['kind']}/{doc['metadata']['name']}"
                if (doc["apiVersion"], doc["kind"]) not in KINDS:
                    raise ChartRenderError(
                        operation=operation,
                        reason=f"the chart renders {doc['apiVersion']} {where}, a kind this "
                        "runtime does not manage (add it to KINDS and to the chart's RBAC)",
                    )
                if labels.get(LABEL_MANAGED_BY) != MANAGED_BY:
                    raise ChartRenderError(
                        operation=operation,
                        reason=f"{where} lacks the label {LABEL_MANAGED_BY}={MANAGED_BY}",
                    )
                if doc["metadata"].get("namespace") != self.namespace:
                    raise ChartRenderError(
                        operation=operation, reason=f"{where} is not in {self.namespace}"
                    )
                problems = _request_above_limit(doc)
                if problems:
                    raise ChartRenderError(operation=operation, reason="; ".join(problems))
                objects.append(doc)
        order = list(KINDS)
        objects.sort(key=lambda d: (order.index((d["apiVersion"], d["kind"])), _name(d)))
        return objects

    def close(self) -> None:
        self._chart.close()


def _name(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


# ---------------------------------------------------------------- pods


def _waiting_reasons(status: Obj) -> list[tuple[str, str]]:
    return [
        (str(w.get("reason", "")), str(w.get("message", "")))
        for c in status.get("containerStatuses") or []
        if (w := (c.get("state") or {}).get("waiting"))
    ]


_CANNOT_START = {
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}


def pod_instance(pod: Obj) -> InstanceStatus:
    """One pod (as the API serves it) as an instance: ``Stopping`` once it is being deleted;
    ``CrashLoop`` when a container waits out ``CrashLoopBackOff``; ``Failed`` when it cannot
    start (image, config) or the pod failed; ``Running`` (ready) when it runs and every
    container is ready; otherwise ``Starting``. Restarts sum the containers'. The revision
    its engine serves is not visible in the pod (0)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    restarts = sum(int(c.get("restartCount", 0)) for c in containers)
    ready = bool(containers) and all(c.get("ready") for c in containers)
    waiting = _waiting_reasons(status)
    last_error: str | None = None
    for c in containers:
        term = (c.get("lastState") or {}).get("terminated")
        if term:
            last_error = (
                f"{c.get('name')}: exited {term.get('exitCode')} ({term.get('reason', '')})"
            )
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    since = str(
        (conditions.get("Ready") or {}).get("lastTransitionTime")
        or status.get("startTime")
        or meta.get("creationTimestamp")
        or ""
    )
    phase_of_pod = status.get("phase", "Pending")
    if meta.get("deletionTimestamp"):
        phase, ready, since = "Stopping", False, str(meta["deletionTimestamp"])
    elif any(reason == "CrashLoopBackOff" for reason, _ in waiting):
        phase = "CrashLoop"
    elif phase_of_pod in ("Failed", "Succeeded"):
        phase, ready = "Failed", False
        last_error = status.get("message") or status.get("reason") or last_error
    elif blocked := [(r, m) for r, m in waiting if r in _CANNOT_START]:
        phase = "Failed"
        last_error = "; ".join(f"{r}: {m}" if m else r for r, m in blocked)
    elif phase_of_pod == "Running" and ready:
        phase = "Running"
    else:
        phase = "Starting"
    ip = status.get("podIP")
    return InstanceStatus(
        instance=str(meta.get("name", "")),
        track=str((meta.get("labels") or {}).get(LABEL_TRACK, "stable")),
        phase=phase,
        ready=ready and phase == "Running",
        revision=0,
        restarts=restarts,
        last_error=last_error,
        since=since,
        endpoints={"inbound": f"{ip}:{A2A_HTTP_PORT}", "ops": f"{ip}:{_OPS_PORT}"} if ip else {},
    )


# ---------------------------------------------------------------- Vault


@dataclass(frozen=True)
class VaultRoles:
    """Where agents' Vault Kubernetes-auth roles live: ``auth/<mount>/role/<prefix><rn>``
    (the chart's ``vault.kubernetesAuthMount`` and ``vault.agentRolePrefix``, which its
    sidecars log in with)."""

    mount: str = "kubernetes"
    prefix: str = "specmesh-agent-"
    audience: str | None = None
    """``vault.tokenAudience``: the audience of the projected token the sidecars send."""
    ttl: str = "1h"
    """Of the tokens the role issues (the sidecar renews; docs/deploy.md)."""

    @classmethod
    def from_chart_values(cls, values: Mapping[str, Any]) -> VaultRoles:
        vault = values.get("vault") or {}
        return cls(
            mount=str(vault.get("kubernetesAuthMount") or "kubernetes"),
            prefix=str(vault.get("agentRolePrefix", "specmesh-agent-")),
            audience=str(vault.get("tokenAudience") or "") or None,
        )

    def role(self, rn: str) -> str:
        return f"{self.prefix}{rn}"


# ---------------------------------------------------------------- the runtime


class KubernetesRuntime:
    """Agents as the chart's objects in one namespace (the :class:`Runtime` protocol)."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        client: AsyncClient,
        renderer: ChartRenderer,
        namespace: str,
        vault: VaultClient | None = None,
        vault_roles: VaultRoles | None = None,
    ) -> None:
        """``client``: a lightkube client of the cluster (each apply names
        :data:`FIELD_MANAGER` itself); ``vault``: the control plane's own Vault identity,
        which keeps the agents' Kubernetes-auth roles (None: no roles are kept)."""
        self._client = client
        self._renderer = renderer
        self.namespace = namespace
        self._vault = vault
        self._roles = vault_roles or VaultRoles()

    @classmethod
    def from_settings(
        cls, settings: KubernetesRuntimeSettings, *, vault: VaultClient | None
    ) -> KubernetesRuntime:
        renderer = ChartRenderer.from_values_file(
            chart_path=settings.chart_path,
            values_file=settings.chart_values,
            release=settings.chart_release,
            namespace=settings.agents_namespace,
        )
        try:
            config = (
                KubeConfig.from_file(settings.kubeconfig)
                if settings.kubeconfig is not None
                else KubeConfig.from_env()
            )
        except (ConfigError, OSError) as e:
            renderer.close()
            raise KubernetesUnavailableError(
                operation="load the Kubernetes configuration", reason=str(e)
            ) from e
        client = AsyncClient(
            config,
            namespace=settings.agents_namespace,
            timeout=httpx2.Timeout(settings.kubernetes_timeout_seconds),
        )
        return cls(
            client=client,
            renderer=renderer,
            namespace=settings.agents_namespace,
            vault=vault,
            vault_roles=VaultRoles.from_chart_values(renderer.values),
        )

    def _selector(self, rn: str | None = None) -> dict[str, Any]:
        """This release's agent objects (of agent ``rn``): never another release's."""
        return {
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_INSTANCE: self._renderer.release,
            LABEL_AGENT: rn if rn is not None else exists(),
        }

    async def _check_owned(self, rn: str, objects: list[Obj]) -> None:
        """Refuse, before writing anything, when an object of one of these names exists and
        is not this release's object of agent ``rn``: a forced apply would take it over and
        a later prune would delete it."""
        owner = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: self._renderer.release,
                 LABEL_AGENT: rn}  # fmt: skip
        for obj in objects:
            res, name = KINDS[(obj["apiVersion"], obj["kind"])], _name(obj)
            operation = f"read {obj['kind']}/{name}"
            try:
                found = await _call(
                    operation, self._client.get(res, name, namespace=self.namespace)
                )
            except KubernetesRefusedError as e:
                if e.status == 404:
                    continue  # to be created
                raise
            labels = dict(found.metadata.labels or {})
            if any(labels.get(k) != v for k, v in owner.items()):
                raise ObjectNotOwnedError(
                    operation=f"apply agent {rn!r}", kind=obj["kind"], name=name, labels=labels
                )

    async def render(self, workload: AgentWorkload) -> list[Obj]:
        """What :meth:`apply` applies for ``workload`` (in apply order)."""
        return await asyncio.to_thread(self._renderer.render, workload)

    async def apply(self, workload: AgentWorkload) -> None:
        rn = workload.name
        objects = await self.render(workload)
        await self._check_owned(rn, objects)
        if self._vault is not None:
            # First: the pods' sidecars log in with it as soon as they start.
            await self._vault.put_kubernetes_role(
                mount=self._roles.mount,
                name=self._roles.role(rn),
                service_account=service_account_name(workload.agent),
                namespace=self.namespace,
                policies=[agent_policy_name(workload.agent)],
                ttl=self._roles.ttl,
                audience=self._roles.audience,
            )
        for obj in objects:
            res = KINDS[(obj["apiVersion"], obj["kind"])]
            await _call(
                f"apply {obj['kind']}/{_name(obj)}",
                self._client.patch(
                    res,
                    _name(obj),
                    obj,
                    namespace=self.namespace,
                    patch_type=PatchType.APPLY,
                    field_manager=FIELD_MANAGER,
                    force=True,
                ),
            )
        wanted = {(o["apiVersion"], o["kind"], _name(o)) for o in objects}
        await self._delete_where(rn, keep=wanted)

    async def remove(self, agent: str) -> None:
        rn = resource_name(agent)
        await self._delete_where(rn, keep=set())
        if self._vault is not None:
            await self._vault.delete_kubernetes_role(
                mount=self._roles.mount, name=self._roles.role(rn)
            )

    async def _delete_where(self, rn: str, *, keep: set[tuple[str, str, str]]) -> None:
        """Delete the agent's objects (by label) that are not in ``keep``, dependents first."""
        for (api_version, kind), res in reversed(KINDS.items()):
            found = await _list(
                f"list {kind} of {rn}",
                self._client,
                res,
                namespace=self.namespace,
                labels=self._selector(rn),
            )
            for obj in found:
                name = str(obj.metadata.name)
                if (api_version, kind, name) in keep:
                    continue
                logger.info("deleting %s/%s of agent %s", kind, name, rn)
                try:
                    await _call(
                        f"delete {kind}/{name}",
                        self._client.delete(
                            res, name, namespace=self.namespace, cascade=CascadeType.BACKGROUND
                        ),
                    )
                except KubernetesRefusedError as e:
                    if e.status != 404:  # gone already: what we wanted
                        raise

    async def running(self) -> set[str]:
        agents: set[str] = set()
        for (_, kind), res in KINDS.items():
            for obj in await _list(
                f"list {kind}", self._client, res, namespace=self.namespace,
                labels=self._selector(),
            ):  # fmt: skip
                agents.add(str((obj.metadata.labels or {})[LABEL_AGENT]))
        return agents

    async def observe(self, agent: str) -> list[InstanceStatus]:
        rn = resource_name(agent)
        pods = await _list(
            f"list pods of {rn}",
            self._client,
            Pod,
            namespace=self.namespace,
            labels={LABEL_INSTANCE: self._renderer.release, LABEL_AGENT: rn},
        )
        return sorted(
            (pod_instance(p.to_dict()) for p in pods), key=lambda i: (i.track, i.instance)
        )

    async def observe_all(self) -> dict[str, list[InstanceStatus]]:
        pods = await _list(
            "list pods",
            self._client,
            Pod,
            namespace=self.namespace,
            labels={LABEL_INSTANCE: self._renderer.release},
        )
        found: dict[str, list[InstanceStatus]] = {}
        for p in pods:
            pod = p.to_dict()
            agent = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_AGENT)
            if agent:
                found.setdefault(str(agent), []).append(pod_instance(pod))
        return {
            agent: sorted(instances, key=lambda i: (i.track, i.instance))
            for agent, instances in found.items()
        }

    async def close(self) -> None:
        await self._client.close()
        self._renderer.close()


def kubernetes_runtime_from_env(*, vault: VaultClient | None) -> KubernetesRuntime:
    """The runtime as the chart configures it (:class:`KubernetesRuntimeSettings`, from
    ``SPECMESH_*``); ``vault`` is the control plane's own Vault client."""
    return KubernetesRuntime.from_settings(KubernetesRuntimeSettings(), vault=vault)
