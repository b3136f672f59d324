"""Kubernetes names and labels that the control plane's Istio objects and the Helm chart
share. Changing one here changes both: the chart's tests join the two.
"""

from __future__ import annotations

from specmesh.names import resource_name

__all__ = [
    "A2A_GRPC_PORT",
    "A2A_HTTP_PORT",
    "LABEL_AGENT",
    "LABEL_INSTANCE",
    "LABEL_MANAGED_BY",
    "LABEL_TRACK",
    "MANAGED_BY",
    "TRACKS",
    "service_account_name",
    "service_name",
    "spiffe_principal",
]

LABEL_AGENT = "specmesh.io/agent"
"""Pod/Service label holding the agent's resource name."""
LABEL_TRACK = "specmesh.io/track"
"""Pod label holding the release track; DestinationRule subsets select on it."""
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"
"""The Helm release an agent's objects belong to (the chart sets it on every object and pod)."""
MANAGED_BY = "specmesh"
TRACKS = ("stable", "canary")

A2A_GRPC_PORT = 8081
"""The agent Service's gRPC port (named ``grpc-a2a``), the sidecar's gRPC inbound."""
A2A_HTTP_PORT = 8080
"""The agent Service's HTTP port (named ``http-a2a`` so Istio detects HTTP)."""


def service_name(agent: str) -> str:
    """The Kubernetes Service (and Istio host) of an agent."""
    return resource_name(agent)


def service_account_name(agent: str) -> str:
    """The ServiceAccount an agent's pods run as (its mesh identity, and Vault's
    Kubernetes-auth subject)."""
    return f"specmesh-agent-{resource_name(agent)}"


def spiffe_principal(agent: str, *, namespace: str, trust_domain: str = "cluster.local") -> str:
    """The Istio principal (SPIFFE ID without the scheme) of an agent's pods."""
    return f"{trust_domain}/ns/{namespace}/sa/{service_account_name(agent)}"
