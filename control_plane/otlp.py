"""The OTLP/HTTP trace receiver: ``POST /v1/traces`` into a :class:`TraceStore`.

What it speaks (OTLP/HTTP 1.x, traces only):

- body: an ``ExportTraceServiceRequest`` as ``application/x-protobuf``, or as
  ``application/json`` in the OTLP JSON mapping (protobuf's JSON mapping, except that trace
  and span ids are hex strings; unknown fields are ignored, as the spec asks);
- ``Content-Encoding: gzip``: aiohttp's server inflates request bodies by default, and
  :class:`OtlpReceiver` inflates a body still compressed (a server run with
  ``auto_decompress=False``); either way the inflated size is bounded;
- answer: an ``ExportTraceServiceResponse`` in the request's encoding; spans whose ids are
  malformed are dropped and counted in ``partial_success``;
- errors: a ``google.rpc.Status`` in the request's encoding (JSON when the content type is
  not one of the two)::

      400  the body does not decode (bad protobuf, bad JSON, bad gzip)
      401  a token is configured and the request does not carry it
      413  the body (inflated) is larger than ``max_body_bytes``
      415  neither application/x-protobuf nor application/json
      503  the store failed (OTLP exporters retry on 503)

Forwarding (:class:`OtlpForwarder`): each request the receiver accepted is re-posted, as
received, to a real collector by a background task through a bounded queue. When the queue
is full the export is dropped and counted; a failing collector is logged; neither ever
delays or fails ingestion.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import aiohttp
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2  # type: ignore[import-untyped]  # googleapis-common-protos: no stubs
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from control_plane.traces import UNKNOWN_SERVICE, Span, SpanEvent, TraceStore
from specmesh.aio import cancel_and_wait

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "TRACES_PATH",
    "OtlpDecodeError",
    "OtlpForwarder",
    "OtlpReceiver",
    "build_otlp_app",
    "decode_export_request",
    "spans_from_request",
]

logger = logging.getLogger(__name__)

TRACES_PATH: Final = "/v1/traces"
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
_FORMATS: Final = {PROTOBUF: PROTOBUF, "application/protobuf": PROTOBUF, JSON: JSON}
_GZIP_MAGIC: Final = b"\x1f\x8b"
_MAX_TIME_NS: Final = 2**63 - 1  # what SQLite's INTEGER holds (year 2262)
_INVALID_ARGUMENT: Final = 3  # google.rpc.Code
_UNAUTHENTICATED: Final = 16
_UNAVAILABLE: Final = 14
_RESOURCE_EXHAUSTED: Final = 8


class OtlpDecodeError(ValueError):
    """A request body that is not an ``ExportTraceServiceRequest`` (answered with 400)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


# ---------------------------------------------------------------- decoding


def _hex_to_base64(value: Any, where: str) -> Any:
    if not isinstance(value, str) or not value:
        return value
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise OtlpDecodeError(f"{where}: must be a hex string (got {value[:40]!r})") from None


def _items(parent: Any, *names: str) -> list[Any]:
    for name in names:
        value = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(value, list):
            return value
    return []


def _ids_to_base64(document: Any) -> None:
    """OTLP JSON carries ids as hex; protobuf's JSON mapping reads bytes as base64."""
    id_keys = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")
    for r, resource_spans in enumerate(_items(document, "resourceSpans", "resource_spans")):
        for s, scope_spans in enumerate(_items(resource_spans, "scopeSpans", "scope_spans")):
            for i, span in enumerate(_items(scope_spans, "spans")):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                for obj in (span, *_items(span, "links")):
                    if not isinstance(obj, dict):
                        continue
                    for key in id_keys:
                        if key in obj:
                            obj[key] = _hex_to_base64(obj[key], f"{where}.{key}")


def decode_export_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """Decode a body of ``content_type`` (:data:`PROTOBUF` or :data:`JSON`)."""
    request = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError as e:
            raise OtlpDecodeError(f"body: not an OTLP ExportTraceServiceRequest ({e})") from e
        return request
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OtlpDecodeError(f"body: invalid JSON ({e})") from e
    if not isinstance(document, dict):
        raise OtlpDecodeError("body: must be a JSON object (an ExportTraceServiceRequest)")
    _ids_to_base64(document)
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise OtlpDecodeError(f"body: not an OTLP ExportTraceServiceRequest ({e})") from e
    return request


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if kind == "double_value" and not math.isfinite(value.double_value):
        return str(value.double_value)  # NaN and infinities are not JSON
    return getattr(value, kind)


