"""Hot reload under load, end to end over loopback HTTP.

The real :class:`EngineRuntime` behind the real :class:`EngineServer`; 200 ``POST
/v1/invoke`` requests (20 at a time) while 20 new snapshots arrive, alternating a prompt
change and a model change. The real litellm path calls the scripted model server through
the pass-through egress; half the turns call a real MCP tool between two model calls, so
a turn's model calls straddle a reload.

Each revision is recognisable in what the model server records: the system prompt holds
``rev-<p>`` (``p``: the revision that last changed the prompt) and the request names
model ``scripted-<m>`` at temperature ``m / 100`` (``m``: the revision that last changed
the model). The scripted answers echo both, so the answer shows them too.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from mcp.server.mcpserver import MCPServer

from engine.hot_reload import EngineRuntime
from engine.intake import InMemorySnapshotFeed
from engine.server import EngineServer, ServerConfig
from engine.settings import EngineSettings
from localfleet.modelserver import RecordedRequest, ScriptedModelServer
from specmesh.snapshot import ResolvedSnapshot
from tests.integration.asgi_server import serve_asgi
from tests.integration.test_engine_runtime import AGENT, Egress, make_snapshot

pytestmark = pytest.mark.integration

WAIT = 30.0
REQUESTS = 200
CONCURRENCY = 20
CHANGES = 20
MODEL_DELAY_MS = 25

SCRIPT: dict[str, Any] = {
    "rules": [
        {
            "name": "answer-after-tool",
            "match": {"lastMessageIsTool": True, "system": r"(?P<marker>rev-\d+)"},
            "reply": {
                "type": "text",
                "text": "{{marker}} {{model}} after {{last_tool_result}}",
                "delayMs": MODEL_DELAY_MS,
            },
        },
        {
            "name": "call-tool",
            "match": {
                "lastMessageIsTool": False,
                "lastUser": r"^lookup (?P<key>\S+)$",
                "system": r"(?P<marker>rev-\d+)",
            },
            "reply": {
                "type": "toolCalls",
                "toolCalls": [{"name": "kb__lookup", "arguments": {"key": "{{key}}"}}],
                "delayMs": MODEL_DELAY_MS,
            },
        },
        {
            "name": "answer",
            "match": {"lastMessageIsTool": False, "system": r"(?P<marker>rev-\d+)"},
            "reply": {
                "type": "text",
                "text": "{{marker}} {{model}} says hi",
                "delayMs": MODEL_DELAY_MS,
            },
        },
    ],
    "fallback": {"type": "error", "status": 400, "message": "no revision marker"},
}


# ---------------------------------------------------------------- revisions


@dataclass(frozen=True)
class Revision:
    """What one revision looks like on the model server's side."""

    number: int
    prompt_rev: int
    model_rev: int

    @property
    def system(self) -> str:
        return f"You are agent-a at rev-{self.prompt_rev}. Be brief."

    @property
    def model(self) -> str:
        return f"scripted-{self.model_rev}"

    @property
    def temperature(self) -> float:
        return self.model_rev / 100

    def answer(self, text: str) -> str:
        if text.startswith("lookup "):
            key = text.removeprefix("lookup ")
            return f"rev-{self.prompt_rev} {self.model} after value-of-{key}"
        return f"rev-{self.prompt_rev} {self.model} says hi"

    def snapshot(self) -> ResolvedSnapshot:
        return make_snapshot(
            self.number,
            template=f"You are agent-a at rev-{self.prompt_rev}. {{{{tone}}}}",
            model={"model": self.model, "temperature": self.temperature},
        )


def revisions() -> dict[int, Revision]:
    """Revision 1, then CHANGES revisions alternating a prompt and a model change."""
    out = {1: Revision(1, prompt_rev=1, model_rev=1)}
    for number in range(2, CHANGES + 2):
        prev = out[number - 1]
        if number % 2 == 0:
            out[number] = Revision(number, prompt_rev=number, model_rev=prev.model_rev)
        else:
            out[number] = Revision(number, prompt_rev=prev.prompt_rev, model_rev=number)
    return out


# ---------------------------------------------------------------- servers


HELD_KEY = "held"
"""The one lookup the tool holds until the test releases it: a turn held mid-flight."""


@dataclass
class Gate:
    """Holds the ``HELD_KEY`` lookup between the turn's two model calls."""

    entered: asyncio.Event
    release: asyncio.Event


