"""Model calls through litellm, for providers whose API is not OpenAI's.

Imported only when a spec names such a provider (``anthropic``, ``gemini``...), or an
embedding or token count needs litellm: the import costs ~1.5 s and ~160 MB.
litellm errors are translated here, and only here, into :mod:`engine.errors`
(:func:`translate_error`).
"""

from __future__ import annotations

import json
import os

# litellm downloads its price map on import unless told otherwise (offline: seconds).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from collections.abc import AsyncGenerator
from typing import Any

import litellm
import openai
from litellm import exceptions as llm_errors

from .errors import (
    ModelBudgetError,
    ModelError,
    ModelRequestError,
    ModelTimeoutError,
    ModelUnavailableError,
)
from .openai_chat import BUDGET_STATUS, ChatRequest, budget_refusal_message
from .replies import ModelReply, ReplyBuilder, TextChunk, safe_reason

__all__ = ["LITELLM_ERRORS", "LiteLlmChat", "translate_error"]

litellm.suppress_debug_info = True
litellm.telemetry = False

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

LITELLM_ERRORS: tuple[type[BaseException], ...] = (
    openai.OpenAIError,
    llm_errors.BudgetExceededError,
)
"""What a litellm call raises (translate with :func:`translate_error`)."""


def translate_error(error: BaseException, *, model: str) -> ModelError:
    """The engine error for a litellm error (``None`` of the table: a plain ModelError);
    the sidecar's budget refusal (402 ``BUDGET_EXCEEDED``) is a :class:`ModelBudgetError`
    with the sidecar's text, as on the OpenAI-compatible path."""
    refusal = _budget_refusal(error)
    if refusal is not None:
        return ModelBudgetError(model=model, reason=refusal, status=BUDGET_STATUS)
    kind: type[ModelError] = ModelError
    for cls in type(error).__mro__:
        if cls in _ERROR_TABLE:
            kind = _ERROR_TABLE[cls]
            break
    status = getattr(error, "status_code", None)
    status = status if isinstance(status, int) else None
    if kind is ModelError and status is not None:
        kind = ModelUnavailableError if status >= 500 or status == 429 else ModelRequestError
    return kind(model=model, reason=safe_reason(kind, status), status=status)


def _budget_refusal(error: BaseException) -> str | None:
    """The sidecar's ``BUDGET_EXCEEDED`` message in a litellm error for a 402: litellm keeps
    the answer's body only in its text (JSON, or the repr of its bytes)."""
    if getattr(error, "status_code", None) != BUDGET_STATUS:
        return None
    text = str(error)
    start, end = text.find('{"error"'), text.rfind("}")
    if start < 0 or end < start:
        return None
    raw = text[start : end + 1]
    for candidate in (raw, raw.replace("\\'", "'")):
        try:
            return budget_refusal_message(json.loads(candidate))
        except ValueError:
            continue
    return None


class LiteLlmChat:
    """``litellm.acompletion`` with litellm's provider translation, retries and timeout."""

    def __init__(self, *, provider: str) -> None:
        self._provider = provider

    async def aclose(self) -> None:
        return None

    async def call(
        self, request: ChatRequest, *, stream: bool
    ) -> AsyncGenerator[TextChunk | ModelReply, None]:
        # the same body as the OpenAI-compatible client sends, with litellm's own keys
        kwargs: dict[str, Any] = {
            **request.body(stream=stream),
            "model": f"{self._provider}/{request.model}",
            "api_base": request.api_base,
            "api_key": request.api_key,
            "timeout": request.timeout,
            "num_retries": request.max_retries,
        }
        if request.headers:
            kwargs["extra_headers"] = dict(request.headers)
        builder = ReplyBuilder(model=request.display)
        try:
            if stream:
                response = await litellm.acompletion(**kwargs)
                async for chunk in response:
                    text = _absorb_chunk(builder, chunk)
                    if text:
                        yield TextChunk(text)
            else:
                response = await litellm.acompletion(**kwargs)
                text = _absorb_response(builder, response)
                if text:
                    yield TextChunk(text)
        except LITELLM_ERRORS as e:
            raise translate_error(e, model=request.display) from e
        yield builder.reply()


def _usage(builder: ReplyBuilder, usage: Any) -> None:
    if usage is not None:
        builder.set_usage(
            {
                k: getattr(usage, k, None)
                for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            }
        )


def _absorb_chunk(builder: ReplyBuilder, chunk: Any) -> str:
    _usage(builder, getattr(chunk, "usage", None))
    if getattr(chunk, "model", None):
        builder.model = str(chunk.model)
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    if choice.finish_reason:
        builder.finish_reason = str(choice.finish_reason)
    delta = choice.delta
    for tc in getattr(delta, "tool_calls", None) or ():
        fn = tc.function
        builder.add_tool_delta(
            tc.index,
            id=tc.id,
            name=fn.name if fn is not None else None,
            arguments=fn.arguments if fn is not None else None,
        )
    text = str(getattr(delta, "content", None) or "")
    builder.add_text(text)
    return text


def _absorb_response(builder: ReplyBuilder, response: Any) -> str:
    _usage(builder, getattr(response, "usage", None))
    if getattr(response, "model", None):
        builder.model = str(response.model)
    choice = response.choices[0]
    builder.finish_reason = str(choice.finish_reason or "")
    message = choice.message
    for i, tc in enumerate(getattr(message, "tool_calls", None) or ()):
        builder.calls[i] = {
            "id": tc.id or "",
            "name": tc.function.name or "",
            "args": tc.function.arguments or "",
        }
    text = str(message.content or "")
    builder.add_text(text)
    return text
