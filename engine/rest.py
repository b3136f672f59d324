"""Business REST endpoints, for applications that do not speak A2A.

::

    POST /v1/invoke         {"contextId"?: str, "message": str, "budgetUsd"?: number}
                            200 {"contextId", "answer", "revision", "promptVersion",
                                 "usage", "citations", "cost"}
    POST /v1/invoke/stream  same body; text/event-stream of events
                            delta {"text"} | tool_call {"callId", "name", "arguments"} |
                            tool_result {"callId", "name", "ok", "result"} |
                            done {same as /v1/invoke} | error {"code", "message", "revision"}
    DELETE /v1/conversations/{contextId}
                            204 forgotten, 404 unknown (or expired), 501 when the runner
                            keeps no conversations, 503 memory store unavailable
    GET  /healthz           200 while the process is up
    GET  /readyz            200 when a valid spec is loaded and the sidecar is connected,
                            else 503 {"status": "not ready", "reason"}

Errors are ``{"error": {"code", "message"}}``: 400 names the bad field
(``message: ...``), 503 when the agent is not ready (or draining), 500 when the turn
failed (its code and message are safe to show). ``X-Specmesh-Call-Depth`` is honoured
as on the A2A bindings.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.a2a_executor import CallDepthError, parse_call_depth, passed_on_headers
from engine.errors import MemoryStoreError
from engine.turn_protocol import (
    AgentRunner,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnCompleted,
    TurnFailed,
    TurnRequest,
    not_ready_reason,
)
from specmesh import jsonbounds

__all__ = [
    "ConversationDeleter",
    "InvokeRequest",
    "create_business_routes",
    "describe_validation_error",
    "error_response",
    "read_body",
]

logger = logging.getLogger(__name__)

_MAX_BODY = 1 << 20
_MAX_DEPTH = 16  # the body is one flat object; the bound keeps json.loads from recursing


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` when it is longer than ``limit`` bytes (read no
    further than that: a declared Content-Length over it is refused unread)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class InvokeRequest(BaseModel):
    """The body of ``POST /v1/invoke`` and ``POST /v1/invoke/stream``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    context_id: str | None = Field(default=None, alias="contextId", min_length=1, max_length=256)
    """The conversation; a new one is started when absent."""
    message: str = Field(min_length=1)
    """The user's message."""
    budget_usd: float | None = Field(default=None, alias="budgetUsd", ge=0, allow_inf_nan=False)
    """The most the request's chain may spend (as A2A metadata ``specmesh.budgetUsd``)."""


@runtime_checkable
class ConversationDeleter(Protocol):
    """What ``DELETE /v1/conversations/{contextId}`` needs (the engine runtime is one)."""

    async def delete_conversation(self, context_id: str) -> bool:
        """Forget the conversation; whether it existed."""
        ...


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    """The JSON error body of the business REST endpoints (503s say when to retry)."""
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers
    )


def describe_validation_error(error: ValidationError, *, show_input: bool = True) -> str:
    """``path: problem`` for each problem of a request body, joined by ``; ``."""
    problems = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "body"
        if item["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown field")
        elif item["type"] == "missing":
            problems.append(f"{path}: is required")
        else:
            got = f" (got {item.get('input')!r})" if show_input else ""
            problems.append(f"{path}: {item['msg'].lower()}{got}")
    return "; ".join(problems)


async def _parse(request: Request, runner: AgentRunner, *, stream: bool) -> TurnRequest | Response:
    """The turn to run, or the error response to send."""
    body = await read_body(request, _MAX_BODY)
    if body is None:
        return error_response(413, "too_large", f"body: must be at most {_MAX_BODY} bytes")
    try:
        data = jsonbounds.loads(body or b"null", max_depth=_MAX_DEPTH)
    except jsonbounds.JsonTooDeepError as e:
        return error_response(400, "invalid_json", f"body: {e}")
    except json.JSONDecodeError as e:
        return error_response(400, "invalid_json", f"body: is not valid JSON ({e.msg})")
    except UnicodeDecodeError:
        return error_response(400, "invalid_json", "body: is not UTF-8")
    if not isinstance(data, dict):
        return error_response(400, "invalid_request", "body: must be a JSON object")
    try:
        parsed = InvokeRequest.model_validate(data)
    except ValidationError as e:
        return error_response(400, "invalid_request", describe_validation_error(e))
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        depth = parse_call_depth(headers)
    except CallDepthError as e:
        return error_response(400, "invalid_request", str(e))
    reason = not_ready_reason(runner)
    if reason is not None:
        return error_response(503, "not_ready", reason)
    return TurnRequest(
        context_id=parsed.context_id or uuid.uuid4().hex,
        text=parsed.message,
        call_depth=depth,
        headers=passed_on_headers(headers),
        stream=stream,
        budget_usd=parsed.budget_usd,
    )


