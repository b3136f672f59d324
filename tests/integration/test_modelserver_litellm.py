"""The scripted model server through the real litellm code path (``openai/`` provider)."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import litellm
import pytest
from litellm.exceptions import ServiceUnavailableError

from localfleet.modelserver import ScriptedModelServer, cosine
from localfleet.modelserver.tokens import count_prompt_tokens

pytestmark = pytest.mark.integration

litellm.suppress_debug_info = True

MODEL = "openai/scripted"
KEY = "sk-scripted-test"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
SCRIPT: dict[str, Any] = {
    "rules": [
        {
            "name": "weather-result",
            "match": {"toolResult": "(?P<sky>sunny|rainy)"},
            "reply": {"type": "text", "text": "It is {{sky}} ({{last_tool_result}})."},
        },
        {
            "name": "weather-call",
            "match": {
                "lastUser": "weather in (?P<city>\\w+)",
                "toolOffered": "get_weather",
                "lastMessageIsTool": False,
            },
            "reply": {
                "type": "toolCalls",
                "toolCalls": [
                    {"id": "call_w1", "name": "get_weather", "arguments": {"city": "{{city}}"}}
                ],
            },
        },
        {
            "name": "overloaded",
            "match": {"lastUser": "explode"},
            "reply": {"type": "error", "status": 503, "message": "overloaded, try later"},
        },
        {
            "name": "poem",
            "match": {"system": "(?i)poet"},
            "reply": {"type": "text", "text": "Roses are red,\nviolets are blue."},
        },
    ]
}


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def server() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(script=SCRIPT) as s:
        yield s


async def _complete(server: ScriptedModelServer, **kw: Any) -> Any:
    return await litellm.acompletion(
        model=MODEL, api_base=server.url, api_key=KEY, max_retries=0, timeout=10, **kw
    )


async def test_plain_answer_has_content_and_usage(server: ScriptedModelServer) -> None:
    messages = _user("hello there")

    response = await _complete(server, messages=messages)

    assert response.choices[0].message.content == "scripted: hello there"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens == count_prompt_tokens(messages)
    assert response.usage.completion_tokens == 4
    assert response.usage.total_tokens == response.usage.prompt_tokens + 4


async def test_streamed_answer_reassembles_with_usage(server: ScriptedModelServer) -> None:
    messages = [{"role": "system", "content": "You are a poet."}, *_user("a poem please")]

    stream = await _complete(
        server, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    rebuilt: Any = litellm.stream_chunk_builder(chunks, messages=messages)

    assert len(chunks) > 3
    assert rebuilt.choices[0].message.content == "Roses are red,\nviolets are blue."
    assert rebuilt.choices[0].finish_reason == "stop"
    assert rebuilt.usage.prompt_tokens == count_prompt_tokens(messages)
    assert rebuilt.usage.completion_tokens == 8


async def test_tool_call_then_tool_result_turn(server: ScriptedModelServer) -> None:
    messages: list[dict[str, Any]] = _user("What is the weather in Paris?")

    first = await _complete(server, messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"},
    ]
    second = await _complete(server, messages=messages, tools=TOOLS)

    assert first.choices[0].finish_reason == "tool_calls"
    assert (call.id, call.function.name) == ("call_w1", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert second.choices[0].message.content == "It is sunny (sunny, 24 C)."
    assert [r.rule_name for r in server.requests()] == ["weather-call", "weather-result"]


async def test_streamed_tool_call_reassembles(server: ScriptedModelServer) -> None:
    messages = _user("weather in Lisbon")

    stream = await _complete(server, messages=messages, tools=TOOLS, stream=True)
    rebuilt: Any = litellm.stream_chunk_builder([c async for c in stream], messages=messages)

    calls = rebuilt.choices[0].message.tool_calls
    assert rebuilt.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name) for c in calls] == [("call_w1", "get_weather")]
    assert json.loads(calls[0].function.arguments) == {"city": "Lisbon"}


async def test_embeddings_have_shape_and_rank_by_shared_words(
    server: ScriptedModelServer,
) -> None:
    texts = [
        "How do I rotate the database password?",
        "Rotate the database password from the admin console.",
        "The cafeteria serves lunch at noon.",
    ]

    response = await litellm.aembedding(
        model="openai/embed", api_base=server.url, api_key=KEY, input=texts, timeout=10
    )
    vectors = [d["embedding"] for d in response.data]

    assert [len(v) for v in vectors] == [256, 256, 256]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert response.usage.prompt_tokens > 0


async def test_script_replaced_at_runtime_changes_answers(server: ScriptedModelServer) -> None:
    before = await _complete(server, messages=_user("who are you"))
    replacement = {"rules": [{"reply": {"type": "text", "text": "version two"}, "times": 1}]}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.put(f"{server.root_url}/_scripted/script", json=replacement) as put,
    ):
        assert put.status == 200

    after = await _complete(server, messages=_user("who are you"))
    exhausted = await _complete(server, messages=_user("who are you"))

    assert before.choices[0].message.content == "scripted: who are you"
    assert after.choices[0].message.content == "version two"
    assert exhausted.choices[0].message.content == "scripted: who are you"


async def test_requests_are_recorded_with_the_key_redacted(server: ScriptedModelServer) -> None:
    await _complete(server, messages=_user("remember me"), tools=TOOLS, temperature=0.2)

    (record,) = await server.wait_for_requests(1)
    (raw,) = server.requests(include_auth=True)

    assert record.model == "scripted"
    assert record.messages == _user("remember me")
    assert [t["function"]["name"] for t in record.tools] == ["get_weather"]
    assert record.stream is False
    assert record.body["temperature"] == 0.2
    assert record.has_authorization
    assert KEY not in record.model_dump_json()
    assert raw.authorization == f"Bearer {KEY}"


async def test_error_rule_gives_its_status_and_litellm_raises(
    server: ScriptedModelServer,
) -> None:
    with pytest.raises(ServiceUnavailableError) as caught:
        await _complete(server, messages=_user("please explode"))

    assert caught.value.status_code == 503
    assert "overloaded, try later" in str(caught.value)


async def test_invalid_script_is_rejected_with_a_path(server: ScriptedModelServer) -> None:
    bad = {"rules": [{"match": {"toolOffered": ""}, "reply": {"type": "text", "text": "x"}}]}

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.put(f"{server.root_url}/_scripted/script", json=bad) as put,
    ):
        status, body = put.status, await put.json()
    still = await _complete(server, messages=_user("weather in Oslo"), tools=TOOLS)

    assert status == 400
    assert [i["path"] for i in body["error"]["issues"]] == ["rules[0].match.toolOffered"]
    assert "rules[0].match.toolOffered: must not be empty" in body["error"]["message"]
    assert still.choices[0].finish_reason == "tool_calls"
