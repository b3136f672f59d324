"""The engine's servers: A2A over JSON-RPC, HTTP+JSON and gRPC, business REST, health.

::

    HTTP (uvicorn, one Starlette app)              gRPC (grpc.aio)
      POST /v1/invoke, /v1/invoke/stream  rest.py    lf.a2a.v1.A2AService   GrpcHandler
      GET  /healthz, /readyz                         grpc.health.v1.Health  NOT_SERVING
      GET  /.well-known/agent-card.json   card.py                           until ready
      POST /                  A2A JSON-RPC           reflection
      /v1/message:send ...    A2A HTTP+JSON
                 \\                                   /
                  +-- DefaultRequestHandlerV2 -------+  user = the caller the sidecar
                          |                            named (callers.py)
                          +-- task store (tasks.py): memory, or Redis shared
                          |   by every replica (+ its event stream)
                          EngineAgentExecutor (a2a_executor.py)
                                    |
                         _ServingRunner (readiness, drain, metrics)
                                    |
                             AgentRunner (the runtime)

:class:`EngineServer` is an async context manager: entering binds both listeners and
starts serving; leaving shuts down gracefully -- readiness and gRPC health go
NOT_SERVING, the listeners stop accepting, turns in flight get ``drain_timeout`` seconds
to finish, then whatever is left is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType

import grpc
import uvicorn
from a2a.server.cluster import TaskEventStream, VersionedTaskStore
from a2a.server.context import ServerCallContext
from a2a.server.events import Event
from a2a.server.request_handlers import DefaultRequestHandlerV2, GrpcHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import TaskStore
from a2a.types import a2a_pb2, a2a_pb2_grpc
from a2a.types.a2a_pb2 import AgentCard
from a2a.utils.errors import A2A_ERROR_REASONS, A2AError, InternalError
from a2a.utils.grpc_status import status_to_grpc
from google.protobuf import any_pb2
from google.rpc import (  # type: ignore[import-untyped]  # googleapis-common-protos: no stubs
    error_details_pb2,
    status_pb2,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from engine.a2a_executor import STREAMING_STATE, EngineAgentExecutor
from engine.callers import CallerContextBuilder, GrpcCallerContextBuilder
from engine.card import DEFAULT_SECURITY, CardSource, CardUrls
from engine.errors import TaskStoreError
from engine.json_numbers import IntegralNumbersMiddleware
from engine.knowledge.rest import KnowledgeSource, create_knowledge_routes
from engine.rest import ConversationDeleter, create_business_routes
from engine.tasks import (
    DEFAULT_RETENTION_SECONDS,
    MEMORY,
    MemoryTaskStore,
    RedisTaskEventStream,
    RedisTaskStore,
    connect_redis,
)
from engine.telemetry import EngineMetrics, TraceContextInterceptor, TraceContextMiddleware
from engine.turn_protocol import (
    AgentRunner,
    CardInfo,
    NotifiesChanges,
    TurnCompleted,
    TurnEvent,
    TurnFailed,
    TurnRequest,
    not_ready_reason,
)
from specmesh.addresses import local_url_host
from specmesh.aio import cancel_and_wait
from specmesh.uvicorn_server import QuietUvicornServer, bind_tcp

__all__ = ["A2A_SERVICE", "EngineServer", "ServerConfig"]

logger = logging.getLogger(__name__)

A2A_SERVICE = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"].full_name
"""The gRPC service name, also the gRPC health service name of the A2A endpoint."""
HTTP_JSON_PREFIX = "/v1"
_UNTRACED_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Where the engine listens and how it is reached."""

    agent_name: str
    http_host: str = "127.0.0.1"
    http_port: int = 7103
    """0 picks a free port (tests)."""
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 7104
    """0 picks a free port (tests)."""
    public_http_url: str | None = None
    """Base URL callers use for HTTP (the card's JSON-RPC and HTTP+JSON URLs); default:
    the listen address."""
    public_grpc_url: str | None = None
    """gRPC target callers use (the card's gRPC URL); default: the listen address."""
    card_security: tuple[str, ...] = DEFAULT_SECURITY
    """Security schemes the card declares (what the public entry accepts)."""
    drain_timeout: float = 10.0
    """Seconds turns in flight get to finish on shutdown."""
    readiness_interval: float = 0.2
    """How often gRPC health follows the runner's readiness."""
    card_cache_control: str = "public, max-age=60"
    """``Cache-Control`` of the agent card (with its ``ETag``, revalidation costs a 304);
    a hot reload reaches a client that cached the card within ``max-age``."""
    task_store: str = MEMORY
    """``memory`` (this process, bounded) or ``redis://host:port/db`` (shared by every
    replica; the sidecar's task-store proxy), see :mod:`engine.tasks`."""
    task_retention_seconds: int = DEFAULT_RETENTION_SECONDS
    """How long a task not written is kept."""


