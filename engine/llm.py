"""The model client: litellm through the sidecar's egress, with fallbacks and spans.

The engine holds no key: litellm is pointed at ``{egress}/llm/v1`` (fallback ``i`` at
``{egress}/llm/fallbacks/<i>/v1``) with the dummy key ``sidecar-injected``; the sidecar
adds the real credential. A call streams :class:`TextChunk` s and ends with one
:class:`ModelReply` (text, tool calls, usage, finish reason). When a model is
unavailable (connection, 5xx, rate limit, timeout) before it streamed anything, the
next fallback is tried; a refusal (4xx) is not retried elsewhere.

litellm errors are translated here, and only here, into :mod:`engine.errors`
(:func:`translate_error`). Each call is one ``chat <model>`` span with the GenAI
semantic-convention attributes; message content is recorded only when enabled.
"""

from __future__ import annotations

import os

# litellm downloads its price map on import unless told otherwise (offline: seconds).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import litellm
import openai
from litellm import exceptions as llm_errors
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from specmesh.spec.models import ModelSpec

from .errors import (
    ModelError,
    ModelRequestError,
    ModelTimeoutError,
    ModelUnavailableError,
)

__all__ = [
    "SIDECAR_API_KEY",
    "ModelClient",
    "ModelReply",
    "ModelTarget",
    "TextChunk",
    "ToolCallRequest",
    "translate_error",
]

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

litellm.suppress_debug_info = True
litellm.telemetry = False

SIDECAR_API_KEY = "sidecar-injected"
"""The key litellm sends; the sidecar replaces it with the real one."""

#: litellm error class -> engine error class; the nearest entry in the MRO wins.
_ERROR_TABLE: dict[type[BaseException], type[ModelError]] = {
    llm_errors.Timeout: ModelTimeoutError,
    llm_errors.APIConnectionError: ModelUnavailableError,
    llm_errors.ServiceUnavailableError: ModelUnavailableError,
    llm_errors.InternalServerError: ModelUnavailableError,
    llm_errors.BadGatewayError: ModelUnavailableError,
    llm_errors.RateLimitError: ModelUnavailableError,
    llm_errors.BadRequestError: ModelRequestError,
    llm_errors.AuthenticationError: ModelRequestError,
    llm_errors.PermissionDeniedError: ModelRequestError,
    llm_errors.NotFoundError: ModelRequestError,
    llm_errors.UnprocessableEntityError: ModelRequestError,
    llm_errors.InvalidRequestError: ModelRequestError,
    llm_errors.APIResponseValidationError: ModelError,
    llm_errors.BudgetExceededError: ModelRequestError,
    llm_errors.MockException: ModelError,  # litellm's mock_response errors
    llm_errors.APIError: ModelError,  # status decides, see translate_error
    llm_errors.OpenAIError: ModelError,
    openai.OpenAIError: ModelError,
}
_SAFE_REASON = {
    ModelTimeoutError: "timed out",
    ModelUnavailableError: "unavailable",
    ModelRequestError: "refused the request",
    ModelError: "failed",
}


def translate_error(error: BaseException, *, model: str) -> ModelError:
    """The engine error for a litellm error (``None`` of the table: a plain ModelError)."""
    kind: type[ModelError] = ModelError
    for cls in type(error).__mro__:
        if cls in _ERROR_TABLE:
            kind = _ERROR_TABLE[cls]
            break
    status = getattr(error, "status_code", None)
    status = status if isinstance(status, int) else None
    if kind is ModelError and status is not None:
        kind = ModelUnavailableError if status >= 500 or status == 429 else ModelRequestError
    reason = _SAFE_REASON[kind] + (f" (HTTP {status})" if status else "")
    return kind(model=model, reason=reason, status=status)


@dataclass(frozen=True)
class TextChunk:
    """A piece of the model's text, as it streams."""

    text: str


@dataclass(frozen=True)
class ToolCallRequest:
    """A function call the model asked for; ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ModelReply:
    """The model's whole answer to one call."""

    text: str
    tool_calls: tuple[ToolCallRequest, ...]
    usage: Mapping[str, int]
    finish_reason: str
    model: str

    def assistant_message(self) -> dict[str, Any]:
        """The reply as an OpenAI assistant message (to send back with tool results)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.tool_calls
            ]
        return msg


@dataclass(frozen=True)
class ModelTarget:
    """One model to try: litellm's model string and the egress base URL for it."""

    model: str
    api_base: str
    display: str


@dataclass
class _Accumulator:
    text: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = ""
    model: str = ""

    def reply(self) -> ModelReply:
        calls = tuple(
            ToolCallRequest(
                id=c.get("id") or f"call_{i}", name=c.get("name", ""), arguments=c.get("args", "")
            )
            for i, c in sorted(self.calls.items())
        )
        return ModelReply(
            text="".join(self.text),
            tool_calls=calls,
            usage=dict(self.usage),
            finish_reason=self.finish_reason or ("tool_calls" if calls else "stop"),
            model=self.model,
        )


