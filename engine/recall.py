"""Recall: which stored turns of a conversation reach the model, as the memory spec says.

One :class:`ConversationRecall` per runtime context (memory store + memory, model and
knowledge parts). For each turn the loop calls :meth:`ConversationRecall.recall` before the
first model call and :meth:`ConversationRecall.record` with the final answer:

1. read the conversation's stored turns;
2. compress them when the prompt would pass the budget (:mod:`engine.compression`);
3. select turns with the search strategy; stored summaries always come first:

   ==========  ==========================================================================
   strategy    turns sent
   ==========  ==========================================================================
   recent      the last ``n`` turns
   keyword     the ``topK`` earlier exchanges (a user turn and its answer) sharing the most
               words with the question, plus the last exchange for continuity
   semantic    the ``topK`` earlier exchanges whose embeddings are nearest the question's
               (cosine, at least ``minScore``), plus the last exchange; embeddings come
               from ``{egress}/llm/embeddings/v1`` (litellm ``aembedding``) and are stored
               with each turn. If embedding fails, keyword scoring stands in.
   ==========  ==========================================================================

   Selected turns keep their chronological order;
4. with compression on, drop the oldest selected turns while the prompt is over the budget
   (summaries stay).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from specmesh.spec.models import (
    AgentSpec,
    EmbeddingModelSpec,
    KeywordSearch,
    RecentSearch,
    SemanticSearch,
)

from .compression import Summarizer, count_prompt_tokens, summary_message
from .errors import ModelError
from .llm import SIDECAR_API_KEY
from .memory import ConversationMemory, Turn, prompt_message

__all__ = ["ConversationRecall", "Embedder", "Recalled", "select_turns"]

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

_WORD = re.compile(r"\w+")
_STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "does", "for",
    "from", "had", "has", "have", "how", "i", "if", "in", "is", "it", "its", "me", "my", "no",
    "not", "of", "on", "or", "our", "so", "that", "the", "their", "them", "then", "there",
    "these", "they", "this", "to", "was", "we", "were", "what", "when", "where", "which",
    "who", "why", "will", "with", "would", "you", "your",
})  # fmt: skip
_CONTINUITY = 1
"""Exchanges always kept at the end by the keyword and semantic strategies."""


def _words(text: Any) -> set[str]:
    return {
        w
        for w in _WORD.findall(str(text or "").lower())
        if w not in _STOPWORDS and (len(w) > 1 or w.isdigit())
    }


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        return 0.0
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def _exchanges(turns: Sequence[Turn]) -> list[list[Turn]]:
    """Turns grouped as exchanges: a user turn and what follows it until the next one."""
    groups: list[list[Turn]] = []
    for t in turns:
        if t.get("role") == "user" or not groups:
            groups.append([t])
        else:
            groups[-1].append(t)
    return groups


def select_turns(
    turns: Sequence[Turn],
    strategy: RecentSearch | KeywordSearch | SemanticSearch,
    *,
    question: str,
    question_embedding: Sequence[float] | None = None,
) -> list[Turn]:
    """The stored (non-summary) turns the strategy recalls, oldest first."""
    if isinstance(strategy, RecentSearch):
        return list(turns[-strategy.n :])
    groups = _exchanges(turns)
    recent, earlier = groups[-_CONTINUITY:], groups[:-_CONTINUITY]
    scored: list[tuple[float, int]] = []
    semantic = isinstance(strategy, SemanticSearch) and question_embedding is not None
    asked = _words(question)
    for index, group in enumerate(earlier):
        if semantic:
            assert question_embedding is not None
            vectors = [t["embedding"] for t in group if isinstance(t.get("embedding"), list)]
            score = max((_cosine(question_embedding, v) for v in vectors), default=0.0)
            if isinstance(strategy, SemanticSearch) and score < strategy.min_score:
                continue
        else:
            shared: set[str] = set()
            for t in group:
                shared |= asked & _words(t.get("content"))
            score = float(len(shared))
        if score > 0:
            scored.append((score, index))
    scored.sort(key=lambda s: (-s[0], -s[1]))  # best first, the more recent on ties
    chosen = sorted(index for _, index in scored[: strategy.top_k])
    out = [t for index in chosen for t in earlier[index]]
    return out + [t for group in recent for t in group]


class Embedder:
    """Embeddings through the sidecar (``{egress}/llm/embeddings/v1``) with litellm."""

    def __init__(self, *, spec: EmbeddingModelSpec, egress_url: str, timeout: float) -> None:
        self.spec = spec
        self._model = f"{spec.provider or 'openai'}/{spec.model}"
        self._api_base = f"{egress_url.rstrip('/')}/llm/embeddings/v1"
        self._timeout = timeout

    async def embed(self, texts: Sequence[str], *, parent: Context | None) -> list[list[float]]:
        span = tracer.start_span(
            f"embeddings {self.spec.model}", context=parent, kind=SpanKind.CLIENT
        )
        span.set_attributes(
            {
                "gen_ai.operation.name": "embeddings",
                "gen_ai.request.model": self.spec.model,
                "specmesh.memory.operation": "embed",
            }
        )
        kwargs: dict[str, Any] = {
            "model": self._model,
            "input": list(texts),
            "api_base": self._api_base,
            "api_key": SIDECAR_API_KEY,
            "timeout": self._timeout,
        }
        if self.spec.dimensions:
            kwargs["dimensions"] = self.spec.dimensions
        # litellm only for semantic search (the context builder imports it in a thread)
        import litellm

        from .litellm_chat import LITELLM_ERRORS, translate_error

        try:
            try:
                response = await litellm.aembedding(**kwargs)
            except LITELLM_ERRORS as e:
                raise translate_error(e, model=self.spec.model) from e
            data = sorted(response.data, key=lambda d: _get(d, "index"))
            return [[float(x) for x in _get(d, "embedding")] for d in data]
        except ModelError as e:
            span.set_status(Status(StatusCode.ERROR, e.reason))
            span.set_attribute("error.type", type(e).__name__)
            raise
        finally:
            span.end()


def _get(item: Any, name: str) -> Any:
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


@dataclass(frozen=True)
class Recalled:
    """What :meth:`ConversationRecall.recall` found for one turn."""

    context_id: str
    question: str
    messages: list[dict[str, Any]]
    """History messages for the prompt (summaries first), between system and question."""
    question_embedding: list[float] | None = None
    compressed: bool = False
    """Whether this recall summarised older turns."""
    dropped: int = 0
    """Selected turns left out to stay under the budget."""


class ConversationRecall:
    """The memory part of a runtime context: store, strategy, compression."""

    def __init__(
        self,
        *,
        memory: ConversationMemory,
        spec: AgentSpec,
        egress_url: str,
        record_content: bool = False,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """``session``: the aiohttp session the summarizer's model calls share."""
        self.memory = memory
        self._spec = spec.memory
        self._model_name = spec.model.model
        self.strategy = spec.memory.search_strategy
        self.embedder: Embedder | None = None
        if isinstance(self.strategy, SemanticSearch):
            embedding = self.strategy.embedding_model or spec.knowledge.embedding_model
            if embedding is None:
                logger.warning(
                    "semantic memory search has no embedding model (memory or knowledge "
                    "part); keyword scoring stands in"
                )
            else:
                self.embedder = Embedder(
                    spec=embedding, egress_url=egress_url, timeout=spec.model.timeout_seconds
                )
        compression = spec.memory.compression
        self.summarizer = (
            Summarizer(
                model=spec.model,
                compression=compression,
                egress_url=egress_url,
                record_content=record_content,
                session=session,
            )
            if compression.enabled
            else None
        )

    async def _embed(self, texts: Sequence[str], parent: Context | None) -> list[list[float]]:
        if self.embedder is None:
            return []
        try:
            return await self.embedder.embed(texts, parent=parent)
        except ModelError as e:
            logger.warning("memory embedding failed (%s); keyword scoring stands in", e.reason)
            return []

    def _tokens(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any]) -> int:
        return count_prompt_tokens(messages, tools, model=self._model_name)

    async def recall(
        self,
        context_id: str,
        question: str,
        *,
        system: Sequence[Mapping[str, Any]] = (),
        tools: Sequence[Mapping[str, Any]] = (),
        parent: Context | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Recalled:
        """The history to send with ``question`` (see the module docstring)."""
        turns = await self.memory.get(context_id)
        vectors = await self._embed([question], parent)
        q_embedding = vectors[0] if vectors else None
        user = {"role": "user", "content": question}
        compression = self._spec.compression
        compressed = False
        if self.summarizer is not None and turns:
            prompt = [*system, *(_rendered(t) for t in turns), user]
            if self._tokens(prompt, tools) > compression.max_prompt_tokens:
                turns, compressed = await self._compress(context_id, turns, parent, headers)
        summaries = [t for t in turns if t.get("summary")]
        plain = [t for t in turns if not t.get("summary")]
        selected = select_turns(
            plain, self.strategy, question=question, question_embedding=q_embedding
        )
        history = [summary_message(t) for t in summaries]
        chosen = [prompt_message(t) for t in selected]
        dropped = 0
        if self.summarizer is not None:
            budget = compression.max_prompt_tokens
            while chosen and self._tokens([*system, *history, *chosen, user], tools) > budget:
                chosen.pop(0)
                dropped += 1
            if dropped:
                logger.info(
                    "conversation %s: %d turns left out to stay under %d tokens",
                    context_id,
                    dropped,
                    budget,
                )
        return Recalled(
            context_id=context_id,
            question=question,
            messages=history + chosen,
            question_embedding=q_embedding,
            compressed=compressed,
            dropped=dropped,
        )

    async def _compress(
        self,
        context_id: str,
        turns: list[Turn],
        parent: Context | None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[list[Turn], bool]:
        assert self.summarizer is not None
        keep = self._spec.compression.keep_recent_turns
        older = turns[: len(turns) - keep] if keep else list(turns)
        if not older or (len(older) == 1 and older[0].get("summary")):
            return turns, False
        try:
            text = await self.summarizer.summarize(older, parent=parent, headers=headers)
        except ModelError as e:
            logger.warning(
                "conversation %s: summarising %d turns failed (%s); oldest turns are left out",
                context_id,
                len(older),
                e.reason,
            )
            return turns, False
        summary: Turn = {"role": "system", "content": text, "summary": True}
        done = await self.memory.replace_oldest(
            context_id, count=len(older), last=older[-1], turns=[summary]
        )
        if not done:  # another instance compressed meanwhile: use what is stored now
            logger.info("conversation %s was compressed concurrently; re-reading", context_id)
            return await self.memory.get(context_id), False
        logger.info("conversation %s: %d turns summarised", context_id, len(older))
        return [summary, *turns[len(older) :]], True

    async def record(self, recalled: Recalled, answer: str, *, parent: Context | None) -> None:
        """Store the question and the final answer (with embeddings when semantic)."""
        user: Turn = {"role": "user", "content": recalled.question}
        assistant: Turn = {"role": "assistant", "content": answer}
        if self.embedder is not None:
            if recalled.question_embedding is not None:
                user["embedding"] = recalled.question_embedding
            vectors = await self._embed([answer], parent)
            if vectors:
                assistant["embedding"] = vectors[0]
        await self.memory.append(recalled.context_id, [user, assistant])

    async def delete(self, context_id: str) -> bool:
        return await self.memory.delete(context_id)


def _rendered(turn: Turn) -> dict[str, Any]:
    return summary_message(turn) if turn.get("summary") else prompt_message(turn)
