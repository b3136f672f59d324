"""A long conversation crosses the token budget: older turns are summarised by the agent's
own model (a recorded model call, a ``chat`` span marked ``summarize``), the summary is
stored as such, and every prompt stays under the budget while holding the summary."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.compression import SUMMARIZE_INSTRUCTIONS, SUMMARY_PREFIX
from engine.memory import memory_key
from localfleet.modelserver import ScriptedModelServer
from localfleet.modelserver.tokens import count_prompt_tokens
from specmesh.budget import LEDGER_HEADER

from .egress_stub import span_exporter
from .memory_support import REDIS_PASSWORD, MemoryRig, ask

pytestmark = pytest.mark.integration

BUDGET = 256
SUMMARY = "SUMMARY-OK the user listed facts about servers alpha to delta"


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModelServer]:
    script = {
        "rules": [
            {
                "name": "summarize",
                "match": {"system": "(?i)you summarize conversations"},
                "reply": {"type": "text", "text": SUMMARY},
            }
        ],
        "fallback": {"type": "text", "text": "Noted: {{last_user}}"},
    }
    async with ScriptedModelServer(script=script) as server:
        yield server


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return span_exporter()


def _fact(i: int) -> str:
    name = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"][i % 8]
    return (
        f"Fact {i}: server {name} runs in rack {i} of hall {i + 10}, it serves the payment "
        f"gateway, the search index and the nightly report jobs for region {i + 100}."
    )


async def test_a_long_conversation_is_summarised_and_stays_under_the_budget(
    memory_rig: MemoryRig, spans: InMemorySpanExporter
) -> None:
    model, redis_server = memory_rig.model, memory_rig.redis
    agent = memory_rig.agent_name("cmp")
    await memory_rig.apply(
        agent,
        memory={
            "compression": {
                "enabled": True,
                "maxPromptTokens": BUDGET,
                "keepRecentTurns": 2,
                "summaryMaxTokens": 40,
            },
            "searchStrategy": {"type": "recent", "n": 50},
        },
    )
    spans.clear()
    async with memory_rig.instance(agent) as inst:
        ledger = inst.dataplane.ledger
        entries = []
        for i in range(8):
            # each turn as the sidecar hands it over: with a budgeted ledger entry, so a
            # model call naming none (or another) is refused
            entries.append(ledger.open(100.0))
            await ask(
                inst.runtime, _fact(i), context_id="long", headers={LEDGER_HEADER: entries[-1].id}
            )

    requests = model.requests()
    summarize = [r for r in requests if r.messages[0]["content"] == SUMMARIZE_INSTRUCTIONS]
    chats = [r for r in requests if r not in summarize]
    assert len(chats) == 8
    assert summarize, "the history passed the budget, a summary was asked for"
    # the summariser saw the older turns and was limited to summaryMaxTokens
    assert "Fact 0" in summarize[0].messages[1]["content"]
    assert summarize[0].body.get("max_tokens") == 40
    # the summary is a cost of its turn: the call named the turn's ledger entry (a call
    # naming none is refused while budgeted entries are open), which the model never sees
    assert all(e.unpriced == {"scripted"} for e in entries)  # every turn's calls reached it
    assert not any(LEDGER_HEADER in r.headers for r in requests)
    # every prompt the model received stayed under the budget (the server's own count)
    for r in chats:
        assert count_prompt_tokens(r.messages, r.tools) <= BUDGET, r.messages
    # the prompts after the first summary hold it, as a system message after the prompt
    first = requests.index(summarize[0])
    later = [r for r in chats if requests.index(r) > first]
    assert later
    for r in later:
        assert r.messages[1] == {"role": "system", "content": SUMMARY_PREFIX + SUMMARY}
        assert r.messages[-1]["content"].startswith("Fact ")
    # the summary is stored, marked, in place of the turns it covers
    direct = aioredis.Redis(host=redis_server.host, port=redis_server.port, password=REDIS_PASSWORD)
    stored = [json.loads(x) for x in await direct.lrange(memory_key(agent, "long"), 0, -1)]
    await direct.aclose()
    assert stored[0]["summary"] is True and stored[0]["content"] == SUMMARY
    assert not any(t.get("summary") for t in stored[1:])
    assert "Fact 0" not in json.dumps(stored)
    # the summary call is its own chat span, inside the turn, marked as a memory operation
    finished = spans.get_finished_spans()
    marked = [
        s
        for s in finished
        if s.name == "chat scripted"
        and (s.attributes or {}).get("specmesh.memory.operation") == "summarize"
    ]
    assert len(marked) == len(summarize)
    turns = {s.context.span_id: s for s in finished if s.name.startswith("invoke_agent ")}
    assert all(s.parent is not None and s.parent.span_id in turns for s in marked)
