"""The knowledge base end to end: real Chroma (embedded, on disk), real litellm to the
scripted model server (chat and embeddings), the real engine runtime and its REST server,
and the real ``specmesh kb`` command.

The sidecar is stood in for by a pass-through egress (aiohttp) mapping ``/llm/v1/*`` and
``/llm/embeddings/v1/*`` to the model server. The scripted model's embeddings are hashed
bags of words, so a question shares most words with the passage that answers it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.hot_reload import EngineRuntime
from engine.intake import InMemorySnapshotFeed
from engine.server import EngineServer, ServerConfig
from engine.settings import EngineSettings
from localfleet.modelserver import ScriptedModelServer
from specmesh.snapshot import PromptBundle, ResolvedSnapshot
from specmesh.spec.models import AgentSpec, PromptEntry
from specmeshctl.main import main as cli_main
from tests.integration.egress_stub import StubEgress, span_exporter
from tests.polling import eventually

pytestmark = pytest.mark.integration

AGENT = "kb-agent"
COLLECTION = "kb-docs"
WAIT = 30.0

DOCS = {
    "nacos.md": (
        "# Nacos\n\n"
        "Nacos is the service registry of the platform. To register a service instance in "
        "Nacos, call the naming API with the service name, the instance IP and its port. "
        "A registered instance sends heartbeats every five seconds.\n\n"
        "Nacos also stores configuration: a data ID and a group name identify each "
        "configuration entry, and listeners are told when it changes. Namespaces keep "
        "tenants apart.\n\n"
        "Ephemeral instances vanish when their heartbeats stop; persistent instances stay "
        "until they are deregistered explicitly by an operator."
    ),
    "gateway.md": (
        "# Gateway\n\n"
        "The cloud-native gateway routes HTTP traffic to backends. Routes match on path "
        "prefixes, headers and query parameters. Each route points at a backend pool.\n\n"
        "TLS certificates are uploaded per domain; the gateway renews them before expiry. "
        "Rate limits are set per route, as requests per second, with a burst allowance.\n\n"
        "Canary releases split traffic by weight between two versions of a backend."
    ),
    "scheduler.md": (
        "# Scheduler\n\n"
        "The job scheduler runs cron jobs and workflows. A cron expression says when a job "
        "fires; a workflow chains jobs as a directed acyclic graph.\n\n"
        "Failed jobs retry with exponential backoff, up to a limit set per job. Alarms go "
        "to the on-call rota by SMS, email or chat when retries run out.\n\n"
        "Sharded jobs split a large batch over many workers, each taking one shard."
    ),
    "billing.txt": (
        "Billing\n\n"
        "Invoices are issued monthly, on the first working day. Prices depend on the "
        "edition: developer, professional or enterprise.\n\n"
        "Refunds take up to ten working days. Discounts apply to yearly subscriptions "
        "paid upfront, and vouchers are redeemed on the console's billing page."
    ),
}
NACOS_ANSWER = "To register a service instance in Nacos, call the naming API"


# ---------------------------------------------------------------- servers


class Egress(StubEgress):
    """The sidecar's egress, stood in for: ``/llm/...`` to the model server, recorded."""

    def __init__(self, *, model: str) -> None:
        super().__init__()
        self.model = model
        self.paths: list[str] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        m = re.fullmatch(r"llm/(?:embeddings/)?v1/(.*)", path)
        if m is None:
            return web.Response(status=403, text="not allowed")
        self.paths.append(path)
        return await self.relay(request, f"{self.model}/v1/{m.group(1)}")


@pytest.fixture(scope="module")
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(script={"rules": []}) as server:
        yield server


@pytest.fixture(scope="module")
async def egress(model: ScriptedModelServer) -> AsyncIterator[Egress]:
    async with Egress(model=model.root_url).running() as e:
        yield e


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return span_exporter()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    (folder / "image.png").write_bytes(b"\x89PNG not a document")
    return folder


def knowledge(**retrieval: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "store": {"type": "chroma", "collection": COLLECTION},
        "embeddingModel": {"model": "hashed-embeddings"},
        "retrieval": {"mode": "auto", "topK": 3, **retrieval},
        "chunking": {"size": 200, "overlap": 40},
    }


