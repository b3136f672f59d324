"""The engine runtime against real things: the scripted model server through litellm, a
real MCP server over streamable HTTP, a real a2a-sdk partner, a real grpc.aio sidecar.

The sidecar is stood in for by a tiny pass-through egress (aiohttp) that maps
``/llm/v1/*`` to the model server, ``/mcp/<name>`` to the MCP server and
``/a2a/<agent>/*`` to the partner, recording what it forwards.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from a2a.helpers.proto_helpers import new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue_v2 import EventQueue
from a2a.server.request_handlers import DefaultRequestHandlerV2
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Role,
)
from aiohttp import web
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError as McpToolError
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette

from engine.hot_reload import EngineRuntime
from engine.intake import (
    DirSnapshotFeed,
    GrpcSnapshotFeed,
    InMemorySnapshotFeed,
    snapshot_to_proto,
)
from engine.settings import EngineSettings
from engine.turn_protocol import (
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnCompleted,
    TurnEvent,
    TurnFailed,
    TurnRequest,
)
from localfleet.modelserver import ScriptedModelServer
from specmesh.snapshot import PromptBundle, ResolvedSnapshot
from specmesh.spec.models import AgentSpec, McpServerSpec, PromptEntry, PromptRelease
from specmesh.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.integration.asgi_server import free_socket, serve_asgi
from tests.integration.egress_stub import StubEgress, span_exporter
from tests.polling import eventually

pytestmark = pytest.mark.integration

AGENT = "agent-a"
PARTNER = "agent-b"
WAIT = 20.0


# ---------------------------------------------------------------- servers


class McpState:
    """What the in-test MCP server's tools share with the tests."""

    def __init__(self) -> None:
        self.handshakes = 0
        self.reset()

    def reset(self) -> None:
        self.arrived = 0
        self.both_arrived = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate_entered = asyncio.Event()


def _mcp_server(state: McpState) -> MCPServer:
    server = MCPServer("kb")

    @server.tool()
    def lookup(key: str) -> str:
        """Look a key up in the knowledge base."""
        return f"value-of-{key}"

    @server.tool()
    def boom() -> str:
        """Always fails."""
        raise McpToolError("the database is down")

    @server.tool()
    async def rendezvous(name: str) -> str:
        """Returns 'together' only when two calls run at the same time."""
        state.arrived += 1
        if state.arrived >= 2:
            state.both_arrived.set()
        try:
            async with asyncio.timeout(5):
                await state.both_arrived.wait()
        except TimeoutError:
            return f"{name}: alone"
        return f"{name}: together"

    @server.tool()
    async def grow(ctx: Context) -> str:
        """Adds the tool 'fresh' and announces the change."""
        server.add_tool(lambda: "fresh!", name="fresh", description="A new tool.")
        await ctx.notify_tools_changed()
        return "grown"

    @server.tool()
    async def gate() -> str:
        """Waits until the test opens the gate."""
        state.gate_entered.set()
        await state.gate.wait()
        return "opened"

    return server