def _done(context_id: str, event: TurnCompleted) -> dict[str, Any]:
    return {
        "contextId": context_id,
        "answer": event.text,
        "revision": event.revision,
        "promptVersion": event.prompt_version,
        "usage": dict(event.usage),
        "citations": [dict(c) for c in event.citations],
        **({"cost": dict(event.cost)} if event.cost is not None else {}),
    }


def _failed(event: TurnFailed) -> JSONResponse:
    status = 503 if event.code in ("not_ready", "unavailable") else 500
    return error_response(status, event.code, event.message, revision=event.revision)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, default=str)}\n\n".encode()


def create_business_routes(
    *, runner: AgentRunner, conversations: ConversationDeleter | None = None
) -> list[Route]:
    """The business REST and health routes over ``runner`` (``runner.ready`` is readiness);
    ``conversations`` (default: ``runner`` when it is one) serves conversation deletion."""
    if conversations is None and isinstance(runner, ConversationDeleter):
        conversations = runner

    async def invoke(request: Request) -> Response:
        parsed = await _parse(request, runner, stream=False)
        if isinstance(parsed, Response):
            return parsed
        events = runner.run(parsed)
        try:
            async for event in events:
                if isinstance(event, TurnCompleted):
                    return JSONResponse(_done(parsed.context_id, event))
                if isinstance(event, TurnFailed):
                    return _failed(event)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        return error_response(500, "internal", "the turn ended without an answer")

    async def invoke_stream(request: Request) -> Response:
        parsed = await _parse(request, runner, stream=True)
        if isinstance(parsed, Response):
            return parsed
        turn = parsed

        async def stream() -> AsyncIterator[bytes]:
            events = runner.run(turn)
            try:
                async for event in events:
                    if isinstance(event, TextDelta):
                        yield _sse("delta", {"text": event.text})
                    elif isinstance(event, ToolCallStarted):
                        yield _sse(
                            "tool_call",
                            {
                                "callId": event.call_id,
                                "name": event.name,
                                "arguments": dict(event.arguments),
                            },
                        )
                    elif isinstance(event, ToolCallFinished):
                        yield _sse(
                            "tool_result",
                            {
                                "callId": event.call_id,
                                "name": event.name,
                                "ok": event.ok,
                                "result": event.result,
                            },
                        )
                    elif isinstance(event, TurnCompleted):
                        yield _sse("done", _done(turn.context_id, event))
                        return
                    elif isinstance(event, TurnFailed):
                        yield _sse(
                            "error",
                            {
                                "code": event.code,
                                "message": event.message,
                                "revision": event.revision,
                            },
                        )
                        return
                yield _sse(
                    "error", {"code": "internal", "message": "the turn ended without an answer"}
                )
            finally:
                close = getattr(events, "aclose", None)
                if close is not None:
                    await close()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def delete_conversation(request: Request) -> Response:
        context_id = request.path_params["context_id"]
        if not 1 <= len(context_id) <= 256:
            return error_response(400, "invalid_request", "contextId: must be 1 to 256 characters")
        reason = not_ready_reason(runner)
        if reason is not None:
            return error_response(503, "not_ready", reason)
        if conversations is None:
            return error_response(501, "not_supported", "this agent keeps no conversations")
        try:
            existed = await conversations.delete_conversation(context_id)
        except MemoryStoreError as e:
            return error_response(503, e.code, str(e))
        if not existed:
            return error_response(404, "not_found", f"contextId: no conversation {context_id!r}")
        return Response(status_code=204)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        reason = not_ready_reason(runner)
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        info = runner.card_info()
        return JSONResponse({"status": "ready", "revision": info.revision if info else None})

    return [
        Route("/v1/invoke", invoke, methods=["POST"]),
        Route("/v1/invoke/stream", invoke_stream, methods=["POST"]),
        Route("/v1/conversations/{context_id}", delete_conversation, methods=["DELETE"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
