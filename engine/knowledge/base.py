"""The knowledge base of one knowledge spec: ingest, delete, search, and how passages
reach the model.

Ingest, per document (``source`` names it)::

    chunks = chunk_text(text)                  ids = hash(source, position, text)
    stored = ids the store holds for source
    same ids          -> unchanged (nothing embedded, nothing written)
    no stored ids     -> added     (every chunk embedded and upserted)
    otherwise         -> replaced  (only the new ids embedded and upserted, the stored
                                    ids that are gone deleted)

Search embeds the query, takes the ``topK`` nearest chunks and drops those scoring below
``scoreThreshold`` (score = 1 - cosine distance). Each search is one ``retrieve
<collection>`` span with the sources, positions and scores it returned; the query and
passages are recorded only when content recording is on.

Retrieval modes (``knowledge.retrieval.mode``): ``auto`` -- the agent loop searches with
the user's message and puts the passages in the prompt (:func:`passages_message`);
``tool`` -- the loop offers :class:`SearchKnowledgeTool` (``search_knowledge``). Either
way the passages used become the answer's citations.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from engine.errors import ToolError
from engine.tools import ToolCallContext, ToolDefinition
from specmesh.spec.models import KnowledgeSpec

from .chunking import chunk_text, document_digest
from .errors import KnowledgeError

if TYPE_CHECKING:  # chromadb and litellm: imported by KnowledgeBase.open, in a thread
    from .embeddings import Embedder
    from .store import VectorStore

__all__ = [
    "EXCERPT_CHARS",
    "SEARCH_TOOL",
    "Document",
    "IngestReport",
    "KnowledgeBase",
    "Passage",
    "SearchKnowledgeTool",
    "passages_message",
]

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

EXCERPT_CHARS = 300
"""Characters of a passage kept in its citation."""
SEARCH_TOOL = "search_knowledge"


def _import_backends() -> None:
    importlib.import_module("engine.knowledge.store")
    importlib.import_module("engine.knowledge.embeddings")


@dataclass(frozen=True)
class Document:
    """A document to ingest: its name (a path, a URL...) and its text."""

    source: str
    text: str


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk."""

    chunk_id: str
    source: str
    position: int
    score: float
    text: str

    def citation(self) -> dict[str, Any]:
        """The citation of this passage (REST ``citations``, A2A artifact metadata)."""
        excerpt = self.text if len(self.text) <= EXCERPT_CHARS else self.text[:EXCERPT_CHARS] + "…"
        return {
            "source": self.source,
            "position": self.position,
            "score": round(self.score, 4),
            "text": excerpt,
        }


@dataclass
class IngestReport:
    """What an ingest did, counted in documents (and chunks written or deleted)."""

    added: int = 0
    unchanged: int = 0
    replaced: int = 0
    chunks_written: int = 0
    chunks_deleted: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "added": self.added,
            "unchanged": self.unchanged,
            "replaced": self.replaced,
            "chunksWritten": self.chunks_written,
            "chunksDeleted": self.chunks_deleted,
        }


def passages_message(passages: Sequence[Passage]) -> dict[str, str]:
    """The system message that puts ``passages`` in the prompt (``auto`` mode)."""
    lines = ["Relevant passages:"]
    for i, p in enumerate(passages, 1):
        lines.append(f"[{i}] {p.text} (source: {p.source})")
    lines.append("Use them when they help, and cite the sources you use.")
    return {"role": "system", "content": "\n".join(lines)}