def _counting(app: Any, state: McpState) -> Any:
    """ASGI wrapper counting MCP handshakes (server/discover or initialize)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        messages = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            method = json.loads(body).get("method") if body else None
        except (ValueError, AttributeError):
            method = None
        if method in ("server/discover", "initialize"):
            state.handshakes += 1
        replay = iter(messages)

        async def receive_again() -> Any:
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        await app(scope, receive_again, send)

    return wrapped


class EchoExecutor(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = context.get_user_input()
        await event_queue.enqueue_event(
            new_text_message(
                f"partner heard: {text}", context_id=context.context_id, role=Role.ROLE_AGENT
            )
        )

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


def _partner_app(url: str) -> Starlette:
    card = AgentCard(
        name=PARTNER,
        description="Knows everything about gateways.",
        version="1",
        supported_interfaces=[
            AgentInterface(protocol_binding="JSONRPC", url=url, protocol_version="1.0")
        ],
        capabilities=AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(
                id="routes", name="Gateway routes", description="Explains routes.", tags=["gw"]
            )
        ],
    )
    handler = DefaultRequestHandlerV2(
        agent_executor=EchoExecutor(), task_store=InMemoryTaskStore(), agent_card=card
    )
    return Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, "/")])


class Egress(StubEgress):
    """A stand-in for the sidecar's egress: path prefix -> upstream, streamed through."""

    handler_cancellation = True

    def __init__(self, *, model: str, mcp: Mapping[str, str], a2a: Mapping[str, str]) -> None:
        super().__init__()
        self.model = model
        self.mcp = dict(mcp)
        self.a2a = dict(a2a)
        self.a2a_headers: list[dict[str, str]] = []

    def _target(self, path: str, headers: Mapping[str, str]) -> str | None:
        if m := re.fullmatch(r"llm/(?:fallbacks/\d+/)?v1/(.*)", path):
            return f"{self.model}/v1/{m.group(1)}"
        if m := re.fullmatch(r"mcp/([^/]+)(/.*)?", path):
            base = self.mcp.get(m.group(1))
            return None if base is None else base + (m.group(2) or "")
        if m := re.fullmatch(r"a2a/([^/]+)(/.*)?", path):
            base = self.a2a.get(m.group(1))
            self.a2a_headers.append({k.lower(): v for k, v in headers.items()})
            return None if base is None else base + (m.group(2) or "/")
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = self._target(request.match_info["tail"], request.headers)
        if target is None:
            return web.Response(status=403, text="not allowed")
        if request.query_string:
            target += "?" + request.query_string
        return await self.relay(request, target)


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(script={"rules": []}) as server:
        yield server


@pytest.fixture(scope="module")
async def mcp_state() -> McpState:
    return McpState()


@pytest.fixture(scope="module")
async def mcp_url(mcp_state: McpState) -> AsyncIterator[str]:
    server = _mcp_server(mcp_state)
    app = _counting(server.streamable_http_app(), mcp_state)
    async with serve_asgi(app) as url:
        yield f"{url}/mcp"


@pytest.fixture(scope="module")
async def partner_url() -> AsyncIterator[str]:
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with serve_asgi(_partner_app(url), sock=sock) as served:
        yield served


@pytest.fixture(scope="module")
async def egress(
    model: ScriptedModelServer, mcp_url: str, partner_url: str
) -> AsyncIterator[Egress]:
    e = Egress(
        model=model.root_url,
        mcp={"kb": mcp_url, "kb2": mcp_url},
        a2a={PARTNER: partner_url},
    )
    async with e.running():
        yield e


@pytest.fixture(autouse=True)
def _fresh(mcp_state: McpState, model: ScriptedModelServer, egress: Egress) -> None:
    mcp_state.reset()
    model.clear_requests()
    egress.a2a_headers.clear()


# ---------------------------------------------------------------- helpers


def make_snapshot(
    revision: int = 1,
    *,
    template: str = "You are a helpful assistant. {{tone}}",
    versions: Mapping[str, str] | None = None,
    release: PromptRelease | None = None,
    mcp: Mapping[str, list[str] | None] | None = None,
    partners: tuple[str, ...] = (),
    registry_description: str = "knowledge base",
    base: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
) -> ResolvedSnapshot:
    mcp = {"kb": None} if mcp is None else mcp
    versions = versions or {"1.0": template}
    spec = AgentSpec.model_validate(
        {
            "base": {
                "description": "Agent A answers questions.",
                "promptKey": "agent-a",
                "variables": {"tone": "Be brief."},
                "skills": [{"id": "qa", "name": "Questions"}],
                **(base or {}),
            },
            "model": {
                "model": "scripted",
                "temperature": 0,
                "maxRetries": 0,
                "timeoutSeconds": 10,
                **(model or {}),
            },
            "mcpServers": [
                {"mcpServerName": name, **({"allowedTools": allowed} if allowed else {})}
                for name, allowed in mcp.items()
            ],
            "partnerAgents": [{"agentName": p} for p in partners],
        }
    )
    return ResolvedSnapshot(
        agent_name=AGENT,
        revision=revision,
        track="stable",
        spec=spec,
        prompt=PromptBundle(
            versions={
                v: PromptEntry(prompt_key="agent-a", version=v, template=t)
                for v, t in versions.items()
            },
            release=release,
        ),
        mcp_servers={
            name: McpServerSpec(url="http://registry.invalid/mcp", description=registry_description)
            for name in mcp
        },
    )


