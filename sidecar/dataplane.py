"""The sidecar's data plane as one component: credentials, mTLS, routing, egress, inbound.

Started after the spec sync and the registry view (it needs both), stopped before them:

1. Vault identity (a token locally; Kubernetes auth in a cluster) -> credential resolver;
2. mTLS certificates from Vault PKI, unless Istio provides mTLS;
3. router over the Agent Registry and the release policies (watched in etcd);
4. egress on loopback for the engine; 5. inbound for callers (mTLS + partner check);
6. the Redis proxy on loopback (memory store, password from Vault; listens once the
   spec's memory is Redis) and, when ``SPECMESH_TASK_STORE_PROXY`` is set, the task-store
   proxy (fixed upstream ``SPECMESH_TASK_STORE_UPSTREAM``, password
   ``SPECMESH_TASK_STORE_PASSWORD`` from Vault; the engine's shared A2A task store);
7. A2A over gRPC, each when its setting is set: egress on loopback
   (``SPECMESH_EGRESS_GRPC``) and inbound (``SPECMESH_INBOUND_GRPC``, mTLS + partner check);
8. the public entry, each when its setting is set and not in Istio mode: HTTP
   (``SPECMESH_ENTRY``) and gRPC (``SPECMESH_ENTRY_GRPC``), bearer tokens.

Every listener asks one :class:`~sidecar.callers.CallerPolicy` (this agent's ``callers``
from its own snapshot, the partner graph, the trusted token issuers).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sidecar.affinity import ConversationTracks
from sidecar.callers import CallerPolicy, JwtVerifier
from sidecar.credentials import CredentialResolver, KubernetesLogin, TokenLogin, VaultLogin
from sidecar.egress import EgressMetrics, EgressProxy
from sidecar.engine_calls import EngineCalls
from sidecar.inbound import EtcdPartnerGraph, InboundServer
from sidecar.ledger import BudgetLedger
from sidecar.main import SidecarContext
from sidecar.mtls import AgentCertificates, PkiClient
from sidecar.redisproxy import RedisProxy, fixed_redis_upstream
from sidecar.router import EtcdReleaseSource, Router
from sidecar.settings import SidecarSettings
from specmesh.addresses import parse_endpoint, parse_host_port, parse_listen, parse_table
from specmesh.aio import cancel_and_wait
from specmesh.errors import SecretError
from specmesh.spec.models import CallersSpec
from specmesh.store import SpecStore
from specmesh.vault import VaultClient, agent_pki_role, keep_token_alive
from specmesh.watch import PrefixWatcher

if TYPE_CHECKING:  # imported when their settings turn them on (the A2A gRPC protos, ~3 MB)
    from sidecar.entry import EntryServer, GrpcEntry
    from sidecar.grpcproxy import GrpcEgress, GrpcInbound

__all__ = ["DataPlane", "conversation_tracks", "vault_login"]

logger = logging.getLogger(__name__)


def vault_login(settings: SidecarSettings) -> VaultLogin:
    """The sidecar's Vault identity: Kubernetes auth when a role is set, else the token."""
    if not settings.vault_addr:
        raise SecretError("no Vault address: set SPECMESH_VAULT_ADDR")
    if settings.vault_k8s_role:
        return KubernetesLogin(
            address=settings.vault_addr,
            role=settings.vault_k8s_role,
            mount=settings.vault_k8s_mount,
            jwt_path=settings.vault_k8s_token_path,
        )
    if not settings.vault_token:
        raise SecretError("no Vault identity: set SPECMESH_VAULT_TOKEN or SPECMESH_VAULT_K8S_ROLE")
    return TokenLogin(address=settings.vault_addr, token=settings.vault_token)


def conversation_tracks(settings: SidecarSettings) -> ConversationTracks | None:
    """The sidecar's one table of conversations' tracks, for the entry and the egress; None
    when pinning is off, and in Istio mode (the mesh splits each request)."""
    if settings.istio or settings.conversation_pin_seconds <= 0:
        return None
    return ConversationTracks(
        max_age=settings.conversation_pin_seconds, max_entries=settings.conversation_pin_max
    )