def _kb(gate: Gate) -> MCPServer:
    server = MCPServer("kb")

    @server.tool()
    async def lookup(key: str) -> str:
        """Look a key up in the knowledge base."""
        if key == HELD_KEY:
            gate.entered.set()
            await gate.release.wait()
        return f"value-of-{key}"

    return server


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(script=SCRIPT) as server:
        yield server


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate(entered=asyncio.Event(), release=asyncio.Event())


@pytest.fixture(scope="module")
async def egress(model: ScriptedModelServer, gate: Gate) -> AsyncIterator[Egress]:
    async with serve_asgi(_kb(gate).streamable_http_app()) as mcp_url:
        e = Egress(model=model.root_url, mcp={"kb": f"{mcp_url}/mcp"}, a2a={})
        async with e.running():
            yield e


@pytest.fixture
async def engine(
    egress: Egress,
) -> AsyncIterator[tuple[EngineRuntime, InMemorySnapshotFeed, EngineServer]]:
    feed = InMemorySnapshotFeed()
    settings = EngineSettings(
        agent_name=AGENT,
        egress_url=egress.url,
        tool_timeout_seconds=10,
        mcp_connect_timeout_seconds=5,
    )
    config = ServerConfig(
        agent_name=AGENT, http_port=0, grpc_port=0, drain_timeout=5, readiness_interval=0.02
    )
    async with (
        EngineRuntime(feed=feed, settings=settings) as runtime,
        EngineServer(runner=runtime, config=config) as server,
    ):
        await feed.publish(revisions()[1].snapshot())
        await runtime.wait_ready(timeout=WAIT)
        yield runtime, feed, server


# ---------------------------------------------------------------- helpers


@dataclass
class Outcome:
    """One request as the client saw it."""

    context_id: str
    text: str
    status: int
    body: dict[str, Any]
    revision_before: int
    """``runtime.revision`` just before the request was sent."""
    revision_after: int
    """``runtime.revision`` when the response arrived."""


async def _invoke(
    http: httpx.AsyncClient, runtime: EngineRuntime, context_id: str, text: str
) -> Outcome:
    before = runtime.revision
    response = await http.post("/v1/invoke", json={"contextId": context_id, "message": text})
    after = runtime.revision
    assert before is not None and after is not None
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text}
    return Outcome(context_id, text, response.status_code, body, before, after)


def _user_text(request: RecordedRequest) -> str:
    return str([m for m in request.messages if m["role"] == "user"][-1]["content"])


def _calls_by_conversation(model: ScriptedModelServer) -> dict[str, list[RecordedRequest]]:
    """Model calls grouped by the user message (unique per conversation here)."""
    out: dict[str, list[RecordedRequest]] = defaultdict(list)
    for request in model.requests():
        out[_user_text(request)].append(request)
    return out


async def _until_model_called_with(model: ScriptedModelServer, text: str) -> None:
    """Wait until the model server received a call for the user message ``text``."""
    seen = 0
    while True:
        records = model.requests()
        if any(_user_text(r) == text for r in records[seen:]):
            return
        seen = len(records)
        await model.wait_for_requests(seen + 1, timeout=WAIT)


def _mismatches(outcome: Outcome, calls: list[RecordedRequest], rev: Revision) -> list[str]:
    """How the recorded model calls of one turn differ from revision ``rev``."""
    problems = []
    expected_calls = 2 if outcome.text.startswith("lookup ") else 1
    if len(calls) != expected_calls:
        problems.append(f"{len(calls)} model calls, expected {expected_calls}")
    for call in calls:
        seen = (call.messages[0]["content"], call.model, call.body.get("temperature"))
        if seen != (rev.system, rev.model, rev.temperature):
            problems.append(f"call {call.seq} {seen} is not revision {rev.number}")
    if outcome.body.get("answer") != rev.answer(outcome.text):
        problems.append(f"answer {outcome.body.get('answer')!r} is not revision {rev.number}")
    return problems


# ---------------------------------------------------------------- the test