class KnowledgeBase:
    """One knowledge spec's store, embedding model, chunking and retrieval settings."""

    def __init__(
        self,
        *,
        spec: KnowledgeSpec,
        store: VectorStore,
        embedder: Embedder,
        record_content: bool = False,
    ) -> None:
        if spec.store is None:
            raise ValueError("the knowledge spec has no store")
        self.spec = spec
        self.collection = spec.store.collection
        self._store = store
        self._embedder = embedder
        self._record_content = record_content
        self._write = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        spec: KnowledgeSpec,
        *,
        egress_url: str,
        data_dir: Path,
        record_content: bool = False,
    ) -> KnowledgeBase:
        """The knowledge base of an enabled spec (opens or creates its collection)."""
        if spec.store is None or spec.embedding_model is None:
            raise KnowledgeError("store and embeddingModel are required when enabled is true")
        # chromadb and litellm take seconds to import: not on the event loop
        await asyncio.to_thread(_import_backends)
        from .embeddings import LiteLlmEmbedder
        from .store import ChromaVectorStore

        store = await ChromaVectorStore.open(spec.store, data_dir=data_dir)
        embedder = LiteLlmEmbedder(spec=spec.embedding_model, egress_url=egress_url)
        return cls(spec=spec, store=store, embedder=embedder, record_content=record_content)

    @property
    def mode(self) -> str:
        return self.spec.retrieval.mode

    @property
    def store(self) -> VectorStore:
        return self._store

    async def count(self) -> int:
        """Chunks in the collection."""
        return await self._store.count()

    # ------------------------------------------------------------ writes

    async def ingest(self, documents: Sequence[Document]) -> IngestReport:
        """Chunk, embed and upsert ``documents`` (see the module docstring)."""
        from .store import StoredChunk

        report = IngestReport()
        chunking = self.spec.chunking
        async with self._write:
            for doc in documents:
                chunks = chunk_text(
                    doc.text, source=doc.source, size=chunking.size, overlap=chunking.overlap
                )
                stored = await self._store.ids_where("source", doc.source)
                wanted = {c.id for c in chunks}
                if stored == wanted:
                    report.unchanged += 1
                    continue
                new = [c for c in chunks if c.id not in stored]
                vectors = await self._embedder.embed([c.text for c in new])
                digest = document_digest(doc.text)
                await self._store.upsert(
                    [
                        StoredChunk(
                            id=c.id,
                            vector=v,
                            text=c.text,
                            metadata={
                                "source": c.source,
                                "position": c.position,
                                "start": c.start,
                                "end": c.end,
                                "digest": digest,
                            },
                        )
                        for c, v in zip(new, vectors, strict=True)
                    ]
                )
                gone = sorted(stored - wanted)
                await self._store.delete_ids(gone)
                report.chunks_written += len(new)
                report.chunks_deleted += len(gone)
                if stored:
                    report.replaced += 1
                else:
                    report.added += 1
        logger.info(
            "knowledge %s: ingested %d documents (%s)",
            self.collection,
            len(documents),
            report.as_json(),
        )
        return report

    async def delete_source(self, source: str) -> int:
        """Delete every chunk of ``source``; return how many there were."""
        async with self._write:
            ids = await self._store.ids_where("source", source)
            await self._store.delete_ids(sorted(ids))
        return len(ids)

    # ------------------------------------------------------------ reads

    async def search(
        self,
        query: str,
        *,
        top_k: int | None = None,
        parent: otel_context.Context | None = None,
    ) -> list[Passage]:
        """The passages nearest to ``query`` that pass the score threshold."""
        retrieval = self.spec.retrieval
        k = top_k or retrieval.top_k
        span = tracer.start_span(f"retrieve {self.collection}", context=parent)
        span.set_attributes(
            {
                "gen_ai.operation.name": "retrieve",
                "specmesh.knowledge.collection": self.collection,
                "specmesh.knowledge.mode": retrieval.mode,
                "specmesh.knowledge.top_k": k,
                "specmesh.knowledge.score_threshold": retrieval.score_threshold,
            }
        )
        if self._record_content:
            span.set_attribute("specmesh.knowledge.query", query)
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                vector = (await self._embedder.embed([query]))[0]
                hits = await self._store.query(vector, k=k)
            except KnowledgeError as e:
                span.set_status(Status(StatusCode.ERROR, e.reason))
                span.set_attribute("error.type", type(e).__name__)
                raise
            passages = [
                Passage(
                    chunk_id=h.id,
                    source=str(h.metadata.get("source", "")),
                    position=int(h.metadata.get("position", 0)),
                    score=h.score,
                    text=h.text,
                )
                for h in hits
                if h.score >= retrieval.score_threshold
            ]
            span.set_attributes(
                {
                    "specmesh.knowledge.candidates": len(hits),
                    "specmesh.knowledge.returned": len(passages),
                    "specmesh.knowledge.sources": [p.source for p in passages],
                    "specmesh.knowledge.positions": [p.position for p in passages],
                    "specmesh.knowledge.scores": [round(p.score, 4) for p in passages],
                }
            )
            if self._record_content:
                span.set_attribute(
                    "specmesh.knowledge.passages",
                    json.dumps([p.citation() for p in passages], ensure_ascii=False),
                )
            return passages

    def tool(self, sink: list[Passage]) -> SearchKnowledgeTool:
        """The ``search_knowledge`` tool of one turn; the passages it returns go to ``sink``."""
        return SearchKnowledgeTool(knowledge=self, sink=sink)

    async def aclose(self) -> None:
        """Nothing to close: chromadb's clients hold no connection of their own to end."""


class SearchKnowledgeTool:
    """``search_knowledge``: the model searches the knowledge base (``tool`` mode)."""

    kind = "knowledge"

    def __init__(self, *, knowledge: KnowledgeBase, sink: list[Passage]) -> None:
        self._knowledge = knowledge
        self._sink = sink
        self.definition = ToolDefinition(
            name=SEARCH_TOOL,
            description=(
                "Search the agent's knowledge base. Returns the most relevant passages, "
                "each with its source; cite the sources you use."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for."},
                },
                "required": ["query"],
            },
        )

    async def call(self, arguments: Mapping[str, Any], *, context: ToolCallContext) -> str:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ToolError(tool=SEARCH_TOOL, reason="'query' must be a non-empty string")
        try:
            passages = await self._knowledge.search(query)
        except KnowledgeError as e:
            raise ToolError(tool=SEARCH_TOOL, reason=e.reason) from e
        self._sink.extend(passages)
        if not passages:
            return "No passage of the knowledge base matches."
        return "\n\n".join(
            f"[{i}] (source: {p.source}, score {p.score:.2f})\n{p.text}"
            for i, p in enumerate(passages, 1)
        )
