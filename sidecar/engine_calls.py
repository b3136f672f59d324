"""The calls the sidecar relays to its own engine, counted by revision and outcome.

Every call the inbound (HTTP and gRPC) and the public entry (HTTP and gRPC) send to the
engine beside them is counted here -- never a call the entry forwards to another instance
(that instance's inbound counts it). Release analysis reads these figures from every
instance's ``/metrics`` (``control_plane/sidecar_metrics.py``): they are what the sidecar
saw, not what the engine says of itself. Two metrics on the sidecar's registry::

    specmesh_sidecar_engine_requests_total{revision, kind, outcome}
    specmesh_sidecar_engine_request_duration_seconds{revision, kind}   (histogram)

``revision`` is the agent revision of the snapshot the sidecar holds when the call starts
(the revision its track serves). ``kind`` is ``message`` for an A2A turn (JSON-RPC
``SendMessage`` / ``SendStreamingMessage``, HTTP+JSON ``message:send|:stream``, the business
``/v1/invoke[/stream]``, gRPC ``SendMessage`` / ``SendStreamingMessage``), ``other`` for
anything else (the card, ``GetTask``...). ``outcome``:

* ``ok``: the engine answered, and a turn's answer is not a failed task;
* ``client_error``: a 4xx, a gRPC status naming the caller's mistake, a JSON-RPC error
  other than ``-32603`` -- the engine answered, the caller was wrong;
* ``http_5xx``: the engine answered 5xx;
* ``grpc_error``: the engine ended a gRPC call with ``INTERNAL``, ``UNKNOWN``,
  ``UNAVAILABLE``, ``DATA_LOSS`` or ``UNIMPLEMENTED``;
* ``a2a_error``: the answer is a task in ``TASK_STATE_FAILED`` (the last state of a stream)
  or a JSON-RPC ``-32603`` internal error;
* ``timeout``: no answer (or no next chunk) within the listener's read timeout, or a gRPC
  ``DEADLINE_EXCEEDED``;
* ``unreachable``: the engine refused or dropped the connection (a dead engine), or broke a
  stream mid-way;
* ``cancelled``: the caller left before the end (not the engine's fault: not an error).

The duration runs from the call's start to the end of its answer (a stream's last event);
a cancelled call's is not observed.
A2A bodies are read as they pass, without holding the answer back: a JSON answer of at most
:data:`MAX_INSPECTED` bytes is parsed once complete, an event stream line by line (lines
longer than that are skipped), gRPC messages as they are relayed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any, Literal

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = [
    "DURATION_BUCKETS",
    "ERROR_OUTCOMES",
    "MAX_INSPECTED",
    "EngineCall",
    "EngineCalls",
    "http_kind",
]

Outcome = Literal[
    "ok",
    "client_error",
    "http_5xx",
    "grpc_error",
    "a2a_error",
    "timeout",
    "unreachable",
    "cancelled",
]
ERROR_OUTCOMES: frozenset[str] = frozenset(
    {"http_5xx", "grpc_error", "a2a_error", "timeout", "unreachable"}
)
"""Outcomes that count as a failed call (the engine's fault)."""

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
"""Upper bounds (seconds) of the duration histogram: a turn with a model takes 0.05 s to a
few minutes; a p95 read from it is known to within its bucket (docs/analysis.md)."""

MAX_INSPECTED = 256 * 1024
"""Largest JSON answer (or event-stream line) read for an A2A failure."""

_SEND_METHODS = frozenset({"SendMessage", "SendStreamingMessage"})
_SEND_PATH = re.compile(r"^(?:/[^/]+)?/v1/(?:message:(?:send|stream)|invoke(?:/stream)?)$")
_JSONRPC_METHOD = re.compile(rb'"method"\s*:\s*"(SendMessage|SendStreamingMessage)"')
_FAILED = "TASK_STATE_FAILED"
_INTERNAL_JSONRPC = -32603
_SERVER_CODES = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def http_kind(method: str, path: str, body: bytes | None) -> str:
    """``message`` for an A2A turn over HTTP, else ``other``."""
    if method != "POST":
        return "other"
    if _SEND_PATH.match(path):
        return "message"
    if body and _JSONRPC_METHOD.search(body[:4096]):
        return "message"
    return "other"


def _failed_state(document: Any) -> bool:
    """Whether an A2A answer (JSON: a Task, a StreamResponse, a SendMessageResponse, or
    either inside a JSON-RPC ``result``) reports a failed task."""
    if not isinstance(document, dict):
        return False
    result = document.get("result", document)
    if not isinstance(result, dict):
        return False
    for holder in (result.get("task"), result.get("statusUpdate"), result):
        if isinstance(holder, dict):
            status = holder.get("status")
            if isinstance(status, dict) and status.get("state") == _FAILED:
                return True
    return False


def _jsonrpc_error(document: Any) -> str | None:
    """The outcome of a JSON-RPC error answer; None when it is none."""
    if not isinstance(document, dict) or "error" not in document:
        return None
    error = document["error"]
    code = error.get("code") if isinstance(error, dict) else None
    return "a2a_error" if code == _INTERNAL_JSONRPC else "client_error"


class EngineCall:
    """One call to the engine, from its start; :meth:`finish` records it once."""

    def __init__(self, calls: EngineCalls, revision: int, kind: str) -> None:
        self._calls = calls
        self._revision = revision
        self.kind = kind
        self._started = time.monotonic()
        self._done = False
        self._body = bytearray()
        self._read = False
        self._overflow = False
        self._stream = False
        self._line = bytearray()
        self._a2a: str | None = None
        self._code: grpc.StatusCode | None = None
        self.broken: str | None = None

    # HTTP ----------------------------------------------------------------

    def begin_body(self, content_type: str) -> None:
        """The answer's headers arrived: read its body when it is a turn's JSON."""
        self._stream = content_type.startswith("text/event-stream")
        self._read = self.kind == "message" and (self._stream or "json" in content_type)

    def feed(self, chunk: bytes) -> None:
        """A chunk of the answer, as relayed."""
        if not self._read or self._overflow:
            return
        if self._stream:
            self._feed_stream(chunk)
        elif len(self._body) + len(chunk) > MAX_INSPECTED:
            self._overflow = True
            self._body.clear()
        else:
            self._body += chunk

    def _feed_stream(self, chunk: bytes) -> None:
        self._line += chunk
        while True:
            end = self._line.find(b"\n")
            if end < 0:
                if len(self._line) > MAX_INSPECTED:
                    self._line.clear()  # a huge line: skipped
                return
            line = bytes(self._line[:end]).strip()
            del self._line[: end + 1]
            if line.startswith(b"data:"):
                self._judge_json(line[5:])

    def _judge_json(self, text: bytes) -> None:
        try:
            document = json.loads(text)
        except ValueError:
            return
        error = _jsonrpc_error(document)
        if error is not None:
            self._a2a = error
        elif isinstance(document, dict) and self._stream:
            # a stream's state is its last status: a later one replaces an earlier failure
            result = document.get("result", document)
            if isinstance(result, dict) and ("statusUpdate" in result or "task" in result):
                self._a2a = "a2a_error" if _failed_state(document) else None
        elif _failed_state(document):
            self._a2a = "a2a_error"

    def finish_http(self, status: int) -> None:
        """The answer ended (relayed whole, or cut: :attr:`broken`)."""
        if self._read and not self._stream and not self._overflow and self._body:
            self._judge_json(bytes(self._body))
        outcome: str
        if self.broken is not None:
            outcome = self.broken
        elif status >= 500:
            outcome = "http_5xx"
        elif status >= 400:
            outcome = "client_error"
        elif self._a2a is not None:
            outcome = "a2a_error" if self._a2a == "a2a_error" else "client_error"
        else:
            outcome = "ok"
        self.finish(outcome)

    # gRPC ----------------------------------------------------------------

    def grpc_code(self, code: grpc.StatusCode) -> None:
        """The call's final status (the relay's report)."""
        self._code = code

    def grpc_message(self, message: bytes, *, streaming: bool) -> None:
        """A message the engine answered (serialized ``SendMessageResponse`` or, streaming,
        ``StreamResponse``); only turns are read."""
        if self.kind != "message":
            return
        from a2a.types import a2a_pb2
        from google.protobuf.message import DecodeError

        try:
            if streaming:
                event = a2a_pb2.StreamResponse.FromString(message)
                if event.HasField("status_update"):
                    state = event.status_update.status.state
                elif event.HasField("task"):
                    state = event.task.status.state
                else:
                    return
            else:
                answer = a2a_pb2.SendMessageResponse.FromString(message)
                if not answer.HasField("task"):
                    return
                state = answer.task.status.state
        except DecodeError:
            return
        self._a2a = "a2a_error" if state == a2a_pb2.TaskState.TASK_STATE_FAILED else None

    def finish_grpc(self) -> None:
        code = self._code
        outcome: str
        if code is None or code == grpc.StatusCode.CANCELLED:
            outcome = "cancelled"
        elif code == grpc.StatusCode.OK:
            outcome = "a2a_error" if self._a2a == "a2a_error" else "ok"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            outcome = "timeout"
        elif code in _SERVER_CODES:
            outcome = "grpc_error"
        else:
            outcome = "client_error"
        self.finish(outcome)

    # --------------------------------------------------------------------

    def finish(self, outcome: str) -> None:
        """Count the call once, with its duration from the start."""
        if self._done:
            return
        self._done = True
        self._calls.record(self._revision, self.kind, outcome, time.monotonic() - self._started)


class EngineCalls:
    """The two metrics, on ``registry``; ``revision()`` names the revision served now (0:
    no snapshot yet)."""

    def __init__(self, *, registry: CollectorRegistry, revision: Callable[[], int]) -> None:
        self._revision = revision
        self.requests = Counter(
            "specmesh_sidecar_engine_requests",
            "Calls relayed to this instance's engine, by revision served, kind and outcome",
            ["revision", "kind", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "specmesh_sidecar_engine_request_duration_seconds",
            "Time from a call to this instance's engine to the end of its answer",
            ["revision", "kind"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )

    def begin(self, kind: str) -> EngineCall:
        return EngineCall(self, self._revision(), kind)

    def begin_http(self, method: str, path: str, body: bytes | None) -> EngineCall:
        return self.begin(http_kind(method, path, body))

    def begin_grpc(self, method: str) -> EngineCall:
        return self.begin("message" if method in _SEND_METHODS else "other")

    def record(self, revision: int, kind: str, outcome: str, seconds: float) -> None:
        self.requests.labels(revision=str(revision), kind=kind, outcome=outcome).inc()
        if outcome != "cancelled":  # cut short by the caller: its duration says nothing
            self.duration.labels(revision=str(revision), kind=kind).observe(seconds)