_READINESS_RECHECK = 30.0
"""Seconds between two readiness checks when the runner announces its changes (a bound,
not the way changes arrive)."""


def _readiness_changed(runner: AgentRunner, *, serving: bool | None) -> bool:
    return runner.ready != serving


class _Drain:
    """Turns in flight and whether new ones are still accepted."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _ServingRunner:
    """The runner as the servers use it: refuses turns when not ready or draining,
    counts turns in flight and records their metrics."""

    def __init__(
        self, *, inner: AgentRunner, drain: _Drain, metrics: EngineMetrics, transport: str
    ) -> None:
        self._inner = inner
        self._drain = drain
        self._metrics = metrics
        self._transport = transport

    @property
    def ready(self) -> bool:
        return self._inner.ready and not self._drain.draining

    def not_ready_reason(self) -> str | None:
        if self._drain.draining:
            return "the agent is shutting down"
        return not_ready_reason(self._inner)

    def card_info(self) -> CardInfo | None:
        return self._inner.card_info()

    async def run(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        if self._drain.draining:
            yield TurnFailed(code="unavailable", message="the agent is shutting down")
            return
        reason = not_ready_reason(self._inner)
        if reason is not None:
            yield TurnFailed(code="not_ready", message=reason)
            return
        start = time.perf_counter()
        outcome, usage = "cancelled", {}
        with self._drain.turn():
            events = self._inner.run(request)
            try:
                async for event in events:
                    if isinstance(event, TurnCompleted):
                        outcome, usage = "completed", dict(event.usage)
                        if event.model:
                            self._metrics.record_cost(
                                model=event.model,
                                prompt_tokens=int(usage.get("prompt_tokens", 0) or 0),
                                completion_tokens=int(usage.get("completion_tokens", 0) or 0),
                                cost=event.cost,
                            )
                    elif isinstance(event, TurnFailed):
                        outcome = "failed"
                    yield event
                    if outcome != "cancelled":
                        return
            finally:
                self._metrics.record_turn(
                    seconds=time.perf_counter() - start,
                    outcome=outcome,
                    transport=self._transport,
                    usage=usage,
                )
                close = getattr(events, "aclose", None)
                if close is not None:
                    await close()


class EngineServer:
    """Both listeners of one engine, over one :class:`~engine.turn_protocol.AgentRunner`."""

    def __init__(
        self,
        *,
        runner: AgentRunner,
        config: ServerConfig,
        metrics: EngineMetrics | None = None,
        task_store: TaskStore | VersionedTaskStore | None = None,
        event_stream: TaskEventStream | None = None,
    ) -> None:
        """``task_store`` / ``event_stream`` replace the store ``config.task_store``
        names (the caller then closes them)."""
        self._runner = runner
        self._config = config
        self._metrics = metrics or EngineMetrics(agent_name=config.agent_name)
        self._task_store = task_store
        self._event_stream = event_stream
        self._redis_store: RedisTaskStore | None = None
        self._drain = _Drain()
        self._http: QuietUvicornServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._watcher: asyncio.Task[None] | None = None
        self._prices: asyncio.Future[int] | None = None
        self._handler: DefaultRequestHandlerV2 | None = None
        self._stopped = False
        self.http_port = 0
        self.grpc_port = 0
        self.card_source: CardSource | None = None

    # ------------------------------------------------------------ addresses

    @property
    def http_url(self) -> str:
        """The HTTP listener's base URL, e.g. ``http://127.0.0.1:7103``."""
        return f"http://{local_url_host(self._config.http_host)}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        """The gRPC listener's target, e.g. ``127.0.0.1:7104``."""
        return f"{local_url_host(self._config.grpc_host)}:{self.grpc_port}"

    @property
    def ready(self) -> bool:
        """Ready to take turns: a spec is loaded and the server is not draining."""
        return self._runner.ready and not self._drain.draining

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> EngineServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind both listeners and serve; returns once both accept connections."""
        cfg = self._config
        sock = bind_tcp(cfg.http_host, cfg.http_port)
        try:
            self.http_port = sock.getsockname()[1]
            grpc_server = grpc.aio.server(interceptors=[TraceContextInterceptor()])
            self.grpc_port = grpc_server.add_insecure_port(f"{cfg.grpc_host}:{cfg.grpc_port}")
            if self.grpc_port == 0:
                raise OSError(f"cannot listen for gRPC on {cfg.grpc_host}:{cfg.grpc_port}")
        except BaseException:
            sock.close()
            raise

        public_http = (cfg.public_http_url or self.http_url).rstrip("/")
        self.card_source = CardSource(
            card_info=self._runner.card_info,
            urls=CardUrls(
                jsonrpc=f"{public_http}/",
                http_json=f"{public_http}{HTTP_JSON_PREFIX}",
                grpc=cfg.public_grpc_url or self.grpc_target,
            ),
            agent_name=cfg.agent_name,
            security=cfg.card_security,
        )
        a2a_runner = _ServingRunner(
            inner=self._runner, drain=self._drain, metrics=self._metrics, transport="a2a"
        )
        rest_runner = _ServingRunner(
            inner=self._runner, drain=self._drain, metrics=self._metrics, transport="rest"
        )
        task_store, event_stream = self._open_task_store()
        handler = _RequestHandler(
            card_source=self.card_source,
            agent_executor=EngineAgentExecutor(runner=a2a_runner),
            task_store=task_store,
            event_stream=event_stream,
            agent_card=self.card_source.card,
        )
        self._handler = handler

        # gRPC: A2A, health (NOT_SERVING until ready), reflection
        a2a_pb2_grpc.add_A2AServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _GrpcHandler(handler, context_builder=GrpcCallerContextBuilder()), grpc_server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, grpc_server)
        await self._set_health(serving=False)
        reflection.enable_server_reflection(
            (
                A2A_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            grpc_server,
        )
        await grpc_server.start()
        self._grpc = grpc_server

        # HTTP: business REST and health first (a2a's HTTP+JSON tenant mount matches any
        # /<segment>/... path), then the card, JSON-RPC and HTTP+JSON
        card_source = self.card_source

        async def card_modifier(_: AgentCard) -> AgentCard:
            if not card_source.ready:
                raise HTTPException(503, "the agent has no valid spec loaded yet")
            return card_source.current()

        routes: list[BaseRoute] = [
            *create_business_routes(
                runner=rest_runner,
                conversations=(
                    self._runner if isinstance(self._runner, ConversationDeleter) else None
                ),
            ),
            *(
                create_knowledge_routes(source=self._runner)
                if isinstance(self._runner, KnowledgeSource)
                else ()
            ),
            *create_agent_card_routes(
                card_source.card,
                card_modifier=card_modifier,
                cache_control=cfg.card_cache_control,
            ),
            *create_jsonrpc_routes(handler, "/", context_builder=CallerContextBuilder()),
            *create_rest_routes(
                handler, path_prefix=HTTP_JSON_PREFIX, context_builder=CallerContextBuilder()
            ),
        ]
        app = Starlette(
            routes=routes,
            middleware=[
                Middleware(TraceContextMiddleware, skip_paths=_UNTRACED_PATHS),
                Middleware(IntegralNumbersMiddleware),  # 1, not 1.0, in A2A metadata
            ],
        )
        server = QuietUvicornServer(
            uvicorn.Config(
                app,
                host=cfg.http_host,
                port=self.http_port,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=max(math.ceil(cfg.drain_timeout), 1),
            )
        )
        self._http = server
        self._http_task = asyncio.create_task(server.serve(sockets=[sock]), name="engine-http")
        self._watcher = asyncio.create_task(self._follow_readiness(), name="engine-readiness")
        # the price map (litellm's JSON file, ~40 ms) is read off the loop before the
        # first turn needs it
        self._prices = asyncio.ensure_future(asyncio.to_thread(self._metrics.prices.load))
        logger.info(
            "engine serving",
            extra={"http": self.http_url, "grpc": self.grpc_target, "agent": cfg.agent_name},
        )

    def _open_task_store(
        self,
    ) -> tuple[TaskStore | VersionedTaskStore, TaskEventStream | None]:
        """The task store given, else the one ``config.task_store`` names."""
        cfg = self._config
        if self._task_store is not None:
            return self._task_store, self._event_stream
        if cfg.task_store == MEMORY:
            return MemoryTaskStore(retention_seconds=cfg.task_retention_seconds), None
        client = connect_redis(cfg.task_store)
        self._redis_store = RedisTaskStore(
            client=client,
            agent_name=cfg.agent_name,
            retention_seconds=cfg.task_retention_seconds,
        )
        stream = RedisTaskEventStream(
            client=client,
            agent_name=cfg.agent_name,
            retention_seconds=cfg.task_retention_seconds,
        )
        return self._redis_store, stream

    async def _set_health(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set("", status)
        await self._health.set(A2A_SERVICE, status)

    async def _follow_readiness(self) -> None:
        """Keep gRPC health equal to readiness: woken by the runner's changes when it
        announces them (``EngineRuntime`` does: nothing runs at rest), else polled every
        ``readiness_interval``. Draining ends this task (``stop``)."""
        runner = self._runner
        serving: bool | None = None
        while True:
            ready = self.ready
            if ready != serving:
                await self._set_health(serving=ready)
                logger.info("readiness changed", extra={"ready": ready})
                serving = ready
            if isinstance(runner, NotifiesChanges):
                changed = functools.partial(_readiness_changed, serving=serving)
                with contextlib.suppress(TimeoutError):
                    await runner.wait_until(changed, timeout=_READINESS_RECHECK)
            else:
                await asyncio.sleep(self._config.readiness_interval)

    async def stop(self) -> None:
        """Graceful shutdown, bounded by ``drain_timeout`` (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        grace = self._config.drain_timeout
        self._drain.draining = True
        await cancel_and_wait(self._watcher)
        await self._health.enter_graceful_shutdown()
        logger.info("draining", extra={"in_flight": self._drain.in_flight, "grace_s": grace})

        waits: list[asyncio.Future[object]] = []
        if self._http is not None:
            self._http.should_exit = True  # stops accepting; waits for open responses
        if self._grpc is not None:
            waits.append(asyncio.ensure_future(self._grpc.stop(grace)))
        try:
            await asyncio.wait_for(self._drain.wait_idle(), grace)
        except TimeoutError:
            logger.warning(
                "drain timed out; cancelling turns in flight",
                extra={"in_flight": self._drain.in_flight},
            )
        if self._handler is not None:
            # cancels what is left of the turns; bounded: a2a-sdk 1.3's ActiveTask can
            # deadlock (producer joining the queue its cancelled consumer no longer
            # drains) when a turn is cancelled while its consumer awaits the task store
            try:
                await asyncio.wait_for(self._handler.aclose(), max(grace, 1.0))
            except TimeoutError:
                logger.warning("the A2A handler did not close in time; leaving it")
        if self._http_task is not None:
            waits.append(self._http_task)  # type: ignore[arg-type]
        for result in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                logger.error("server stopped with an error: %r", result)
        if self._redis_store is not None:
            await self._redis_store.aclose()
        if self._prices is not None:
            await asyncio.gather(self._prices, return_exceptions=True)
        logger.info("engine stopped")


class _RequestHandler(DefaultRequestHandlerV2):
    """The SDK's handler, refreshing the card it checks capabilities against first."""

    def __init__(self, *, card_source: CardSource, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._card_source = card_source

    async def on_message_send(
        self, params: a2a_pb2.SendMessageRequest, context: ServerCallContext
    ) -> a2a_pb2.Message | a2a_pb2.Task:
        if params.configuration.return_immediately:
            # the caller does not wait: the answer grows in the task as it comes, for
            # GetTask pollers and SubscribeToTask followers; a waiting caller gets it whole
            context.state[STREAMING_STATE] = True
        answer: a2a_pb2.Message | a2a_pb2.Task = await super().on_message_send(params, context)
        return answer

    async def on_message_send_stream(
        self, params: a2a_pb2.SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        self._card_source.current()  # capabilities.streaming follows the spec
        context.state[STREAMING_STATE] = True  # the model is streamed for this caller
        async for event in super().on_message_send_stream(params, context):
            yield event


class _GrpcHandler(GrpcHandler):
    """The SDK's gRPC handler; a failing task store is ``UNAVAILABLE`` (retryable), not
    ``INTERNAL``. The error stays the SDK's ``InternalError`` (its ``ErrorInfo`` reason,
    so clients map it as on the other bindings); the cause marks it as the store's."""

    async def abort_context(self, error: A2AError, context: grpc.aio.ServicerContext) -> None:
        if not (isinstance(error, InternalError) and isinstance(error.__cause__, TaskStoreError)):
            await super().abort_context(error, context)
            return
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ErrorInfo(
                reason=A2A_ERROR_REASONS[InternalError], domain="a2a-protocol.org"
            )
        )
        status = status_pb2.Status(
            code=grpc.StatusCode.UNAVAILABLE.value[0], message=error.message, details=[info]
        )
        rich = status_to_grpc(status)
        trailing = tuple(context.trailing_metadata() or ())
        context.set_trailing_metadata((*trailing, *rich.trailing_metadata))
        await context.abort(rich.code, rich.details)
