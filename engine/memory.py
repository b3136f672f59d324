"""Conversation memory: the history of each conversation (A2A contextId).

:class:`ConversationMemory` is the interface the agent loop uses; the memory issue adds
a Redis implementation beside :class:`InMemoryConversationMemory`, which keeps history in
this process only. Messages are OpenAI-style dicts (``{"role": ..., "content": ...}``);
only the user's messages and the final answers are kept, not tool traffic, so a history
stays valid when the tools change with the spec.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["ConversationMemory", "InMemoryConversationMemory"]

Message = Mapping[str, Any]


class ConversationMemory(Protocol):
    """History per conversation."""

    async def get(self, context_id: str) -> list[dict[str, Any]]:
        """The conversation's messages, oldest first (empty when unknown)."""
        ...

    async def append(self, context_id: str, messages: Sequence[Message]) -> None:
        """Add messages at the end of the conversation."""
        ...

    async def delete(self, context_id: str) -> None:
        """Forget the conversation."""
        ...


class InMemoryConversationMemory:
    """History kept in this process; each conversation keeps its last ``max_messages``."""

    def __init__(self, *, max_messages: int = 200, max_conversations: int = 10_000) -> None:
        self._max_messages = max_messages
        self._max_conversations = max_conversations
        self._data: dict[str, list[dict[str, Any]]] = {}
        self._lock = asyncio.Lock()

    async def get(self, context_id: str) -> list[dict[str, Any]]:
        return [dict(m) for m in self._data.get(context_id, ())]

    async def append(self, context_id: str, messages: Sequence[Message]) -> None:
        async with self._lock:
            history = self._data.pop(context_id, [])
            history.extend(dict(m) for m in messages)
            del history[: max(0, len(history) - self._max_messages)]
            self._data[context_id] = history  # re-inserted: most recently used last
            while len(self._data) > self._max_conversations:
                del self._data[next(iter(self._data))]

    async def delete(self, context_id: str) -> None:
        async with self._lock:
            self._data.pop(context_id, None)