async def test_hot_reload_under_load_answers_each_request_with_one_revision(
    engine: tuple[EngineRuntime, InMemorySnapshotFeed, EngineServer],
    model: ScriptedModelServer,
    gate: Gate,
) -> None:
    runtime, feed, server = engine
    revs = revisions()
    model.clear_requests()
    assert runtime.context is not None
    kb_connection = runtime.context.mcp[0][1]

    outcomes: list[Outcome] = []
    probes: dict[int, Outcome] = {}
    held: list[Outcome] = []
    switched_at: dict[int, float] = {}
    progress = asyncio.Condition()
    pending = iter(range(REQUESTS))

    async def worker(http: httpx.AsyncClient) -> None:
        for i in pending:
            cid = f"load-{i:03d}"
            text = f"lookup {cid}" if i % 2 else f"hello from {cid}"
            outcome = await _invoke(http, runtime, cid, text)
            async with progress:
                outcomes.append(outcome)
                progress.notify_all()

    async def change(http: httpx.AsyncClient, group: asyncio.TaskGroup, number: int) -> None:
        # spread over the load: change k goes out once 9*k requests were answered
        async with progress:
            await progress.wait_for(lambda: len(outcomes) >= 9 * (number - 1))
        if number == 2:
            # one turn is held mid-flight (in its tool call, between its two model calls)
            # across this change: a turn that surely straddles a reload
            group.create_task(hold(http))
            await asyncio.wait_for(gate.entered.wait(), WAIT)
        await feed.publish(revs[number].snapshot())
        await runtime.wait_until(lambda r: r.revision == number, timeout=WAIT)
        switched_at[number] = time.time()
        gate.release.set()
        # the next request, started after the change and before any other change: the
        # next change waits until its turn reached the model (it holds its revision)
        text = f"lookup probe-{number}"
        group.create_task(probe(http, number, text))
        await _until_model_called_with(model, text)

    async def publisher(http: httpx.AsyncClient, group: asyncio.TaskGroup) -> None:
        for number in range(2, CHANGES + 2):
            await change(http, group, number)

    async def probe(http: httpx.AsyncClient, number: int, text: str) -> None:
        probes[number] = await _invoke(http, runtime, f"probe-{number}", text)

    async def hold(http: httpx.AsyncClient) -> None:
        held.append(await _invoke(http, runtime, "held", f"lookup {HELD_KEY}"))

    limits = httpx.Limits(max_connections=CONCURRENCY + 5)
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=server.http_url, timeout=WAIT, limits=limits) as http,
        asyncio.timeout(WAIT),
        asyncio.TaskGroup() as group,
    ):
        group.create_task(publisher(http, group))
        for _ in range(CONCURRENCY):
            group.create_task(worker(http))

    seconds = time.monotonic() - started
    everything = outcomes + list(probes.values()) + held
    failed = [(o.context_id, o.status, o.body) for o in everything if o.status != 200]
    assert failed == []
    assert len(outcomes) == REQUESTS and len(probes) == CHANGES and len(held) == 1

    # each request answered entirely by one revision: the one it reports
    calls = _calls_by_conversation(model)
    mixed = {
        o.context_id: problems
        for o in everything
        if (problems := _mismatches(o, calls[o.text], revs[o.body["revision"]]))
    }
    assert mixed == {}

    # the change is visible to the next request
    assert {n: p.body["revision"] for n, p in probes.items()} == {n: n for n in probes}
    stale = [
        (o.context_id, o.revision_before, o.body["revision"], o.revision_after)
        for o in outcomes + held
        if not o.revision_before <= o.body["revision"] <= o.revision_after
    ]
    assert stale == []

    # turns straddled reloads: their last model call came after a newer revision was
    # serving, and still carried the revision the turn started on (checked above, with
    # every turn); the held turn surely did, the load's turns may have
    straddled = [
        o.context_id
        for o in outcomes + held
        if o.text.startswith("lookup ")
        and (newer := switched_at.get(o.body["revision"] + 1)) is not None
        and calls[o.text][-1].received_at > newer
    ]
    assert held[0].body["revision"] == 1 and "held" in straddled

    assert (runtime.revision, runtime.builds, runtime.failures) == (CHANGES + 1, CHANGES + 1, 0)
    assert runtime.context is not None and runtime.context.mcp[0][1] is kb_connection
    assert runtime.builder.open_mcp_connections == 1
    served = sorted({o.body["revision"] for o in outcomes})
    print(
        f"\n{len(everything)} requests in {seconds:.2f} s, {len(model.requests())} model calls, "
        f"load served by revisions {served}, {len(straddled)} turns straddled a reload"
    )
