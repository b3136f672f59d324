"""Errors of the knowledge base, all :class:`engine.errors.EngineError` s::

    KnowledgeError                 the knowledge base could not do what was asked
    +-- KnowledgeStoreError        the vector store failed or cannot be opened
    |                              (``store``: where it is, ``reason``)
    +-- EmbeddingError             the embedding model call failed (``model``, ``reason``,
                                   ``status``); litellm's error is translated here, in
                                   :mod:`engine.knowledge.embeddings`, only

chromadb's errors are translated in :mod:`engine.knowledge.store`. Messages are safe to
show a caller: no secret, no document content.
"""

from __future__ import annotations

from engine.errors import EngineError

__all__ = ["EmbeddingError", "KnowledgeError", "KnowledgeStoreError"]


class KnowledgeError(EngineError):
    """The knowledge base could not do what was asked."""

    code = "knowledge_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KnowledgeStoreError(KnowledgeError):
    """The vector store failed, or could not be opened."""

    code = "knowledge_store_error"

    def __init__(self, *, store: str, reason: str) -> None:
        super().__init__(f"vector store {store}: {reason}")
        self.store = store


class EmbeddingError(KnowledgeError):
    """The embedding model call failed."""

    code = "embedding_error"

    def __init__(self, *, model: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"embedding model {model!r}: {reason}")
        self.model = model
        self.status = status
