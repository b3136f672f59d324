"""``specmesh control-plane``: the API server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from control_plane.analysis_loop import AnalysisLoop
from control_plane.api import ControlPlane
from control_plane.auth import StaticTokenAuthenticator
from control_plane.controller import Controller
from control_plane.evaluation import Evaluator, status_entries
from control_plane.grpc_api import build_grpc_server, build_servicers
from control_plane.http_api import build_app
from control_plane.issuer import TokenIssuer
from control_plane.mcptools import McpToolCatalog
from control_plane.mesh import IstioValidator
from control_plane.otlp import OtlpForwarder, OtlpReceiver, build_otlp_app
from control_plane.publisher import KubernetesMeshSink, MeshPublisher, MeshSink, YamlMeshSink
from control_plane.runtime import Runtime
from control_plane.runtime.local import LocalRuntime
from control_plane.settings import ControlPlaneSettings
from control_plane.sidecar_metrics import SidecarScraper
from control_plane.tokens import TokenAuthenticator, TokenStore
from control_plane.traces import SqliteTraceStore, retention_loop
from specmesh.addresses import parse_host_port, parse_table
from specmesh.errors import SecretError
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.logs import configure_logging
from specmesh.secrets import VaultRef
from specmesh.store import SpecStore
from specmesh.vault import VaultClient, keep_token_alive, kubernetes_login

__all__ = ["main", "serve"]

logger = logging.getLogger(__name__)


async def _listen(runner: web.AppRunner, listen: str, *, setting: str) -> None:
    host, port = parse_host_port(listen, setting=setting, listen=True)
    await web.TCPSite(runner, host, port).start()


async def serve(settings: ControlPlaneSettings, *, stop: asyncio.Event | None = None) -> None:
    """Run the API (and the OTLP receiver) until ``stop`` is set (or forever)."""
    stop = stop or asyncio.Event()
    etcd = EtcdClient.from_endpoint(
        settings.etcd_endpoint, watch_timeout=settings.etcd_watch_timeout
    )
    if settings.vault_k8s_role:
        vault = await kubernetes_login(
            address=settings.vault_addr,
            role=settings.vault_k8s_role,
            mount=settings.vault_k8s_mount,
            jwt_path=settings.vault_k8s_token_path,
        )
    else:
        vault = VaultClient(address=settings.vault_addr, token=settings.vault_token)
    store = SpecStore(etcd=etcd, keys=Keys(prefix=settings.etcd_prefix))
    istio = IstioValidator(settings.istio_crds) if settings.istio_crds else None
    traces = SqliteTraceStore(path=settings.traces_db)
    static_tokens = StaticTokenAuthenticator.from_file(settings.tokens_file)
    authenticator = TokenAuthenticator(etcd=etcd, keys=store.keys, static=static_tokens)
    tokens = TokenStore(store=store, static=static_tokens, on_change=authenticator.observe)
    mcp_tools = McpToolCatalog(
        store=store,
        secrets=vault,
        addresses=parse_table(settings.service_addresses),
        refresh_seconds=settings.mcp_tools_refresh_seconds,
        timeout=settings.mcp_tools_timeout_seconds,
    )
    issuer = TokenIssuer(
        vault=vault,
        kv_mount=settings.vault_kv_mount,
        issuer=settings.token_issuer,
        ttl_seconds=settings.invoke_token_ttl_seconds,
    )
    control_plane = ControlPlane(
        store=store, vault=vault, kv_mount=settings.vault_kv_mount, tokens=tokens, issuer=issuer,
        mesh_settings=settings.mesh(), istio=istio,
        traces=traces, mcp_tools=mcp_tools,
        pki_mount=settings.vault_pki_mount, runtime=settings.runtime,
        infrastructure_secret=(
            VaultRef.parse(settings.task_store_password) if settings.task_store_password else None
        ),
    )  # fmt: skip
    grpc_server = await build_grpc_server(control_plane, authenticator, settings.grpc_listen)
    runner = web.AppRunner(
        build_app(control_plane, authenticator, build_servicers(control_plane, authenticator)),
        access_log=None,
    )
    # Closed in reverse: gRPC, OTLP listener, REST, forwarder (drains), trace store, token
    # watch, etcd, Vault.
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(vault.close)
        stack.push_async_callback(etcd.close)
        await stack.enter_async_context(authenticator)
        if not await authenticator.wait_loaded(timeout=10):  # until then: 503, fail closed
            logger.warning("tokens and revocations not read from etcd yet; refusing every token")
        await stack.enter_async_context(traces)
        try:  # now, so that a sidecar's first JWKS fetch finds the key; else at first use
            logger.info("invoke tokens signed with key %s", await issuer.load())
        except SecretError as e:
            logger.warning("the invoke-token signing key is not available yet: %s", e)
        await stack.enter_async_context(mcp_tools)
        forwarder = None
        if settings.otlp_forward_url:
            forwarder = await stack.enter_async_context(
                OtlpForwarder(url=settings.otlp_forward_url)
            )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await _listen(runner, settings.listen, setting="SPECMESH_LISTEN")
        logger.info("control plane listening on http://%s", settings.listen)
        if settings.otlp_listen:
            receiver = OtlpReceiver(store=traces, forwarder=forwarder)
            otlp_runner = web.AppRunner(build_otlp_app(receiver), access_log=None)
            await otlp_runner.setup()
            stack.push_async_callback(otlp_runner.cleanup)
            await _listen(otlp_runner, settings.otlp_listen, setting="SPECMESH_OTLP_LISTEN")
            logger.info("OTLP/HTTP receiver on http://%s/v1/traces", settings.otlp_listen)
        if settings.task_store_password:
            # agents applied before the task store was configured may read its password too
            count = await control_plane.specs.write_identities()
            logger.info("agent policies rewritten with the task store's password: %d", count)
        await grpc_server.start()
        stack.push_async_callback(grpc_server.stop, 5)
        logger.info("control plane gRPC API listening on %s", settings.grpc_listen)
        retention = timedelta(days=settings.traces_retention_days)
        publisher = _publisher(settings, store, istio)
        runtime = _runtime(settings, vault)
        if runtime is not None:
            stack.push_async_callback(runtime.close)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(retention_loop(traces, older_than=retention, stop=stop))
            publishing = tasks.create_task(publisher.run()) if publisher else None
            controlling = (
                tasks.create_task(
                    Controller(
                        store=store,
                        runtime=runtime,
                        resync_seconds=settings.controller_resync_seconds,
                        observe_seconds=settings.controller_observe_seconds,
                    ).run()
                )
                if runtime is not None
                else None
            )
            analysing = (
                tasks.create_task(
                    AnalysisLoop(
                        control_plane=control_plane,
                        turns=traces,
                        requests=SidecarScraper(store=store),
                        interval_seconds=settings.analysis_interval_seconds,
                        evaluator=Evaluator(
                            tokens=control_plane.issuer, entries=status_entries(store)
                        ),
                    ).run()
                )
                if settings.analysis_interval_seconds
                else None
            )
            renewing = tasks.create_task(keep_token_alive(vault))
            collecting = (
                tasks.create_task(_collect_garbage(control_plane, settings))
                if settings.secrets_gc_interval_seconds
                else None
            )
            await stop.wait()
            renewing.cancel()
            if collecting is not None:
                collecting.cancel()
            if publishing is not None:
                publishing.cancel()
            if controlling is not None:
                controlling.cancel()
            if analysing is not None:
                analysing.cancel()


async def _collect_garbage(control_plane: ControlPlane, settings: ControlPlaneSettings) -> None:
    """Destroy unreferenced secret versions every ``secrets_gc_interval_seconds``."""
    while True:
        await asyncio.sleep(settings.secrets_gc_interval_seconds)
        try:
            await control_plane.specs.collect_garbage(
                grace_seconds=settings.secrets_gc_grace_seconds
            )
        except Exception:
            logger.exception("collecting unreferenced secret versions failed (will retry)")


def _runtime(settings: ControlPlaneSettings, vault: VaultClient) -> Runtime | None:
    """The runtime the controller drives (none: the controller does not run)."""
    if settings.runtime == "local":
        logger.info("controller: local runtime (supervisor at %s)", settings.supervisor_socket)
        return LocalRuntime(settings.supervisor_socket)
    if settings.runtime == "kubernetes":
        from control_plane.runtime.kubernetes import kubernetes_runtime_from_env

        logger.info("controller: kubernetes runtime")
        return kubernetes_runtime_from_env(vault=vault)
    return None


def _publisher(
    settings: ControlPlaneSettings, store: SpecStore, istio: IstioValidator | None
) -> MeshPublisher | None:
    sink: MeshSink
    if settings.mesh_publish == "yaml":
        sink = YamlMeshSink(settings.mesh_output_dir or Path(".specmesh") / "mesh")
    elif settings.mesh_publish == "kubernetes":
        sink = KubernetesMeshSink(namespace=settings.mesh_namespace)
    else:
        return None
    logger.info("publishing Istio objects (%s) on every change", settings.mesh_publish)
    return MeshPublisher(
        store=store,
        sink=sink,
        settings=settings.mesh(),
        validator=istio,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specmesh control-plane")
    parser.add_argument("--listen", default=None, help="host:port of the REST API")
    args = parser.parse_args(argv)
    configure_logging()
    settings = ControlPlaneSettings()
    if args.listen:
        settings = settings.model_copy(update={"listen": args.listen})

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop=stop)

    asyncio.run(run())
    return 0
