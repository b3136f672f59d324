"""Business REST endpoints of the knowledge base (beside :mod:`engine.rest`)::

    POST   /v1/knowledge/documents          {"documents": [{"source": str, "text": str}]}
                                            200 {"collection", "added", "unchanged",
                                                 "replaced", "chunksWritten",
                                                 "chunksDeleted", "chunks"}
    DELETE /v1/knowledge/documents?source=S 200 {"collection", "source", "deleted", "chunks"}

``chunks`` is the collection's size afterwards. Errors are ``{"error": {"code",
"message"}}`` as in :mod:`engine.rest`: 400 names the bad field, 409
``knowledge_disabled`` when the current spec has no knowledge base, 503 when the agent
is not ready, 502 when the embedding model or the vector store failed.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Annotated, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.rest import describe_validation_error, error_response, read_body
from specmesh import jsonbounds

from .errors import KnowledgeError

if TYPE_CHECKING:
    from .base import KnowledgeBase

__all__ = ["IngestRequest", "KnowledgeSource", "create_knowledge_routes"]

logger = logging.getLogger(__name__)

_MAX_BODY = 32 << 20


@runtime_checkable
class KnowledgeSource(Protocol):
    """What serves the current knowledge base (the engine runtime)."""

    @property
    def ready(self) -> bool: ...

    @property
    def knowledge(self) -> KnowledgeBase | None:
        """The current context's knowledge base; None when the spec has none."""
        ...


class _DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Annotated[str, Field(min_length=1, max_length=1024)]
    """The document's name (a path or URL); re-ingesting a source replaces its chunks."""
    text: str
    """The document's text."""


class IngestRequest(BaseModel):
    """The body of ``POST /v1/knowledge/documents``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    documents: Annotated[list[_DocumentIn], Field(min_length=1, max_length=10_000)]


def _current(source: KnowledgeSource) -> KnowledgeBase | Response:
    if not source.ready:
        return error_response(503, "not_ready", "the agent has no valid spec loaded yet")
    kb = source.knowledge
    if kb is None:
        return error_response(
            409, "knowledge_disabled", "the agent's spec has no knowledge base enabled"
        )
    return kb


def create_knowledge_routes(*, source: KnowledgeSource) -> list[Route]:
    """The knowledge routes over ``source``'s current knowledge base."""

    async def ingest(request: Request) -> Response:
        body = await read_body(request, _MAX_BODY)
        if body is None:
            return error_response(413, "too_large", f"body: must be at most {_MAX_BODY} bytes")
        try:
            data: Any = jsonbounds.loads(body or b"null", max_depth=16)
        except jsonbounds.JsonTooDeepError as e:
            return error_response(400, "invalid_json", f"body: {e}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "invalid_json", "body: is not valid JSON")
        try:
            parsed = IngestRequest.model_validate(data)
        except ValidationError as e:
            return error_response(
                400, "invalid_request", describe_validation_error(e, show_input=False)
            )
        kb = _current(source)
        if isinstance(kb, Response):
            return kb
        from .base import Document  # imported late: it pulls in litellm and chromadb

        try:
            report = await kb.ingest([Document(d.source, d.text) for d in parsed.documents])
            size = await kb.count()
        except KnowledgeError as e:
            logger.warning("knowledge ingest failed: %s", e.reason)
            return error_response(502, e.code, e.reason)
        return JSONResponse({"collection": kb.collection, **report.as_json(), "chunks": size})

    async def delete(request: Request) -> Response:
        name = request.query_params.get("source", "")
        if not name:
            return error_response(400, "invalid_request", "source: is required (query parameter)")
        kb = _current(source)
        if isinstance(kb, Response):
            return kb
        try:
            deleted = await kb.delete_source(name)
            size = await kb.count()
        except KnowledgeError as e:
            logger.warning("knowledge delete failed: %s", e.reason)
            return error_response(502, e.code, e.reason)
        return JSONResponse(
            {"collection": kb.collection, "source": name, "deleted": deleted, "chunks": size}
        )

    return [
        Route("/v1/knowledge/documents", ingest, methods=["POST"]),
        Route("/v1/knowledge/documents", delete, methods=["DELETE"]),
    ]
