"""The lean model call: OpenAI Chat Completions over aiohttp, no litellm.

For a model whose provider is ``openai`` (the default: any OpenAI-compatible server) the
engine speaks the wire format itself -- one ``POST {api_base}/chat/completions``, whole
or streamed as server-sent events -- instead of going through litellm, which costs
~15 ms of CPU per streamed call here (a pydantic object per chunk, its logging and cost
machinery in a worker thread) and ~1.5 s and ~160 MB at import. litellm stays for the
providers it translates (:mod:`engine.litellm_chat`).

::

    OpenAIChat.call(request, stream=...)
      POST {api_base}/chat/completions  {"model", "messages", "temperature", "max_tokens",
        |                                 "top_p", "tools", "stream", "stream_options"}
        +-- 2xx, whole:    one JSON body            -> ReplyBuilder -> TextChunk, ModelReply
        +-- 2xx, streamed: "data: {chunk}" lines,   -> ReplyBuilder -> TextChunk per delta,
        |                  "data: [DONE]"                              then ModelReply
        +-- 408                      -> ModelTimeoutError       retried (before any output)
        +-- 429, 5xx, connection     -> ModelUnavailableError   retried (before any output)
        +-- other 4xx                -> ModelRequestError       not retried
        +-- timeout (connect, read)  -> ModelTimeoutError       retried (before any output)
        +-- a body that is not the format -> ModelError

Retries: ``max_retries`` more attempts after the first, with a short exponential backoff
(:data:`RETRY_BASE_S` doubling plus jitter, at most :data:`RETRY_MAX_S`, the project's
:class:`specmesh.backoff.BackoffPolicy`; a 429's ``Retry-After`` up
to that bound), only while nothing was received -- a stream that broke halfway is not
replayed. Timeouts: ``timeout`` seconds to connect and between two reads (as httpx's
timeout in litellm's OpenAI client). Errors carry the status, never the body: a
provider's error text can echo a key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tenacity import RetryCallState, retry_if_exception

from specmesh.backoff import BackoffPolicy

from .errors import (
    ModelBudgetError,
    ModelError,
    ModelRequestError,
    ModelTimeoutError,
    ModelUnavailableError,
)
from .replies import ModelReply, ReplyBuilder, TextChunk, safe_reason

BUDGET_STATUS = 402
"""The sidecar's answer to a call that would pass the request's budget."""
BUDGET_REASON = "BUDGET_EXCEEDED"

__all__ = ["RETRY_BASE_S", "RETRY_MAX_S", "ChatRequest", "OpenAIChat", "new_session"]

logger = logging.getLogger(__name__)

RETRY_BASE_S = 0.1
"""First wait before retrying a failed call (doubles each retry)."""
RETRY_MAX_S = 4.0
"""Longest wait between two attempts."""
_RETRY_POLICY = BackoffPolicy(initial=RETRY_BASE_S, maximum=RETRY_MAX_S, jitter=RETRY_BASE_S)

_JSON = "application/json"


@dataclass(frozen=True, kw_only=True)
class ChatRequest:
    """One chat completion call."""

    api_base: str
    """``.../v1``: the call goes to ``{api_base}/chat/completions``."""
    model: str
    """The model name as the server knows it (no provider prefix)."""
    display: str
    """The name errors and replies use."""
    api_key: str
    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Any]] = ()
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    timeout: float = 60.0
    max_retries: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra headers for the sidecar (the turn's ledger entry: :mod:`engine.ledger`)."""

    def body(self, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": list(self.messages)}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.tools:
            body["tools"] = list(self.tools)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body


def _transport_error(error: BaseException, *, model: str) -> ModelError:
    """A read that timed out or a connection that broke, as the engine's model error."""
    if isinstance(error, TimeoutError | aiohttp.ServerTimeoutError):
        return ModelTimeoutError(model=model, reason=safe_reason(ModelTimeoutError))
    return ModelUnavailableError(model=model, reason=safe_reason(ModelUnavailableError))


def _status_error(status: int, *, model: str) -> ModelError:
    kind: type[ModelError]
    if status == 408:
        kind = ModelTimeoutError
    elif status == 429 or status >= 500:
        kind = ModelUnavailableError
    else:
        kind = ModelRequestError
    return kind(model=model, reason=safe_reason(kind, status), status=status)


def _malformed(model: str) -> ModelError:
    return ModelError(model=model, reason="answered in an unexpected format")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


class _Failed(Exception):
    """An attempt failed before anything was received (retryable or not)."""

    def __init__(self, error: ModelError, *, retry: bool, wait: float | None = None) -> None:
        super().__init__(error.reason)
        self.error = error
        self.retry = retry
        self.wait = wait


class OpenAIChat:
    """Chat Completions calls over one shared ``aiohttp`` session.

    The session is the caller's (``session``), or this object's own, made on the first
    call and closed by :meth:`aclose`.
    """

    def __init__(self, *, session: aiohttp.ClientSession | None = None) -> None:
        self._session = session
        self._own: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is not None and not self._session.closed:
            return self._session
        if self._own is None or self._own.closed:
            self._own = new_session()
        return self._own

    async def aclose(self) -> None:
        if self._own is not None:
            await self._own.close()
            self._own = None

    async def call(
        self, request: ChatRequest, *, stream: bool
    ) -> AsyncGenerator[TextChunk | ModelReply, None]:
        """Text chunks (one when whole), then exactly one ModelReply; raises ModelError."""
        data = json.dumps(request.body(stream=stream), ensure_ascii=False).encode()
        headers = {
            **request.headers,
            "Authorization": f"Bearer {request.api_key}",
            "Content-Type": _JSON,
            "Accept": "text/event-stream" if stream else _JSON,
        }
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=request.timeout, sock_read=request.timeout
        )
        url = f"{request.api_base.rstrip('/')}/chat/completions"

        def log_retry(state: RetryCallState) -> None:
            failed = state.outcome.exception() if state.outcome is not None else None
            reason = failed.error.reason if isinstance(failed, _Failed) else str(failed)
            logger.info(
                "model %s %s; retry %d of %d in %.2f s",
                request.display,
                reason,
                state.attempt_number,
                request.max_retries,
                state.upcoming_sleep,
            )

        try:
            async for attempt in _RETRY_POLICY.retrying(
                retry=retry_if_exception(lambda e: isinstance(e, _Failed) and e.retry),
                attempts=request.max_retries + 1,
                hint=lambda e: e.wait if isinstance(e, _Failed) else None,
                before_sleep=log_retry,
            ):
                with attempt:
                    response = await self._open(request, url, data, headers, timeout)
        except _Failed as failed:
            raise failed.error from failed.error.__cause__
        try:
            if stream:
                async for item in self._streamed(request, response):
                    yield item
            else:
                async for item in self._whole(request, response):
                    yield item
        finally:
            response.release()

    async def _open(
        self,
        request: ChatRequest,
        url: str,
        data: bytes,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """The response once its status is a success; raises _Failed otherwise."""
        model = request.display
        try:
            response = await self._client().post(url, data=data, headers=headers, timeout=timeout)
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            error: ModelError = ModelTimeoutError(
                model=model, reason=safe_reason(ModelTimeoutError)
            )
            error.__cause__ = e
            raise _Failed(error, retry=True) from e
        except aiohttp.ClientError as e:
            error = ModelUnavailableError(model=model, reason=safe_reason(ModelUnavailableError))
            error.__cause__ = e
            raise _Failed(error, retry=True) from e
        if response.status < 300:
            return response
        if response.status == BUDGET_STATUS:
            refusal = await _budget_refusal(response)
            if refusal is not None:
                raise _Failed(
                    ModelBudgetError(model=model, reason=refusal, status=402), retry=False
                )
        wait = _retry_after(response.headers) if response.status == 429 else None
        response.release()
        error = _status_error(response.status, model=model)
        raise _Failed(error, retry=not isinstance(error, ModelRequestError), wait=wait)

    async def _whole(
        self, request: ChatRequest, response: aiohttp.ClientResponse
    ) -> AsyncIterator[TextChunk | ModelReply]:
        model = request.display
        try:
            raw = await response.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _transport_error(e, model=model) from e
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise _malformed(model) from e
        builder = ReplyBuilder(model=model)
        try:
            text = builder.absorb_message(body)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise _malformed(model) from e
        if text:
            yield TextChunk(text)
        yield builder.reply()

    async def _streamed(
        self, request: ChatRequest, response: aiohttp.ClientResponse
    ) -> AsyncIterator[TextChunk | ModelReply]:
        model = request.display
        builder = ReplyBuilder(model=model)
        try:
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue  # blank lines, comments, "event:" lines
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                if not payload:
                    continue
                chunk = json.loads(payload)
                if isinstance(chunk, dict) and "error" in chunk:
                    raise _stream_error(chunk["error"], model=model)
                text = builder.absorb_chunk(chunk)
                if text:
                    yield TextChunk(text)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _transport_error(e, model=model) from e
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise _malformed(model) from e  # not JSON, not the format, a line too long
        yield builder.reply()


async def _budget_refusal(response: aiohttp.ClientResponse) -> str | None:
    """The sidecar's ``BUDGET_EXCEEDED`` message (its own text: no provider's, no secret);
    None for another 402."""
    try:
        body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    finally:
        response.release()
    return budget_refusal_message(body)


def budget_refusal_message(body: Any) -> str | None:
    """The message of the sidecar's ``BUDGET_EXCEEDED`` error body (AIP-193 JSON); None
    when ``body`` is another error."""
    try:
        error = body["error"]
        reasons = {d.get("reason") for d in error.get("details", ()) if isinstance(d, dict)}
        message = error["message"]
    except (KeyError, TypeError, AttributeError):
        return None
    return message if BUDGET_REASON in reasons and isinstance(message, str) else None


def _stream_error(error: Any, *, model: str) -> ModelError:
    """An error event inside a stream (OpenAI sends ``{"error": {...}}``)."""
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) else None
    if status is not None:
        return _status_error(status, model=model)
    return ModelUnavailableError(model=model, reason=safe_reason(ModelUnavailableError))


def new_session() -> aiohttp.ClientSession:
    """A session for model calls: kept-alive connections, no cookies, no default timeout
    (each call sets its own)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=True,
    )