@asynccontextmanager
async def running_engine(
    egress: Egress,
    snapshot: ResolvedSnapshot,
    *,
    clock: Callable[[], float] = time.monotonic,
    **settings: Any,
) -> AsyncIterator[tuple[EngineRuntime, InMemorySnapshotFeed]]:
    """An engine on ``snapshot``; ``clock``: its pin clock; ``settings``: EngineSettings."""
    feed = InMemorySnapshotFeed()
    config = EngineSettings(
        agent_name=AGENT,
        egress_url=egress.url,
        tool_timeout_seconds=settings.pop("tool_timeout_seconds", 10),
        mcp_connect_timeout_seconds=5,
        card_timeout_seconds=2,
        **settings,
    )
    async with EngineRuntime(feed=feed, settings=config, clock=clock) as runtime:
        await feed.publish(snapshot)
        await runtime.wait_ready(timeout=WAIT)
        yield runtime, feed


async def turn(
    runtime: EngineRuntime, text: str, *, context_id: str = "c1", depth: int = 0
) -> list[TurnEvent]:
    async with asyncio.timeout(WAIT):
        return [
            e
            async for e in runtime.run(
                TurnRequest(context_id=context_id, text=text, call_depth=depth)
            )
        ]


def tool_call(name: str, arguments: Mapping[str, Any], call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "name": name, "arguments": dict(arguments)}


def rules(*items: dict[str, Any]) -> dict[str, Any]:
    return {"rules": list(items)}


def on_tool_result(text: str) -> dict[str, Any]:
    return {"match": {"lastMessageIsTool": True}, "reply": {"type": "text", "text": text}}


def on_user(pattern: str, *calls: dict[str, Any]) -> dict[str, Any]:
    return {
        "match": {"lastUser": pattern, "lastMessageIsTool": False},
        "reply": {"type": "toolCalls", "toolCalls": list(calls)},
    }


# ---------------------------------------------------------------- the loop


