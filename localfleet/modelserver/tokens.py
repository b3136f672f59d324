"""Deterministic token counting, so usage numbers are stable across runs and machines.

The rule, chosen to be easy to predict by hand in a test:

* a *text* costs one token per word (a run of letters, digits or ``_``) plus one per
  punctuation or symbol character; whitespace is free. ``"Hello, world!"`` is 4 tokens.
* a *message* costs 3 tokens of framing, plus its role, content, ``name`` and, for an
  assistant turn, each tool call's name and arguments.
* a *prompt* costs 3 tokens of priming, plus its messages, plus the JSON text of the
  ``tools`` offered (counted as a text).
* a *completion* costs its text plus each tool call's name and arguments.

It is not any real model's tokenizer; it only has to be deterministic and monotone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "content_text",
    "count_completion_tokens",
    "count_prompt_tokens",
    "count_tokens",
    "truncate_to_tokens",
]

_TOKEN = re.compile(r"\w+|[^\w\s]")
_MESSAGE_FRAMING = 3
_PROMPT_PRIMING = 3


def _tokens(text: str) -> Iterator[re.Match[str]]:
    return _TOKEN.finditer(text)


def count_tokens(text: str) -> int:
    """Tokens in ``text``: words plus punctuation characters."""
    return sum(1 for _ in _tokens(text))


def truncate_to_tokens(text: str, limit: int) -> str:
    """The longest prefix of ``text`` holding at most ``limit`` tokens."""
    if limit <= 0:
        return ""
    for i, match in enumerate(_tokens(text), start=1):
        if i == limit:
            return text[: match.end()]
    return text


def content_text(content: Any) -> str:
    """The text of a message ``content``: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return json.dumps(content, sort_keys=True, ensure_ascii=False)


def _tool_call_tokens(tool_calls: Any) -> int:
    total = 0
    if not isinstance(tool_calls, list):
        return 0
    for call in tool_calls:
        if not isinstance(call, Mapping):
            continue
        function = call.get("function")
        if isinstance(function, Mapping):
            total += count_tokens(str(function.get("name") or ""))
            total += count_tokens(str(function.get("arguments") or ""))
    return total


def count_prompt_tokens(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
) -> int:
    """Prompt tokens of a chat request (see the module docstring for the rule)."""
    total = _PROMPT_PRIMING
    for message in messages:
        total += _MESSAGE_FRAMING
        total += count_tokens(str(message.get("role") or ""))
        total += count_tokens(content_text(message.get("content")))
        total += count_tokens(str(message.get("name") or ""))
        total += _tool_call_tokens(message.get("tool_calls"))
    if tools:
        total += count_tokens(json.dumps(list(tools), sort_keys=True, ensure_ascii=False))
    return total


def count_completion_tokens(text: str | None, tool_calls: Sequence[tuple[str, str]] = ()) -> int:
    """Completion tokens of a reply: its text plus each ``(name, arguments)`` tool call."""
    total = count_tokens(text or "")
    for name, arguments in tool_calls:
        total += count_tokens(name) + count_tokens(arguments)
    return total
