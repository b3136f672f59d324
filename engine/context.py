"""The runtime context: everything one spec revision needs to answer, built once.

A :class:`RuntimeContext` is immutable once built; a turn captures one at its start and
finishes on it. :class:`ContextBuilder` builds the next context beside the current one,
rebuilding only the parts whose JSON changed:

==============  ==============================================  =======================
part            what it holds                                    kept when unchanged
==============  ==============================================  =======================
model           :class:`engine.llm.ModelClient`                  the client
prompt          :class:`engine.prompt.PromptSet` (base+bundle)   the rendered versions
MCP server      :class:`engine.tools.mcp.McpConnection`          the session, tool list
partner         :class:`engine.tools.partners.PartnerTool`       the agent card
memory          :class:`ConversationMemory` (in process: the      the store (shared, ref-
                runtime's; Redis: via the sidecar's proxy) and   counted); the recall is
                :class:`engine.recall.ConversationRecall`        rebuilt with each context
knowledge       :class:`engine.knowledge.KnowledgeBase` or None  the store, embedder
==============  ==============================================  =======================

MCP connections and partner tools are shared by every context that uses them unchanged
(keyed by their own part of the spec) and reference-counted: the builder closes one
when the last context holding it is released.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import aiohttp
import httpx
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER

from specmesh.snapshot import ResolvedSnapshot
from specmesh.spec.models import McpServerRef, SemanticSearch

from .errors import ContextBuildError, PromptError
from .knowledge.base import KnowledgeBase
from .knowledge.errors import KnowledgeError
from .llm import ModelClient, uses_litellm
from .memory import ConversationMemory, InMemoryConversationMemory, RedisConversationMemory
from .openai_chat import new_session
from .prompt import PromptSet
from .recall import ConversationRecall
from .settings import EngineSettings
from .tools import Tool
from .tools.partners import PartnerTool

if TYPE_CHECKING:  # the MCP SDK is imported by the first build that needs it
    from .tools.mcp import McpConnection, McpTool

__all__ = ["ContextBuilder", "RuntimeContext", "part_fingerprints"]

logger = logging.getLogger(__name__)


class _Closable(Protocol):
    async def aclose(self) -> None: ...


_R = TypeVar("_R", bound=_Closable)


def part_fingerprints(snapshot: ResolvedSnapshot) -> dict[str, str]:
    """The JSON of each independently rebuilt part of a snapshot."""
    spec = snapshot.spec

    def dump(value: Any) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    return {
        "model": spec.model.model_dump_json(),
        "prompt": dump(
            [spec.base.model_dump(mode="json"), snapshot.prompt.model_dump(mode="json")]
        ),
        "knowledge": spec.knowledge.model_dump_json(),
        "memory": spec.memory.model_dump_json(),
        **{
            f"mcp:{ref.mcp_server_name}": dump(
                [
                    ref.model_dump(mode="json", exclude={"allowed_tools"}),
                    _entry_json(snapshot, ref.mcp_server_name),
                ]
            )
            for ref in spec.mcp_servers
        },
        **{f"partner:{ref.agent_name}": ref.model_dump_json() for ref in spec.partner_agents},
    }


def _entry_json(snapshot: ResolvedSnapshot, name: str) -> Any:
    entry = snapshot.mcp_servers.get(name)
    return entry.model_dump(mode="json") if entry is not None else None


@dataclass(frozen=True, eq=False)
class RuntimeContext:
    """One revision's model, prompt, tools and memory; immutable once built."""

    agent_name: str
    revision: int
    snapshot: ResolvedSnapshot
    model: ModelClient
    prompt: PromptSet
    mcp: tuple[tuple[McpServerRef, McpConnection], ...]
    partners: tuple[PartnerTool, ...]
    memory: ConversationMemory
    recall: ConversationRecall
    """The memory part: search strategy and compression over ``memory``."""
    knowledge: KnowledgeBase | None = None
    """The knowledge base, when the spec enables one."""
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    _tool_cache: dict[str, tuple[int, list[McpTool]]] = field(default_factory=dict, repr=False)

    def tools(self) -> dict[str, Tool]:
        """The tools offered now, by the name the model sees (MCP lists may refresh)."""
        out: dict[str, Tool] = {}
        if self.mcp:
            from .tools.mcp import mcp_tools
        for ref, conn in self.mcp:
            cached = self._tool_cache.get(ref.mcp_server_name)
            if cached is None or cached[0] != conn.generation:
                cached = (conn.generation, mcp_tools(conn, ref))
                self._tool_cache[ref.mcp_server_name] = cached
            for t in cached[1] if conn.connected else ():
                out.setdefault(t.definition.name, t)
        for p in self.partners:
            p.refresh_card_if_due()
            out.setdefault(p.definition.name, p)
        return out


@dataclass
class _Entry(Generic[_R]):
    resource: _R
    refs: int = 0