async def test_turn_calls_an_mcp_tool_then_answers(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(
        rules(
            on_tool_result("The answer is {{last_tool_result}}."),
            on_user("lookup (?P<key>\\w+)", tool_call("kb__lookup", {"key": "{{key}}"})),
        )
    )
    async with running_engine(egress, make_snapshot()) as (runtime, _):
        events = await turn(runtime, "please lookup color")

    started = [e for e in events if isinstance(e, ToolCallStarted)]
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    final = events[-1]
    assert [(s.name, dict(s.arguments)) for s in started] == [("kb__lookup", {"key": "color"})]
    assert [(f.ok, f.result) for f in finished] == [(True, "value-of-color")]
    assert isinstance(final, TurnCompleted)
    assert final.text == "The answer is value-of-color."
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == final.text
    assert (final.revision, final.prompt_version) == (1, "1.0")
    requests = model.requests()
    assert len(requests) == 2
    assert final.usage["total_tokens"] > 0
    assert requests[0].messages[0] == {
        "role": "system",
        "content": "You are a helpful assistant. Be brief.",
    }
    auth = model.requests(include_auth=True)[0].headers["authorization"]
    assert auth == "Bearer sidecar-injected"  # the engine holds no key


async def test_a_failing_tool_goes_back_to_the_model_as_an_error(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(
        rules(
            on_tool_result("Sorry: {{last_tool_result}}"),
            on_user("boom", tool_call("kb__boom", {})),
        )
    )
    async with running_engine(egress, make_snapshot()) as (runtime, _):
        events = await turn(runtime, "boom please")

    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert len(finished) == 1 and not finished[0].ok
    assert "the database is down" in finished[0].result
    assert isinstance(events[-1], TurnCompleted)
    assert "the database is down" in events[-1].text


async def test_unknown_tools_and_bad_arguments_are_errors_for_the_model(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(
        rules(
            on_tool_result("ok"),
            {
                "match": {"lastUser": "odd", "lastMessageIsTool": False},
                "reply": {
                    "type": "toolCalls",
                    "toolCalls": [
                        {"id": "a", "name": "nope__missing", "arguments": {}},
                        {"id": "b", "name": "kb__lookup", "arguments": "{not json"},
                    ],
                },
            },
        )
    )
    async with running_engine(egress, make_snapshot()) as (runtime, _):
        events = await turn(runtime, "odd calls")

    results = {e.call_id: (e.ok, e.result) for e in events if isinstance(e, ToolCallFinished)}
    assert results["a"][0] is False and "no tool named" in results["a"][1]
    assert results["b"][0] is False and "not valid JSON" in results["b"][1]
    assert isinstance(events[-1], TurnCompleted)


async def test_tool_calls_of_one_step_run_concurrently(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(
        rules(
            on_tool_result("done"),
            on_user(
                "meet",
                tool_call("kb__rendezvous", {"name": "x"}, "call_x"),
                tool_call("kb__rendezvous", {"name": "y"}, "call_y"),
            ),
        )
    )
    async with running_engine(egress, make_snapshot()) as (runtime, _):
        events = await turn(runtime, "meet")

    results = sorted(e.result for e in events if isinstance(e, ToolCallFinished))
    assert results == ["x: together", "y: together"]
    tool_messages = [m for m in model.requests()[-1].messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_x", "call_y"]


async def test_a_tool_call_past_the_tool_timeout_is_an_error(
    egress: Egress, model: ScriptedModelServer, mcp_state: McpState
) -> None:
    model.set_script(rules(on_tool_result("gave up"), on_user("wait", tool_call("kb__gate", {}))))
    async with running_engine(egress, make_snapshot(), tool_timeout_seconds=0.5) as (runtime, _):
        events = await turn(runtime, "wait for it")
    mcp_state.gate.set()

    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert not finished[0].ok and "timed out" in finished[0].result
    assert isinstance(events[-1], TurnCompleted)


async def test_the_step_limit_refuses_the_turn(egress: Egress, model: ScriptedModelServer) -> None:
    model.set_script(
        rules(
            on_user("loop", tool_call("kb__lookup", {"key": "k"})),
            {
                "match": {"lastMessageIsTool": True},
                "reply": {
                    "type": "toolCalls",
                    "toolCalls": [tool_call("kb__lookup", {"key": "k"})],
                },
            },
        )
    )
    async with running_engine(egress, make_snapshot(), max_steps=3) as (runtime, _):
        events = await turn(runtime, "loop forever")

    assert isinstance(events[-1], TurnFailed)
    assert events[-1].code == "step_limit"
    assert len(model.requests()) == 3
    assert sum(isinstance(e, (TurnCompleted, TurnFailed)) for e in events) == 1


async def test_tools_list_changed_refreshes_the_offered_tools(
    egress: Egress, model: ScriptedModelServer, mcp_state: McpState
) -> None:
    model.set_script(rules(on_tool_result("ok"), on_user("grow", tool_call("kb__grow", {}))))
    async with running_engine(egress, make_snapshot()) as (runtime, _):
        assert runtime.context is not None
        handshakes = mcp_state.handshakes
        before = set(runtime.context.tools())
        await turn(runtime, "grow")
        await eventually(
            lambda: "kb__fresh" in runtime.context.tools(),  # type: ignore[union-attr]
            timeout=WAIT,
            what="the refreshed tool list",
        )

    assert "kb__fresh" not in before
    assert mcp_state.handshakes == handshakes  # refreshed on the same session


async def test_allow_list_and_namespacing_shape_the_offered_tools(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(rules({"match": {}, "reply": {"type": "text", "text": "hi"}}))
    snapshot = make_snapshot(mcp={"kb": ["lookup", "boom"], "kb2": ["lookup"]})
    async with running_engine(egress, snapshot) as (runtime, _):
        await turn(runtime, "hello")

    offered = sorted(t["function"]["name"] for t in model.requests()[0].tools)
    assert offered == ["kb2__lookup", "kb__boom", "kb__lookup"]


async def test_history_is_kept_per_context(egress: Egress, model: ScriptedModelServer) -> None:
    model.set_script(rules({"match": {}, "reply": {"type": "text", "text": "echo {{last_user}}"}}))
    async with running_engine(egress, make_snapshot()) as (runtime, _):
        await turn(runtime, "first", context_id="h1")
        await turn(runtime, "second", context_id="h1")
        await turn(runtime, "other", context_id="h2")

    sent = [[m["content"] for m in r.messages if m["role"] != "system"] for r in model.requests()]
    assert sent[1] == ["first", "echo first", "second"]
    assert sent[2] == ["other"]


async def test_prompt_ab_choice_is_stable_per_context(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(rules({"match": {}, "reply": {"type": "text", "text": "ok"}}))
    snapshot = make_snapshot(
        versions={"1.0": "Prompt A", "2.0": "Prompt B"},
        release=PromptRelease(weights={"1.0": 50, "2.0": 50}),
    )
    async with running_engine(egress, snapshot) as (runtime, _):
        first = {}
        for i in range(12):
            done = (await turn(runtime, "hi", context_id=f"ab-{i}"))[-1]
            assert isinstance(done, TurnCompleted)
            first[f"ab-{i}"] = done.prompt_version
        for cid, version in first.items():
            again = (await turn(runtime, "again", context_id=cid))[-1]
            assert isinstance(again, TurnCompleted) and again.prompt_version == version

    assert set(first.values()) == {"1.0", "2.0"}
    systems = {r.messages[0]["content"] for r in model.requests()}
    assert systems == {"Prompt A", "Prompt B"}


async def test_model_fallback_is_tried_when_the_model_is_unavailable(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(
        rules(
            {
                "match": {"model": "primary"},
                "reply": {"type": "error", "status": 503, "message": "overloaded"},
            },
            {"match": {"model": "backup"}, "reply": {"type": "text", "text": "from backup"}},
        )
    )
    snapshot = make_snapshot(model={"model": "primary", "fallbacks": [{"model": "backup"}]}, mcp={})
    async with running_engine(egress, snapshot) as (runtime, _):
        events = await turn(runtime, "hi")

    assert isinstance(events[-1], TurnCompleted) and events[-1].text == "from backup"
    assert [r.model for r in model.requests()] == ["primary", "backup"]


async def test_a_model_error_fails_the_turn_with_a_safe_message(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(
        rules({"match": {}, "reply": {"type": "error", "status": 400, "message": "x"}})
    )
    async with running_engine(egress, make_snapshot(mcp={})) as (runtime, _):
        events = await turn(runtime, "hi")

    assert isinstance(events[-1], TurnFailed)
    assert events[-1].code == "model_refused"
    assert events[-1].revision == 1


async def test_cancelling_a_turn_cancels_the_tool_call(
    egress: Egress, model: ScriptedModelServer, mcp_state: McpState
) -> None:
    model.set_script(rules(on_tool_result("late"), on_user("wait", tool_call("kb__gate", {}))))
    async with running_engine(egress, make_snapshot()) as (runtime, _):
        task = asyncio.create_task(turn(runtime, "wait"))
        async with asyncio.timeout(WAIT):
            await mcp_state.gate_entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        model.set_script(rules({"match": {}, "reply": {"type": "text", "text": "fine"}}))
        after = await turn(runtime, "still there?")
    mcp_state.gate.set()

    assert isinstance(after[-1], TurnCompleted) and after[-1].text == "fine"
    assert len(model.requests()) == 2  # the cancelled turn never called the model again


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return span_exporter()


async def test_spans_follow_the_genai_conventions_without_content(
    egress: Egress, model: ScriptedModelServer, spans: InMemorySpanExporter
) -> None:
    model.set_script(
        rules(
            on_tool_result("The answer is {{last_tool_result}}."),
            on_user("lookup (?P<key>\\w+)", tool_call("kb__lookup", {"key": "{{key}}"})),
        )
    )
    spans.clear()
    tracer = trace.get_tracer("test")
    async with running_engine(egress, make_snapshot()) as (runtime, _):
        with tracer.start_as_current_span("server") as server_span:
            await turn(runtime, "lookup secretword", context_id="traced")

    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    by_name = {s.name: s for s in finished}
    agent = by_name[f"invoke_agent {AGENT}"]
    chats = [s for s in finished if s.name == "chat scripted"]
    tool = by_name["execute_tool kb__lookup"]
    trace_id = server_span.get_span_context().trace_id
    assert {s.context.trace_id for s in [agent, *chats, tool]} == {trace_id}
    assert (
        agent.parent is not None and agent.parent.span_id == server_span.get_span_context().span_id
    )
    assert all(
        s.parent is not None and s.parent.span_id == agent.context.span_id for s in [*chats, tool]
    )
    attrs = dict(agent.attributes or {})
    assert attrs["gen_ai.operation.name"] == "invoke_agent"
    assert attrs["specmesh.prompt.version"] == "1.0"
    assert attrs["specmesh.spec.revision"] == 1
    assert attrs["gen_ai.usage.input_tokens"] > 0
    chat = dict(chats[0].attributes or {})
    assert chat["gen_ai.operation.name"] == "chat"
    assert chat["gen_ai.request.model"] == "scripted"
    assert chat["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert chat["gen_ai.usage.output_tokens"] > 0
    assert dict(tool.attributes or {})["gen_ai.tool.name"] == "kb__lookup"
    everything = json.dumps([dict(s.attributes or {}) for s in finished], default=str)
    assert "secretword" not in everything
    assert "sidecar-injected" not in everything


# ---------------------------------------------------------------- hot reload


async def test_hot_reload_serves_the_next_turn_while_in_flight_finishes_on_its_revision(
    egress: Egress, model: ScriptedModelServer, mcp_state: McpState
) -> None:
    model.set_script(
        rules(
            on_tool_result("old turn done"),
            on_user("wait", tool_call("kb__gate", {})),
            {"match": {}, "reply": {"type": "text", "text": "new turn"}},
        )
    )
    async with running_engine(egress, make_snapshot(1)) as (runtime, feed):
        in_flight = asyncio.create_task(turn(runtime, "wait", context_id="old"))
        async with asyncio.timeout(WAIT):
            await mcp_state.gate_entered.wait()
        await feed.publish(make_snapshot(2, template="A brand new prompt."))
        await runtime.wait_until(lambda r: r.revision == 2, timeout=WAIT)

        fresh = await turn(runtime, "hello", context_id="new")
        mcp_state.gate.set()
        old = await in_flight

    assert isinstance(fresh[-1], TurnCompleted) and fresh[-1].revision == 2
    assert isinstance(old[-1], TurnCompleted) and old[-1].revision == 1
    systems = [r.messages[0]["content"] for r in model.requests()]
    assert systems.count("You are a helpful assistant. Be brief.") == 2  # both calls of turn 1
    assert "A brand new prompt." in systems


async def test_a_prompt_only_change_keeps_the_mcp_session(
    egress: Egress, model: ScriptedModelServer, mcp_state: McpState
) -> None:
    model.set_script(rules({"match": {}, "reply": {"type": "text", "text": "ok"}}))
    async with running_engine(egress, make_snapshot(1)) as (runtime, feed):
        assert runtime.context is not None
        connection = runtime.context.mcp[0][1]
        handshakes = mcp_state.handshakes

        await feed.publish(make_snapshot(2, template="Edited prompt."))
        await runtime.wait_until(lambda r: r.revision == 2, timeout=WAIT)
        await feed.publish(make_snapshot(3, template="Edited.", mcp={"kb": ["lookup"]}))
        await runtime.wait_until(lambda r: r.revision == 3, timeout=WAIT)
        done = (await turn(runtime, "hi"))[-1]

        assert mcp_state.handshakes == handshakes
        assert runtime.context is not None and runtime.context.mcp[0][1] is connection
        assert isinstance(done, TurnCompleted) and done.revision == 3

        await feed.publish(make_snapshot(4, registry_description="moved"))
        await runtime.wait_until(lambda r: r.revision == 4, timeout=WAIT)
        assert mcp_state.handshakes == handshakes + 1
        assert runtime.context is not None and runtime.context.mcp[0][1] is not connection
        # conversation c1 is pinned to revision 3, which holds the old session; it ends
        assert runtime.retained_revisions == [3] and connection.connected
        assert await runtime.delete_conversation("c1")
        async with asyncio.timeout(WAIT):  # closed once no context holds it
            await connection.wait_closed()
        assert not connection.connected
        assert runtime.builder.open_mcp_connections == 1


async def test_a_snapshot_that_fails_to_build_keeps_the_current_context(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(rules({"match": {}, "reply": {"type": "text", "text": "still here"}}))
    async with running_engine(egress, make_snapshot(1)) as (runtime, feed):
        await feed.publish(make_snapshot(2, base={"promptVersion": "9.9"}))
        await runtime.wait_until(lambda r: r.failures == 1, timeout=WAIT)
        events = await turn(runtime, "hi")

        assert runtime.revision == 1
        assert runtime.failed_revision == 2
        assert runtime.last_error is not None and "9.9" in runtime.last_error
        assert isinstance(events[-1], TurnCompleted) and events[-1].revision == 1
        info = runtime.card_info()
        assert info is not None
        assert (info.name, info.revision, info.description) == (
            AGENT,
            1,
            "Agent A answers questions.",
        )
        assert info.skills[0]["id"] == "qa"


async def test_not_ready_until_a_snapshot_is_built(egress: Egress) -> None:
    feed = InMemorySnapshotFeed()
    settings = EngineSettings(agent_name=AGENT, egress_url=egress.url)
    async with EngineRuntime(feed=feed, settings=settings) as runtime:
        events = [e async for e in runtime.run(TurnRequest(context_id="c", text="hi"))]
        assert not runtime.ready and runtime.card_info() is None
        await feed.publish(make_snapshot(1))
        await runtime.wait_ready(timeout=WAIT)

    assert isinstance(events[0], TurnFailed) and events[0].code == "not_ready"


# ---------------------------------------------------------------- partners


async def test_partner_agent_is_a_tool_described_by_its_card(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(
        rules(
            on_tool_result("B says: {{last_tool_result}}"),
            on_user("ask b", tool_call("ask_agent-b", {"message": "what are routes?"})),
        )
    )
    snapshot = make_snapshot(mcp={}, partners=(PARTNER,))
    async with running_engine(egress, snapshot) as (runtime, _):
        events = await turn(runtime, "ask b please", depth=1)

    tools = {t["function"]["name"]: t["function"] for t in model.requests()[0].tools}
    assert "Knows everything about gateways." in tools["ask_agent-b"]["description"]
    assert "Gateway routes" in tools["ask_agent-b"]["description"]
    final = events[-1]
    assert isinstance(final, TurnCompleted)
    assert final.text == "B says: partner heard: what are routes?"
    sends = [h for h in egress.a2a_headers if "x-specmesh-call-depth" in h]
    assert sends and sends[-1]["x-specmesh-call-depth"] == "2"
    assert sends[-1]["a2a-version"] == "1.0"


async def test_partner_call_beyond_the_depth_limit_is_refused(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(
        rules(
            on_tool_result("{{last_tool_result}}"),
            on_user("ask", tool_call("ask_agent-b", {"message": "loop?"})),
        )
    )
    snapshot = make_snapshot(mcp={}, partners=(PARTNER,))
    async with running_engine(egress, snapshot, max_call_depth=2) as (runtime, _):
        events = await turn(runtime, "ask b", depth=2)

    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert not finished[0].ok and "call depth 3" in finished[0].result
    assert not [h for h in egress.a2a_headers if "x-specmesh-call-depth" in h]
    assert isinstance(events[-1], TurnCompleted)


async def test_unreachable_partner_gets_a_generic_description(
    egress: Egress, model: ScriptedModelServer
) -> None:
    model.set_script(rules({"match": {}, "reply": {"type": "text", "text": "ok"}}))
    snapshot = make_snapshot(mcp={}, partners=("agent-gone",))
    async with running_engine(egress, snapshot) as (runtime, _):
        await turn(runtime, "hi")

    tools = {t["function"]["name"]: t["function"] for t in model.requests()[0].tools}
    assert "not available" in tools["ask_agent-gone"]["description"]


# ---------------------------------------------------------------- intake


def _write_agent(folder: Path, template: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "agent-base.json").write_text(
        json.dumps({"description": "Dev agent", "promptKey": "dev-prompt"})
    )
    (folder / "model.json").write_text(json.dumps({"model": "scripted"}))
    (folder / "mcp-servers.json").write_text(json.dumps({"mcpServers": [{"mcpServerName": "kb"}]}))
    (folder / "prompts").mkdir(exist_ok=True)
    (folder / "prompts" / "dev.json").write_text(
        json.dumps({"promptKey": "dev-prompt", "version": "1.0.0", "template": template})
    )
    (folder / "mcp").mkdir(exist_ok=True)
    (folder / "mcp" / "servers.yaml").write_text(
        "apiVersion: specmesh.io/v1\nkind: McpServer\nmetadata: {name: kb}\n"
        "spec: {url: 'http://127.0.0.1:9/mcp'}\n"
    )


async def test_dir_feed_picks_up_a_file_edit_and_skips_invalid_content(tmp_path: Path) -> None:
    folder = tmp_path / "dev-agent"
    _write_agent(folder, "first template")
    feed = DirSnapshotFeed(folder, agent_name="dev-agent", poll_interval=0.02)
    received: asyncio.Queue[ResolvedSnapshot] = asyncio.Queue()

    async def consume() -> None:
        async for snapshot in feed:
            await received.put(snapshot)

    consumer = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(WAIT):
            first = await received.get()
            (folder / "model.json").write_text("{not json")
            await eventually(
                lambda: feed.last_error is not None, timeout=WAIT, what="the feed's error"
            )
            error = feed.last_error
            _write_agent(folder, "second template")
            (folder / "model.json").write_text(json.dumps({"model": "scripted"}))
            second = await received.get()
    finally:
        consumer.cancel()

    assert first.revision == 1 and second.revision == 2
    assert "model.json" in error
    assert received.empty()  # the invalid content produced no snapshot
    assert first.prompt.versions["1.0.0"].template == "first template"
    assert second.prompt.versions["1.0.0"].template == "second template"
    assert set(second.mcp_servers) == {"kb"}
    assert feed.last_error is None


class _Sidecar(sidecar_pb2_grpc.SpecSyncServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.streams = 0
        self.reports: list[Any] = []

    async def WatchSnapshots(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.streams += 1
        while True:
            item = await self.queue.get()
            if item == "break":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "sidecar restarting")
            yield sidecar_pb2.WatchSnapshotsResponse(snapshot=item)

    async def ReportStatus(self, request: Any, context: Any) -> Any:
        self.reports.append(request)
        return sidecar_pb2.ReportStatusResponse()


async def test_grpc_feed_converts_skips_invalid_reconnects_and_reports_again(
    egress: Egress, model: ScriptedModelServer
) -> None:
    sidecar = _Sidecar()
    server = grpc.aio.server()
    sidecar_pb2_grpc.add_SpecSyncServiceServicer_to_server(sidecar, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        feed = GrpcSnapshotFeed(
            f"127.0.0.1:{port}", agent_name=AGENT, initial_backoff=0.05, max_backoff=0.2
        )
        broken = snapshot_to_proto(make_snapshot(2))
        broken.spec_json = '{"base": {}}'
        await sidecar.queue.put(snapshot_to_proto(make_snapshot(1)))
        await sidecar.queue.put(broken)
        await sidecar.queue.put("break")
        await sidecar.queue.put(snapshot_to_proto(make_snapshot(3, template="third")))
        model.set_script(rules({"match": {}, "reply": {"type": "text", "text": "ok"}}))
        settings = EngineSettings(agent_name=AGENT, egress_url=egress.url)
        async with EngineRuntime(feed=feed, settings=settings) as runtime:
            await runtime.wait_until(lambda r: r.revision == 3, timeout=WAIT)
            done = (await turn(runtime, "hi"))[-1]
            await eventually(lambda: len(sidecar.reports) == 3, timeout=WAIT, what="three reports")
            ready_while_connected = runtime.ready

            await server.stop(grace=None)  # the sidecar is gone

            await runtime.wait_until(lambda r: not r.ready, timeout=WAIT)
            reason = runtime.not_ready_reason()
    finally:
        await server.stop(grace=None)

    assert isinstance(done, TurnCompleted) and done.revision == 3
    assert sidecar.streams == 2
    assert model.requests()[0].messages[0]["content"] == "third"
    # revision 1 built; on reconnecting, revision 1 reported again before 3 was built
    assert [r.serving_revision for r in sidecar.reports] == [1, 1, 3]
    assert ready_while_connected
    assert reason is not None and "sidecar is not connected" in reason
