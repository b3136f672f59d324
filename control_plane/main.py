"""``specmesh control-plane``: the API server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence

from aiohttp import web

from control_plane.api import ControlPlane
from control_plane.auth import StaticTokenAuthenticator
from control_plane.grpc_api import build_grpc_server
from control_plane.mesh import IstioValidator, MeshSettings
from control_plane.rest import build_app
from control_plane.settings import ControlPlaneSettings
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.logs import configure_logging
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

__all__ = ["main", "serve"]

logger = logging.getLogger(__name__)


async def serve(settings: ControlPlaneSettings, *, stop: asyncio.Event | None = None) -> None:
    """Run the API until ``stop`` is set (or forever)."""
    etcd = EtcdClient.from_endpoint(settings.etcd_endpoint)
    vault = VaultClient(address=settings.vault_addr, token=settings.vault_token)
    store = SpecStore(etcd=etcd, keys=Keys(prefix=settings.etcd_prefix))
    istio = IstioValidator(settings.istio_crds) if settings.istio_crds else None
    control_plane = ControlPlane(
        store=store, vault=vault, kv_mount=settings.vault_kv_mount,
        mesh_settings=MeshSettings(namespace=settings.mesh_namespace), istio=istio,
    )  # fmt: skip
    authenticator = StaticTokenAuthenticator.from_file(settings.tokens_file)
    grpc_server = await build_grpc_server(control_plane, authenticator, settings.grpc_listen)
    runner = web.AppRunner(build_app(control_plane, authenticator), access_log=None)
    await runner.setup()
    host, _, port = settings.listen.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    await site.start()
    logger.info("control plane listening on http://%s", settings.listen)
    await grpc_server.start()
    logger.info("control plane gRPC API listening on %s", settings.grpc_listen)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await grpc_server.stop(5)
        await runner.cleanup()
        await etcd.close()
        await vault.close()


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
