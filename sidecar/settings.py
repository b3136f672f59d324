"""Settings of the sidecar; the only place in ``sidecar/`` that reads the environment.

Names follow ``docs/runtime.md``: ``AGENT_NAME`` and the ``SPECMESH_*`` variables. When
the local services were started by ``specmesh services up``, their etcd endpoint, Vault
address and token (in ``<home>/services.json``) are the defaults, as for the CLI.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from specmesh.addresses import (
    format_host_port,
    parse_endpoint,
    parse_host_port,
    parse_listen,
    parse_table,
)
from specmesh.errors import SecretError
from specmesh.issuers import JwtIssuer, parse_jwt_issuers
from specmesh.keys import Keys
from specmesh.names import check_logical_name, resource_name
from specmesh.secrets import VaultRef

__all__ = ["SidecarSettings", "default_instance_id"]


def default_instance_id() -> str:
    """``<hostname>-<pid>``: unique per process on a host, readable in the registry."""
    return f"{socket.gethostname()}-{os.getpid()}"


class SidecarSettings(BaseSettings):
    """Everything one sidecar needs to know about where it runs."""

    model_config = SettingsConfigDict(
        env_prefix="SPECMESH_", extra="ignore", frozen=True, populate_by_name=True
    )

    agent_name: str = Field(validation_alias=AliasChoices("AGENT_NAME", "agent_name"))
    """Logical name of the agent this sidecar serves (the engine beside it has the same)."""
    track: Literal["stable", "canary"] = "stable"
    """Release track of this instance (``SPECMESH_TRACK``)."""
    instance_id: str = Field(default_factory=default_instance_id)
    """Instance name in the Agent Registry (``SPECMESH_INSTANCE_ID``); default host-pid."""

    sync_addr: str = "127.0.0.1:7101"
    """SpecSyncService listener (``SPECMESH_SYNC_ADDR``): ``host:port`` or ``unix:path``."""
    egress_url: str = "http://127.0.0.1:7102"
    """The egress listener the engine sends LLM/MCP/A2A traffic to (``SPECMESH_EGRESS_URL``)."""
    engine_http: str = "127.0.0.1:7103"
    """The engine's HTTP listener, where inbound A2A/REST goes (``SPECMESH_ENGINE_HTTP``)."""
    engine_grpc: str = "127.0.0.1:7104"
    """The engine's A2A gRPC listener (``SPECMESH_ENGINE_GRPC``)."""
    engine_timeout: float = Field(default=300.0, gt=0, le=3600)
    """Seconds the inbound and the public entry (HTTP) wait for the engine's answer, and
    then between two chunks of it (``SPECMESH_ENGINE_TIMEOUT``); past it the call fails as
    ``ENGINE_UNREACHABLE`` and counts as a ``timeout`` (a hung engine). gRPC calls keep the
    caller's deadline."""
    inbound: str = "127.0.0.1:7100"
    """Inbound listener (``SPECMESH_INBOUND``), registered as this instance's endpoint."""
    inbound_grpc: str | None = None
    """A2A gRPC inbound listener (``SPECMESH_INBOUND_GRPC``, ``host:port``), registered as the
    instance's ``grpcEndpoint``; off when unset."""
    egress_grpc: str | None = None
    """A2A gRPC egress for the engine (``SPECMESH_EGRESS_GRPC``, loopback ``host:port``,
    plaintext; metadata ``x-specmesh-target-agent`` names the partner); off when unset."""
    entry: str | None = None
    """The agent's public HTTP entry (``SPECMESH_ENTRY``, ``host:port``, plaintext): external
    A2A clients (JSON-RPC, HTTP+JSON, REST) with a bearer token; the agent card without one.
    Off when unset, and in Istio mode (the inbound is the entry there)."""
    entry_grpc: str | None = None
    """The agent's public A2A gRPC entry (``SPECMESH_ENTRY_GRPC``, ``host:port``, plaintext,
    bearer token); off when unset, and in Istio mode."""
    conversation_pin_seconds: float = Field(default=1800.0, ge=0)
    """How long the entry sends a conversation (A2A ``contextId``) back to the release track
    its first message went to, and the egress a conversation with a partner back to the
    partner's track, measured from that message (the engine's setting of the same name
    keeps it on its snapshot); 0 disables it (each message is split by the release)."""
    conversation_pin_max: int = Field(default=10000, ge=1)
    """Most conversations the sidecar remembers a track of (the entry's and those with
    partners, together); the least recently used leaves first."""
    jwt_issuers: Annotated[tuple[JwtIssuer, ...], NoDecode] = ()
    """Trusted bearer-token issuers (``SPECMESH_JWT_ISSUERS``, read by
    :func:`specmesh.issuers.parse_jwt_issuers`, the control plane's rule too): a JSON list
    of ``{"issuer", "jwksUri" | "jwks", "audiences"}``; ``audiences`` defaults to
    ``["{agent}"]``, this agent's resource name. A token of an issuer not listed is refused;
    empty: every token is refused."""
    jwt_leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    """Clock skew allowed when checking a token's ``exp``/``nbf``/``iat``."""
    jwks_refetch_seconds: float = Field(default=5.0, ge=0.1, le=3600)
    """A JWKS is refetched at once for a ``kid`` it lacks, but at most this often per issuer."""
    jwks_ttl_seconds: float = Field(default=300.0, ge=1, le=86_400)
    """How long a fetched JWKS is used before it is fetched again."""
    redis_proxy: str = "127.0.0.1:7105"
    """The Redis proxy the engine reaches its memory store through (``SPECMESH_REDIS_PROXY``;
    ``host:port`` or ``unix:path``); listens only once the spec's memory is Redis."""
    task_store_proxy: str | None = None
    """The A2A task store's proxy for the engine (``SPECMESH_TASK_STORE_PROXY``;
    ``host:port`` or ``unix:path``): every connection goes to ``task_store_upstream`` with
    ``task_store_password``; off when unset. The engine's ``SPECMESH_TASK_STORE`` points
    here."""
    task_store_upstream: str | None = None
    """The shared task Redis (``SPECMESH_TASK_STORE_UPSTREAM``, ``redis://host:port/db`` or
    ``rediss://``, no credentials in it); required with ``task_store_proxy``."""
    task_store_password: str | None = None
    """``vault://`` reference of the task Redis password (``SPECMESH_TASK_STORE_PASSWORD``);
    the agent's Vault token must be able to read it (the control plane's
    ``SPECMESH_TASK_STORE_PASSWORD`` grants it); none = no AUTH."""
    ops: str = "127.0.0.1:7109"
    """Health, readiness and metrics listener (``SPECMESH_OPS``)."""

    home: Path = Path(".specmesh")
    """Folder of the local services' state (``services.json``) and default state dir."""
    state_dir: Path | None = None
    """Where the last good snapshot is kept (``SPECMESH_STATE_DIR``); default
    ``<home>/sidecars/<agent>-<track>``."""

    etcd_endpoint: str | None = None
    """etcd client URL; default: the local services', else ``http://127.0.0.1:2379``."""
    etcd_prefix: str = "/specmesh"
    """Prefix of every specmesh key in etcd."""
    etcd_timeout: float = Field(default=5.0, gt=0, le=60)
    """Timeout of one etcd request, in seconds."""
    etcd_watch_timeout: float = Field(default=15.0, gt=0, le=3600)
    """Read deadline of an etcd watch, in seconds: a watch that gets no message for this
    long (etcd sends a progress notification every
    ``--experimental-watch-progress-notify-interval`` when nothing changes; the local
    fleet's etcd: 5 s) is half-open, and reconnects from its last revision. Keep it above
    2.2 intervals (``SPECMESH_ETCD_WATCH_TIMEOUT``)."""
    registry_ttl: int = Field(default=10, ge=2, le=300)
    """Lease TTL of this instance's registry entry, in seconds (keep-alive every TTL/3)."""

    vault_addr: str | None = Field(
        default=None, validation_alias=AliasChoices("SPECMESH_VAULT_ADDR", "VAULT_ADDR")
    )
    """Vault/OpenBao address; default: the local services'."""
    vault_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SPECMESH_VAULT_TOKEN", "VAULT_TOKEN"),
        repr=False,
    )
    """Vault token (local runs). Leave unset in a cluster and set ``vault_k8s_role``."""
    vault_revoke_on_stop: bool = False
    """Revoke the Vault token as the sidecar begins to stop (``SPECMESH_VAULT_REVOKE_ON_STOP``;
    the local supervisor sets it: it stops the engine first, every start gets a fresh token,
    and a stopped instance's is dead at once rather than at the end of its period)."""
    vault_k8s_role: str | None = None
    """Vault Kubernetes auth role of this agent (``SPECMESH_VAULT_K8S_ROLE``), in a cluster."""
    vault_k8s_mount: str = "kubernetes"
    """Mount path of Vault's Kubernetes auth method."""
    vault_k8s_token_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    """The pod's service-account token, sent to Vault's Kubernetes auth."""
    vault_kv_mount: str = "secret"
    """KV v2 mount holding agents' secrets."""

    istio: bool = False
    """Istio mode (``SPECMESH_ISTIO``): Istio does mTLS, weights and ejection."""
    istio_trust_domain: str = "cluster.local"
    """Istio mode: the mesh's trust domain; an ``X-Forwarded-Client-Cert`` naming another
    domain's workload names no agent (``SPECMESH_ISTIO_TRUST_DOMAIN``)."""
    namespace: str | None = Field(
        default=None, validation_alias=AliasChoices("SPECMESH_NAMESPACE", "POD_NAMESPACE")
    )
    """Istio mode: the agents' namespace (the chart passes the pod's); a caller of another
    namespace names no agent. Unset: any namespace."""
    mtls: bool | None = None
    """Sidecar-made mTLS (``SPECMESH_MTLS``); default on, off in Istio mode."""

    llm_override_url: str | None = None
    """Send every LLM call to this OpenAI-compatible server instead of the spec's baseUrl
    (``SPECMESH_LLM_OVERRIDE_URL``; the offline fleet points it at the scripted model)."""
    service_addresses: str = ""
    """``host:port`` -> ``host:port`` applied to MCP server URLs and the memory store's address
    just before connecting (``SPECMESH_SERVICE_ADDRESSES``, ``a:1=b:2,...``; see
    :mod:`specmesh.addresses`): the local fleet's services listen on ports chosen at each
    start, which never go into a spec."""
    credential_ttl: float = Field(default=300.0, gt=0, le=86_400)
    """How long a credential read from Vault is served from the cache (``SPECMESH_CREDENTIAL_TTL``);
    refreshed in the background at two thirds of it."""
    cert_ttl: float = Field(default=300.0, ge=2, le=86_400)
    """TTL of the agent's mTLS certificate from Vault PKI, rotated at two thirds of it."""
    vault_pki_mount: str = "specmesh-pki"
    """Vault PKI mount issuing agent certificates."""
    vault_pki_role: str | None = None
    """Vault PKI role issuing this agent's certificates; default the agent's own role
    ``specmesh-agent-<resource-name>``, which issues its SPIFFE ID only."""
    shutdown_grace: float = Field(default=10.0, ge=0, le=300)
    """Seconds in-flight work may take to drain on SIGTERM."""
    log_level: str = "INFO"
    """Root log level."""
    uvloop: bool = True
    """Run the event loop on uvloop (``SPECMESH_UVLOOP``; ``false``: the standard asyncio
    loop). It cuts the sidecar's CPU per proxied request (see ``bench/sidecar_hop.py``)."""
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "SPECMESH_OTLP_ENDPOINT"),
    )
    """OTLP/HTTP endpoint for the sidecar's spans (the standard OpenTelemetry variable)."""

    @field_validator("service_addresses")
    @classmethod
    def _table(cls, value: str) -> str:
        parse_table(value)
        return value

    @field_validator("jwt_issuers", mode="before")
    @classmethod
    def _issuers(cls, value: Any) -> tuple[JwtIssuer, ...]:
        return parse_jwt_issuers(value)

    @field_validator("agent_name")
    @classmethod
    def _agent_name(cls, value: str) -> str:
        problem = check_logical_name(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("etcd_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        Keys(prefix=value)  # raises ValueError with the rule
        return value

    @field_validator("sync_addr", "redis_proxy", "task_store_proxy")
    @classmethod
    def _listener(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_listen(value, setting=f"SPECMESH_{str(info.field_name).upper()}")
        return value

    @field_validator("inbound", "inbound_grpc", "egress_grpc", "entry", "entry_grpc", "ops")
    @classmethod
    def _tcp_listener(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_host_port(value, setting=f"SPECMESH_{str(info.field_name).upper()}", listen=True)
        return value

    @field_validator("egress_url")
    @classmethod
    def _egress_url(cls, value: str) -> str:
        parse_endpoint(value, setting="SPECMESH_EGRESS_URL", listen=True)
        return value

    @field_validator("task_store_password")
    @classmethod
    def _task_store_password(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                VaultRef.parse(value)
            except SecretError as e:
                raise ValueError(f"SPECMESH_TASK_STORE_PASSWORD: {e}") from e
        return value

    @model_validator(mode="after")
    def _task_store(self) -> SidecarSettings:
        if self.task_store_proxy and not self.task_store_upstream:
            raise ValueError(
                "SPECMESH_TASK_STORE_PROXY is set but SPECMESH_TASK_STORE_UPSTREAM is not"
            )
        if self.task_store_upstream:
            from sidecar.redisproxy import RedisProxyError, fixed_redis_upstream

            try:
                fixed_redis_upstream(self.task_store_upstream, password_ref=None)
            except RedisProxyError as e:
                raise ValueError(f"SPECMESH_TASK_STORE_UPSTREAM {e.reason}") from e
        return self

    @model_validator(mode="after")
    def _defaults(self) -> SidecarSettings:
        state_file = self.home / "services.json"
        state: dict[str, Any] = {}
        if state_file.exists():
            state = json.loads(state_file.read_text())
        defaults: dict[str, Any] = {
            "etcd_endpoint": state.get("etcdEndpoint") or "http://127.0.0.1:2379",
            # the address only: the services' token is root, and a sidecar holds its own
            "vault_addr": state.get("baoAddress"),
            "vault_pki_role": f"specmesh-agent-{resource_name(self.agent_name)}",
            "mtls": not self.istio,
            "state_dir": self.home / "sidecars" / f"{resource_name(self.agent_name)}-{self.track}",
        }
        for name, value in defaults.items():
            if getattr(self, name) is None and value is not None:
                object.__setattr__(self, name, value)
        return self

    @property
    def keys(self) -> Keys:
        return Keys(prefix=self.etcd_prefix)

    @property
    def snapshot_path(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "snapshot.json"

    @property
    def inbound_url(self) -> str:
        """The endpoint registered in the Agent Registry."""
        if "://" in self.inbound:
            return self.inbound
        scheme = "https" if self.mtls else "http"
        return f"{scheme}://{self.inbound}"

    @property
    def ops_url(self) -> str:
        """The ops endpoint registered in the Agent Registry (``opsEndpoint``: where the
        control plane reads ``/metrics``): ``SPECMESH_OPS``, a wildcard host replaced by the
        inbound's host (the address other hosts reach this instance at)."""
        host, port = parse_host_port(self.ops, setting="SPECMESH_OPS", listen=True)
        if host in ("", "0.0.0.0", "::"):
            inbound = self.inbound_url.split("://", 1)[1]
            host, _ = parse_host_port(inbound, setting="SPECMESH_INBOUND", listen=True)
            if host in ("", "0.0.0.0", "::"):
                host = "127.0.0.1"
        return f"http://{format_host_port(host, port)}"
