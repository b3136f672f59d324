"""Search strategies pick the relevant old turn: keyword (word overlap) and semantic
(embeddings through the sidecar's egress, answered by the scripted model server, stored
with each turn in Redis)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine.memory import memory_key
from engine.recall import select_turns
from localfleet.modelserver import ScriptedModelServer, embed_text
from specmesh.spec.models import KeywordSearch, RecentSearch, SemanticSearch

from .memory_support import REDIS_PASSWORD, MemoryRig, ask

pytestmark = pytest.mark.integration

TOPICS = [
    "My favourite database is PostgreSQL version 16.",
    "The weather in Paris is sunny today.",
    "I like hiking in the mountains on weekends.",
    "Let us talk about cooking pasta with tomatoes.",
]
QUESTION = "Which database version did I mention?"


def _turns(with_embeddings: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for text in TOPICS:
        for role, content in (("user", text), ("assistant", f"Noted: {text}")):
            turn: dict[str, Any] = {"role": role, "content": content, "ts": 1.0}
            if with_embeddings:
                turn["embedding"] = embed_text(content)
            out.append(turn)
    return out


def test_recent_keeps_the_last_n_turns() -> None:
    picked = select_turns(_turns(), RecentSearch(n=3), question=QUESTION)
    assert [t["content"] for t in picked] == [
        f"Noted: {TOPICS[2]}",
        TOPICS[3],
        f"Noted: {TOPICS[3]}",
    ]


def test_keyword_picks_the_exchange_sharing_words_plus_the_last_one() -> None:
    picked = select_turns(_turns(), KeywordSearch(type="keyword", top_k=1), question=QUESTION)
    assert [t["content"] for t in picked] == [
        TOPICS[0],
        f"Noted: {TOPICS[0]}",
        TOPICS[3],
        f"Noted: {TOPICS[3]}",
    ]


def test_semantic_picks_the_nearest_exchange_and_honours_min_score() -> None:
    turns = _turns(with_embeddings=True)
    strategy = SemanticSearch(type="semantic", top_k=1)
    picked = select_turns(
        turns, strategy, question=QUESTION, question_embedding=embed_text(QUESTION)
    )
    assert [t["content"] for t in picked][:2] == [TOPICS[0], f"Noted: {TOPICS[0]}"]
    strict = SemanticSearch(type="semantic", top_k=1, min_score=0.99)
    only_last = select_turns(
        turns, strict, question=QUESTION, question_embedding=embed_text(QUESTION)
    )
    assert [t["content"] for t in only_last] == [TOPICS[3], f"Noted: {TOPICS[3]}"]


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModelServer]:
    async with ScriptedModelServer(
        script={"rules": [], "fallback": {"type": "text", "text": "Noted: {{last_user}}"}}
    ) as server:
        yield server


@pytest.mark.parametrize(
    "strategy",
    [
        {"type": "keyword", "topK": 1},
        {"type": "semantic", "topK": 1, "embeddingModel": {"model": "embed-scripted"}},
    ],
    ids=["keyword", "semantic"],
)
async def test_the_engine_sends_the_relevant_old_turn(
    strategy: dict[str, Any], memory_rig: MemoryRig
) -> None:
    model, redis_server = memory_rig.model, memory_rig.redis
    agent = memory_rig.agent_name(f"srch-{strategy['type'][:3]}")
    await memory_rig.apply(agent, memory={"searchStrategy": strategy})
    async with memory_rig.instance(agent) as inst:
        for text in TOPICS:
            await ask(inst.runtime, text, context_id="s")
        model.clear_requests()
        await ask(inst.runtime, QUESTION, context_id="s")

    chats = [r for r in model.requests() if r.endpoint == "chat.completions"]
    (request,) = chats
    assert [m["content"] for m in request.messages] == [
        "You are a helpful assistant.",
        TOPICS[0],
        f"Noted: {TOPICS[0]}",
        TOPICS[3],
        f"Noted: {TOPICS[3]}",
        QUESTION,
    ]
    direct = aioredis.Redis(host=redis_server.host, port=redis_server.port, password=REDIS_PASSWORD)
    stored = [json.loads(x) for x in await direct.lrange(memory_key(agent, "s"), 0, -1)]
    await direct.aclose()
    if strategy["type"] == "semantic":
        embeds = [r for r in model.requests() if r.endpoint == "embeddings"]
        assert embeds and embeds[0].model == "embed-scripted"
        assert embeds[0].input == [QUESTION]
        # each stored turn carries its vector, the one the model server gives for its text
        assert all(t["embedding"] == pytest.approx(embed_text(t["content"])) for t in stored)
    else:
        assert not any("embedding" in t for t in stored)