class DataPlane:
    """Credentials, certificates, router, egress and inbound, in start order."""

    def __init__(self, ctx: SidecarContext) -> None:
        self.ctx = ctx
        self.vault: VaultClient | None = None
        self.credentials: CredentialResolver | None = None
        self.certificates: AgentCertificates | None = None
        self.egress: EgressProxy | None = None
        self.inbound: InboundServer | None = None
        self.redis_proxy: RedisProxy | None = None
        self.task_store_proxy: RedisProxy | None = None
        self.grpc_egress: GrpcEgress | None = None
        self.grpc_inbound: GrpcInbound | None = None
        self.entry: EntryServer | None = None
        self.grpc_entry: GrpcEntry | None = None
        self.verifier: JwtVerifier | None = None
        self.policy: CallerPolicy | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pki: PkiClient | None = None
        self.tracks = conversation_tracks(ctx.settings)
        self.ledger = BudgetLedger(spec_budget=self._spec_budget)
        """The requests' cost budgets: opened by the inbound and entry, charged by the egress."""
        self.calls = EngineCalls(registry=ctx.metrics.registry, revision=self._revision)

    def _revision(self) -> int:
        """The revision this instance serves (its snapshot's; 0: none yet)."""
        snapshot = self.ctx.holder.current
        return snapshot.revision if snapshot is not None else 0

    async def start(self) -> None:
        settings = self.ctx.settings
        self.vault = await vault_login(settings).login()
        self._tasks.append(asyncio.create_task(keep_token_alive(self.vault), name="vault-renew"))
        self.credentials = CredentialResolver(source=self.vault, ttl=settings.credential_ttl)
        self.credentials.start()
        if settings.mtls:
            assert settings.vault_addr is not None
            self._pki = PkiClient(
                address=settings.vault_addr,
                token=self.vault.token,
                mount=settings.vault_pki_mount,
                role=settings.vault_pki_role or agent_pki_role(settings.agent_name),
            )
            self.certificates = AgentCertificates(
                agent=settings.agent_name, pki=self._pki, ttl=settings.cert_ttl
            )
            await self.certificates.start()
        releases = EtcdReleaseSource(
            watcher=PrefixWatcher(etcd=self.ctx.etcd, prefix=self.ctx.keys.agents()),
            keys=self.ctx.keys,
        )
        self._tasks.append(asyncio.create_task(releases.run(), name="release-watch"))
        await releases.wait_ready()
        metrics = EgressMetrics(self.ctx.metrics.registry)
        router = Router(
            instances=self.ctx.registry_view,
            releases=releases,
            mode="istio" if settings.istio else "direct",
            on_ejection=metrics.on_ejection,
        )
        host, port = parse_endpoint(settings.egress_url, setting="SPECMESH_EGRESS_URL", listen=True)
        self.egress = EgressProxy(
            snapshots=self.ctx.holder,
            credentials=self.credentials,
            router=router,
            client_ssl=self.certificates.client_context if self.certificates else None,
            metrics=metrics,
            host=host,
            port=port,
            llm_override=settings.llm_override_url,
            service_addresses=parse_table(settings.service_addresses),
            tracks=self.tracks,
            ledger=self.ledger,
        )
        await self.egress.start()
        graph = EtcdPartnerGraph(store=SpecStore(etcd=self.ctx.etcd, keys=self.ctx.keys))
        await graph.refresh()
        self._tasks.append(asyncio.create_task(graph.run(), name="partner-graph-watch"))
        self.verifier = JwtVerifier(
            issuers=settings.jwt_issuers,
            agent=settings.agent_name,
            leeway=settings.jwt_leeway_seconds,
            min_refetch=settings.jwks_refetch_seconds,
            jwks_ttl=settings.jwks_ttl_seconds,
        )
        self._tasks.append(asyncio.create_task(self.verifier.run(), name="jwks-refresh"))
        self.policy = CallerPolicy(
            agent=settings.agent_name,
            graph=graph,
            callers=self._own_callers,
            verifier=self.verifier,
            mesh_trust_domain=settings.istio_trust_domain,
            mesh_namespace=settings.namespace,
        )
        host, port = parse_host_port(settings.inbound, setting="SPECMESH_INBOUND", listen=True)
        self.inbound = InboundServer(
            agent_name=settings.agent_name,
            engine_http=settings.engine_http,
            policy=self.policy,
            certificates=self.certificates,
            host=host,
            port=port,
            require_identity=settings.istio,
            ledger=self.ledger,
            read_timeout=settings.engine_timeout,
            calls=self.calls,
        )
        await self.inbound.start()
        self.redis_proxy = self._redis_proxy(settings.redis_proxy, setting="SPECMESH_REDIS_PROXY")
        await self.redis_proxy.start()
        if settings.task_store_proxy and settings.task_store_upstream:
            self.task_store_proxy = self._redis_proxy(
                settings.task_store_proxy,
                setting="SPECMESH_TASK_STORE_PROXY",
                upstream=fixed_redis_upstream(
                    settings.task_store_upstream, password_ref=settings.task_store_password
                ),
                label="task store",
            )
            await self.task_store_proxy.start()
        grpc_router: Router | None = None
        if settings.egress_grpc or settings.inbound_grpc or settings.entry_grpc:
            from sidecar.grpcproxy import GrpcEgress, GrpcInbound, GrpcInstanceSource

            # its own router (outlier state per protocol) over the instances with a
            # grpcEndpoint
            grpc_router = Router(
                instances=GrpcInstanceSource(self.ctx.registry_view),
                releases=releases,
                mode="istio" if settings.istio else "direct",
                on_ejection=metrics.on_ejection,
            )
        if settings.egress_grpc:
            assert grpc_router is not None
            self.grpc_egress = GrpcEgress(
                snapshots=self.ctx.holder,
                credentials=self.credentials,
                router=grpc_router,
                certificates=self.certificates,
                address=settings.egress_grpc,
                on_retry=metrics.on_retry,
                tracks=self.tracks,
                ledger=self.ledger,
            )
            await self.grpc_egress.start()
        if settings.inbound_grpc:
            self.grpc_inbound = GrpcInbound(
                agent_name=settings.agent_name,
                engine_grpc=settings.engine_grpc,
                policy=self.policy,
                certificates=self.certificates,
                address=settings.inbound_grpc,
                require_identity=settings.istio,
                ledger=self.ledger,
                calls=self.calls,
            )
            await self.grpc_inbound.start()
        await self._start_entry(router, grpc_router)
        logger.info("data plane up: egress %s, inbound %s", self.egress.url, self.inbound.url)

    def _spec_budget(self) -> float | None:
        """The spec's ``model.budgetPerRequestUsd`` in the snapshot it serves."""
        snapshot = self.ctx.holder.current
        return snapshot.spec.model.budget_per_request_usd if snapshot is not None else None

    def _own_callers(self) -> CallersSpec | None:
        """This agent's ``base.callers`` in the snapshot it serves (None: the defaults)."""
        snapshot = self.ctx.holder.current
        return snapshot.spec.base.callers if snapshot is not None else None

    async def _start_entry(self, router: Router, grpc_router: Router | None) -> None:
        settings = self.ctx.settings
        assert self.policy is not None
        if settings.istio:
            if settings.entry or settings.entry_grpc:
                logger.warning(
                    "SPECMESH_ENTRY/SPECMESH_ENTRY_GRPC are ignored in Istio mode: "
                    "the inbound is the entry"
                )
            return
        if settings.entry or settings.entry_grpc:
            from sidecar.entry import EntryServer, GrpcEntry
        if settings.entry:
            host, port = parse_host_port(settings.entry, setting="SPECMESH_ENTRY", listen=True)
            self.entry = EntryServer(
                agent_name=settings.agent_name,
                instance_id=settings.instance_id,
                engine_http=settings.engine_http,
                policy=self.policy,
                router=router,
                client_ssl=self.certificates.client_context if self.certificates else None,
                host=host,
                port=port,
                tracks=self.tracks,
                ledger=self.ledger,
                read_timeout=settings.engine_timeout,
                calls=self.calls,
            )
            await self.entry.start()
            logger.info("public entry (HTTP) on %s", self.entry.url)
        if settings.entry_grpc:
            assert grpc_router is not None
            self.grpc_entry = GrpcEntry(
                agent_name=settings.agent_name,
                instance_id=settings.instance_id,
                engine_grpc=settings.engine_grpc,
                policy=self.policy,
                router=grpc_router,
                certificates=self.certificates,
                address=settings.entry_grpc,
                tracks=self.tracks,
                ledger=self.ledger,
                calls=self.calls,
            )
            await self.grpc_entry.start()
            logger.info("public entry (gRPC) on %s", self.grpc_entry.target)

    def _redis_proxy(self, listen: str, *, setting: str, **kwargs: Any) -> RedisProxy:
        """A Redis proxy on ``listen`` (``host:port`` or ``unix:path``): the memory store's
        (following the snapshot), or one with a fixed ``upstream``."""
        assert self.credentials is not None
        kind, host, port = parse_listen(listen, setting=setting)
        return RedisProxy(
            snapshots=self.ctx.holder,
            credentials=self.credentials,
            host=host,
            port=port,
            unix_path=host if kind == "unix" else None,
            service_addresses=parse_table(self.ctx.settings.service_addresses),
            **kwargs,
        )

    async def stop(self) -> None:
        if self.vault is not None and self.ctx.settings.vault_revoke_on_stop:
            # first: a sidecar killed while draining must not leave a live token behind
            # (its engine is stopped before it, so nothing needs a credential any more)
            try:
                await self.vault.revoke_self()
                logger.info("revoked this instance's Vault token")
            except SecretError as e:
                logger.warning("could not revoke the Vault token: %s", e)
        if self.grpc_entry is not None:
            await self.grpc_entry.stop()
        if self.entry is not None:
            await self.entry.stop()
        if self.grpc_inbound is not None:
            await self.grpc_inbound.stop()
        if self.grpc_egress is not None:
            await self.grpc_egress.stop()
        if self.redis_proxy is not None:
            await self.redis_proxy.stop()
        if self.task_store_proxy is not None:
            await self.task_store_proxy.stop()
        if self.inbound is not None:
            await self.inbound.stop()
        if self.egress is not None:
            await self.egress.stop()
        await asyncio.gather(*(cancel_and_wait(task) for task in self._tasks))
        if self.certificates is not None:
            await self.certificates.close()
        if self._pki is not None:
            await self._pki.close()
        if self.verifier is not None:
            await self.verifier.close()
        if self.credentials is not None:
            await self.credentials.close()
        if self.vault is not None:
            await self.vault.close()
