"""Conversation affinity at the entry: a known contextId goes back to its release track.

The entry routes a conversation's first message by the release split (weights, header
match); :class:`ConversationTracks` remembers the track it went to, and the conversation's
later messages go to that track while the pin lasts (``SPECMESH_CONVERSATION_PIN_SECONDS``
from the first message, ``SPECMESH_CONVERSATION_PIN_MAX`` conversations, least recently used
leaving first), so a change of weight does not move a conversation mid-way. A canary pin
holds only while the release still names the same canary revision: after an abort, a
promote or a new canary, the conversation is routed by the release again. A call matching
the release's ``headerMatch`` still goes to the canary (explicit routing wins).

The contextId is read from the A2A request as the entry sees it, with a2a-sdk's protobuf
types: JSON-RPC ``SendMessage`` / ``SendStreamingMessage`` ``params.message.contextId``,
HTTP+JSON ``POST [/{tenant}]/v1/message:send|:stream`` ``message.contextId``, gRPC
``SendMessageRequest.message.context_id``, and the business REST ``POST /v1/invoke[/stream]``
``contextId``. A body that does not parse, or a call without a contextId, is routed as
before and pins nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from a2a.types.a2a_pb2 import SendMessageRequest
from google.protobuf.json_format import ParseDict, ParseError
from google.protobuf.message import DecodeError

from specmesh.pins import PinTable
from specmesh.spec.models import ReleaseSpec

__all__ = ["ConversationTracks", "context_id_of_grpc", "context_id_of_http"]

_SEND_METHODS = frozenset({"SendMessage", "SendStreamingMessage"})
_HTTP_JSON_SEND = re.compile(r"^(?:/[^/]+)?/v1/message:(?:send|stream)$")
_BUSINESS_INVOKE = frozenset({"/v1/invoke", "/v1/invoke/stream"})
_MAX_ID = 256


def _usable(context_id: object) -> str | None:
    if isinstance(context_id, str) and 0 < len(context_id) <= _MAX_ID:
        return context_id
    return None


def _from_send_request(params: object) -> str | None:
    if not isinstance(params, dict):
        return None
    try:
        request = ParseDict(params, SendMessageRequest(), ignore_unknown_fields=True)
    except (ParseError, TypeError, ValueError):
        return None
    return _usable(request.message.context_id)


def context_id_of_http(method: str, path: str, body: bytes | None) -> str | None:
    """The contextId of an HTTP call to the entry; None when it has none or is no message."""
    if method != "POST" or not body:
        return None
    is_rest = path in _BUSINESS_INVOKE
    if not (is_rest or path == "/" or _HTTP_JSON_SEND.match(path)):
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    if is_rest:
        return _usable(document.get("contextId"))
    if path == "/":
        if document.get("method") not in _SEND_METHODS:
            return None
        return _from_send_request(document.get("params"))
    return _from_send_request(document)


def context_id_of_grpc(method: str, request: bytes) -> str | None:
    """The contextId of a gRPC call (``method``: the A2A service's method name)."""
    if method not in _SEND_METHODS:
        return None
    try:
        message = SendMessageRequest.FromString(request)
    except DecodeError:
        return None
    return _usable(message.message.context_id)


@dataclass(frozen=True)
class _TrackPin:
    track: str
    canary_revision: int | None


class ConversationTracks:
    """contextId -> the release track the entry routed the conversation to."""

    def __init__(
        self,
        *,
        max_age: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pins: PinTable[str, _TrackPin] = PinTable(
            max_age=max_age, max_entries=max_entries, clock=clock
        )

    def __len__(self) -> int:
        return len(self._pins)

    def track(self, context_id: str | None, release: ReleaseSpec | None) -> str | None:
        """The track the conversation is pinned to, if the pin still holds under
        ``release`` (a canary pin: the same canary revision)."""
        if context_id is None:
            return None
        pin = self._pins.get(context_id)
        if pin is None:
            return None
        if pin.track == "canary":
            canary = release.canary_revision if release is not None else None
            if canary is None or canary != pin.canary_revision:
                self._pins.remove(context_id)
                return None
        return pin.track

    def remember(
        self, context_id: str | None, track: str | None, release: ReleaseSpec | None
    ) -> None:
        """Pin a conversation to the track its first message went to."""
        if context_id is None or track is None:
            return
        canary = release.canary_revision if release is not None else None
        self._pins.pin(context_id, _TrackPin(track, canary))
