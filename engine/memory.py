"""Conversation memory: the stored turns of each conversation (A2A contextId).

:class:`ConversationMemory` is the store interface; two backends implement it:

* :class:`InMemoryConversationMemory` -- this process only (the default, one instance);
* :class:`RedisConversationMemory` -- shared by every instance of the agent: one Redis list
  per conversation, key ``specmesh:memory:<agent resource name>:<contextId>``. The engine
  connects to the sidecar's Redis proxy (``SPECMESH_REDIS_PROXY``) without a password; the
  sidecar authenticates to the real store with the credentials from Vault.

A *turn* is one stored message, a JSON object: ``{"role", "content", "ts"}`` plus, when
they apply, ``"summary": true`` (a summary replacing the turns it covers, see
:mod:`engine.compression`) and ``"embedding": [...]`` (for the semantic search strategy,
see :mod:`engine.recall`). Only the user's messages and the final answers are kept, not
tool traffic, so a history stays valid when the tools change with the spec.

Retention: with a TTL, a conversation not written for ``ttl_seconds`` is forgotten (Redis
``EXPIRE``, refreshed on every write; in process, checked on read). Redis errors are
translated here into :class:`engine.errors.MemoryStoreError`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from specmesh.addresses import parse_listen
from specmesh.names import resource_name
from specmesh.spec.models import MemorySpec

from .errors import MemoryStoreError

__all__ = [
    "KEY_PREFIX",
    "ConversationMemory",
    "InMemoryConversationMemory",
    "RedisConversationMemory",
    "Turn",
    "memory_key",
    "prompt_message",
]

Message = Mapping[str, Any]
Turn = dict[str, Any]

KEY_PREFIX = "specmesh:memory"
"""Prefix of every conversation key in Redis."""


def memory_key(agent_name: str, context_id: str, *, prefix: str = KEY_PREFIX) -> str:
    """The Redis key of one conversation."""
    return f"{prefix}:{resource_name(agent_name)}:{context_id}"


def prompt_message(turn: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI message of a stored turn (role and content only)."""
    return {"role": turn["role"], "content": turn.get("content")}


def _stamped(message: Message, now: float) -> Turn:
    turn = dict(message)
    turn.setdefault("ts", now)
    return turn


class ConversationMemory(Protocol):
    """Stored turns per conversation."""

    async def get(self, context_id: str) -> list[Turn]:
        """The conversation's turns, oldest first (empty when unknown or expired)."""
        ...

    async def append(self, context_id: str, messages: Sequence[Message]) -> None:
        """Add turns at the end (``ts`` is set when absent); refreshes the TTL."""
        ...

    async def replace_oldest(
        self, context_id: str, *, count: int, last: Message, turns: Sequence[Message]
    ) -> bool:
        """Replace the oldest ``count`` turns by ``turns`` -- only if the ``count``-th turn
        is still ``last`` (nobody compressed meanwhile); return whether it was done.
        Turns appended meanwhile are kept."""
        ...

    async def delete(self, context_id: str) -> bool:
        """Forget the conversation; return whether it existed."""
        ...

    async def aclose(self) -> None:
        """Release connections (the store's data stays)."""
        ...


# ---------------------------------------------------------------- in process


@dataclass
class _Conversation:
    turns: list[Turn]
    written_at: float