class _SharedPool(Generic[_R]):
    """Resources shared by contexts, closed when the last one lets go."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry[_R]] = {}

    def get(self, key: str) -> _R | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.refs += 1
        return entry.resource

    def add(self, key: str, resource: _R) -> None:
        self._entries[key] = _Entry(resource, refs=1)

    def release(self, key: str) -> _R | None:
        """Drop one reference; return the resource when it must be closed."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.refs -= 1
        if entry.refs > 0:
            return None
        del self._entries[key]
        return entry.resource

    def drain(self) -> list[_R]:
        out = [e.resource for e in self._entries.values()]
        self._entries.clear()
        return out

    def __len__(self) -> int:
        return len(self._entries)


class ContextBuilder:
    """Builds contexts from snapshots, reusing what did not change; owns shared resources."""

    def __init__(
        self,
        *,
        settings: EngineSettings,
        egress_url: str,
        memory: ConversationMemory,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._settings = settings
        self._egress = egress_url.rstrip("/")
        self._memory = memory
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(headers={VERSION_HEADER: PROTOCOL_VERSION_CURRENT})
        self._model_session: aiohttp.ClientSession | None = None
        """Shared by every model client (kept-alive connections to the egress)."""
        self._mcp: _SharedPool[McpConnection] = _SharedPool()
        self._partners: _SharedPool[PartnerTool] = _SharedPool()
        self._memories: _SharedPool[ConversationMemory] = _SharedPool()

    @property
    def open_mcp_connections(self) -> int:
        """MCP connections held by live contexts."""
        return len(self._mcp)

    async def build(
        self, snapshot: ResolvedSnapshot, previous: RuntimeContext | None = None
    ) -> RuntimeContext:
        """Build the context of ``snapshot``; raise ContextBuildError when it cannot serve."""
        fingerprints = part_fingerprints(snapshot)
        prev = previous.fingerprints if previous is not None else {}
        spec = snapshot.spec

        def same(part: str) -> bool:
            return previous is not None and prev.get(part) == fingerprints.get(part)

        try:
            prompt = (
                previous.prompt
                if previous and same("prompt")
                else PromptSet.build(spec.base, snapshot.prompt)
            )
        except PromptError as e:
            raise ContextBuildError(revision=snapshot.revision, reason=str(e)) from e
        if self._model_session is None or self._model_session.closed:
            self._model_session = new_session()
        await _import_in_thread(_modules_needed(snapshot))
        model = (
            previous.model
            if previous and same("model")
            else ModelClient(
                spec=spec.model,
                egress_url=self._egress,
                record_content=self._settings.record_content,
                session=self._model_session,
            )
        )
        knowledge = (
            previous.knowledge
            if previous and same("knowledge")
            else await self._open_knowledge(snapshot)
        )

        acquired_mcp: list[str] = []
        acquired_partners: list[str] = []
        try:
            mcp: list[tuple[McpServerRef, McpConnection]] = []
            starting: list[Awaitable[None]] = []
            for ref in spec.mcp_servers:
                name = ref.mcp_server_name
                if name not in snapshot.mcp_servers:
                    logger.warning("MCP server %s is not in the MCP Registry; skipped", name)
                    continue
                key = f"mcp:{name}|{fingerprints[f'mcp:{name}']}"
                conn = self._mcp.get(key)
                if conn is None:
                    from .tools.mcp import McpConnection

                    conn = McpConnection(
                        server=name,
                        url=f"{self._egress}/mcp/{name}",
                        connect_timeout=self._settings.mcp_connect_timeout_seconds,
                        initial_backoff=self._settings.reconnect_initial_seconds,
                        max_backoff=self._settings.reconnect_max_seconds,
                    )
                    self._mcp.add(key, conn)
                    starting.append(conn.start())
                acquired_mcp.append(key)
                mcp.append((ref, conn))
            partners: list[PartnerTool] = []
            for pref in spec.partner_agents:
                key = f"partner:{pref.agent_name}|{fingerprints[f'partner:{pref.agent_name}']}"
                tool = self._partners.get(key)
                if tool is None:
                    tool = PartnerTool(
                        caller=snapshot.agent_name,
                        partner=pref.agent_name,
                        egress_url=self._egress,
                        http=self._http,
                        max_depth=self._settings.max_call_depth,
                        card_timeout=self._settings.card_timeout_seconds,
                        card_retry=self._settings.card_retry_seconds,
                    )
                    self._partners.add(key, tool)
                    starting.append(_ignore_result(tool.fetch_card))
                acquired_partners.append(key)
                partners.append(tool)
            if starting:
                await asyncio.gather(*starting)
        except BaseException:
            await self._release_keys(acquired_mcp, acquired_partners)
            raise
        memory = self._acquire_memory(snapshot, fingerprints, previous)
        return RuntimeContext(
            agent_name=snapshot.agent_name,
            revision=snapshot.revision,
            snapshot=snapshot,
            model=model,
            prompt=prompt,
            mcp=tuple(mcp),
            partners=tuple(partners),
            memory=memory,
            recall=ConversationRecall(
                memory=memory,
                spec=spec,
                egress_url=self._egress,
                record_content=self._settings.record_content,
                session=self._model_session,
            ),
            knowledge=knowledge,
            fingerprints=fingerprints,
        )

    async def _open_knowledge(self, snapshot: ResolvedSnapshot) -> KnowledgeBase | None:
        spec = snapshot.spec.knowledge
        if not spec.enabled:
            return None
        try:
            return await KnowledgeBase.open(
                spec,
                egress_url=self._egress,
                data_dir=self._settings.data_dir,
                record_content=self._settings.record_content,
            )
        except KnowledgeError as e:
            raise ContextBuildError(revision=snapshot.revision, reason=e.reason) from e

    def _acquire_memory(
        self,
        snapshot: ResolvedSnapshot,
        fingerprints: Mapping[str, str],
        previous: RuntimeContext | None,
    ) -> ConversationMemory:
        """The memory store of ``snapshot``: Redis clients are shared by the contexts whose
        memory part is the same (reference-counted); in-process memory is the runtime's."""
        spec = snapshot.spec.memory
        if spec.storage_type != "redis":
            if previous is not None and previous.fingerprints.get("memory") == fingerprints.get(
                "memory"
            ):
                return previous.memory
            if isinstance(self._memory, InMemoryConversationMemory):
                return self._memory.with_ttl(spec.ttl_seconds)
            return self._memory
        key = f"memory|{fingerprints['memory']}"
        memory = self._memories.get(key)
        if memory is None:
            memory = RedisConversationMemory.for_spec(
                spec,
                proxy=self._settings.redis_proxy,
                agent_name=snapshot.agent_name,
                timeout=self._settings.redis_timeout_seconds,
            )
            self._memories.add(key, memory)
        return memory

    async def _release_memory(self, context: RuntimeContext) -> None:
        if context.snapshot.spec.memory.storage_type != "redis":
            return
        memory = self._memories.release(f"memory|{context.fingerprints['memory']}")
        if memory is not None:
            logger.info("closing the memory store client (no context uses it)")
            await memory.aclose()

    async def release(self, context: RuntimeContext) -> None:
        """The context is no longer used: close what no other context holds."""
        await self._release_memory(context)
        fp = context.fingerprints
        mcp_keys = [
            f"mcp:{ref.mcp_server_name}|{fp[f'mcp:{ref.mcp_server_name}']}"
            for ref, _ in context.mcp
        ]
        partner_keys = [
            f"partner:{p.partner}|{fp[f'partner:{p.partner}']}" for p in context.partners
        ]
        await self._release_keys(mcp_keys, partner_keys)

    async def _release_keys(self, mcp_keys: list[str], partner_keys: list[str]) -> None:
        closing: list[Awaitable[None]] = []
        for key in mcp_keys:
            conn = self._mcp.release(key)
            if conn is not None:
                logger.info("closing MCP connection %s (no context uses it)", conn.server)
                closing.append(conn.aclose())
        for key in partner_keys:
            tool = self._partners.release(key)
            if tool is not None:
                closing.append(tool.aclose())
        if closing:
            await asyncio.gather(*closing)

    async def aclose(self) -> None:
        """Close every shared resource (shutdown)."""
        closing: list[Awaitable[None]] = [c.aclose() for c in self._mcp.drain()]
        closing += [p.aclose() for p in self._partners.drain()]
        closing += [m.aclose() for m in self._memories.drain()]
        if closing:
            await asyncio.gather(*closing)
        if self._own_http:
            await self._http.aclose()
        if self._model_session is not None:
            await self._model_session.close()


def _modules_needed(snapshot: ResolvedSnapshot) -> list[str]:
    """The heavy modules a snapshot's parts need (none for an OpenAI-compatible model
    without MCP servers, semantic memory, compression or knowledge)."""
    spec = snapshot.spec
    needed = []
    if spec.mcp_servers:
        needed.append("engine.tools.mcp")
    if (
        uses_litellm(spec.model)
        or spec.memory.compression.enabled
        or isinstance(spec.memory.search_strategy, SemanticSearch)
    ):
        needed.append("engine.litellm_chat")
    return needed


async def _import_in_thread(modules: list[str]) -> None:
    """Import ``modules`` off the event loop (litellm, the MCP SDK: seconds each)."""
    import sys

    missing = [m for m in modules if m not in sys.modules]
    if missing:
        await asyncio.to_thread(lambda: [importlib.import_module(m) for m in missing])


async def _ignore_result(fn: Callable[[], Awaitable[Any]]) -> None:
    await fn()
