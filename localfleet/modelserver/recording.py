"""Every request the server receives, kept in a bounded ring buffer.

Secret-bearing header values (``Authorization`` and the like) are redacted in what is
returned, unless the caller asks for them explicitly (``include_auth``); whether an
``Authorization`` header arrived is always recorded, so a test can check that a
credential was sent without ever seeing it, and a sidecar test can opt in to check its
exact value on the wire.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from specmesh.secrets import REDACTED
from specmesh.spec.models import SpecModel

__all__ = ["DEFAULT_CAPACITY", "SECRET_HEADERS", "RecordedRequest", "RequestLog"]

#: How many requests are kept; older ones are dropped first.
DEFAULT_CAPACITY = 10_000

#: Headers whose values are redacted (lower-case names).
SECRET_HEADERS: frozenset[str] = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"}
)


class RecordedRequest(SpecModel):
    """One request as received (camelCase on the wire)."""

    seq: int
    """1-based number of the request since the server started."""
    received_at: float
    """Unix time the request arrived."""
    method: str
    path: str
    endpoint: str
    """``chat.completions``, ``embeddings`` (or the path for anything else)."""
    model: str | None = None
    messages: list[Any] = Field(default_factory=list)
    tools: list[Any] = Field(default_factory=list)
    input: list[Any] | None = None
    """Embedding inputs, as a list."""
    stream: bool = False
    body: dict[str, Any] = Field(default_factory=dict)
    """The whole JSON body."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Lower-cased names; secret values redacted unless asked for."""
    has_authorization: bool = False
    """Whether an ``Authorization`` header was present."""
    authorization: str | None = None
    """The raw ``Authorization`` value; only filled when asked for (``include_auth``)."""
    rule_index: int | None = None
    """Index of the script rule that answered; None for the fallback or no decision."""
    rule_name: str | None = None
    usage: dict[str, int] | None = None
    """The token counts the answer reported (``prompt_tokens``, ``completion_tokens``,
    ``total_tokens``); None until answered, and for an error answer."""


@dataclass(frozen=True)
class _Entry:
    record: RecordedRequest
    raw_headers: Mapping[str, str]


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with every secret-bearing value replaced by ``<redacted>``."""
    return {k: (REDACTED if k in SECRET_HEADERS else v) for k, v in headers.items()}


class RequestLog:
    """A ring buffer of :class:`RecordedRequest` with an awaitable "count reached"."""

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (got {capacity})")
        self._entries: deque[_Entry] = deque(maxlen=capacity)
        self._seq = 0
        self._since_clear = 0
        self._changed = asyncio.Event()

    def next_seq(self) -> int:
        """Reserve the number of the next request."""
        self._seq += 1
        return self._seq

    def add(
        self,
        *,
        seq: int,
        method: str,
        path: str,
        endpoint: str,
        headers: Mapping[str, str],
        body: Mapping[str, Any],
        model: str | None = None,
        messages: list[Any] | None = None,
        tools: list[Any] | None = None,
        input: list[Any] | None = None,
        stream: bool = False,
        rule_index: int | None = None,
        rule_name: str | None = None,
    ) -> RecordedRequest:
        """Record a request; ``headers`` are raw (lower-case names), redacted here."""
        raw = {k.lower(): v for k, v in headers.items()}
        record = RecordedRequest(
            seq=seq,
            received_at=time.time(),
            method=method,
            path=path,
            endpoint=endpoint,
            model=model,
            messages=messages or [],
            tools=tools or [],
            input=input,
            stream=stream,
            body=dict(body),
            headers=redact_headers(raw),
            has_authorization="authorization" in raw,
            rule_index=rule_index,
            rule_name=rule_name,
        )
        self._entries.append(_Entry(record, raw))
        self._since_clear += 1
        self._changed.set()
        self._changed = asyncio.Event()
        return record

    def set_usage(self, seq: int, usage: Mapping[str, int]) -> None:
        """Record the token counts answered to request ``seq`` (if still held).

        Searched from the newest entry: the request answered is one of the last few
        recorded (those in flight; numbers are reserved before the body is read, so the
        log is not strictly in number order), so this costs O(requests in flight), not
        O(capacity): a full log scanned from its oldest entry cost the server ~1 ms a
        request."""
        last = len(self._entries) - 1
        for back, entry in enumerate(reversed(self._entries)):
            if entry.record.seq == seq:
                record = entry.record.model_copy(update={"usage": dict(usage)})
                self._entries[last - back] = _Entry(record, entry.raw_headers)
                return

    def records(self, *, include_auth: bool = False) -> list[RecordedRequest]:
        """The recorded requests, oldest first; raw secret headers only if ``include_auth``."""
        if not include_auth:
            return [e.record for e in self._entries]
        return [
            e.record.model_copy(
                update={
                    "headers": dict(e.raw_headers),
                    "authorization": e.raw_headers.get("authorization"),
                }
            )
            for e in self._entries
        ]

    def clear(self) -> None:
        """Forget every recorded request (numbering goes on)."""
        self._entries.clear()
        self._since_clear = 0

    async def wait_for(self, count: int, *, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until ``count`` requests arrived since the last clear; TimeoutError after
        ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while self._since_clear < count:
                await self._changed.wait()
        return self.records()