@dataclass
class _Data:
    conversations: dict[str, _Conversation] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class InMemoryConversationMemory:
    """Turns kept in this process; each conversation keeps its last ``max_messages``."""

    def __init__(
        self,
        *,
        ttl_seconds: float | None = None,
        max_messages: int = 200,
        max_conversations: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        _data: _Data | None = None,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self._max_messages = max_messages
        self._max_conversations = max_conversations
        self._clock = clock
        self._wall_clock = wall_clock
        self._data = _data or _Data()

    def with_ttl(self, ttl_seconds: float | None) -> InMemoryConversationMemory:
        """The same conversations under another TTL (a memory spec change keeps history)."""
        return InMemoryConversationMemory(
            ttl_seconds=ttl_seconds,
            max_messages=self._max_messages,
            max_conversations=self._max_conversations,
            clock=self._clock,
            wall_clock=self._wall_clock,
            _data=self._data,
        )

    def _live(self, context_id: str) -> _Conversation | None:
        conv = self._data.conversations.get(context_id)
        if conv is None:
            return None
        if self.ttl_seconds is not None and self._clock() - conv.written_at >= self.ttl_seconds:
            del self._data.conversations[context_id]
            return None
        return conv

    def expires_in(self, context_id: str) -> float | None:
        """Seconds until the conversation expires (None: no TTL or unknown)."""
        conv = self._live(context_id)
        if conv is None or self.ttl_seconds is None:
            return None
        return conv.written_at + self.ttl_seconds - self._clock()

    async def get(self, context_id: str) -> list[Turn]:
        conv = self._live(context_id)
        return [dict(m) for m in conv.turns] if conv is not None else []

    async def append(self, context_id: str, messages: Sequence[Message]) -> None:
        async with self._data.lock:
            conv = self._live(context_id)
            self._data.conversations.pop(context_id, None)
            history = conv.turns if conv is not None else []
            now = self._wall_clock()
            history.extend(_stamped(m, now) for m in messages)
            del history[: max(0, len(history) - self._max_messages)]
            # re-inserted: most recently used last
            self._data.conversations[context_id] = _Conversation(history, self._clock())
            while len(self._data.conversations) > self._max_conversations:
                del self._data.conversations[next(iter(self._data.conversations))]

    async def replace_oldest(
        self, context_id: str, *, count: int, last: Message, turns: Sequence[Message]
    ) -> bool:
        async with self._data.lock:
            conv = self._live(context_id)
            if conv is None or count < 1 or len(conv.turns) < count:
                return False
            if conv.turns[count - 1] != dict(last):
                return False
            now = self._wall_clock()
            conv.turns[:count] = [_stamped(t, now) for t in turns]
            conv.written_at = self._clock()
            return True

    async def delete(self, context_id: str) -> bool:
        async with self._data.lock:
            existed = self._live(context_id) is not None
            self._data.conversations.pop(context_id, None)
            return existed

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------- Redis

# KEYS[1] the list; ARGV[1] count, ARGV[2] the expected count-th turn, ARGV[3] TTL (0: none),
# ARGV[4..] the turns replacing the oldest ``count``.
_REPLACE_OLDEST = """
local n = tonumber(ARGV[1])
if redis.call('LINDEX', KEYS[1], n - 1) ~= ARGV[2] then return 0 end
redis.call('LTRIM', KEYS[1], n, -1)
for i = #ARGV, 4, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""


def _dumps(turn: Mapping[str, Any]) -> str:
    return json.dumps(turn, ensure_ascii=False, separators=(",", ":"))


class RedisConversationMemory:
    """Turns in Redis, one list per conversation, shared by every instance of the agent.

    Give it a client (tests, benchmarks) or use :meth:`connect` for the sidecar's proxy.
    """

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        agent_name: str,
        ttl_seconds: int | None = None,
        max_messages: int = 1000,
        prefix: str = KEY_PREFIX,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self.agent_name = agent_name
        self.ttl_seconds = ttl_seconds
        self._max_messages = max_messages
        self._prefix = prefix
        self._wall_clock = wall_clock
        self._replace = client.register_script(_REPLACE_OLDEST)

    @classmethod
    def connect(
        cls,
        *,
        proxy: str,
        agent_name: str,
        ttl_seconds: int | None = None,
        timeout: float = 5.0,
        max_messages: int = 1000,
    ) -> RedisConversationMemory:
        """A memory on the sidecar's Redis proxy (``host:port`` or ``unix:path``); no
        password, no database selection (the proxy does both); connects lazily."""
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            # the proxy may open its listener a moment after the snapshot arrives
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            "driver_info": None,  # no CLIENT SETINFO: the first reply is the proxy's own
            "decode_responses": True,
        }
        kind, host, port = parse_listen(proxy, setting="SPECMESH_REDIS_PROXY")
        if kind == "unix":
            client = aioredis.Redis(unix_socket_path=host, **common)
        else:
            client = aioredis.Redis(host=host, port=port, **common)
        return cls(
            client=client, agent_name=agent_name, ttl_seconds=ttl_seconds, max_messages=max_messages
        )

    @classmethod
    def for_spec(
        cls, spec: MemorySpec, *, proxy: str, agent_name: str, timeout: float = 5.0
    ) -> RedisConversationMemory:
        return cls.connect(
            proxy=proxy, agent_name=agent_name, ttl_seconds=spec.ttl_seconds, timeout=timeout
        )

    def key(self, context_id: str) -> str:
        return memory_key(self.agent_name, context_id, prefix=self._prefix)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def get(self, context_id: str) -> list[Turn]:
        try:
            raw = await self._client.lrange(self.key(context_id), 0, -1)
        except RedisError as e:
            raise _translate(e, "read") from e
        return [json.loads(item) for item in raw]

    async def append(self, context_id: str, messages: Sequence[Message]) -> None:
        if not messages:
            return
        key = self.key(context_id)
        now = self._wall_clock()
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *(_dumps(_stamped(m, now)) for m in messages))
                pipe.ltrim(key, -self._max_messages, -1)
                if self.ttl_seconds:
                    pipe.expire(key, self.ttl_seconds)
                await pipe.execute()
        except RedisError as e:
            raise _translate(e, "write") from e

    async def replace_oldest(
        self, context_id: str, *, count: int, last: Message, turns: Sequence[Message]
    ) -> bool:
        if count < 1:
            return False
        now = self._wall_clock()
        args: list[str | int] = [count, _dumps(last), self.ttl_seconds or 0]
        args += [_dumps(_stamped(t, now)) for t in turns]
        try:
            done = await self._replace(keys=[self.key(context_id)], args=args)
        except RedisError as e:
            raise _translate(e, "write") from e
        return bool(done)

    async def delete(self, context_id: str) -> bool:
        try:
            return bool(await self._client.delete(self.key(context_id)))
        except RedisError as e:
            raise _translate(e, "delete") from e

    async def ttl(self, context_id: str) -> int:
        """Seconds the conversation's key lives on (-1: no TTL, -2: no key)."""
        try:
            return int(await self._client.ttl(self.key(context_id)))
        except RedisError as e:
            raise _translate(e, "read") from e

    async def aclose(self) -> None:
        await self._client.aclose()


def _translate(error: RedisError, operation: str) -> MemoryStoreError:
    if isinstance(error, ResponseError):
        # the proxy's own refusals start with "specmesh:" and are safe to show
        text = str(error)
        reason = text if text.startswith("specmesh:") else f"refused ({type(error).__name__})"
    else:
        reason = f"unavailable ({type(error).__name__})"
    return MemoryStoreError(operation=operation, reason=reason)
