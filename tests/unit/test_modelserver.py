"""The scripted model server without litellm: scripts, tokens, embeddings, wire format,
and its HTTP API on loopback through a plain aiohttp client."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import signal
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from localfleet.modelserver import (
    ScriptedModelServer,
    ScriptError,
    cosine,
    count_tokens,
    embed_text,
    load_script,
    parse_script,
)
from localfleet.modelserver.completions import Completion, ToolCall
from localfleet.modelserver.recording import RequestLog
from localfleet.modelserver.script import ChatView, ScriptEngine
from localfleet.modelserver.tokens import count_prompt_tokens, truncate_to_tokens

TIMEOUT = aiohttp.ClientTimeout(total=10)


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _view(messages: list[dict[str, Any]], **kw: Any) -> ChatView:
    return ChatView.of(model=kw.pop("model", "scripted"), messages=messages, **kw)


@pytest.fixture
async def server() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer() as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


# ---------------------------------------------------------------- tokens and embeddings


def test_count_tokens_counts_words_and_punctuation() -> None:
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("  ") == 0
    assert count_tokens("snake_case 42") == 2


def test_truncate_to_tokens_keeps_a_prefix_of_that_many_tokens() -> None:
    assert truncate_to_tokens("one two, three", 3) == "one two,"
    assert truncate_to_tokens("one two", 5) == "one two"
    assert truncate_to_tokens("one", 0) == ""


def test_prompt_tokens_count_framing_messages_and_tools() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    bare = count_prompt_tokens(messages)
    with_tools = count_prompt_tokens(messages, [{"type": "function"}])

    assert bare == 3 + (3 + 1 + 3) + (3 + 1 + 1)
    assert with_tools > bare


def test_embeddings_are_deterministic_unit_vectors() -> None:
    a = embed_text("The cat sat on the mat")
    b = embed_text("The cat sat on the mat")
    empty = embed_text("")

    assert a == b
    assert len(a) == 256
    assert math.isclose(sum(x * x for x in a), 1.0)
    assert math.isclose(sum(x * x for x in empty), 1.0)


def test_embeddings_rank_texts_sharing_words_higher() -> None:
    query = embed_text("how do I reset my password")
    close = embed_text("To reset your password, open settings")
    far = embed_text("Quarterly revenue grew in Europe")

    assert cosine(query, close) > cosine(query, far)
    assert cosine(query, close) > 0.2


# ---------------------------------------------------------------- scripts


def test_rules_match_in_order_and_stop_after_times() -> None:
    engine = ScriptEngine(
        parse_script(
            {
                "rules": [
                    {
                        "name": "once",
                        "match": {"lastUser": "hello"},
                        "reply": {"type": "text", "text": "first"},
                        "times": 1,
                    },
                    {"match": {"lastUser": "hello"}, "reply": {"type": "text", "text": "again"}},
                ]
            }
        )
    )

    replies = [engine.decide(_view(_user("hello"))).text() for _ in range(3)]
    other = engine.decide(_view(_user("bye")))

    assert replies == ["first", "again", "again"]
    assert engine.fired == [1, 2]
    assert (other.rule_index, other.text()) == (None, "scripted: bye")


def test_a_cycle_answers_a_deterministic_share_of_the_matching_requests() -> None:
    engine = ScriptEngine(
        parse_script(
            {
                "rules": [
                    {
                        "match": {"lastUser": "flaky"},
                        "cycle": {"every": 10, "first": 3},
                        "reply": {"type": "error", "status": 500, "message": "boom"},
                    }
                ]
            }
        )
    )

    flaky = [engine.decide(_view(_user("flaky"))).rule_index for _ in range(20)]
    other = engine.decide(_view(_user("steady")))

    assert flaky == ([0] * 3 + [None] * 7) * 2  # 30 %, the rest falls through
    assert engine.fired == [6] and other.rule_index is None
    with pytest.raises(ScriptError, match="first must be <= every"):
        parse_script(
            {"rules": [{"cycle": {"every": 2, "first": 3}, "reply": {"type": "text", "text": "x"}}]}
        )


def test_rule_conditions_model_system_tool_offered_and_tool_result() -> None:
    engine = ScriptEngine(
        parse_script(
            {
                "rules": [
                    {
                        "name": "result",
                        "match": {"toolResult": "(?P<temp>\\d+) C"},
                        "reply": {"type": "text", "text": "{{temp}} degrees"},
                    },
                    {
                        "name": "call",
                        "match": {
                            "model": "gpt-.*",
                            "system": "(?i)weather bot",
                            "toolOffered": "get_weather",
                            "lastMessageIsTool": False,
                        },
                        "reply": {
                            "type": "toolCalls",
                            "toolCalls": [{"name": "get_weather", "arguments": {"q": "x"}}],
                        },
                    },
                ]
            }
        )
    )
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    first = [{"role": "system", "content": "You are a Weather Bot"}, *_user("weather?")]
    second = [*first, {"role": "tool", "tool_call_id": "c", "content": "21 C"}]

    assert engine.decide(_view(first, model="gpt-4o", tools=tools)).rule_name == "call"
    assert engine.decide(_view(first, model="scripted", tools=tools)).rule_name is None
    assert engine.decide(_view(first, model="gpt-4o")).rule_name is None
    assert engine.decide(_view(second, model="gpt-4o", tools=tools)).text() == "21 degrees"


def test_placeholders_fill_tool_arguments_with_named_groups() -> None:
    engine = ScriptEngine(
        parse_script(
            {
                "rules": [
                    {
                        "match": {"lastUser": 'in "(?P<city>[\\w ]+)"'},
                        "reply": {
                            "type": "toolCalls",
                            "toolCalls": [
                                {"name": "a", "arguments": {"city": "{{city}}", "n": 1}},
                                {"name": "b", "arguments": '{"said": "{{last_user}}"}'},
                            ],
                        },
                    }
                ]
            }
        )
    )
    decision = engine.decide(_view(_user('weather in "New York"')))
    assert decision.reply.type == "toolCalls"
    calls = decision.reply.tool_calls

    assert json.loads(decision.arguments(calls[0])) == {"city": "New York", "n": 1}
    assert json.loads(decision.arguments(calls[1])) == {"said": 'weather in "New York"'}


def test_unknown_placeholder_is_rejected_with_its_path() -> None:
    with pytest.raises(ScriptError) as caught:
        parse_script(
            {"rules": [{"match": {"lastUser": "x"}, "reply": {"type": "text", "text": "{{who}}"}}]}
        )

    assert [i.path for i in caught.value.issues] == ["rules[0]"]
    assert "reply.text: unknown placeholder {{who}}" in str(caught.value)


def test_invalid_regex_and_unknown_field_are_rejected_with_paths() -> None:
    with pytest.raises(ScriptError) as caught:
        parse_script(
            {
                "rules": [
                    {"match": {"lastUser": "(unclosed"}, "reply": {"type": "text", "text": "x"}},
                    {"match": {"lastUsr": "x"}, "reply": {"type": "text", "text": "x"}},
                    {"reply": {"type": "error", "status": 200, "message": "no"}},
                ]
            }
        )

    issues = {i.path: i.message for i in caught.value.issues}
    assert issues["rules[0].match.lastUser"].startswith("invalid regular expression")
    assert "did you mean 'lastUser'" in issues["rules[1].match.lastUsr"]
    assert issues["rules[2].reply.status"] == "must be >= 400 (got 200)"


def test_load_script_reads_yaml_and_names_the_file_on_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("rules:\n  - match: {lastUser: hi}\n    reply: {type: text, text: hey}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - reply: {type: txt}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n")

    script = load_script(good)
    with pytest.raises(ScriptError) as invalid:
        load_script(bad)
    with pytest.raises(ScriptError) as unparsable:
        load_script(broken)
    with pytest.raises(ScriptError) as missing:
        load_script(tmp_path / "nope.yaml")

    assert script.rules[0].match.last_user == "hi"
    assert str(invalid.value).startswith(f"{bad}: ")
    assert "rules[0].reply: 'type' must be one of 'text', 'toolCalls', 'error'" in str(
        invalid.value
    )
    assert f"{broken}:" in str(unparsable.value) and "invalid YAML" in str(unparsable.value)
    assert "no such file" in str(missing.value)


# ---------------------------------------------------------------- wire format


def test_stream_chunks_reassemble_text_and_tool_calls() -> None:
    completion = Completion(
        id="c1",
        created=0,
        model="m",
        text="Let me check,  please.\n",
        tool_calls=(ToolCall("call_1", "lookup", json.dumps({"query": "a" * 40})),),
        finish_reason="tool_calls",
        prompt_tokens=5,
        completion_tokens=7,
    )

    chunks = completion.chunks(include_usage=True)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    arguments = "".join(
        call["function"].get("arguments", "")
        for c in chunks
        if c["choices"]
        for call in c["choices"][0]["delta"].get("tool_calls", [])
    )

    assert text == completion.text
    assert arguments == completion.tool_calls[0].arguments
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


# ---------------------------------------------------------------- HTTP API


async def test_health_and_models_answer(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{server.root_url}/healthz") as health:
        assert (health.status, await health.json()) == (200, {"status": "ok"})
    async with http.get(f"{server.url}/models") as models:
        body = await models.json()

    assert [m["id"] for m in body["data"]] == ["scripted"]


async def test_chat_answers_with_fallback_and_usage(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    messages = _user("ping it")
    payload = {"model": "scripted", "messages": messages}

    async with http.post(f"{server.url}/chat/completions", json=payload) as response:
        body = await response.json()

    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "scripted: ping it"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": count_prompt_tokens(messages),
        "completion_tokens": 4,
        "total_tokens": count_prompt_tokens(messages) + 4,
    }


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    payload = {"model": "scripted", "messages": _user("a b c d"), "max_tokens": 3}

    async with http.post(f"{server.url}/chat/completions", json=payload) as response:
        choice = (await response.json())["choices"][0]

    assert (choice["message"]["content"], choice["finish_reason"]) == ("scripted: a", "length")


async def test_malformed_requests_get_openai_errors(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    url = f"{server.url}/chat/completions"
    async with http.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        not_json = (r.status, await r.json())
    async with http.post(url, json={"model": "scripted", "messages": []}) as r:
        no_messages = (r.status, await r.json())

    assert not_json[0] == 400 and "not valid JSON" in not_json[1]["error"]["message"]
    assert no_messages[0] == 400 and no_messages[1]["error"]["param"] == "messages"
    assert no_messages[1]["error"]["type"] == "invalid_request_error"


async def test_streamed_sse_ends_with_done(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    payload = {"model": "scripted", "messages": _user("stream me"), "stream": True}

    async with http.post(f"{server.url}/chat/completions", json=payload) as response:
        raw = (await response.read()).decode()
        content_type = response.headers["Content-Type"]

    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    chunks = [json.loads(e) for e in events[:-1]]
    assert content_type.startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
        "scripted: stream me"
    )
    assert all("usage" not in c for c in chunks)


async def test_embeddings_in_float_and_base64_agree(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    url = f"{server.url}/embeddings"
    payload: dict[str, Any] = {"model": "e", "input": ["alpha beta", "gamma"], "dimensions": 8}

    async with http.post(url, json=payload) as r:
        floats = await r.json()
    async with http.post(url, json={**payload, "encoding_format": "base64"}) as r:
        encoded = await r.json()

    decoded = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["data"][0]["embedding"] == pytest.approx(decoded, abs=1e-6)
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_script_is_replaced_at_runtime_and_invalid_one_refused(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    script = {"rules": [{"match": {}, "reply": {"type": "text", "text": "replaced"}}]}
    admin = f"{server.root_url}/_scripted/script"

    async with http.put(admin, json=script) as r:
        assert r.status == 200
    async with http.post(
        f"{server.url}/chat/completions", json={"model": "m", "messages": _user("x")}
    ) as r:
        answer = (await r.json())["choices"][0]["message"]["content"]
    async with http.put(admin, json={"rules": [{"reply": {"type": "text"}}]}) as r:
        refused = (r.status, await r.json())
    async with http.get(admin) as r:
        current = await r.json()

    assert answer == "replaced"
    assert refused[0] == 400
    assert refused[1]["error"]["issues"] == [
        {"path": "rules[0].reply.text", "rule": "missing", "message": "required field is missing"}
    ]
    assert current["script"]["rules"][0]["reply"]["text"] == "replaced"
    assert current["fired"] == [1]


async def test_requests_are_recorded_with_authorization_redacted(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    await server.wait_for_requests(0)
    headers = {"Authorization": "Bearer sk-wire-value", "X-Trace": "t1"}
    payload = {"model": "m", "messages": _user("hi"), "temperature": 0.5}
    async with http.post(f"{server.url}/chat/completions", json=payload, headers=headers):
        pass
    async with http.post(f"{server.url}/chat/completions", json=payload):
        pass
    admin = f"{server.root_url}/_scripted/requests"

    async with http.get(admin) as r:
        redacted = (await r.json())["requests"]
    async with http.get(f"{admin}?include_auth=1") as r:
        raw = (await r.json())["requests"]
    async with http.delete(admin) as r:
        assert r.status == 200

    assert [r["hasAuthorization"] for r in redacted] == [True, False]
    assert redacted[0]["headers"]["authorization"] == "<redacted>"
    assert redacted[0]["authorization"] is None
    assert "sk-wire-value" not in json.dumps(redacted)
    assert redacted[0]["headers"]["x-trace"] == "t1"
    assert redacted[0]["body"]["temperature"] == 0.5
    assert raw[0]["authorization"] == "Bearer sk-wire-value"
    assert server.requests() == []


async def test_usage_is_recorded_on_the_request_it_answered_even_out_of_number_order() -> None:
    log = RequestLog(capacity=3)
    for seq in (1, 3, 2, 4):  # numbers are reserved before bodies are read: 3 lands first
        log.add(
            seq=seq,
            method="POST",
            path="/v1/chat/completions",
            endpoint="chat",
            headers={},
            body={},
        )

    log.set_usage(3, {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
    log.set_usage(2, {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3})
    log.set_usage(1, {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18})  # dropped

    assert [(r.seq, r.usage) for r in log.records()] == [
        (3, {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}),
        (2, {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}),
        (4, None),
    ]


async def test_wait_for_requests_returns_once_enough_arrived(
    server: ScriptedModelServer, http: aiohttp.ClientSession
) -> None:
    waiter = asyncio.create_task(server.wait_for_requests(2, timeout=10))
    for _ in range(2):
        async with http.get(f"{server.url}/models"):
            pass

    records = await waiter
    with pytest.raises(TimeoutError):
        await server.wait_for_requests(3, timeout=0.05)

    assert [r.endpoint for r in records] == ["models", "models"]


async def test_start_on_a_taken_port_raises_service_error(server: ScriptedModelServer) -> None:
    from specmesh.errors import ServiceError

    with pytest.raises(ServiceError, match="cannot listen"):
        async with ScriptedModelServer(port=server.port):
            pass


async def test_cli_prints_url_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "s.json"
    script.write_text(json.dumps({"rules": [{"reply": {"type": "text", "text": "from cli"}}]}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "localfleet.modelserver",
        "--script",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as http,
            http.post(f"{url}/chat/completions", json={"model": "m", "messages": _user("x")}) as r,
        ):
            answer = (await r.json())["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert answer == "from cli"
    assert code == 0


async def test_cli_rejects_an_invalid_script_with_exit_code_1(tmp_path: Path) -> None:
    script = tmp_path / "bad.yaml"
    script.write_text("rules:\n  - reply: {type: text, text: x, delay: 5}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "localfleet.modelserver",
        "--script",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)

    assert proc.returncode == 1
    assert "rules[0].reply.delay: unknown field 'delay'" in err.decode()