def _attributes(pairs: Sequence[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _enum_name(enum: Any, number: int, prefix: str) -> str:
    try:
        return str(enum.Name(number)).removeprefix(prefix)
    except ValueError:
        return "UNSPECIFIED"


def _malformed(span: trace_pb2.Span) -> str | None:
    if len(span.trace_id) != 16 or not any(span.trace_id):
        return f"span {span.name!r}: trace id must be 16 bytes, not all zero"
    if len(span.span_id) != 8 or not any(span.span_id):
        return f"span {span.name!r}: span id must be 8 bytes, not all zero"
    if len(span.parent_span_id) not in (0, 8):
        return f"span {span.name!r}: parent span id must be 8 bytes or empty"
    if max(span.start_time_unix_nano, span.end_time_unix_nano) > _MAX_TIME_NS:
        return f"span {span.name!r}: a time is beyond {_MAX_TIME_NS} ns"
    return None


def spans_from_request(request: ExportTraceServiceRequest) -> tuple[list[Span], int, str]:
    """The request's spans, how many were rejected, and why (the last reason)."""
    spans: list[Span] = []
    rejected = 0
    reason = ""
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get("service.name")
        service_name = service if isinstance(service, str) and service else UNKNOWN_SERVICE
        agent = Span.agent_of(resource)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                bad = _malformed(s)
                if bad is not None:
                    rejected += 1
                    reason = bad
                    continue
                spans.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() if any(s.parent_span_id) else None,
                        name=s.name,
                        kind=_enum_name(trace_pb2.Span.SpanKind, s.kind, "SPAN_KIND_"),
                        start_ns=s.start_time_unix_nano,
                        end_ns=max(s.end_time_unix_nano, s.start_time_unix_nano),
                        status=_enum_name(
                            trace_pb2.Status.StatusCode, s.status.code, "STATUS_CODE_"
                        ),
                        status_message=s.status.message,
                        service_name=service_name,
                        agent=agent,
                        attributes=_attributes(s.attributes),
                        events=tuple(
                            SpanEvent(e.name, e.time_unix_nano, _attributes(e.attributes))
                            for e in s.events
                        ),
                        resource=resource,
                    )
                )
    return spans, rejected, reason


def _inflate(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise OtlpDecodeError(f"body: invalid gzip ({e})") from e
    if len(out) > limit:
        raise OtlpDecodeError(f"body: larger than {limit} bytes once inflated", status=413)
    if not inflater.eof:
        raise OtlpDecodeError("body: truncated gzip")
    return out


# ---------------------------------------------------------------- forwarding


@dataclass(frozen=True)
class _Export:
    body: bytes
    headers: Mapping[str, str]


class OtlpForwarder:
    """Re-posts accepted export bodies to a collector's ``/v1/traces``, in the background.

    An async context manager: entering starts the sending task, leaving gives queued
    exports up to ``drain_timeout`` seconds, then stops. :meth:`offer` never waits.
    """

    def __init__(
        self,
        *,
        url: str,
        headers: Mapping[str, str] | None = None,
        queue_size: int = 256,
        timeout: float = 10.0,
        drain_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._headers = dict(headers or {})
        self._queue: asyncio.Queue[_Export] = asyncio.Queue(maxsize=queue_size)
        self._timeout = timeout
        self._drain_timeout = drain_timeout
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.forwarded = 0
        self.failed = 0
        self.dropped = 0

    async def __aenter__(self) -> OtlpForwarder:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout), auto_decompress=False
        )
        self._task = asyncio.create_task(self._send_all(), name="otlp-forwarder")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await asyncio.wait_for(self._queue.join(), timeout=self._drain_timeout)
        except TimeoutError:
            logger.warning(
                "OTLP forwarding to %s: %d exports not sent at shutdown",
                self.url,
                self._queue.qsize(),
            )
        await cancel_and_wait(self._task)
        if self._session is not None:
            await self._session.close()

    def offer(self, body: bytes, *, content_type: str, content_encoding: str | None) -> bool:
        """Queue one export; ``False`` (and counted as dropped) when the queue is full."""
        headers = {**self._headers, "Content-Type": content_type}
        if content_encoding:
            headers["Content-Encoding"] = content_encoding
        try:
            self._queue.put_nowait(_Export(body, headers))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                logger.warning(
                    "OTLP forwarding to %s: queue full, %d exports dropped so far",
                    self.url,
                    self.dropped,
                )
            return False
        return True

    async def _send_all(self) -> None:
        assert self._session is not None
        while True:
            export = await self._queue.get()
            try:
                async with self._session.post(
                    self.url, data=export.body, headers=export.headers
                ) as response:
                    await response.read()
                    if response.status >= 300:
                        self._failed(f"HTTP {response.status}")
                    else:
                        self._sent()
            except (aiohttp.ClientError, TimeoutError) as e:
                self._failed(f"{type(e).__name__}: {e}")
            except Exception:  # top of the task: never let it die
                self.failed += 1
                logger.exception("OTLP forwarding to %s failed", self.url)
            finally:
                self._queue.task_done()

    def _failed(self, why: str) -> None:
        self.failed += 1
        if not self._failing:
            logger.warning("OTLP forwarding to %s failing: %s", self.url, why)
        else:
            logger.debug("OTLP forwarding to %s failed: %s", self.url, why)
        self._failing = True

    def _sent(self) -> None:
        self.forwarded += 1
        if self._failing:
            logger.info("OTLP forwarding to %s recovered", self.url)
        self._failing = False


