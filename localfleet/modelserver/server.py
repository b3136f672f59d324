"""The scripted model server: an OpenAI-compatible HTTP API answered from a script.

Routes (each ``/v1/...`` route is also served without the ``/v1`` prefix)::

    POST   /v1/chat/completions   the script's reply, whole or streamed (SSE)
    POST   /v1/embeddings         deterministic hashed bag-of-words vectors
    GET    /v1/models             the script's ``models``
    GET    /healthz               {"status": "ok"}
    GET    /_scripted/script      the current script and how often each rule fired
    PUT    /_scripted/script      replace the script (JSON or YAML body; 400 with issues)
    GET    /_scripted/requests    recorded requests (``?include_auth=1``: raw secret headers)
    DELETE /_scripted/requests    forget recorded requests

Requests to the three ``/v1`` routes are recorded; health and ``/_scripted`` ones are not.
Any API key is accepted. Malformed requests get a 400 with an OpenAI-style error body,
as the real API answers them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

from aiohttp import web

from specmesh.addresses import local_url_host
from specmesh.errors import ServiceError

from .completions import SSE_DONE, Completion, ToolCall, error_body, sse
from .embeddings import DEFAULT_DIMENSIONS, embed_text, encode_base64
from .errors import ScriptError
from .recording import DEFAULT_CAPACITY, RecordedRequest, RequestLog
from .script import (
    ChatView,
    ErrorReply,
    Script,
    ScriptEngine,
    ToolCallsReply,
    parse_script,
    parse_script_text,
)
from .tokens import count_completion_tokens, count_prompt_tokens, count_tokens, truncate_to_tokens

__all__ = ["ScriptedModelServer"]

logger = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024 * 1024
_MAX_DIMENSIONS = 8192
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _error(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> web.Response:
    body = error_body(status, message, error_type=error_type, code=code, param=param)
    return web.json_response(body, status=status)


def _headers(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in request.headers:
        key = name.lower()
        if key not in out:
            out[key] = ", ".join(request.headers.getall(name))
    return out


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _BadRequest("request body must be a JSON object")
    return data


def _positive_int(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"{name} must be a positive integer", param=name)
        return value
    return None


@web.middleware
async def _guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _BadRequest as e:
        return _error(400, e.message, param=e.param)
    except web.HTTPException:
        raise
    except Exception:
        logger.exception("unexpected error answering %s %s", request.method, request.path)
        return _error(500, "internal error in the scripted model server")


class ScriptedModelServer:
    """A local OpenAI-compatible server answering from a :class:`Script`.

    Use as an async context manager (or :meth:`start` / :meth:`stop`); :attr:`url` is the
    base URL to give an OpenAI client or litellm as ``api_base`` (it ends in ``/v1``).
    ``port=0`` picks a free port.
    """

    def __init__(
        self,
        *,
        script: Script | Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        embedding_dimensions: int = DEFAULT_DIMENSIONS,
        max_recorded: int = DEFAULT_CAPACITY,
        shutdown_timeout: float = 5.0,
    ) -> None:
        if not 1 <= embedding_dimensions <= _MAX_DIMENSIONS:
            raise ValueError(
                f"embedding_dimensions must be in 1..{_MAX_DIMENSIONS} (got {embedding_dimensions})"
            )
        self._engine = ScriptEngine(self._as_script(script))
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._dimensions = embedding_dimensions
        self._shutdown_timeout = shutdown_timeout
        self._log = RequestLog(capacity=max_recorded)
        self._runner: web.AppRunner | None = None
        self._app = self._build_app()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind and serve; raise :class:`ServiceError` if the address cannot be bound."""
        if self._runner is not None:
            raise RuntimeError("the scripted model server is already started")
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port)
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ServiceError(
                service="model-server",
                reason=f"cannot listen on {self._host}:{self._requested_port}: {e.strerror or e}",
            ) from e
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner
        logger.info("scripted model server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop accepting, let in-flight answers finish (up to ``shutdown_timeout``)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.info("scripted model server on port %s stopped", self._port)

    async def __aenter__(self) -> ScriptedModelServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------ properties

    @property
    def app(self) -> web.Application:
        """The aiohttp application (for in-process test clients)."""
        return self._app

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port; only known once started."""
        if self._port is None:
            raise RuntimeError("the scripted model server is not started")
        return self._port

    @property
    def root_url(self) -> str:
        """``http://host:port`` (admin routes live under it)."""
        return f"http://{local_url_host(self._host)}:{self.port}"

    @property
    def url(self) -> str:
        """``http://host:port/v1``: the ``api_base`` for OpenAI clients and litellm."""
        return f"{self.root_url}/v1"

    # ------------------------------------------------------------ script and recording

    @property
    def script(self) -> Script:
        return self._engine.script

    @property
    def fired(self) -> list[int]:
        """How many times each rule of the current script has fired."""
        return self._engine.fired

    def set_script(self, script: Script | Mapping[str, Any]) -> None:
        """Replace the script; rule counts start again from zero."""
        self._engine = ScriptEngine(self._as_script(script))
        logger.info("script replaced (%d rules)", len(self._engine.script.rules))

    def requests(self, *, include_auth: bool = False) -> list[RecordedRequest]:
        """Recorded requests, oldest first; raw secret headers only if ``include_auth``."""
        return self._log.records(include_auth=include_auth)

    def clear_requests(self) -> None:
        self._log.clear()

    async def wait_for_requests(
        self, count: int, *, timeout: float = 10.0
    ) -> list[RecordedRequest]:
        """Wait until ``count`` requests were recorded since the last clear."""
        return await self._log.wait_for(count, timeout=timeout)

    @staticmethod
    def _as_script(script: Script | Mapping[str, Any] | None) -> Script:
        if script is None:
            return Script()
        if isinstance(script, Script):
            return script
        return parse_script(script)

    # ------------------------------------------------------------ app

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY, middlewares=[_guard])
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
            app.router.add_post(f"{prefix}/embeddings", self._embeddings)
            app.router.add_get(f"{prefix}/models", self._models)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/_scripted/script", self._get_script)
        app.router.add_put("/_scripted/script", self._put_script)
        app.router.add_get("/_scripted/requests", self._get_requests)
        app.router.add_delete("/_scripted/requests", self._delete_requests)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        seq = self._log.next_seq()
        try:
            body = await _json_object(request)
        except _BadRequest:
            self._record(request, seq, "chat.completions", {})
            raise
        model = body.get("model")
        messages = body.get("messages")
        tools = body.get("tools") or []
        stream = body.get("stream") is True
        problem: _BadRequest | None = None
        if not isinstance(model, str) or not model:
            problem = _BadRequest("model must be a non-empty string", param="model")
        elif not isinstance(messages, list) or not messages:
            problem = _BadRequest("messages must be a non-empty list", param="messages")
        elif not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            problem = _BadRequest("every message must be an object with a role", param="messages")
        elif not isinstance(tools, list):
            problem = _BadRequest("tools must be a list", param="tools")
        if problem is not None:
            self._record(request, seq, "chat.completions", body)
            raise problem
        assert isinstance(model, str) and isinstance(messages, list)
        view = ChatView.of(model=model, messages=messages, tools=tools)
        decision = self._engine.decide(view)
        self._record(
            request,
            seq,
            "chat.completions",
            body,
            model=model,
            messages=messages,
            tools=tools,
            stream=stream,
            rule_index=decision.rule_index,
            rule_name=decision.rule_name,
        )
        logger.debug(
            "request %d (model %s): rule %s", seq, model, decision.rule_name or decision.rule_index
        )
        reply = decision.reply
        if reply.delay_ms:
            await asyncio.sleep(reply.delay_ms / 1000)
        if isinstance(reply, ErrorReply):
            return _error(
                reply.status,
                decision.render(reply.message),
                error_type=reply.error_type,
                code=reply.code,
            )
        max_tokens = _positive_int(body, "max_completion_tokens", "max_tokens")
        text = decision.text()
        calls: tuple[ToolCall, ...] = ()
        finish_reason = "stop"
        if isinstance(reply, ToolCallsReply):
            calls = tuple(
                ToolCall(call.id or f"call_{seq}_{i}", call.name, decision.arguments(call))
                for i, call in enumerate(reply.tool_calls)
            )
            finish_reason = "tool_calls"
        elif text is not None and max_tokens is not None and count_tokens(text) > max_tokens:
            text = truncate_to_tokens(text, max_tokens)
            finish_reason = "length"
        completion = Completion(
            id=f"chatcmpl-scripted-{seq}",
            created=int(time.time()),
            model=model,
            text=text,
            tool_calls=calls,
            finish_reason=finish_reason,
            prompt_tokens=count_prompt_tokens(messages, tools),
            completion_tokens=count_completion_tokens(text, [(c.name, c.arguments) for c in calls]),
        )
        self._log.set_usage(seq, completion.usage())
        if not stream:
            return web.json_response(completion.body())
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await self._stream(
            request, completion, include_usage=include_usage, chunk_delay_ms=reply.chunk_delay_ms
        )

    async def _stream(
        self,
        request: web.Request,
        completion: Completion,
        *,
        include_usage: bool,
        chunk_delay_ms: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            for i, chunk in enumerate(completion.chunks(include_usage=include_usage)):
                if i and chunk_delay_ms:
                    await asyncio.sleep(chunk_delay_ms / 1000)
                await response.write(sse(chunk))
            await response.write(SSE_DONE)
            await response.write_eof()
        except ConnectionResetError:
            logger.info("client left during the stream of %s", completion.id)
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        seq = self._log.next_seq()
        try:
            body = await _json_object(request)
        except _BadRequest:
            self._record(request, seq, "embeddings", {})
            raise
        model = body.get("model")
        raw_input = body.get("input")
        texts = _embedding_texts(raw_input)
        self._record(
            request,
            seq,
            "embeddings",
            body,
            model=model if isinstance(model, str) else None,
            input=texts,
        )
        if not isinstance(model, str) or not model:
            raise _BadRequest("model must be a non-empty string", param="model")
        if texts is None:
            raise _BadRequest(
                "input must be a string, a non-empty list of strings, or token arrays",
                param="input",
            )
        dimensions = _positive_int(body, "dimensions") or self._dimensions
        if dimensions > _MAX_DIMENSIONS:
            raise _BadRequest(f"dimensions must be <= {_MAX_DIMENSIONS}", param="dimensions")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _BadRequest("encoding_format must be float or base64", param="encoding_format")
        data: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            vector = embed_text(text, dimensions=dimensions)
            embedding: list[float] | str = encode_base64(vector) if encoding == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(count_tokens(t) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self._record(request, self._log.next_seq(), "models", {})
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "specmesh"}
                    for m in self.script.models
                ],
            }
        )

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def _get_script(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"script": self.script.model_dump(mode="json"), "fired": self.fired}
        )

    async def _put_script(self, request: web.Request) -> web.StreamResponse:
        text = await request.text()
        try:
            script = parse_script_text(text, source="script")
        except ScriptError as e:
            body = error_body(400, str(e))
            body["error"]["issues"] = [
                {"path": i.path, "rule": i.rule, "message": i.message} for i in e.issues
            ]
            return web.json_response(body, status=400)
        self.set_script(script)
        return web.json_response({"rules": len(script.rules)})

    async def _get_requests(self, request: web.Request) -> web.StreamResponse:
        include_auth = request.query.get("include_auth", "") in ("1", "true", "yes")
        records = self._log.records(include_auth=include_auth)
        return web.json_response({"requests": [r.model_dump(mode="json") for r in records]})

    async def _delete_requests(self, request: web.Request) -> web.StreamResponse:
        self._log.clear()
        return web.json_response({"cleared": True})

    def _record(
        self,
        request: web.Request,
        seq: int,
        endpoint: str,
        body: Mapping[str, Any],
        **fields: Any,
    ) -> None:
        self._log.add(
            seq=seq,
            method=request.method,
            path=request.path,
            endpoint=endpoint,
            headers=_headers(request),
            body=body,
            **fields,
        )


def _embedding_texts(value: Any) -> list[str] | None:
    """The texts of an embeddings ``input``; token arrays become ``t<id>`` words."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return list(value)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [" ".join(f"t{v}" for v in value)]
    if all(
        isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        for v in value
    ):
        return [" ".join(f"t{t}" for t in v) for v in value]
    return None
