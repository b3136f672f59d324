"""The engine's own OpenAI-compatible model client against the scripted model server:
whole and streamed answers, tool-call deltas, usage, errors, retries, timeouts; and that
an OpenAI-compatible agent never imports litellm (fallbacks and the caller's streaming
choice are covered through the runtime and the servers)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from engine.errors import ModelRequestError, ModelTimeoutError, ModelUnavailableError
from engine.litellm_chat import LiteLlmChat
from engine.llm import ModelReply, TextChunk
from engine.openai_chat import ChatRequest, OpenAIChat
from localfleet.modelserver import ScriptedModelServer
from localfleet.modelserver.tokens import count_prompt_tokens
from specmesh.ports import free_port

pytestmark = pytest.mark.integration

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
SCRIPT: dict[str, Any] = {
    "rules": [
        {
            "match": {"lastUser": "weather in (?P<city>\\w+)", "lastMessageIsTool": False},
            "reply": {
                "type": "toolCalls",
                "toolCalls": [
                    {"id": "call_w1", "name": "get_weather", "arguments": {"city": "{{city}}"}},
                    {"id": "call_w2", "name": "get_weather", "arguments": {"city": "Oslo"}},
                ],
            },
        },
        {
            "match": {"lastUser": "explode"},
            "reply": {"type": "error", "status": 503, "message": "overloaded"},
        },
        {
            "match": {"lastUser": "refuse"},
            "reply": {"type": "error", "status": 400, "message": "key sk-secret is bad"},
        },
    ]
}


@pytest.fixture
async def server() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(script=SCRIPT) as s:
        yield s


@pytest.fixture
async def chat() -> AsyncIterator[OpenAIChat]:
    client = OpenAIChat()
    yield client
    await client.aclose()


def _request(server_url: str, text: str, **kw: Any) -> ChatRequest:
    return ChatRequest(
        api_base=server_url,
        model=kw.pop("model", "scripted"),
        display="scripted",
        api_key="sidecar-injected",
        messages=[{"role": "user", "content": text}],
        timeout=10,
        **kw,
    )


async def _collect(
    chat: OpenAIChat | LiteLlmChat, request: ChatRequest, *, stream: bool
) -> list[Any]:
    return [item async for item in chat.call(request, stream=stream)]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_has_its_text_and_usage(
    server: ScriptedModelServer, chat: OpenAIChat, stream: bool
) -> None:
    request = _request(server.url, "hello there", temperature=0.2, max_tokens=64)

    items = await _collect(chat, request, stream=stream)

    *chunks, reply = items
    assert isinstance(reply, ModelReply)
    assert all(isinstance(c, TextChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == reply.text == "scripted: hello there"
    assert len(chunks) == (3 if stream else 1)
    assert reply.finish_reason == "stop"
    prompt = count_prompt_tokens([{"role": "user", "content": "hello there"}])
    assert reply.usage == {
        "prompt_tokens": prompt,
        "completion_tokens": 4,
        "total_tokens": prompt + 4,
    }
    [recorded] = server.requests()
    assert recorded.stream is stream
    assert recorded.body["temperature"] == 0.2 and recorded.body["max_tokens"] == 64


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls_are_assembled_whole_or_from_deltas(
    server: ScriptedModelServer, chat: OpenAIChat, stream: bool
) -> None:
    request = _request(server.url, "weather in Lisbon", tools=TOOLS)

    *_, reply = await _collect(chat, request, stream=stream)

    assert reply.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [
        ("call_w1", "get_weather", '{"city": "Lisbon"}'),
        ("call_w2", "get_weather", '{"city": "Oslo"}'),
    ]
    assert server.requests()[0].body["tools"] == TOOLS


async def test_an_unavailable_model_is_retried_then_reported(
    server: ScriptedModelServer, chat: OpenAIChat
) -> None:
    with pytest.raises(ModelUnavailableError) as caught:
        await _collect(chat, _request(server.url, "explode", max_retries=2), stream=True)

    assert caught.value.status == 503
    assert len(server.requests()) == 3


async def test_a_refusal_is_not_retried_and_does_not_echo_the_provider(
    server: ScriptedModelServer, chat: OpenAIChat
) -> None:
    with pytest.raises(ModelRequestError) as caught:
        await _collect(chat, _request(server.url, "refuse", max_retries=2), stream=False)

    assert caught.value.status == 400
    assert "sk-secret" not in str(caught.value)
    assert len(server.requests()) == 1


async def test_nothing_listening_is_unavailable(chat: OpenAIChat) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"

    with pytest.raises(ModelUnavailableError):
        await _collect(chat, _request(url, "hi"), stream=False)


async def test_a_model_slower_than_the_timeout_times_out(chat: OpenAIChat) -> None:
    release = asyncio.Event()

    async def never(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", never)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        request = dataclasses.replace(_request(f"http://127.0.0.1:{port}/v1", "hi"), timeout=0.2)
        with pytest.raises(ModelTimeoutError):
            await _collect(chat, request, stream=False)
    finally:
        release.set()
        await runner.cleanup()


def test_an_openai_compatible_engine_does_not_import_litellm_chromadb_or_mcp() -> None:
    probe = (
        "import sys, engine.main, engine.hot_reload, engine.server, engine.intake, engine.context;"
        "print(sorted(m for m in ('litellm', 'chromadb', 'mcp', 'openai') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_litellm_translates_goes_through_litellm(
    server: ScriptedModelServer, stream: bool
) -> None:
    chat = LiteLlmChat(provider="hosted_vllm")  # litellm's OpenAI-compatible vLLM provider

    *_, reply = await _collect(
        chat, _request(server.url, "weather in Lisbon", tools=TOOLS), stream=stream
    )
    with pytest.raises(ModelUnavailableError):
        await _collect(chat, _request(server.url, "explode"), stream=stream)

    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("get_weather", '{"city": "Lisbon"}'),
        ("get_weather", '{"city": "Oslo"}'),
    ]
    assert reply.usage["prompt_tokens"] > 0
