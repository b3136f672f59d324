"""The model client: the spec's model and its fallbacks through the sidecar's egress.

The engine holds no key: the model is called at ``{egress}/llm/v1`` (fallback ``i`` at
``{egress}/llm/fallbacks/<i>/v1``) with the dummy key ``sidecar-injected``; the sidecar
adds the real credential. A call yields :class:`TextChunk` s and ends with one
:class:`ModelReply` (text, tool calls, usage, finish reason). When a model is
unavailable (connection, 5xx, rate limit, timeout) before it sent anything, the next
fallback is tried; a refusal (4xx) is not retried elsewhere.

Which client makes the call depends on the provider::

    provider (model part)          client                          imports
    -----------------------------  ------------------------------  ----------------------
    openai (the default: any       engine.openai_chat.OpenAIChat   aiohttp (one session
    OpenAI-compatible server)      -- the wire format itself        shared by the engine)
    anything else (anthropic,      engine.litellm_chat.LiteLlmChat litellm, imported in a
    gemini, bedrock...)            -- litellm's translation         thread by the build

The model is streamed only when the caller streams (``stream(..., streaming=True)``: A2A
``SendStreamingMessage``, ``/v1/invoke/stream``) and the model part allows it
(``stream``); a caller that waits for the whole answer gets one non-streamed call.
Each call is one ``chat <model>`` span with the GenAI semantic-convention attributes;
message content is recorded only when enabled.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from specmesh.prices import ModelPrice, PriceMap, default_price_map, spec_price
from specmesh.spec.models import ModelSpec

from .errors import ModelError, ModelTimeoutError, ModelUnavailableError
from .openai_chat import ChatRequest, OpenAIChat
from .replies import ModelReply, TextChunk, ToolCallRequest

if TYPE_CHECKING:
    from .litellm_chat import LiteLlmChat

__all__ = [
    "OPENAI_COMPATIBLE",
    "SIDECAR_API_KEY",
    "ModelClient",
    "ModelReply",
    "ModelTarget",
    "TextChunk",
    "ToolCallRequest",
    "uses_litellm",
]

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

SIDECAR_API_KEY = "sidecar-injected"
"""The key the engine sends; the sidecar replaces it with the real one."""

OPENAI_COMPATIBLE = frozenset({"openai"})
"""Providers called with the engine's own OpenAI client; litellm translates the others."""

_LITELLM_MODULE = "engine.litellm_chat"


def uses_litellm(spec: ModelSpec) -> bool:
    """Whether the model part names a provider litellm must translate (it or a fallback)."""
    providers = [spec.provider, *(fb.provider for fb in spec.fallbacks)]
    return any((p or "openai") not in OPENAI_COMPATIBLE for p in providers)


class _ChatClient(Protocol):
    def call(
        self, request: ChatRequest, *, stream: bool
    ) -> AsyncGenerator[TextChunk | ModelReply, None]: ...


@dataclass(frozen=True)
class ModelTarget:
    """One model to try: litellm's model string and the egress base URL for it."""

    model: str
    """``provider/model``, as litellm names it."""
    api_base: str
    display: str
    """The model name as the provider knows it."""
    price: ModelPrice | None = None
    """The model part's price for it (overrides litellm's map)."""

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0]


class ModelClient:
    """Calls the spec's model (and its fallbacks) through the sidecar.

    ``session`` is the aiohttp session OpenAI-compatible calls share (the context
    builder's); without one the client makes its own, closed by :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        spec: ModelSpec,
        egress_url: str,
        record_content: bool = False,
        session: aiohttp.ClientSession | None = None,
        prices: PriceMap | None = None,
    ) -> None:
        """``prices``: the map a model the spec does not price is looked up in (default:
        litellm's file, :mod:`specmesh.prices`)."""
        self.spec = spec
        self.prices = prices or default_price_map()
        base = egress_url.rstrip("/")
        self.targets: tuple[ModelTarget, ...] = (
            ModelTarget(
                f"{spec.provider or 'openai'}/{spec.model}",
                f"{base}/llm/v1",
                spec.model,
                spec_price(spec.price),
            ),
            *(
                ModelTarget(
                    f"{fb.provider or 'openai'}/{fb.model}",
                    f"{base}/llm/fallbacks/{i}/v1",
                    fb.model,
                    spec_price(fb.price),
                )
                for i, fb in enumerate(spec.fallbacks)
            ),
        )
        self._record_content = record_content
        self._openai = OpenAIChat(session=session)
        self._litellm: dict[str, LiteLlmChat] = {}

    @property
    def name(self) -> str:
        return self.spec.model

    async def aclose(self) -> None:
        """Close the client's own session, if it made one."""
        await self._openai.aclose()

    def _client(self, target: ModelTarget) -> _ChatClient:
        provider = target.provider
        if provider in OPENAI_COMPATIBLE:
            return self._openai
        client = self._litellm.get(provider)
        if client is None:
            module = importlib.import_module(_LITELLM_MODULE)
            client = self._litellm[provider] = module.LiteLlmChat(provider=provider)
        return client

    async def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        parent: Context | None = None,
        attributes: Mapping[str, Any] | None = None,
        streaming: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[TextChunk | ModelReply, None]:
        """One answer: text chunks, then exactly one ModelReply, priced
        (``cost_usd`` / ``unpriced``) at the price of the model that answered.

        ``streaming``: whether the caller streams; the model is streamed only when it
        does and the model part allows it, otherwise the text comes in one chunk.
        ``headers``: for the sidecar (the request's budget, :mod:`engine.ledger`).
        """
        stream = streaming and self.spec.stream
        last: ModelError | None = None
        for target in self.targets:
            started = False
            try:
                async for item in self._call(
                    target, messages, tools, parent, attributes, stream, headers or {}
                ):
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

    def _priced(self, target: ModelTarget, reply: ModelReply) -> ModelReply:
        usd = self.prices.charge(
            target.model,
            prompt_tokens=int(reply.usage.get("prompt_tokens", 0) or 0),
            completion_tokens=int(reply.usage.get("completion_tokens", 0) or 0),
            override=target.price,
        )
        if usd is None:
            return replace(reply, cost_usd=0.0, unpriced=True)
        return replace(reply, cost_usd=usd, unpriced=False)

    async def _call(
        self,
        target: ModelTarget,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        parent: Context | None,
        attributes: Mapping[str, Any] | None,
        stream: bool,
        headers: Mapping[str, str],
    ) -> AsyncIterator[TextChunk | ModelReply]:
        spec = self.spec
        span = tracer.start_span(f"chat {target.display}", context=parent, kind=SpanKind.CLIENT)
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": target.provider,
                "gen_ai.request.model": target.display,
                "gen_ai.request.temperature": spec.temperature,
                **({"gen_ai.request.max_tokens": spec.max_tokens} if spec.max_tokens else {}),
                **({"gen_ai.request.top_p": spec.top_p} if spec.top_p is not None else {}),
                **(attributes or {}),
            }
        )
        if self._record_content:
            span.set_attribute("gen_ai.input.messages", json.dumps(list(messages), default=str))
        request = ChatRequest(
            api_base=target.api_base,
            model=target.display,
            display=target.display,
            api_key=SIDECAR_API_KEY,
            messages=messages,
            tools=tools,
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
            top_p=spec.top_p,
            timeout=spec.timeout_seconds,
            max_retries=spec.max_retries,
            headers=headers,
        )
        try:
            reply: ModelReply | None = None
            async with aclosing(self._client(target).call(request, stream=stream)) as items:
                async for item in items:
                    if isinstance(item, ModelReply):
                        reply = item
                    else:
                        yield item
            assert reply is not None
            reply = self._priced(target, reply)
            span.set_attributes(
                {
                    "gen_ai.response.model": reply.model,
                    "gen_ai.response.finish_reasons": [reply.finish_reason],
                    "gen_ai.usage.input_tokens": reply.usage.get("prompt_tokens", 0),
                    "gen_ai.usage.output_tokens": reply.usage.get("completion_tokens", 0),
                    **(
                        {"specmesh.cost.unpriced": True}
                        if reply.unpriced
                        else {"specmesh.cost.usd": reply.cost_usd}
                    ),
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
