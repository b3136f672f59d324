"""Settings of the control plane (the only place it reads the environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from control_plane.istio import CRDS_PATH
from control_plane.mesh import MeshSettings
from specmesh.addresses import parse_endpoint, parse_host_port, parse_table
from specmesh.issuers import JwtIssuer, parse_jwt_issuers

__all__ = ["ControlPlaneSettings", "KubernetesRuntimeSettings"]


class ControlPlaneSettings(BaseSettings):
    """``SPECMESH_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="SPECMESH_", extra="ignore", frozen=True)

    listen: str = "127.0.0.1:8090"
    """REST API (and Studio) listener, host:port."""
    grpc_listen: str = "127.0.0.1:8091"
    """gRPC API listener (with health and reflection), host:port."""
    etcd_endpoint: str = "http://127.0.0.1:2379"
    etcd_prefix: str = "/specmesh"
    etcd_watch_timeout: float = Field(default=15.0, gt=0, le=3600)
    """Read deadline of an etcd watch, in seconds: a watch that gets no message for this
    long (etcd sends a progress notification every
    ``--experimental-watch-progress-notify-interval`` when nothing changes; the local
    fleet's etcd: 5 s) is half-open, and reconnects from its last revision. Keep it above
    2.2 intervals (``SPECMESH_ETCD_WATCH_TIMEOUT``)."""
    vault_addr: str = Field(
        default="http://127.0.0.1:8200",
        validation_alias=AliasChoices("SPECMESH_VAULT_ADDR", "VAULT_ADDR"),
    )
    vault_token: str = Field(
        default="", validation_alias=AliasChoices("SPECMESH_VAULT_TOKEN", "VAULT_TOKEN")
    )
    vault_k8s_role: str | None = None
    """Vault Kubernetes-auth role; when set, the control plane logs in with its service
    account's token instead of ``vault_token``."""
    vault_k8s_mount: str = "kubernetes"
    vault_k8s_token_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    vault_kv_mount: str = "secret"
    secrets_gc_interval_seconds: float = Field(default=3600.0, ge=0)
    """How often unreferenced secret versions are destroyed (0: never; see
    ``POST /api/v1/secrets/gc``)."""
    secrets_gc_grace_seconds: float = Field(default=3600.0, ge=0)
    """Versions younger than this are kept by the periodic collection (an apply may be
    between its Vault write and its etcd transaction)."""
    vault_pki_mount: str | None = None
    """Vault PKI mount of the agents' mTLS certificates when the sidecars do mTLS (no Istio):
    apply then keeps one PKI role per agent there, issuing its SPIFFE ID only
    (``SPECMESH_VAULT_PKI_MOUNT``; the local fleet sets ``specmesh-pki``)."""
    service_addresses: str = ""
    """``host:port`` -> ``host:port`` applied to MCP server URLs before the control plane
    connects to list their tools (``SPECMESH_SERVICE_ADDRESSES``, ``a:1=b:2,...``; see
    :mod:`specmesh.addresses`)."""
    mcp_tools_refresh_seconds: float = Field(default=300.0, gt=0)
    """How often every MCP Registry entry's tools are listed again
    (``SPECMESH_MCP_TOOLS_REFRESH_SECONDS``); a changed entry, or a change of the agent whose
    credentials it is listed with, is listed at once."""
    mcp_tools_timeout_seconds: float = Field(default=10.0, gt=0)
    """Timeout of one listing of an MCP server's tools."""
    token_issuer: str = Field(default="specmesh", min_length=1)
    """``iss`` of the invoke tokens this control plane mints (``SPECMESH_TOKEN_ISSUER``);
    their request principals are ``<issuer>/<API principal name>``. Every replica of one
    control plane must use the same name (they share the signing key)."""
    invoke_token_ttl_seconds: int = Field(default=300, ge=1, le=3600)
    """Lifetime of an invoke token (``SPECMESH_INVOKE_TOKEN_TTL_SECONDS``, 1 to 3600)."""
    tokens_file: Path = Path(".specmesh/tokens.json")
    """Bearer tokens (hashed) and their roles."""
    istio_crds: Path | None = CRDS_PATH
    """Istio CRD file used to validate objects before publishing; by default the vendored
    schemas (``control_plane/istio/crd-all.gen.yaml``)."""
    mesh_namespace: str = "specmesh"
    mesh_trust_domain: str = "cluster.local"
    """The mesh's trust domain (``SPECMESH_MESH_TRUST_DOMAIN``; the chart's
    ``istio.trustDomain``, which the sidecars check callers against too): the SPIFFE
    identities of partner agents in their AuthorizationPolicies."""
    otlp_listen: str = "127.0.0.1:4318"
    """OTLP/HTTP trace receiver (``POST /v1/traces``), host:port; empty to turn it off."""
    otlp_forward_url: str | None = None
    """Also send every accepted export to this collector URL (``.../v1/traces``)."""
    traces_db: Path = Path(".specmesh/traces.db")
    """The embedded trace store (SQLite); ``:memory:`` keeps traces in memory only."""
    traces_retention_days: int = Field(default=7, ge=1)
    """Traces whose last span ended longer ago than this are dropped (checked hourly)."""
    mesh_publish: Literal["none", "yaml", "kubernetes"] = "none"
    """Where rendered Istio objects go on every change: nowhere, YAML files in
    ``mesh_output_dir`` (GitOps), or server-side apply to the cluster."""
    mesh_output_dir: Path | None = None
    """Write rendered Istio objects here (GitOps) on every change."""
    mesh_routes: Literal["virtualservice", "gateway-api"] = "virtualservice"
    """The agents' route objects (``SPECMESH_MESH_ROUTES``): Istio VirtualService with
    DestinationRule subsets, or Gateway API HTTPRoute/GRPCRoute over per-track Services
    (ambient mode; the chart's ``istio.routes``)."""
    jwt_issuers: Annotated[tuple[JwtIssuer, ...], NoDecode] = ()
    """The JWT issuers the agents trust (``SPECMESH_JWT_ISSUERS``, read by
    :func:`specmesh.issuers.parse_jwt_issuers` exactly as the sidecars read it: a JSON list
    of ``{"issuer", "jwksUri" | "jwks", "audiences"}``): rendered into every agent's Istio
    RequestAuthentication. The chart sets the same list here and on the
    sidecars, the control plane's own issuer first."""
    runtime: Literal["none", "local", "kubernetes"] = "none"
    """Where the controller runs the agents (``SPECMESH_RUNTIME``): nowhere (the specs are
    served, nothing is started), the local supervisor, or Kubernetes."""
    supervisor_socket: Path = Path(".specmesh/run/supervisor.sock")
    """The local supervisor's API socket (runtime ``local``)."""
    controller_resync_seconds: float = Field(default=30.0, gt=0)
    """How often the controller hands every agent's desired state to the runtime again."""
    controller_observe_seconds: float = Field(default=2.0, gt=0)
    """How often the controller reads what runs and writes the agents' status."""
    analysis_interval_seconds: float = Field(default=5.0, ge=0)
    """How often the release analysis looks at every analysed release (0: it does not run;
    see docs/analysis.md)."""

    task_store_password: str | None = None
    """``vault://`` reference of the shared A2A task store's Redis password
    (``SPECMESH_TASK_STORE_PASSWORD``): every agent's Vault policy may read this one path
    (its sidecar's task-store proxy authenticates with it); nothing else outside the
    agent's own tree. Unset: no agent reads it."""

    @field_validator("service_addresses")
    @classmethod
    def _table(cls, value: str) -> str:
        parse_table(value)
        return value

    @field_validator("listen", "grpc_listen", "otlp_listen")
    @classmethod
    def _listener(cls, value: str, info: ValidationInfo) -> str:
        if value:  # an empty otlp_listen turns the receiver off
            parse_host_port(value, setting=f"SPECMESH_{str(info.field_name).upper()}", listen=True)
        return value

    @field_validator("etcd_endpoint")
    @classmethod
    def _etcd_endpoint(cls, value: str) -> str:
        parse_endpoint(value, setting="SPECMESH_ETCD_ENDPOINT", default_port=2379)
        return value

    @field_validator("jwt_issuers", mode="before")
    @classmethod
    def _issuers(cls, value: Any) -> tuple[JwtIssuer, ...]:
        return parse_jwt_issuers(value)

    def mesh(self) -> MeshSettings:
        """How the mesh publisher renders the agents' Istio objects."""
        return MeshSettings(
            namespace=self.mesh_namespace,
            trust_domain=self.mesh_trust_domain,
            jwt_issuers=self.jwt_issuers,
            routes=self.mesh_routes,
        )

    @field_validator("task_store_password")
    @classmethod
    def _task_store_password(cls, value: str | None) -> str | None:
        if value is not None:
            from specmesh.errors import SecretError
            from specmesh.secrets import VaultRef
            from specmesh.vault import reserved_tree

            try:
                ref = VaultRef.parse(value)
            except SecretError as e:
                raise ValueError(f"SPECMESH_TASK_STORE_PASSWORD: {e}") from e
            reserved = reserved_tree(ref.path)
            if reserved:
                raise ValueError(
                    f"SPECMESH_TASK_STORE_PASSWORD: {reserved}, and every agent may read it"
                )
        return value


class KubernetesRuntimeSettings(BaseSettings):
    """``SPECMESH_*`` variables of the Kubernetes runtime
    (:mod:`control_plane.runtime.kubernetes`); the Helm chart sets every one."""

    model_config = SettingsConfigDict(env_prefix="SPECMESH_", extra="ignore", frozen=True)

    agents_namespace: str = "default"
    """Namespace the agents' objects live in (the chart: the release's, from the downward
    API)."""
    chart_path: Path = Path("/app/helm/specmesh")
    """The Helm chart whose agent templates render every agent (the image carries it)."""
    chart_values: Path = Path("/etc/specmesh/chart/values.yaml")
    """The chart's install values (the chart's ConfigMap ``<release>-control-plane-chart-
    values``, mounted here): what every agent is rendered with, besides its own entry."""
    chart_release: str = "specmesh"
    """The Helm release name the chart was installed as (labels and selectors use it)."""
    kubeconfig: Path | None = None
    """A kubeconfig file; unset: the pod's service account (in cluster), else
    ``KUBECONFIG`` or ``~/.kube/config``."""
    kubernetes_timeout_seconds: float = Field(default=10.0, gt=0)
    """Timeout of each Kubernetes API request."""