# ---------------------------------------------------------------- the receiver


def _status_response(status: int, code: int, message: str, fmt: str) -> web.Response:
    body = status_pb2.Status(code=code, message=message)
    if fmt == PROTOBUF:
        return web.Response(status=status, body=body.SerializeToString(), content_type=PROTOBUF)
    return web.Response(status=status, text=json_format.MessageToJson(body), content_type=JSON)


class OtlpReceiver:
    """Handles ``POST /v1/traces``; see the module docstring."""

    def __init__(
        self,
        *,
        store: TraceStore,
        forwarder: OtlpForwarder | None = None,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.store = store
        self.forwarder = forwarder
        self._token = token
        self.max_body_bytes = max_body_bytes

    def routes(self) -> list[web.RouteDef]:
        """The receiver's routes, to add to an application. Metrics and logs are
        acknowledged and not kept (engines export all three to one OTLP endpoint; the
        Studio's store keeps spans, which carry the token usage)."""
        return [
            web.post(TRACES_PATH, self.handle),
            web.post("/v1/metrics", _acknowledge),
            web.post("/v1/logs", _acknowledge),
        ]

    def _authorized(self, authorization: str | None) -> bool:
        if self._token is None:
            return True
        expected = f"Bearer {self._token}".encode()
        return hmac.compare_digest(expected, (authorization or "").encode())

    async def handle(self, request: web.Request) -> web.Response:
        fmt = _FORMATS.get(request.content_type)
        if fmt is None:
            return _status_response(
                415,
                _INVALID_ARGUMENT,
                f"Content-Type must be {PROTOBUF} or {JSON} (got {request.content_type!r})",
                JSON,
            )
        if not self._authorized(request.headers.get("Authorization")):
            return _status_response(401, _UNAUTHENTICATED, "missing or wrong bearer token", fmt)
        encoding = request.headers.get("Content-Encoding", "").strip().lower() or None
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _status_response(
                413, _RESOURCE_EXHAUSTED, f"body: larger than {self.max_body_bytes} bytes", fmt
            )
        except web.RequestPayloadError as e:  # e.g. a broken gzip stream aiohttp inflates
            cause = e.__cause__
            detail = (
                cause.message
                if isinstance(cause, aiohttp.http_exceptions.HttpProcessingError)
                else " ".join(str(e).split())
            )
            return _status_response(400, _INVALID_ARGUMENT, f"body: cannot be read ({detail})", fmt)
        compressed = encoding == "gzip" and raw.startswith(_GZIP_MAGIC)
        try:
            spans, rejected, reason = await asyncio.to_thread(self._decode, raw, fmt, compressed)
        except OtlpDecodeError as e:
            code = _RESOURCE_EXHAUSTED if e.status == 413 else _INVALID_ARGUMENT
            return _status_response(e.status, code, e.message, fmt)
        try:
            await self.store.add_spans(spans)
        except Exception:  # top of the request: the exporter will retry on 503
            logger.exception("storing %d spans failed", len(spans))
            return _status_response(503, _UNAVAILABLE, "the trace store is unavailable", fmt)
        if self.forwarder is not None:
            self.forwarder.offer(
                raw, content_type=fmt, content_encoding="gzip" if compressed else None
            )
        if rejected:
            logger.warning("OTLP export: %d spans rejected (%s)", rejected, reason)
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = reason
        if fmt == PROTOBUF:
            return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)
        return web.Response(text=json_format.MessageToJson(response), content_type=JSON)

    def _decode(self, raw: bytes, fmt: str, compressed: bool) -> tuple[list[Span], int, str]:
        body = _inflate(raw, self.max_body_bytes) if compressed else raw
        return spans_from_request(decode_export_request(body, fmt))


def build_otlp_app(receiver: OtlpReceiver) -> web.Application:
    """An application serving only the receiver (for its own listener, e.g. ``:4318``)."""
    app = web.Application(client_max_size=receiver.max_body_bytes)
    app.add_routes(receiver.routes())
    return app


async def _acknowledge(request: web.Request) -> web.Response:
    """An empty (successful) export response for signals this receiver does not keep."""
    await request.read()
    if request.content_type == "application/json":
        return web.Response(body=b"{}", content_type="application/json")
    return web.Response(body=b"", content_type="application/x-protobuf")