def make_snapshot(revision: int = 1, *, kb: Mapping[str, Any] | None = None) -> ResolvedSnapshot:
    spec = AgentSpec.model_validate(
        {
            "base": {"description": "Answers platform questions.", "promptKey": AGENT},
            "model": {"model": "scripted", "temperature": 0, "maxRetries": 0},
            "knowledge": dict(kb) if kb is not None else knowledge(),
        }
    )
    return ResolvedSnapshot(
        agent_name=AGENT,
        revision=revision,
        track="stable",
        spec=spec,
        prompt=PromptBundle(
            versions={
                "1": PromptEntry(prompt_key=AGENT, version="1", template="You help operators.")
            }
        ),
        mcp_servers={},
    )


@asynccontextmanager
async def engine(
    egress: Egress, data_dir: Path, snapshot: ResolvedSnapshot, **settings: Any
) -> AsyncIterator[tuple[EngineRuntime, InMemorySnapshotFeed, httpx.AsyncClient]]:
    feed = InMemorySnapshotFeed()
    config = EngineSettings(agent_name=AGENT, egress_url=egress.url, data_dir=data_dir, **settings)
    async with EngineRuntime(feed=feed, settings=config) as runtime:
        await feed.publish(snapshot)
        await runtime.wait_ready(timeout=WAIT)
        server_config = ServerConfig(agent_name=AGENT, http_port=0, grpc_port=0)
        async with (
            EngineServer(runner=runtime, config=server_config) as server,
            httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http,
        ):
            yield runtime, feed, http


async def reload(
    runtime: EngineRuntime, feed: InMemorySnapshotFeed, snap: ResolvedSnapshot
) -> None:
    await feed.publish(snap)
    await runtime.wait_until(lambda r: r.revision == snap.revision, timeout=WAIT)


async def kb_cli(*argv: str) -> int:
    """``specmesh kb ...``, run as the command runs (its own event loop, in a thread)."""
    return await asyncio.to_thread(cli_main, ["kb", *argv])


def answer_with_passages() -> dict[str, Any]:
    return {
        "rules": [
            {
                "match": {"system": "Relevant passages"},
                "reply": {"type": "text", "text": "Per the docs: call the naming API."},
            }
        ],
        "fallback": {"type": "text", "text": "I do not know."},
    }


def system_messages(request: Any) -> list[str]:
    return [m["content"] for m in request.messages if m["role"] == "system"]


# ---------------------------------------------------------------- tests


