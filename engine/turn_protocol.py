"""The seam between the engine's runtime and its servers.

The runtime (spec intake, runtime context, agent loop, tools) implements
:class:`AgentRunner`; the servers (A2A over JSON-RPC, HTTP+JSON and gRPC; business REST)
only call it. A turn streams :data:`TurnEvent` s and always ends with exactly one
:class:`TurnCompleted` or :class:`TurnFailed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "AgentRunner",
    "CardInfo",
    "ExplainsReadiness",
    "NotifiesChanges",
    "TextDelta",
    "ToolCallFinished",
    "ToolCallStarted",
    "TurnCompleted",
    "TurnEvent",
    "TurnFailed",
    "TurnRequest",
    "not_ready_reason",
]

_NO_SPEC = "the agent has no valid spec loaded yet"


@dataclass(frozen=True)
class TurnRequest:
    """One user message in one conversation."""

    context_id: str
    """The A2A contextId: the conversation."""
    text: str
    """The user's message."""
    call_depth: int = 0
    """How many agents deep this call is (0 for a call from outside the mesh)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Request headers worth passing on (trace context is taken from the current span)."""
    task_id: str | None = None
    """The A2A task id, when there is one."""
    stream: bool = True
    """Whether the caller reads the answer as it grows (A2A ``SendStreamingMessage``,
    ``/v1/invoke/stream``); when it waits for the whole answer the model is called
    non-streamed and the text comes as one :class:`TextDelta`."""
    budget_usd: float | None = None
    """The most this request's chain may spend (the caller's A2A metadata
    ``specmesh.budgetUsd``); the model part's ``budgetPerRequestUsd`` may lower it."""


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer, as the model streams it."""

    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    call_id: str
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class ToolCallFinished:
    call_id: str
    name: str
    ok: bool
    result: str


@dataclass(frozen=True)
class TurnCompleted:
    """The final answer and what produced it."""

    text: str
    revision: int
    """The spec revision that answered the whole turn."""
    prompt_version: str
    usage: Mapping[str, int] = field(default_factory=dict)
    """prompt_tokens, completion_tokens, total_tokens over every model call of the turn."""
    citations: tuple[Mapping[str, Any], ...] = ()
    model: str = ""
    """The model that answered (as litellm knows it), for cost accounting."""
    cost: Mapping[str, Any] | None = None
    """The chain's cost (:meth:`engine.ledger.CostLedger.metadata`): this turn's model
    calls and what its partners' answers carried."""


@dataclass(frozen=True)
class TurnFailed:
    """The turn could not be answered; ``message`` is safe to show the caller."""

    code: str
    message: str
    revision: int | None = None
    cost: Mapping[str, Any] | None = None
    """What the turn spent before it failed (as :attr:`TurnCompleted.cost`): a caller
    books it all the same."""


TurnEvent = TextDelta | ToolCallStarted | ToolCallFinished | TurnCompleted | TurnFailed


@dataclass(frozen=True)
class CardInfo:
    """What the agent card is built from (changes with the spec)."""

    name: str
    description: str
    revision: int
    skills: tuple[Mapping[str, Any], ...] = ()
    streaming: bool = True


class AgentRunner(Protocol):
    """The engine's runtime as the servers see it."""

    @property
    def ready(self) -> bool:
        """Whether a valid spec is loaded (readiness)."""
        ...

    def card_info(self) -> CardInfo | None:
        """The current card data; ``None`` until ready."""
        ...

    def run(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        """Run one turn; cancelling the iteration cancels the turn."""
        ...


@runtime_checkable
class ExplainsReadiness(Protocol):
    """A runner that can say why it is not ready (``EngineRuntime`` does)."""

    def not_ready_reason(self) -> str | None:
        """Why it is not ready, safe to show callers; ``None`` when it is ready."""
        ...


@runtime_checkable
class NotifiesChanges(Protocol):
    """A runner that can wait for a change of its state (``EngineRuntime`` does)."""

    async def wait_until(self, predicate: Callable[[Any], bool], *, timeout: float) -> None:
        """Wait until ``predicate(self)`` holds, checked on every state change; raises
        ``TimeoutError`` after ``timeout`` seconds."""
        ...


def not_ready_reason(runner: AgentRunner) -> str | None:
    """Why ``runner`` is not ready (its own words when it has them); ``None`` when ready."""
    if runner.ready:
        return None
    if isinstance(runner, ExplainsReadiness):
        return runner.not_ready_reason() or _NO_SPEC
    return _NO_SPEC
