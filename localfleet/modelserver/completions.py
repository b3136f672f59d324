"""The OpenAI wire format: chat completions, streamed chunks, errors.

A streamed answer follows what the OpenAI API sends: a first chunk with the assistant
role, the text in word-sized ``content`` deltas, each tool call as a header delta
(``index``, ``id``, ``type``, ``function.name``, empty ``arguments``) followed by
``arguments`` fragments of at most :data:`ARGUMENT_CHUNK` characters, a chunk with an
empty delta and the ``finish_reason``, and -- when ``stream_options.include_usage`` is
set -- a last chunk with no choices and the usage (every other chunk then carries
``"usage": null``). The SSE stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ARGUMENT_CHUNK",
    "SSE_DONE",
    "Completion",
    "ToolCall",
    "default_error_type",
    "error_body",
    "sse",
]

#: Largest ``arguments`` fragment in one streamed tool-call delta.
ARGUMENT_CHUNK = 16

#: The SSE event that ends a stream.
SSE_DONE = b"data: [DONE]\n\n"

_PIECE = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True)
class ToolCall:
    """A tool call as sent: id, function name, JSON arguments text."""

    id: str
    name: str
    arguments: str

    def message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _text_pieces(text: str) -> list[str]:
    """Split ``text`` into word-sized pieces that concatenate back to it exactly."""
    return [m[0] for m in _PIECE.finditer(text)]


@dataclass(frozen=True)
class Completion:
    """One chat completion, ready to be sent whole or as chunks."""

    id: str
    created: int
    model: str
    text: str | None
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def body(self) -> dict[str, Any]:
        """The ``chat.completion`` object of a non-streamed answer."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text, "refusal": None}
        if self.tool_calls:
            message["tool_calls"] = [call.message() for call in self.tool_calls]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(),
        }

    def _chunk(
        self, delta: dict[str, Any], *, finish_reason: str | None = None, include_usage: bool
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            chunk["usage"] = None
        return chunk

    def chunks(self, *, include_usage: bool = False) -> list[dict[str, Any]]:
        """The ``chat.completion.chunk`` objects of a streamed answer, in order."""
        first: dict[str, Any] = {"role": "assistant", "content": "" if self.text else None}
        out = [self._chunk(first, include_usage=include_usage)]
        for piece in _text_pieces(self.text or ""):
            out.append(self._chunk({"content": piece}, include_usage=include_usage))
        for index, call in enumerate(self.tool_calls):
            header = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            out.append(self._chunk({"tool_calls": [header]}, include_usage=include_usage))
            for start in range(0, len(call.arguments), ARGUMENT_CHUNK):
                fragment = call.arguments[start : start + ARGUMENT_CHUNK]
                delta = {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                out.append(self._chunk(delta, include_usage=include_usage))
        out.append(self._chunk({}, finish_reason=self.finish_reason, include_usage=include_usage))
        if include_usage:
            out.append(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": self.usage(),
                }
            )
        return out


def sse(data: dict[str, Any]) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def default_error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {
        "error": {
            "message": message,
            "type": error_type or default_error_type(status),
            "param": param,
            "code": code,
        }
    }
