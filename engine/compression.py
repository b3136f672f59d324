"""Compression of long conversations: older turns summarised by the agent's own model.

When ``memory.compression.enabled`` and the prompt a turn would send (system prompt,
stored history, the new question, the tools offered) passes ``maxPromptTokens``, every
turn but the last ``keepRecentTurns`` is summarised by the agent's model -- a separate
``chat <model>`` call through the sidecar, its span marked
``specmesh.memory.operation=summarize``, the answer limited to ``summaryMaxTokens``. The
summary is stored as one turn ``{"role": "system", "summary": true, ...}`` replacing the
turns it covers (an earlier summary among them is folded into the new one), and reaches
the model as the system message ``"Summary of the earlier conversation: ..."``.

Tokens are counted as the larger of litellm's count for the model and a simple estimate
(one token per word and per punctuation character, 3 per message and 3 per prompt --
the scripted model server's rule), so the budget holds for either.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from specmesh.spec.models import CompressionSpec, ModelSpec

from .llm import ModelClient, ModelReply

__all__ = [
    "SUMMARY_PREFIX",
    "Summarizer",
    "count_prompt_tokens",
    "estimate_tokens",
    "summary_message",
]

logger = logging.getLogger(__name__)

SUMMARY_PREFIX = "Summary of the earlier conversation: "
"""How a stored summary starts when it reaches the model."""

SUMMARIZE_INSTRUCTIONS = (
    "You summarize conversations. Write a concise summary of the conversation below, "
    "keeping the facts, names, numbers, decisions and open questions a reader needs to "
    "continue it. Answer with the summary only."
)

_TOKEN = re.compile(r"\w+|[^\w\s]")
_PER_MESSAGE = 3
_PER_PROMPT = 3


def estimate_tokens(text: str) -> int:
    """One token per word and per punctuation character."""
    return sum(1 for _ in _TOKEN.finditer(text))


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"] if isinstance(p, Mapping) and isinstance(p.get("text"), str) else str(p)
            for p in content
        )
    return json.dumps(content, sort_keys=True, ensure_ascii=False)


def _estimate_prompt(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> int:
    total = _PER_PROMPT
    for m in messages:
        total += _PER_MESSAGE + estimate_tokens(str(m.get("role") or ""))
        total += estimate_tokens(_content_text(m.get("content")))
        total += estimate_tokens(str(m.get("name") or ""))
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {}
            total += estimate_tokens(str(fn.get("name") or ""))
            total += estimate_tokens(str(fn.get("arguments") or ""))
    if tools:
        total += estimate_tokens(json.dumps(list(tools), sort_keys=True, ensure_ascii=False))
    return total


def count_prompt_tokens(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] = (),
    *,
    model: str,
) -> int:
    """Tokens of a prompt: max(litellm's count for ``model``, the simple estimate)."""
    estimate = _estimate_prompt(messages, tools)
    import litellm  # with compression on only (the context builder imports it in a thread)

    try:
        counted = litellm.token_counter(
            model=model,
            messages=[{"role": m.get("role"), "content": m.get("content")} for m in messages],
            tools=list(tools) or None,
        )
    except (ValueError, TypeError, KeyError) as e:
        logger.debug("litellm cannot count tokens for %s (%s); using the estimate", model, e)
        counted = 0
    return max(estimate, int(counted))


def summary_message(turn: Mapping[str, Any]) -> dict[str, Any]:
    """The system message a stored summary turn becomes in the prompt."""
    return {"role": "system", "content": SUMMARY_PREFIX + _content_text(turn.get("content"))}


def _truncate(text: str, limit: int) -> str:
    for i, match in enumerate(_TOKEN.finditer(text), start=1):
        if i == limit:
            return text[: match.end()]
    return text


class Summarizer:
    """Summarises turns with the agent's own model (through the sidecar)."""

    def __init__(
        self,
        *,
        model: ModelSpec,
        compression: CompressionSpec,
        egress_url: str,
        record_content: bool = False,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.max_tokens = compression.summary_max_tokens
        self._client = ModelClient(
            spec=model.model_copy(update={"max_tokens": self.max_tokens, "stream": False}),
            egress_url=egress_url,
            record_content=record_content,
            session=session,
        )

    @property
    def model_name(self) -> str:
        return self._client.name

    async def summarize(
        self,
        turns: Sequence[Mapping[str, Any]],
        *,
        parent: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """A summary of ``turns``; raises :class:`engine.errors.ModelError` on failure.
        ``headers``: for the sidecar (the turn's ledger entry, which the call is charged to)."""
        lines = []
        for t in turns:
            if t.get("summary"):
                lines.append(f"(summary of what came before) {_content_text(t.get('content'))}")
            else:
                lines.append(f"{t.get('role')}: {_content_text(t.get('content'))}")
        messages = [
            {"role": "system", "content": SUMMARIZE_INSTRUCTIONS},
            {"role": "user", "content": "\n".join(lines)},
        ]
        reply: ModelReply | None = None
        async for item in self._client.stream(
            messages,
            parent=parent,
            attributes={"specmesh.memory.operation": "summarize"},
            headers=headers,
        ):
            if isinstance(item, ModelReply):
                reply = item
        assert reply is not None
        return _truncate(reply.text.strip(), self.max_tokens)
