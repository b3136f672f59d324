"""Tools the model can call: MCP tools (:mod:`.mcp`) and partner agents (:mod:`.partners`).

Every tool offers a :class:`ToolDefinition` (the OpenAI function the model sees) and an
async ``call``; a failure raises :class:`engine.errors.ToolError`, whose message the
agent loop hands back to the model as the tool's result.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..ledger import CostLedger

__all__ = ["MAX_TOOL_NAME", "Tool", "ToolCallContext", "ToolDefinition", "tool_name"]

MAX_TOOL_NAME = 64
"""Longest function name the OpenAI API accepts."""
_INVALID = re.compile(r"[^A-Za-z0-9_-]+")


def tool_name(*parts: str) -> str:
    """A function name from ``parts`` joined by ``__``, in the charset ``[A-Za-z0-9_-]``.

    Names longer than 64 characters are cut and end in a short hash of the full name, so
    two long names that share a prefix stay distinct.
    """
    name = "__".join(_INVALID.sub("_", p).strip("_") or "_" for p in parts)
    if len(name) <= MAX_TOOL_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_TOOL_NAME - 9]}_{digest}"


@dataclass(frozen=True)
class ToolDefinition:
    """What the model sees of a tool."""

    name: str
    description: str
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )

    def openai(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True)
class ToolCallContext:
    """What a tool knows of the turn calling it."""

    context_id: str
    call_depth: int
    timeout: float
    """Seconds the call may take."""
    ledger: CostLedger | None = None
    """The turn's cost ledger: a partner call sends what is left of the budget and books
    the cost its answer carried."""


class Tool(Protocol):
    """A tool the model can call."""

    @property
    def definition(self) -> ToolDefinition: ...

    @property
    def kind(self) -> str:
        """``mcp`` or ``agent`` (for spans)."""
        ...

    async def call(self, arguments: Mapping[str, Any], *, context: ToolCallContext) -> str:
        """Run the tool; raise ToolError with a message for the model when it fails."""
        ...