async def test_ingested_passage_reaches_the_model_and_the_answer_cites_it(
    egress: Egress,
    model: ScriptedModelServer,
    spans: InMemorySpanExporter,
    docs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model.set_script(answer_with_passages())
    async with engine(egress, tmp_path / "data", make_snapshot()) as (runtime, _, http):
        url = str(http.base_url)
        assert await kb_cli("ingest", AGENT, str(docs), "--url", url) == 0
        first = capsys.readouterr().out
        assert "ingested 4 documents into kb-docs: added 4, unchanged 0, replaced 0" in first
        kb = runtime.knowledge
        assert kb is not None
        size = await kb.count()
        assert size >= 8  # every document is cut into several chunks

        model.clear_requests()
        spans.clear()
        r = await http.post(
            "/v1/invoke", json={"message": "How do I register a service instance in Nacos?"}
        )

        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"] == "Per the docs: call the naming API."
        chats = [q for q in model.requests() if q.endpoint == "chat.completions"]
        assert len(chats) == 1
        injected = system_messages(chats[0])[1]
        assert injected.startswith("Relevant passages:\n[1] ")
        assert NACOS_ANSWER in injected and "(source: nacos.md)" in injected
        # the user's message comes last, after the passages
        assert chats[0].messages[-1]["role"] == "user"
        citations = body["citations"]
        assert citations[0]["source"] == "nacos.md"
        assert NACOS_ANSWER in citations[0]["text"]
        assert set(citations[0]) == {"source", "position", "score", "text"}
        scores = [c["score"] for c in citations]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        # the query went through the sidecar's embeddings route, with no real key
        embeds = [q for q in model.requests(include_auth=True) if q.endpoint == "embeddings"]
        assert len(embeds) == 1
        assert embeds[0].headers["authorization"] == "Bearer sidecar-injected"
        assert "llm/embeddings/v1/embeddings" in egress.paths

        # recorded on the trace: sources and scores, never the content
        finished: list[ReadableSpan] = list(spans.get_finished_spans())
        retrieve = next(s for s in finished if s.name == f"retrieve {COLLECTION}")
        attrs = dict(retrieve.attributes or {})
        assert attrs["specmesh.knowledge.sources"][0] == "nacos.md"
        assert list(attrs["specmesh.knowledge.scores"]) == [c["score"] for c in citations]
        assert attrs["specmesh.knowledge.returned"] == len(citations)
        agent = next(s for s in finished if s.name == f"invoke_agent {AGENT}")
        assert retrieve.parent is not None and retrieve.parent.span_id == agent.context.span_id
        everything = json.dumps([dict(s.attributes or {}) for s in finished], default=str)
        assert "naming API" not in everything and "register a service" not in everything

        # re-ingesting the same folder adds nothing
        model.clear_requests()
        assert await kb_cli("ingest", AGENT, str(docs), "--url", url) == 0
        again = capsys.readouterr().out
        assert "added 0, unchanged 4, replaced 0 (0 chunks written" in again
        assert await kb.count() == size
        assert [q for q in model.requests() if q.endpoint == "embeddings"] == []


async def test_a_changed_document_replaces_its_chunks_and_delete_removes_them(
    egress: Egress, model: ScriptedModelServer, docs: Path, tmp_path: Path
) -> None:
    model.set_script(answer_with_passages())
    async with engine(egress, tmp_path / "data", make_snapshot()) as (runtime, _, http):
        url = str(http.base_url)
        assert await kb_cli("ingest", AGENT, str(docs), "--url", url) == 0
        kb = runtime.knowledge
        assert kb is not None
        size = await kb.count()
        nacos_chunks = len(await kb.store.ids_where("source", "nacos.md"))

        edited = DOCS["gateway.md"].replace("Canary releases", "Blue-green releases")
        r = await http.post(
            "/v1/knowledge/documents",
            json={"documents": [{"source": "gateway.md", "text": edited}]},
        )
        assert r.status_code == 200
        counts = r.json()
        assert (counts["added"], counts["unchanged"], counts["replaced"]) == (0, 0, 1)
        assert counts["chunksWritten"] == counts["chunksDeleted"] >= 1
        assert counts["chunks"] == size  # same number of chunks, the last one rewritten
        hits = await kb.search("blue-green releases split traffic")
        assert hits[0].source == "gateway.md" and "Blue-green" in hits[0].text

        assert await kb_cli("delete", AGENT, "--source", "nacos.md", "--url", url) == 0
        assert await kb.count() == size - nacos_chunks
        assert await kb.store.ids_where("source", "nacos.md") == set()
        r = await http.post(
            "/v1/invoke", json={"message": "How do I register a service instance in Nacos?"}
        )
        assert all(c["source"] != "nacos.md" for c in r.json()["citations"])

        r = await http.delete("/v1/knowledge/documents", params={"source": "nacos.md"})
        assert r.status_code == 200 and r.json()["deleted"] == 0
        r = await http.post("/v1/knowledge/documents", json={"documents": [{"source": "x"}]})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "documents.0.text: is required"


async def test_tool_mode_offers_search_knowledge_and_its_passages_are_cited(
    egress: Egress, model: ScriptedModelServer, docs: Path, tmp_path: Path
) -> None:
    model.set_script(
        {
            "rules": [
                {
                    "match": {"lastMessageIsTool": True},
                    "reply": {"type": "text", "text": "Found: {{last_tool_result}}"},
                },
                {
                    "match": {"toolOffered": "search_knowledge"},
                    "reply": {
                        "type": "toolCalls",
                        "toolCalls": [
                            {
                                "name": "search_knowledge",
                                "arguments": {"query": "cron jobs retry backoff"},
                            }
                        ],
                    },
                },
            ]
        }
    )
    snap = make_snapshot(kb=knowledge(mode="tool", topK=2))
    async with engine(egress, tmp_path / "data", snap) as (_, _, http):
        assert await kb_cli("ingest", AGENT, str(docs), "--url", str(http.base_url)) == 0
        model.clear_requests()
        r = await http.post("/v1/invoke", json={"message": "What happens to failed jobs?"})

    assert r.status_code == 200, r.text
    chats = [q for q in model.requests() if q.endpoint == "chat.completions"]
    assert len(chats) == 2
    offered = [t["function"]["name"] for t in chats[0].tools]
    assert offered == ["search_knowledge"]
    assert len(system_messages(chats[0])) == 1  # no passages injected in tool mode
    tool_result = chats[1].messages[-1]
    assert tool_result["role"] == "tool"
    assert "(source: scheduler.md" in tool_result["content"]
    assert "exponential backoff" in tool_result["content"]
    body = r.json()
    assert body["answer"].startswith("Found: [1] (source: scheduler.md")
    assert body["citations"][0]["source"] == "scheduler.md"
    assert len(body["citations"]) <= 2


async def test_score_threshold_and_spec_changes_apply_on_the_next_request(
    egress: Egress, model: ScriptedModelServer, docs: Path, tmp_path: Path
) -> None:
    model.set_script(answer_with_passages())
    question = {"message": "How do I register a service instance in Nacos?"}
    async with engine(egress, tmp_path / "data", make_snapshot(1)) as (runtime, feed, http):
        assert await kb_cli("ingest", AGENT, str(docs), "--url", str(http.base_url)) == 0
        open_ = (await http.post("/v1/invoke", json=question)).json()["citations"]
        assert len(open_) == 3
        lowest = min(c["score"] for c in open_)
        best = max(c["score"] for c in open_)
        assert lowest < best
        before = runtime.context
        assert before is not None

        # a threshold between the scores drops the weaker passages on the next request
        threshold = round((lowest + best) / 2, 3)
        await reload(runtime, feed, make_snapshot(2, kb=knowledge(scoreThreshold=threshold)))
        after = runtime.context
        assert after is not None
        assert after.model is before.model and after.prompt is before.prompt
        assert after.knowledge is not before.knowledge  # only that part was rebuilt
        filtered = (await http.post("/v1/invoke", json=question)).json()["citations"]
        assert 0 < len(filtered) < len(open_)
        assert all(c["score"] >= threshold for c in filtered)

        # a threshold above every score: no passages, no injected message
        await reload(runtime, feed, make_snapshot(3, kb=knowledge(scoreThreshold=0.99)))
        model.clear_requests()
        r = (await http.post("/v1/invoke", json=question)).json()
        assert r["citations"] == [] and r["answer"] == "I do not know."
        chat = next(q for q in model.requests() if q.endpoint == "chat.completions")
        assert len(system_messages(chat)) == 1

        # knowledge disabled: no retrieval, and ingest is refused
        await reload(runtime, feed, make_snapshot(4, kb={"enabled": False}))
        model.clear_requests()
        r = (await http.post("/v1/invoke", json=question)).json()
        assert r["citations"] == []
        assert [q for q in model.requests() if q.endpoint == "embeddings"] == []
        refused = await http.post(
            "/v1/knowledge/documents", json={"documents": [{"source": "a", "text": "b"}]}
        )
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "knowledge_disabled"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_kb_cli_reports_an_unreachable_engine(docs: Path) -> None:
    code = await kb_cli("ingest", AGENT, str(docs), "--url", f"http://127.0.0.1:{_unused_port()}")
    assert code == 5


@pytest.fixture
async def chroma_server(tmp_path: Path) -> AsyncIterator[str]:
    """A real Chroma server (``chroma run``, shipped with chromadb) on a free port."""
    exe = Path(sys.executable).parent / "chroma"
    if not exe.exists():
        pytest.skip("the chroma command is not installed")
    port = _unused_port()
    log = (tmp_path / "chroma.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(exe),
        "run",
        "--path",
        str(tmp_path / "server"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as http:

            async def beating() -> bool:
                if proc.returncode is not None:
                    pytest.fail(f"chroma run exited with {proc.returncode}")
                try:
                    return (await http.get(f"{url}/api/v2/heartbeat")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(beating, timeout=WAIT, what="chroma's heartbeat")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def test_the_same_code_reaches_a_chroma_server(
    egress: Egress, model: ScriptedModelServer, chroma_server: str, docs: Path, tmp_path: Path
) -> None:
    model.set_script(answer_with_passages())
    kb_spec = knowledge()
    kb_spec["store"] = {**kb_spec["store"], "address": chroma_server}
    async with engine(egress, tmp_path / "unused", make_snapshot(kb=kb_spec)) as (rt, _, http):
        assert await kb_cli("ingest", AGENT, str(docs), "--url", str(http.base_url)) == 0
        kb = rt.knowledge
        assert kb is not None and kb.store.location == chroma_server
        r = await http.post(
            "/v1/invoke", json={"message": "How do I register a service instance in Nacos?"}
        )
        assert r.json()["citations"][0]["source"] == "nacos.md"
    assert not (tmp_path / "unused").exists()  # nothing was stored locally
