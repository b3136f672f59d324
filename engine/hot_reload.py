"""The engine runtime: snapshots in, turns out, hot reload in between.

:class:`EngineRuntime` implements :class:`engine.turn_protocol.AgentRunner`. A background task
consumes a :class:`engine.intake.SnapshotFeed`; each snapshot builds the next
:class:`RuntimeContext` beside the current one (reusing what did not change) and swaps
it in atomically. A turn captures the current context when it starts and finishes on it,
so ``TurnCompleted.revision`` is the revision that answered the whole turn. A snapshot
that fails to build is logged, kept in ``last_error``, reported to the sidecar, and the
current context stays.

Conversations are pinned (:class:`specmesh.pins.PinTable`): the first turn of a
conversation (A2A ``contextId``; the business REST ``contextId`` is the same) pins it to the
context current then, and its later turns run on that context -- across hot reloads --
until the conversation is deleted or ``conversation_pin_seconds`` after its first turn
(then the newest context serves it and pins it anew). New conversations take the newest
context. At most ``conversation_pin_max`` conversations are pinned (least recently used
leaves first) and at most ``conversation_pin_max_contexts`` older contexts are kept for
them (when one more is retired, the conversations of the oldest move to the newest).

Old contexts are reference-counted by the turns running on them and the conversations
pinned to them: once replaced, idle and unpinned, they are released, and the MCP sessions
no other context holds are closed.

Ready means a context is built and, when the feed is the sidecar's
(:class:`engine.intake.SidecarLink`), its stream is connected: without its sidecar the
engine has no callers and no way out, so it says so (:meth:`EngineRuntime.not_ready_reason`)
rather than fail each turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType

import httpx
from opentelemetry import context as otel_context

from specmesh.aio import cancel_and_wait
from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.pins import MAX_PINNED_ID, PinTable
from specmesh.snapshot import ResolvedSnapshot

from .agent_loop import LoopLimits, run_turn
from .context import ContextBuilder, RuntimeContext
from .errors import ContextBuildError
from .intake import SidecarLink, SnapshotFeed, StatusReporter
from .knowledge.base import KnowledgeBase
from .memory import ConversationMemory, InMemoryConversationMemory
from .settings import EngineSettings
from .turn_protocol import AgentRunner, CardInfo, TurnEvent, TurnFailed, TurnRequest

__all__ = ["EngineRuntime"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Lease:
    """A context, the turns running on it and the conversations pinned to it."""

    context: RuntimeContext
    turns: int = 0
    pins: int = 0
    retired: bool = False
    released: bool = False

    @property
    def idle(self) -> bool:
        """Replaced, no turn running on it and no conversation pinned to it."""
        return self.retired and self.turns == 0 and self.pins == 0


class EngineRuntime:
    """The engine's runtime as the servers see it (:class:`engine.turn_protocol.AgentRunner`)."""

    def __init__(
        self,
        *,
        feed: SnapshotFeed,
        settings: EngineSettings | None = None,
        egress_url: str | None = None,
        memory: ConversationMemory | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` measures the age of conversation pins (tests inject one)."""
        self._settings = settings or EngineSettings()
        self._feed = feed
        self._builder = ContextBuilder(
            settings=self._settings,
            egress_url=egress_url or self._settings.egress_url,
            memory=memory or InMemoryConversationMemory(),
            http=http,
        )
        self._limits = LoopLimits(
            max_steps=self._settings.max_steps,
            tool_timeout=self._settings.tool_timeout_seconds,
            record_content=self._settings.record_content,
        )
        self._current: _Lease | None = None
        self._pins: PinTable[str, _Lease] = PinTable(
            max_age=self._settings.conversation_pin_seconds,
            max_entries=self._settings.conversation_pin_max,
            clock=clock,
            on_drop=self._unpinned,
        )
        self._retained: list[_Lease] = []
        """Replaced contexts kept for pinned conversations, oldest first."""
        self._closed = False
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._releasing: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None
        """Why the last snapshot failed to build (secret-free); None after a success."""
        self.failed_revision: int | None = None
        """Revision of the snapshot that last failed to build; None after a success."""
        self.builds = 0
        """Snapshots built into a context so far."""
        self.failures = 0
        """Snapshots that failed to build so far."""
        if isinstance(feed, SidecarLink):
            feed.add_connection_listener(self._on_link)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start consuming snapshots in the background (returns at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._consume(), name="engine-snapshots")
        if self._sweeper is None and self._pins.enabled:
            self._sweeper = asyncio.create_task(self._sweep(), name="engine-pin-expiry")

    async def aclose(self) -> None:
        """Stop consuming, wait for released contexts, close every MCP session."""
        self._closed = True  # the builder closes what pinned contexts hold
        await cancel_and_wait(self._task)
        await cancel_and_wait(self._sweeper)
        self._task = None
        self._sweeper = None
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        self._current = None
        self._pins.clear()
        self._retained.clear()
        await self._builder.aclose()

    async def __aenter__(self) -> EngineRuntime:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        """Whether a context is built and the sidecar, when there is one, is connected."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the runtime is not ready (secret-free, for callers); ``None`` when it is."""
        feed = self._feed
        if isinstance(feed, SidecarLink) and not feed.connected:
            why = feed.last_error or "connecting"
            return f"the agent's sidecar is not connected ({why})"
        if self._current is None:
            if self.last_error:
                return f"the agent has no valid spec loaded yet (last error: {self.last_error})"
            return "the agent has no valid spec loaded yet"
        return None

    @property
    def revision(self) -> int | None:
        """The revision new turns run on."""
        return self._current.context.revision if self._current else None

    @property
    def context(self) -> RuntimeContext | None:
        """The context new turns run on."""
        return self._current.context if self._current else None

    @property
    def knowledge(self) -> KnowledgeBase | None:
        """The knowledge base new turns use (ingest goes there); None when disabled."""
        return self._current.context.knowledge if self._current else None

    @property
    def builder(self) -> ContextBuilder:
        return self._builder

    @property
    def pinned_conversations(self) -> int:
        """Conversations pinned to a context now."""
        return len(self._pins)

    @property
    def retained_revisions(self) -> list[int]:
        """Revisions of the replaced contexts kept alive for pinned conversations."""
        return [lease.context.revision for lease in self._retained]

    def pinned_context(self, context_id: str) -> RuntimeContext | None:
        """The context the conversation is pinned to, None when it is not (or expired)."""
        lease = self._pins.get(context_id)
        return lease.context if lease is not None else None

    def card_info(self) -> CardInfo | None:
        lease = self._current
        if lease is None:
            return None
        snapshot = lease.context.snapshot
        return CardInfo(
            name=snapshot.agent_name,
            description=snapshot.spec.base.description,
            revision=snapshot.revision,
            skills=tuple(s.model_dump(mode="json") for s in snapshot.spec.base.skills),
            streaming=True,
        )

    async def wait_until(
        self, predicate: Callable[[EngineRuntime], bool], *, timeout: float
    ) -> None:
        """Wait until ``predicate(self)`` holds (checked on every state change)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def wait_ready(self, *, timeout: float) -> None:
        await self.wait_until(lambda r: r.ready, timeout=timeout)

    # ------------------------------------------------------------ turns

    async def run(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        """Run one turn on the conversation's pinned context, else on the current one
        (which the conversation is then pinned to)."""
        lease = self._lease_for(request.context_id)
        if lease is None:
            yield TurnFailed(code="not_ready", message="the agent has no valid spec yet")
            return
        lease.turns += 1
        try:
            events = run_turn(
                lease.context, request, limits=self._limits, parent=otel_context.get_current()
            )
            async with aclosing(events):
                async for event in events:
                    yield event
        finally:
            lease.turns -= 1
            if lease.idle:
                self._release(lease)

    def _lease_for(self, context_id: str) -> _Lease | None:
        current = self._current
        if (
            current is None
            or not context_id
            or len(context_id) > MAX_PINNED_ID
            or not self._pins.enabled
        ):
            return current
        pinned = self._pins.get(context_id)
        if pinned is not None:
            return pinned
        current.pins += 1  # before pinning: a pin the table evicts may be to it too
        self._pins.pin(context_id, current)
        return current

    async def delete_conversation(self, context_id: str) -> bool:
        """Forget a conversation -- in the memory store of the context it is pinned to and
        in the current one -- and unpin it; whether it existed (raises
        :class:`engine.errors.MemoryStoreError`, or RuntimeError when not ready)."""
        lease = self._current
        if lease is None:
            raise RuntimeError("the agent has no valid spec yet")
        pinned = self._pins.get(context_id)
        existed = False
        if pinned is not None and pinned.context.memory is not lease.context.memory:
            existed = await pinned.context.recall.delete(context_id)
        existed = await lease.context.recall.delete(context_id) or existed
        self._pins.remove(context_id)
        return existed

    # ------------------------------------------------------------ snapshots

    async def _consume(self) -> None:
        reconnect = Reconnect(
            BackoffPolicy(
                initial=self._settings.reconnect_initial_seconds,
                maximum=self._settings.reconnect_max_seconds,
            )
        )
        while True:
            try:
                async for snapshot in self._feed:
                    reconnect.reset()
                    await self._apply(snapshot)
                delay = reconnect.next_delay()
                logger.warning("the snapshot feed ended; restarting it in %.1f s", delay)
            except asyncio.CancelledError:
                raise
            except Exception:  # top of the task: the feed broke; keep serving, retry
                delay = reconnect.next_delay()
                logger.exception("the snapshot feed failed; restarting it in %.1f s", delay)
            await self._notify()  # a feed that ended is no longer connected: readiness changed
            await reconnect.wait(delay)

    async def _apply(self, snapshot: ResolvedSnapshot) -> None:
        expected = self._settings.agent_name
        if expected and snapshot.agent_name != expected:
            await self._failed(
                snapshot.revision,
                f"snapshot is for agent {snapshot.agent_name!r}, this engine runs {expected!r}",
            )
            return
        previous = self._current
        if previous is not None and previous.context.snapshot == snapshot:
            return
        try:
            context = await self._builder.build(
                snapshot, previous.context if previous is not None else None
            )
        except ContextBuildError as e:
            await self._failed(snapshot.revision, e.reason)
            return
        except Exception as e:  # top of a build: report it, keep the current context
            logger.exception("building revision %d failed", snapshot.revision)
            await self._failed(snapshot.revision, f"internal error ({type(e).__name__})")
            return
        old = self._current
        self._current = _Lease(context)
        self.builds += 1
        self.last_error = None
        self.failed_revision = None
        logger.info(
            "serving revision %d of %s (prompt %s)",
            context.revision,
            context.agent_name,
            context.prompt.fixed or "A/B",
        )
        if old is not None:
            old.retired = True
            if old.idle:
                self._release(old)
            elif old.pins:
                self._retained.append(old)
                self._bound_retained()
        await self._notify()
        await self._report(serving=context.revision, failed=0, error="")

    async def _failed(self, revision: int, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        self.failed_revision = revision
        logger.error(
            "snapshot revision %d not served: %s (still serving %s)",
            revision,
            reason,
            self.revision if self.revision is not None else "nothing",
        )
        await self._notify()
        await self._report(serving=self.revision or 0, failed=revision, error=reason)

    async def _on_link(self, connected: bool) -> None:
        if not connected:
            logger.warning("the sidecar is not connected: not ready until it is back")
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _report(self, *, serving: int, failed: int, error: str) -> None:
        if isinstance(self._feed, StatusReporter):
            await self._feed.report_status(
                serving_revision=serving, failed_revision=failed, error=error
            )

    # ------------------------------------------------------------ pins

    async def _sweep(self) -> None:
        """Expire pins on a timer, so an idle conversation lets its old context go."""
        every = min(60.0, max(1.0, self._settings.conversation_pin_seconds / 10))
        while True:
            await asyncio.sleep(every)  # a timer: expiry itself reads the injected clock
            self._pins.expire()

    def _unpinned(self, context_id: str, lease: _Lease) -> None:
        lease.pins -= 1
        if lease.idle:
            self._release(lease)

    def _bound_retained(self) -> None:
        """Keep at most ``conversation_pin_max_contexts`` replaced contexts for pins."""
        while len(self._retained) > self._settings.conversation_pin_max_contexts:
            oldest = self._retained[0]
            moved = self._pins.remove_value(oldest)  # releases it (via _unpinned) when idle
            if self._retained and self._retained[0] is oldest:
                self._retained.pop(0)  # still running a turn: released when it ends
            logger.info(
                "%d conversations pinned to revision %d move to the newest snapshot "
                "(more than %d older snapshots kept)",
                moved,
                oldest.context.revision,
                self._settings.conversation_pin_max_contexts,
            )

    def _release(self, lease: _Lease) -> None:
        if lease.released:
            return
        lease.released = True
        if lease in self._retained:
            self._retained.remove(lease)
        if self._closed:
            return  # aclose closes every shared resource
        task = asyncio.create_task(self._builder.release(lease.context))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)


def _satisfies_runner(runtime: EngineRuntime) -> AgentRunner:
    """Static proof (mypy) that EngineRuntime implements the servers' seam."""
    return runtime
