"""Embeddings through litellm via the sidecar's egress, one ``embeddings`` span per call.

litellm is pointed at ``{egress}/llm/embeddings/v1`` with the dummy key
``sidecar-injected``; the sidecar forwards to ``knowledge.embeddingModel.baseUrl`` (default:
the model part's) and adds the real key. Texts go in batches of :data:`BATCH`; litellm's
errors are translated here, and only here, into :class:`EmbeddingError`.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import litellm
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from engine.litellm_chat import LITELLM_ERRORS, translate_error
from engine.llm import SIDECAR_API_KEY
from specmesh.spec.models import EmbeddingModelSpec

from .errors import EmbeddingError

__all__ = ["BATCH", "Embedder", "LiteLlmEmbedder"]

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

BATCH = 64
"""Texts per embeddings request."""


class Embedder(Protocol):
    """Turns texts into vectors."""

    @property
    def model(self) -> str: ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order; raise EmbeddingError when the call fails."""
        ...


class LiteLlmEmbedder:
    """The spec's embedding model, through litellm and the sidecar."""

    def __init__(self, *, spec: EmbeddingModelSpec, egress_url: str, timeout: float = 30.0) -> None:
        self.spec = spec
        self._target = f"{spec.provider or 'openai'}/{spec.model}"
        self._api_base = f"{egress_url.rstrip('/')}/llm/embeddings/v1"
        self._timeout = timeout

    @property
    def model(self) -> str:
        return self.spec.model

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), BATCH):
            out.extend(await self._call(list(texts[i : i + BATCH])))
        return out

    async def _call(self, texts: list[str]) -> list[list[float]]:
        with tracer.start_as_current_span(
            f"embeddings {self.spec.model}", kind=SpanKind.CLIENT, record_exception=False
        ) as span:
            span.set_attributes(
                {
                    "gen_ai.operation.name": "embeddings",
                    "gen_ai.provider.name": self._target.split("/", 1)[0],
                    "gen_ai.request.model": self.spec.model,
                    "specmesh.embeddings.inputs": len(texts),
                }
            )
            kwargs: dict[str, Any] = {
                "model": self._target,
                "input": texts,
                "api_base": self._api_base,
                "api_key": SIDECAR_API_KEY,
                "timeout": self._timeout,
            }
            if self.spec.dimensions is not None:
                kwargs["dimensions"] = self.spec.dimensions
            try:
                response = await litellm.aembedding(**kwargs)
            except LITELLM_ERRORS as e:
                error = translate_error(e, model=self.spec.model)
                span.set_status(Status(StatusCode.ERROR, error.reason))
                span.set_attribute("error.type", type(error).__name__)
                raise EmbeddingError(
                    model=self.spec.model, reason=error.reason, status=error.status
                ) from e
            vectors = _vectors(response, len(texts))
            usage = getattr(response, "usage", None)
            tokens = getattr(usage, "prompt_tokens", None)
            if isinstance(tokens, int):
                span.set_attribute("gen_ai.usage.input_tokens", tokens)
            if vectors:
                span.set_attribute("gen_ai.embeddings.dimension.count", len(vectors[0]))
            return vectors


def _vectors(response: Any, expected: int) -> list[list[float]]:
    data = sorted(
        (item if isinstance(item, dict) else item.model_dump() for item in response.data),
        key=lambda item: item.get("index", 0),
    )
    vectors = [[float(x) for x in item["embedding"]] for item in data]
    if len(vectors) != expected:
        raise EmbeddingError(
            model=str(getattr(response, "model", "?")),
            reason=f"answered {len(vectors)} vectors for {expected} inputs",
        )
    return vectors
