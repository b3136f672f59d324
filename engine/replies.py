"""What a model call produces: text chunks, then one whole reply.

:class:`ReplyBuilder` assembles a :class:`ModelReply` from the OpenAI wire format --
streamed chunks (text deltas, tool-call deltas by ``index``, the finish reason, a last
chunk with the usage) or one whole ``chat.completion`` -- whichever client produced it
(:mod:`engine.openai_chat` from JSON, :mod:`engine.litellm_chat` from litellm's objects).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelError, ModelRequestError, ModelTimeoutError, ModelUnavailableError

__all__ = ["ModelReply", "ReplyBuilder", "TextChunk", "ToolCallRequest", "safe_reason"]

_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_SAFE_REASON = {
    ModelTimeoutError: "timed out",
    ModelUnavailableError: "unavailable",
    ModelRequestError: "refused the request",
    ModelError: "failed",
}


def safe_reason(kind: type[ModelError], status: int | None = None) -> str:
    """What a model error says: its kind and HTTP status, never the provider's text."""
    return _SAFE_REASON[kind] + (f" (HTTP {status})" if status else "")


@dataclass(frozen=True)
class TextChunk:
    """A piece of the model's text, as it streams."""

    text: str


@dataclass(frozen=True)
class ToolCallRequest:
    """A function call the model asked for; ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ModelReply:
    """The model's whole answer to one call."""

    text: str
    tool_calls: tuple[ToolCallRequest, ...]
    usage: Mapping[str, int]
    finish_reason: str
    model: str
    cost_usd: float = 0.0
    """What the call cost (:class:`~engine.llm.ModelClient` prices it; 0 until then)."""
    unpriced: bool = False
    """The model is priced nowhere (the spec, litellm's map): its cost is unknown."""

    def assistant_message(self) -> dict[str, Any]:
        """The reply as an OpenAI assistant message (to send back with tool results)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.tool_calls
            ]
        return msg


@dataclass
class ReplyBuilder:
    """Accumulates one call's answer."""

    model: str = ""
    text: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = ""

    # ------------------------------------------------------------ pieces

    def add_text(self, text: str) -> None:
        if text:
            self.text.append(text)

    def add_tool_delta(
        self, index: int | None, *, id: str | None, name: str | None, arguments: str | None
    ) -> None:
        """A tool-call delta: the id and name come once, the arguments in fragments."""
        slot = self.calls.setdefault(index if index is not None else len(self.calls), {})
        if id:
            slot["id"] = id
        if name:
            slot["name"] = slot.get("name", "") + name
        if arguments:
            slot["args"] = slot.get("args", "") + arguments

    def set_usage(self, usage: Mapping[str, Any]) -> None:
        for key in _USAGE_KEYS:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                self.usage[key] = value

    # ------------------------------------------------------------ OpenAI JSON

    def absorb_chunk(self, chunk: Mapping[str, Any]) -> str:
        """One streamed ``chat.completion.chunk``; returns its text."""
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            self.set_usage(usage)
        if chunk.get("model"):
            self.model = str(chunk["model"])
        choices = chunk.get("choices")
        if not choices:
            return ""
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            self.add_tool_delta(
                call.get("index"),
                id=call.get("id"),
                name=fn.get("name"),
                arguments=fn.get("arguments"),
            )
        text = delta.get("content") or ""
        if not isinstance(text, str):
            text = str(text)
        self.add_text(text)
        return text

    def absorb_message(self, body: Mapping[str, Any]) -> str:
        """One whole ``chat.completion``; returns its text."""
        usage = body.get("usage")
        if isinstance(usage, Mapping):
            self.set_usage(usage)
        if body.get("model"):
            self.model = str(body["model"])
        choice = body["choices"][0]
        self.finish_reason = str(choice.get("finish_reason") or "")
        message = choice.get("message") or {}
        for i, call in enumerate(message.get("tool_calls") or ()):
            fn = call.get("function") or {}
            self.calls[i] = {
                "id": call.get("id") or "",
                "name": fn.get("name") or "",
                "args": fn.get("arguments") or "",
            }
        text = message.get("content") or ""
        if not isinstance(text, str):
            text = str(text)
        self.add_text(text)
        return text

    # ------------------------------------------------------------ result

    def reply(self) -> ModelReply:
        calls = tuple(
            ToolCallRequest(
                id=c.get("id") or f"call_{i}", name=c.get("name", ""), arguments=c.get("args", "")
            )
            for i, c in sorted(self.calls.items())
        )
        return ModelReply(
            text="".join(self.text),
            tool_calls=calls,
            usage=dict(self.usage),
            finish_reason=self.finish_reason or ("tool_calls" if calls else "stop"),
            model=self.model,
        )
