"""Tracing for the sidecar: proxied calls become spans in the caller's trace.

Exports over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (read by the settings);
otherwise spans are created and dropped. The resource names the agent
(``specmesh.agent.name``), as the engine's does, so the trace store attributes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["configure_tracing"]


def configure_tracing(*, agent: str, track: str, endpoint: str | None) -> TracerProvider | None:
    """Install the global tracer provider once, in the entry point; ``None`` when off."""
    if not endpoint:
        return None
    # the SDK and the exporter only when spans are exported (a sidecar without them keeps
    # ~3 MB less)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {
            "service.name": "specmesh-sidecar",
            "specmesh.agent.name": agent,
            "specmesh.track": track,
        }
    )
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider
