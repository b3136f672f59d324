"""litellm errors are translated at one boundary, and none is left unmapped."""

from __future__ import annotations

import inspect

import httpx
import openai
import pytest
from aiohttp import web
from litellm import exceptions as llm_errors

from engine.errors import (
    ModelBudgetError,
    ModelError,
    ModelRequestError,
    ModelTimeoutError,
    ModelUnavailableError,
)
from engine.litellm_chat import _ERROR_TABLE, LiteLlmChat, translate_error
from engine.llm import ModelClient
from engine.openai_chat import ChatRequest
from specmesh.spec.models import ModelSpec

_GENERIC = {llm_errors.APIError, llm_errors.OpenAIError, openai.OpenAIError}


def _litellm_error_classes() -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(llm_errors, inspect.isclass)
        if issubclass(cls, openai.OpenAIError) and cls.__module__.startswith("litellm")
    ]


def test_every_litellm_error_has_a_specific_mapping() -> None:
    unmapped = []
    for cls in _litellm_error_classes():
        nearest = next(c for c in cls.__mro__ if c in _ERROR_TABLE)
        if nearest in _GENERIC and cls not in _GENERIC and not issubclass(cls, llm_errors.APIError):
            unmapped.append(cls.__name__)
    assert unmapped == []


def _request() -> httpx.Request:
    return httpx.Request("POST", "http://egress/llm/v1/chat/completions")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (llm_errors.Timeout("t", model="m", llm_provider="openai"), ModelTimeoutError),
        (
            llm_errors.RateLimitError("r", llm_provider="openai", model="m"),
            ModelUnavailableError,
        ),
        (
            llm_errors.ServiceUnavailableError("s", llm_provider="openai", model="m"),
            ModelUnavailableError,
        ),
        (
            llm_errors.APIConnectionError("c", llm_provider="openai", model="m"),
            ModelUnavailableError,
        ),
        (llm_errors.BadRequestError("b", model="m", llm_provider="openai"), ModelRequestError),
        (
            llm_errors.AuthenticationError("a", llm_provider="openai", model="m"),
            ModelRequestError,
        ),
        (
            llm_errors.ContextWindowExceededError("w", model="m", llm_provider="openai"),
            ModelRequestError,
        ),
    ],
)
def test_translation_by_kind(error: BaseException, kind: type[ModelError]) -> None:
    translated = translate_error(error, model="m")

    assert type(translated) is kind
    assert translated.model == "m"


def test_generic_api_error_is_classified_by_status() -> None:
    five = llm_errors.APIError(502, "bad", llm_provider="openai", model="m", request=_request())
    four = llm_errors.APIError(418, "tea", llm_provider="openai", model="m", request=_request())

    assert isinstance(translate_error(five, model="m"), ModelUnavailableError)
    assert isinstance(translate_error(four, model="m"), ModelRequestError)


def test_messages_do_not_echo_the_provider_text() -> None:
    error = llm_errors.BadRequestError("key sk-secret invalid", model="m", llm_provider="openai")

    assert "sk-secret" not in str(translate_error(error, model="m"))


def test_targets_go_through_the_egress() -> None:
    spec = ModelSpec.model_validate(
        {
            "model": "qwen",
            "apiKey": "vault://secret/a#k",
            "fallbacks": [{"model": "claude", "provider": "anthropic"}],
        }
    )

    client = ModelClient(spec=spec, egress_url="http://127.0.0.1:7102/")

    assert [(t.model, t.api_base) for t in client.targets] == [
        ("openai/qwen", "http://127.0.0.1:7102/llm/v1"),
        ("anthropic/claude", "http://127.0.0.1:7102/llm/fallbacks/0/v1"),
    ]


_REFUSAL = {
    "error": {
        "code": 402,
        "status": "RESOURCE_EXHAUSTED",
        "message": "budget exceeded: a call to model 'm' is refused: the request's budget "
        "is $1, $0 is left",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "BUDGET_EXCEEDED",
                "domain": "specmesh.io",
                "metadata": {},
            }
        ],
    }
}


@pytest.mark.parametrize("provider", ["groq", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_litellm_call_the_sidecar_refuses_is_the_budget_error_with_its_text(
    provider: str, stream: bool
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(_REFUSAL, status=402)

    app = web.Application()
    app.router.add_route("*", "/{rest:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    request = ChatRequest(
        api_base=f"http://127.0.0.1:{port}/v1",
        model="m",
        display="m",
        api_key="sidecar-injected",
        messages=[{"role": "user", "content": "hi"}],
    )
    try:
        with pytest.raises(ModelBudgetError) as info:
            async for _ in LiteLlmChat(provider=provider).call(request, stream=stream):
                pass
    finally:
        await runner.cleanup()

    assert info.value.code == "budget_exceeded"
    assert info.value.reason == _REFUSAL["error"]["message"]  # type: ignore[index]
