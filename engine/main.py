"""``specmesh engine``: run one agent's engine until SIGTERM/SIGINT.

::

    specmesh engine [--spec-dir DIR] [--http HOST:PORT] [--grpc HOST:PORT] [--log-level L]

Defaults come from the environment (``AGENT_NAME``, ``SPECMESH_ENGINE_HTTP``,
``SPECMESH_ENGINE_GRPC``, ``SPECMESH_SPEC_DIR``...; see docs/runtime.md). Logging (JSON)
and telemetry are configured once, here. On SIGTERM or SIGINT the engine stops
accepting, gives turns in flight ``SPECMESH_ENGINE_DRAIN_SECONDS`` to finish, and exits 0.

Exit codes: 0 stopped cleanly, 2 bad usage or settings, 1 failed to start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

# a2a-sdk traces every internal call (hundreds of spans per turn) unless told not to; the
# engine's own spans (invoke_agent, chat, execute_tool) and the HTTP/gRPC server spans are
# what a trace needs. Set it to "true" to get the SDK's spans back.
os.environ.setdefault("OTEL_INSTRUMENTATION_A2A_SDK_ENABLED", "false")

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.card import parse_card_security
from engine.server import EngineServer, ServerConfig
from engine.tasks import DEFAULT_RETENTION_SECONDS, MEMORY, check_task_store
from engine.telemetry import EngineMetrics, configure_telemetry
from engine.turn_protocol import AgentRunner
from specmesh.addresses import AddressError, parse_host_port
from specmesh.logs import configure_logging

__all__ = ["RuntimeOpener", "ServeSettings", "main", "serve"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ServeSettings(BaseSettings):
    """How the engine serves (listeners, public URLs, drain, telemetry export).

    Meant to join :class:`engine.settings.EngineSettings`; kept apart while that module is
    being written by the runtime.
    """

    model_config = SettingsConfigDict(env_prefix="SPECMESH_", extra="ignore", frozen=True)

    agent_name: str = Field(
        default="", validation_alias=AliasChoices("AGENT_NAME", "SPECMESH_AGENT_NAME")
    )
    """Logical name of the agent this engine runs."""
    engine_http: str = "127.0.0.1:7103"
    """The HTTP listener: A2A JSON-RPC and HTTP+JSON, agent card, business REST."""
    engine_grpc: str = "127.0.0.1:7104"
    """The A2A gRPC listener."""
    engine_public_http_url: str | None = None
    """Base URL callers use for HTTP (the card's JSON-RPC and HTTP+JSON URLs): the public
    entry's (``SPECMESH_ENGINE_PUBLIC_HTTP_URL``; the supervisor sets the sidecar's entry,
    Kubernetes the Service); default: the listen address."""
    engine_public_grpc_url: str | None = None
    """gRPC target callers use (the card's gRPC URL): the entry's gRPC listener
    (``SPECMESH_ENGINE_PUBLIC_GRPC_URL``); default: the listen address."""
    card_security: str = "bearer"
    """Security schemes the card declares, a comma list of ``bearer`` (a JWT at the public
    entry) and ``mtls`` (Istio mode: partners' mesh certificates)
    (``SPECMESH_CARD_SECURITY``)."""

    @field_validator("card_security")
    @classmethod
    def _security(cls, value: str) -> str:
        parse_card_security(value)
        return value

    engine_uvloop: bool = True
    """Run on uvloop (``SPECMESH_ENGINE_UVLOOP=false``: asyncio's own loop); asyncio's
    loop when uvloop is not installed."""
    engine_drain_seconds: float = Field(default=10.0, ge=0)
    """How long turns in flight may finish after SIGTERM."""
    task_store: str = MEMORY
    """Where A2A tasks live: ``memory`` (this process, bounded) or ``redis://host:port/db``
    (shared by every replica; the sidecar's task-store proxy, no password)."""
    task_retention_seconds: int = Field(default=DEFAULT_RETENTION_SECONDS, gt=0)
    """How long a task not written is kept (Redis TTL, refreshed on every write)."""
    log_level: str = "INFO"
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    """OTLP collector; no export when unset."""
    otel_exporter_otlp_protocol: str = Field(
        default="http/protobuf", validation_alias="OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    """``grpc`` or ``http/protobuf``."""

    @field_validator("task_store")
    @classmethod
    def _check_task_store(cls, value: str) -> str:
        problem = check_task_store(value)
        if problem is not None:
            raise ValueError(f"SPECMESH_TASK_STORE {problem}")
        return value


def _parser(settings: ServeSettings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specmesh engine", description=__doc__.split("\n")[0])
    p.add_argument("--spec-dir", type=Path, default=None, help="run from a local spec folder")
    p.add_argument("--http", default=settings.engine_http, help="HTTP listen address")
    p.add_argument("--grpc", default=settings.engine_grpc, help="gRPC listen address")
    p.add_argument("--log-level", default=settings.log_level)
    return p


async def _open_runtime(stack: AsyncExitStack, spec_dir: Path | None) -> AgentRunner:
    """The engine's runtime over the sidecar's snapshots, or over ``spec_dir``.

    Imported here, not at the top: the runtime pulls in litellm and mcp (seconds).
    """
    from engine.hot_reload import EngineRuntime
    from engine.intake import DirSnapshotFeed, GrpcSnapshotFeed, SnapshotFeed
    from engine.settings import EngineSettings

    settings = EngineSettings()
    folder = spec_dir or settings.spec_dir
    feed: SnapshotFeed
    if folder is not None:
        feed = DirSnapshotFeed(
            folder, agent_name=settings.agent_name, poll_interval=settings.spec_poll_seconds
        )
    else:
        feed = GrpcSnapshotFeed(
            settings.sync_addr,
            agent_name=settings.agent_name,
            initial_backoff=settings.reconnect_initial_seconds,
            max_backoff=settings.sidecar_reconnect_max_seconds,
        )
    return await stack.enter_async_context(EngineRuntime(feed=feed, settings=settings))


async def serve(
    *,
    runner: AgentRunner,
    config: ServerConfig,
    stop: asyncio.Event,
    metrics: EngineMetrics | None = None,
    started: asyncio.Future[EngineServer] | None = None,
) -> None:
    """Serve ``runner`` until ``stop`` is set, then shut down gracefully.

    ``started`` receives the server once both listeners accept connections.
    """
    async with EngineServer(runner=runner, config=config, metrics=metrics) as server:
        # what start-up made (modules, the app, the listeners) lives as long as the
        # process: kept out of the collector's sight, full collections under load went
        # from up to ~130 ms to ~40 ms, and GC time per turn to a fifth (bench notes)
        gc.freeze()
        if started is not None:
            started.set_result(server)
        await stop.wait()
        logger.info("stop requested; shutting down")


RuntimeOpener = Callable[[AsyncExitStack, Path | None], Awaitable[AgentRunner]]
"""Opens the runtime on the stack (closed at exit) from an optional ``--spec-dir``."""


async def _run(
    args: argparse.Namespace,
    settings: ServeSettings,
    metrics: EngineMetrics,
    open_runtime: RuntimeOpener,
) -> int:
    http_host, http_port = parse_host_port(args.http, setting="--http", listen=True)
    grpc_host, grpc_port = parse_host_port(args.grpc, setting="--grpc", listen=True)
    config = ServerConfig(
        agent_name=settings.agent_name,
        http_host=http_host,
        http_port=http_port,
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        public_http_url=settings.engine_public_http_url,
        public_grpc_url=settings.engine_public_grpc_url,
        card_security=parse_card_security(settings.card_security),
        drain_timeout=settings.engine_drain_seconds,
        task_store=settings.task_store,
        task_retention_seconds=settings.task_retention_seconds,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with AsyncExitStack() as stack:
            runner = await open_runtime(stack, args.spec_dir)
            await serve(runner=runner, config=config, stop=stop, metrics=metrics)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return EXIT_OK


def _loop_factory(*, use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when wanted and installed; None: asyncio's default."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        logger.info("uvloop is not installed; running on asyncio's loop")
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None, *, open_runtime: RuntimeOpener | None = None) -> int:
    """Entry point of ``specmesh engine``; returns the exit code.

    ``open_runtime`` replaces the engine's runtime (tests serve a ScriptedRunner).
    """
    try:
        settings = ServeSettings()
    except ValidationError as e:
        sys.stderr.write(f"error: invalid engine settings: {e}\n")
        return EXIT_USAGE
    args = _parser(settings).parse_args(argv)
    configure_logging(level=str(args.log_level).upper())
    if not settings.agent_name:
        logger.error("AGENT_NAME is not set")
        return EXIT_USAGE
    try:
        parse_host_port(args.http, setting="--http", listen=True)
        parse_host_port(args.grpc, setting="--grpc", listen=True)
    except AddressError as e:
        logger.error("bad listen address: %s", e)
        return EXIT_USAGE
    telemetry = configure_telemetry(
        agent_name=settings.agent_name,
        otlp_endpoint=settings.otel_exporter_otlp_endpoint,
        otlp_protocol=settings.otel_exporter_otlp_protocol,
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory(use_uvloop=settings.engine_uvloop)) as run:
            return run.run(_run(args, settings, telemetry.metrics, open_runtime or _open_runtime))
    except OSError as e:
        logger.error("cannot start the engine: %s", e)
        return EXIT_FAILED
    except Exception:
        logger.exception("the engine failed")
        return EXIT_FAILED
    finally:
        with contextlib.suppress(Exception):
            telemetry.shutdown()


if __name__ == "__main__":
    sys.exit(main())
