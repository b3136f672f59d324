"""The vector store: one Chroma collection, embedded on disk or on a Chroma server.

:class:`ChromaVectorStore` opens ``chromadb.PersistentClient(path)`` (HNSW index, cosine
space) when ``store.address`` is empty or a local folder, and ``chromadb.HttpClient``
when it is an ``http(s)://host:port`` URL: the same calls then reach a Chroma server.
Vectors come from the caller (the collection has no embedding function of its own).

chromadb's client is synchronous: every call runs in a worker thread so the event loop
stays free, bounded by ``timeout`` seconds (chromadb's HTTP client has no timeout of its
own; a call that overruns is abandoned to its thread), and its errors are translated here
into :class:`KnowledgeStoreError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import chromadb
import httpx
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import ChromaError

from specmesh.spec.models import VectorStoreSpec

from .errors import KnowledgeStoreError

__all__ = ["ChromaVectorStore", "StoredChunk", "VectorHit", "VectorStore", "store_location"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_STORE_ERRORS = (ChromaError, httpx.HTTPError, ValueError, OSError)
Metadata = Mapping[str, str | int | float | bool]


@dataclass(frozen=True)
class StoredChunk:
    """What the store keeps of one chunk."""

    id: str
    vector: Sequence[float]
    text: str
    metadata: Metadata


@dataclass(frozen=True)
class VectorHit:
    """One search result; ``score`` is 1 - cosine distance."""

    id: str
    score: float
    text: str
    metadata: Metadata


class VectorStore(Protocol):
    """Chunks and their vectors, searchable by cosine similarity."""

    @property
    def location(self) -> str:
        """Where the store is (a folder or a server URL; never a secret)."""
        ...

    async def ids_where(self, field: str, value: str) -> set[str]: ...

    async def upsert(self, chunks: Sequence[StoredChunk]) -> None: ...

    async def delete_ids(self, ids: Sequence[str]) -> None: ...

    async def query(self, vector: Sequence[float], *, k: int) -> list[VectorHit]: ...

    async def count(self) -> int: ...


def store_location(spec: VectorStoreSpec, *, data_dir: Path) -> str:
    """The server URL, or the folder of the embedded store."""
    address = (spec.address or "").strip()
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    return str(Path(address) if address else data_dir / "knowledge")


class ChromaVectorStore:
    """One Chroma collection (cosine HNSW), embedded or on a server."""

    def __init__(
        self, *, client: Any, collection: Any, location: str, timeout: float = 30.0
    ) -> None:
        self._client = client
        self._collection = collection
        self._location = location
        self._timeout = timeout
        self._max_batch = int(client.get_max_batch_size())

    @classmethod
    async def open(
        cls, spec: VectorStoreSpec, *, data_dir: Path, timeout: float = 30.0
    ) -> ChromaVectorStore:
        """Open (creating when missing) the spec's collection."""
        location = store_location(spec, data_dir=data_dir)
        if spec.credentials:
            logger.warning(
                "knowledge store credentials are not applied yet (the sidecar does not proxy "
                "vector-store traffic); connecting to %s without them",
                location,
            )

        def connect() -> ChromaVectorStore:
            settings = ChromaSettings(anonymized_telemetry=False)
            if location.startswith(("http://", "https://")):
                url = urlsplit(location)
                secure = url.scheme == "https"
                client = chromadb.HttpClient(
                    host=url.hostname or "localhost",
                    port=url.port or (443 if secure else 8000),
                    ssl=secure,
                    settings=settings,
                )
            else:
                Path(location).mkdir(parents=True, exist_ok=True)
                client = chromadb.PersistentClient(path=location, settings=settings)
            collection = client.get_or_create_collection(
                spec.collection,
                embedding_function=None,
                configuration={"hnsw": {"space": "cosine"}},
            )
            return cls(client=client, collection=collection, location=location, timeout=timeout)

        return await _in_thread(location, "cannot open the collection", connect, timeout)

    @property
    def location(self) -> str:
        return self._location

    async def ids_where(self, field: str, value: str) -> set[str]:
        def run() -> set[str]:
            got = self._collection.get(where={field: value}, include=[])
            return set(got["ids"])

        return await _in_thread(self._location, "get failed", run, self._timeout)

    async def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        def run() -> None:
            for i in range(0, len(chunks), self._max_batch):
                batch = chunks[i : i + self._max_batch]
                self._collection.upsert(
                    ids=[c.id for c in batch],
                    embeddings=[list(c.vector) for c in batch],
                    documents=[c.text for c in batch],
                    metadatas=[dict(c.metadata) for c in batch],
                )

        if chunks:
            await _in_thread(self._location, "upsert failed", run, self._timeout)

    async def delete_ids(self, ids: Sequence[str]) -> None:
        def run() -> None:
            for i in range(0, len(ids), self._max_batch):
                self._collection.delete(ids=list(ids[i : i + self._max_batch]))

        if ids:
            await _in_thread(self._location, "delete failed", run, self._timeout)

    async def query(self, vector: Sequence[float], *, k: int) -> list[VectorHit]:
        def run() -> list[VectorHit]:
            got = self._collection.query(
                query_embeddings=[list(vector)],
                n_results=k,
                include=["documents", "metadatas", "distances"],
            )
            ids = got["ids"][0]
            docs = (got.get("documents") or [[]])[0]
            metas = (got.get("metadatas") or [[]])[0]
            dists = (got.get("distances") or [[]])[0]
            return [
                VectorHit(id=i, score=1.0 - float(d), text=t or "", metadata=dict(m or {}))
                for i, t, m, d in zip(ids, docs, metas, dists, strict=True)
            ]

        return await _in_thread(self._location, "query failed", run, self._timeout)

    async def count(self) -> int:
        return await _in_thread(
            self._location, "count failed", self._collection.count, self._timeout
        )


async def _in_thread(location: str, what: str, fn: Callable[[], _T], timeout: float) -> _T:
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.to_thread(fn)
    except TimeoutError as e:
        raise KnowledgeStoreError(store=location, reason=f"{what} (timed out)") from e
    except _STORE_ERRORS as e:
        raise KnowledgeStoreError(store=location, reason=f"{what} ({type(e).__name__})") from e