class ModelClient:
    """Calls the spec's model (and its fallbacks) through the sidecar."""

    def __init__(self, *, spec: ModelSpec, egress_url: str, record_content: bool = False) -> None:
        self.spec = spec
        base = egress_url.rstrip("/")
        self.targets: tuple[ModelTarget, ...] = (
            ModelTarget(f"{spec.provider or 'openai'}/{spec.model}", f"{base}/llm/v1", spec.model),
            *(
                ModelTarget(
                    f"{fb.provider or 'openai'}/{fb.model}",
                    f"{base}/llm/fallbacks/{i}/v1",
                    fb.model,
                )
                for i, fb in enumerate(spec.fallbacks)
            ),
        )
        self._record_content = record_content

    @property
    def name(self) -> str:
        return self.spec.model

    async def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        parent: Context | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[TextChunk | ModelReply, None]:
        """Stream one answer: text chunks, then exactly one ModelReply."""
        last: ModelError | None = None
        for target in self.targets:
            started = False
            try:
                async for item in self._call(target, messages, tools, parent, attributes):
                    if isinstance(item, TextChunk):
                        started = True
                    yield item
                return
            except (ModelUnavailableError, ModelTimeoutError) as e:
                if started:
                    raise
                last = e
                if target is not self.targets[-1]:
                    logger.warning(
                        "model %s %s; trying the next fallback", target.display, e.reason
                    )
        assert last is not None
        raise last

    async def _call(
        self,
        target: ModelTarget,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        parent: Context | None,
        attributes: Mapping[str, Any] | None,
    ) -> AsyncIterator[TextChunk | ModelReply]:
        spec = self.spec
        span = tracer.start_span(f"chat {target.display}", context=parent, kind=SpanKind.CLIENT)
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": target.model.split("/", 1)[0],
                "gen_ai.request.model": target.display,
                "gen_ai.request.temperature": spec.temperature,
                **({"gen_ai.request.max_tokens": spec.max_tokens} if spec.max_tokens else {}),
                **({"gen_ai.request.top_p": spec.top_p} if spec.top_p is not None else {}),
                **(attributes or {}),
            }
        )
        if self._record_content:
            span.set_attribute("gen_ai.input.messages", json.dumps(list(messages), default=str))
        kwargs: dict[str, Any] = {
            "model": target.model,
            "messages": list(messages),
            "api_base": target.api_base,
            "api_key": SIDECAR_API_KEY,
            "temperature": spec.temperature,
            "timeout": spec.timeout_seconds,
            "num_retries": spec.max_retries,
        }
        if spec.max_tokens is not None:
            kwargs["max_tokens"] = spec.max_tokens
        if spec.top_p is not None:
            kwargs["top_p"] = spec.top_p
        if tools:
            kwargs["tools"] = list(tools)
        acc = _Accumulator(model=target.display)
        try:
            try:
                if spec.stream:
                    response = await litellm.acompletion(
                        **kwargs, stream=True, stream_options={"include_usage": True}
                    )
                    async for chunk in response:
                        text = _absorb_chunk(acc, chunk)
                        if text:
                            yield TextChunk(text)
                else:
                    response = await litellm.acompletion(**kwargs)
                    text = _absorb_response(acc, response)
                    if text:
                        yield TextChunk(text)
            except openai.OpenAIError as e:
                raise translate_error(e, model=target.display) from e
            except llm_errors.BudgetExceededError as e:
                raise translate_error(e, model=target.display) from e
            reply = acc.reply()
            span.set_attributes(
                {
                    "gen_ai.response.model": reply.model,
                    "gen_ai.response.finish_reasons": [reply.finish_reason],
                    "gen_ai.usage.input_tokens": reply.usage.get("prompt_tokens", 0),
                    "gen_ai.usage.output_tokens": reply.usage.get("completion_tokens", 0),
                }
            )
            if self._record_content:
                span.set_attribute(
                    "gen_ai.output.messages", json.dumps(reply.assistant_message(), default=str)
                )
            yield reply
        except ModelError as e:
            span.set_status(Status(StatusCode.ERROR, e.reason))
            span.set_attribute("error.type", type(e).__name__)
            raise
        except BaseException as e:  # cancellation, closing: still end the span right
            span.set_attribute("error.type", type(e).__name__)
            raise
        finally:
            span.end()


def _usage(acc: _Accumulator, usage: Any) -> None:
    if usage is None:
        return
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = getattr(usage, key, None)
        if isinstance(value, int):
            acc.usage[key] = value


def _absorb_chunk(acc: _Accumulator, chunk: Any) -> str:
    _usage(acc, getattr(chunk, "usage", None))
    if getattr(chunk, "model", None):
        acc.model = str(chunk.model)
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    if choice.finish_reason:
        acc.finish_reason = str(choice.finish_reason)
    delta = choice.delta
    for tc in getattr(delta, "tool_calls", None) or ():
        slot = acc.calls.setdefault(tc.index if tc.index is not None else len(acc.calls), {})
        if tc.id:
            slot["id"] = tc.id
        fn = tc.function
        if fn is not None:
            if fn.name:
                slot["name"] = slot.get("name", "") + fn.name
            if fn.arguments:
                slot["args"] = slot.get("args", "") + fn.arguments
    text = getattr(delta, "content", None) or ""
    if text:
        acc.text.append(text)
    return str(text)


def _absorb_response(acc: _Accumulator, response: Any) -> str:
    _usage(acc, getattr(response, "usage", None))
    if getattr(response, "model", None):
        acc.model = str(response.model)
    choice = response.choices[0]
    acc.finish_reason = str(choice.finish_reason or "")
    message = choice.message
    for i, tc in enumerate(getattr(message, "tool_calls", None) or ()):
        acc.calls[i] = {
            "id": tc.id or "",
            "name": tc.function.name or "",
            "args": tc.function.arguments or "",
        }
    text = message.content or ""
    if text:
        acc.text.append(text)
    return str(text)
