"""An in-memory :class:`~engine.turn_protocol.AgentRunner` whose turns are scripted.

It stands in for the engine's runtime behind the real servers: tests queue the turns
they expect (:meth:`ScriptedRunner.enqueue`), flip readiness and the card, and wait on
each turn's events (started, held, cancelled, finished) instead of sleeping::

    runner = ScriptedRunner()
    turn = runner.enqueue(ScriptedTurn.answer("Hello there", hold_after=1))
    ...                                  # send a message through any server
    await asyncio.wait_for(turn.held.wait(), 5)
    turn.release.set()                   # or cancel the request
    await asyncio.wait_for(turn.finished.wait(), 5)

With nothing queued a turn echoes the message (``"echo: <text>"``) in word-sized deltas.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from engine.turn_protocol import (
    CardInfo,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnCompleted,
    TurnEvent,
    TurnFailed,
    TurnRequest,
)

__all__ = ["DEFAULT_CARD", "ScriptedRunner", "ScriptedTurn"]

DEFAULT_CARD = CardInfo(
    name="scripted-agent",
    description="A scripted agent for tests.",
    revision=1,
    skills=({"id": "echo", "name": "Echo", "description": "Repeats what it is told."},),
    streaming=True,
)

_USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


class ScriptedTurn:
    """One turn's events, played in order; optionally held after the first ``hold_after``."""

    def __init__(self, events: Sequence[TurnEvent], *, hold_after: int | None = None) -> None:
        self.events: tuple[TurnEvent, ...] = tuple(events)
        self.hold_after = hold_after
        self.request: TurnRequest | None = None
        self.started = asyncio.Event()
        """Set when the runner starts playing this turn."""
        self.held = asyncio.Event()
        """Set when the turn reached ``hold_after`` and waits for :attr:`release`."""
        self.release = asyncio.Event()
        """Set it to let a held turn go on."""
        self.cancelled = asyncio.Event()
        """Set when the turn was cancelled by its consumer (the server)."""
        self.finished = asyncio.Event()
        """Set when the turn ended, however it ended."""

    @classmethod
    def answer(
        cls,
        text: str,
        *,
        chunks: Sequence[str] | None = None,
        revision: int = 1,
        prompt_version: str = "v1",
        usage: Mapping[str, int] | None = None,
        citations: Sequence[Mapping[str, Any]] = (),
        tool_calls: Sequence[tuple[str, Mapping[str, Any], str]] = (),
        hold_after: int | None = None,
        model: str = "",
    ) -> ScriptedTurn:
        """A turn that calls ``tool_calls`` (name, arguments, result), then streams ``text``."""
        events: list[TurnEvent] = []
        for i, (name, arguments, result) in enumerate(tool_calls):
            call_id = f"call-{i}"
            events.append(ToolCallStarted(call_id=call_id, name=name, arguments=arguments))
            events.append(ToolCallFinished(call_id=call_id, name=name, ok=True, result=result))
        pieces = list(chunks) if chunks is not None else _split(text)
        events.extend(TextDelta(text=p) for p in pieces)
        events.append(
            TurnCompleted(
                text=text,
                revision=revision,
                prompt_version=prompt_version,
                usage=dict(usage if usage is not None else _USAGE),
                citations=tuple(citations),
                model=model,
            )
        )
        return cls(events, hold_after=hold_after)

    @classmethod
    def failure(
        cls, code: str, message: str, *, revision: int | None = 1, hold_after: int | None = None
    ) -> ScriptedTurn:
        """A turn that fails with ``code`` and ``message``."""
        return cls(
            [TurnFailed(code=code, message=message, revision=revision)], hold_after=hold_after
        )


def _split(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)]


class ScriptedRunner:
    """An :class:`~engine.turn_protocol.AgentRunner` playing queued :class:`ScriptedTurn` s."""

    def __init__(self, *, card: CardInfo | None = DEFAULT_CARD, ready: bool = True) -> None:
        self._card = card
        self._ready = ready
        self._queue: deque[ScriptedTurn] = deque()
        self.requests: list[TurnRequest] = []
        """Every request the runner received, in order."""
        self.turns: list[ScriptedTurn] = []
        """Every turn played, in order (queued or echo)."""

    @property
    def ready(self) -> bool:
        return self._ready and self._card is not None

    def card_info(self) -> CardInfo | None:
        return self._card if self.ready else None

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    def set_card(self, card: CardInfo | None) -> None:
        """Change the card, as a hot reload of the spec would."""
        self._card = card

    def enqueue(self, turn: ScriptedTurn) -> ScriptedTurn:
        """Queue ``turn`` for the next request; returns it to wait on."""
        self._queue.append(turn)
        return turn

    def _next_turn(self, request: TurnRequest) -> ScriptedTurn:
        if self._queue:
            return self._queue.popleft()
        revision = self._card.revision if self._card is not None else 0
        return ScriptedTurn.answer(f"echo: {request.text}", revision=revision)

    async def run(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        turn = self._next_turn(request)
        turn.request = request
        self.requests.append(request)
        self.turns.append(turn)
        turn.started.set()
        ended = False  # the terminal event was handed over: closing now is not a cancel
        try:
            for i, event in enumerate(turn.events):
                if turn.hold_after is not None and i == turn.hold_after:
                    turn.held.set()
                    await turn.release.wait()
                ended = isinstance(event, TurnCompleted | TurnFailed)
                yield event
            if turn.hold_after is not None and turn.hold_after >= len(turn.events):
                turn.held.set()
                await turn.release.wait()
        except (asyncio.CancelledError, GeneratorExit):
            if not ended:
                turn.cancelled.set()
            raise
        finally:
            turn.finished.set()
