"""OpenTelemetry for the engine: providers, inbound trace context, turn metrics.

- :func:`configure_telemetry` sets the global tracer and meter providers once, in the
  entry point: resource ``service.name=specmesh-engine`` plus the agent name; an OTLP
  exporter only when an endpoint is configured (the exporter itself reads the other
  standard ``OTEL_EXPORTER_OTLP_*`` variables); otherwise spans and metrics stay in
  process.
- :class:`TraceContextMiddleware` (ASGI) and :class:`TraceContextInterceptor`
  (``grpc.aio``) continue a caller's W3C trace context (``traceparent``/``tracestate``)
  with one SERVER span per request. a2a-sdk's own ``telemetry`` extra only decorates its
  request handler methods with spans; it does not extract inbound context, so these do,
  and the SDK's spans (and the runtime's ``invoke_agent`` span) nest under them.
- :class:`EngineMetrics`: token usage, cost and turn latency.
- :func:`install_memory_exporter` for tests.

No message content and no header value other than trace context goes on a span.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specmesh.prices import PriceMap, default_price_map

__all__ = [
    "SERVICE_NAME",
    "EngineMetrics",
    "Telemetry",
    "TraceContextInterceptor",
    "TraceContextMiddleware",
    "configure_telemetry",
    "cost_usd",
    "install_memory_exporter",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = "specmesh-engine"
AGENT_NAME_ATTRIBUTE = "specmesh.agent.name"
_INSTRUMENTATION = "specmesh.engine"


def _resource(agent_name: str) -> Resource:
    return Resource.create({"service.name": SERVICE_NAME, AGENT_NAME_ATTRIBUTE: agent_name})


@dataclass(frozen=True)
class Telemetry:
    """The providers :func:`configure_telemetry` installed."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    metrics: EngineMetrics

    def shutdown(self) -> None:
        """Flush and stop the exporters (bounded by the SDK's own timeouts)."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def configure_telemetry(
    *,
    agent_name: str,
    otlp_endpoint: str | None = None,
    otlp_protocol: str = "http/protobuf",
    metric_readers: tuple[MetricReader, ...] = (),
) -> Telemetry:
    """Install global tracer and meter providers for this process (call once).

    ``otlp_endpoint`` is ``OTEL_EXPORTER_OTLP_ENDPOINT`` as read by the settings; when it
    is set, spans and metrics are exported over OTLP (``grpc`` or ``http/protobuf``).
    """
    resource = _resource(agent_name)
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = list(metric_readers)
    if otlp_endpoint:
        if otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            tracer_provider.add_span_processor(BatchSpanProcessor(GrpcSpanExporter()))
            readers.append(PeriodicExportingMetricReader(GrpcMetricExporter()))
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )

            tracer_provider.add_span_processor(BatchSpanProcessor(HttpSpanExporter()))
            readers.append(PeriodicExportingMetricReader(HttpMetricExporter()))
        logger.info("exporting telemetry over OTLP (%s)", otlp_protocol)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        metrics=EngineMetrics(
            meter=meter_provider.get_meter(_INSTRUMENTATION), agent_name=agent_name
        ),
    )


def install_memory_exporter(agent_name: str = "test-agent") -> InMemorySpanExporter:
    """Record every span of this process in memory (tests).

    Adds to the global SDK tracer provider if one is installed, else installs one.
    """
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=_resource(agent_name))
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def _tracer() -> Tracer:
    return trace.get_tracer(_INSTRUMENTATION)


# ---------------------------------------------------------------- inbound trace context


class TraceContextMiddleware:
    """ASGI middleware: one SERVER span per HTTP request, continuing the caller's trace."""

    def __init__(self, app: ASGIApp, *, skip_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self._skip = skip_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self._skip:
            await self.app(scope, receive, send)
            return
        carrier = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        parent = propagate.extract(carrier)
        method = scope.get("method", "HTTP")
        path = scope.get("path", "")
        with _tracer().start_as_current_span(
            f"{method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        ) as span:

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_wrapper)
            route = _route_of(path, scope.get("path_params") or {})
            span.set_attribute("http.route", route)
            span.update_name(f"{method} {route}")


def _route_of(path: str, params: Mapping[str, Any]) -> str:
    """``/v1/tasks/abc:cancel`` with ``{"id": "abc"}`` -> ``/v1/tasks/{id}:cancel`` (low
    cardinality span names)."""
    for name, value in params.items():
        if isinstance(value, str) and value:
            path = path.replace(value, "{" + name + "}", 1)
    return path


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    return {
        str(k).lower(): v
        for k, v in (details.invocation_metadata or ())
        if isinstance(v, str)  # binary (-bin) values carry no trace context
    }


class TraceContextInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """``grpc.aio`` interceptor: one SERVER span per A2A RPC, continuing the caller's trace.

    Unary and server-streaming handlers are wrapped; health and reflection are not traced.
    """

    _UNTRACED = ("/grpc.health.", "/grpc.reflection.")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method or "")
        if handler is None or method.startswith(self._UNTRACED):
            return handler
        parent = propagate.extract(_metadata(handler_call_details))
        service, _, rpc = method.lstrip("/").partition("/")
        name = f"{service}/{rpc}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def traced_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with _tracer().start_as_current_span(
                    name, context=parent, kind=SpanKind.SERVER, attributes=attributes
                ):
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                traced_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            stream = handler.unary_stream

            async def traced_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                with _tracer().start_as_current_span(
                    name, context=parent, kind=SpanKind.SERVER, attributes=attributes
                ):
                    async for response in stream(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                traced_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


# ---------------------------------------------------------------- metrics


def cost_usd(
    model: str, *, prompt_tokens: int, completion_tokens: int, prices: PriceMap | None = None
) -> float:
    """The price of a model call from litellm's price map; 0.0 for an unknown model.

    The map is litellm's own JSON file, read without importing litellm
    (:mod:`specmesh.prices`: ~40 ms once, against seconds and ~160 MB for the import).
    """
    return (prices or default_price_map()).cost(
        model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
    )


class EngineMetrics:
    """Token usage, cost and turn latency, tagged with the agent name."""

    def __init__(
        self, *, meter: Meter | None = None, agent_name: str = "", prices: PriceMap | None = None
    ) -> None:
        """``prices``: the price map costs come from (default: litellm's file)."""
        meter = meter or metrics.get_meter(_INSTRUMENTATION)
        self._agent = agent_name
        self.prices = prices or default_price_map()
        self._tokens = meter.create_counter(
            "specmesh.agent.tokens",
            unit="{token}",
            description="Model tokens used by turns, by gen_ai.token.type (input/output).",
        )
        self._cost = meter.create_counter(
            "specmesh.agent.cost",
            unit="USD",
            description="Model cost of turns' own calls, at the model part's price or litellm's "
            "map (an unpriced model adds 0 here; spans and answers flag it).",
        )
        self._duration = meter.create_histogram(
            "specmesh.agent.turn.duration",
            unit="s",
            description="Wall time of one turn, from request to final answer or failure.",
        )

    def _attrs(self, **extra: str) -> dict[str, str]:
        return {"gen_ai.agent.name": self._agent, **extra}

    def record_turn(
        self, *, seconds: float, outcome: str, transport: str, usage: Mapping[str, int]
    ) -> None:
        """One finished turn: ``outcome`` is completed, failed or cancelled."""
        self._duration.record(seconds, self._attrs(outcome=outcome, transport=transport))
        prompt = int(usage.get("prompt_tokens", 0) or 0)
        completion = int(usage.get("completion_tokens", 0) or 0)
        if prompt:
            self._tokens.add(prompt, self._attrs(**{"gen_ai.token.type": "input"}))
        if completion:
            self._tokens.add(completion, self._attrs(**{"gen_ai.token.type": "output"}))

    def record_cost(
        self,
        *,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost: Mapping[str, Any] | None = None,
    ) -> float:
        """Add one turn's own model cost; returns it. ``cost``: the turn's ledger
        (:mod:`engine.ledger`, priced per call with the spec's prices): its ``ownUsd``;
        without it the turn's tokens are priced at ``model``'s price in the map."""
        own = cost.get("ownUsd") if cost is not None else None
        if isinstance(own, int | float):
            usd = float(own)
        else:
            usd = cost_usd(
                model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                prices=self.prices,
            )
        if usd:
            self._cost.add(usd, self._attrs(**{"gen_ai.request.model": model}))
        return usd


class TurnTimer:
    """Measures one turn for :meth:`EngineMetrics.record_turn`."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start
