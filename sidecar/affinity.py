"""Conversation affinity at the entry and the egress: a known contextId goes back to its
release track.

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
``contextId``. A body that does not parse, or a call that is no message, is routed as
before and pins nothing.

A message that starts a conversation carries no contextId (the official clients leave it to
the agent), so the entry names it: it writes a new contextId (a UUID, as the agent would
make) into a message that has neither ``contextId`` nor ``taskId``, before routing. The
agent then uses that contextId, the client reads it in the answer as usual, and the
conversation's first message is pinned like its next ones.

The egress keeps the same table for the engine's calls to its partners (HTTP A2A bindings
and gRPC; see :class:`~sidecar.policy.Retries`), keyed by (partner, contextId): the engine
sends each partner a contextId of its own per conversation, so a conversation with a
partner stays on the partner's track as a conversation at the entry does. The egress never
names a conversation (the engine always sends a contextId).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from a2a.types.a2a_pb2 import SendMessageRequest
from google.protobuf.json_format import ParseDict, ParseError
from google.protobuf.message import DecodeError

from specmesh.pins import MAX_PINNED_ID, PinTable
from specmesh.spec.models import ReleaseSpec

__all__ = [
    "ConversationTracks",
    "MessageContext",
    "context_id_of_grpc",
    "context_id_of_http",
    "message_context_grpc",
    "message_context_http",
    "new_context_id",
]

_SEND_METHODS = frozenset({"SendMessage", "SendStreamingMessage"})
_HTTP_JSON_SEND = re.compile(r"^(?:/[^/]+)?/v1/message:(?:send|stream)$")
_BUSINESS_INVOKE = frozenset({"/v1/invoke", "/v1/invoke/stream"})


def new_context_id() -> str:
    """A contextId for a conversation the entry names (a UUID, as a2a-sdk makes them)."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class MessageContext:
    """What the entry learnt of a call: its conversation and, when it named it, the
    request rewritten to carry that contextId."""

    context_id: str | None = None
    rewritten: bytes | None = None
    """The request with the contextId the entry assigned; None: send it unchanged."""


_NOTHING = MessageContext()


def _usable(context_id: object) -> str | None:
    if isinstance(context_id, str) and 0 < len(context_id) <= MAX_PINNED_ID:
        return context_id
    return None


def _from_send_request(
    params: object, document: dict[str, Any], assign: Callable[[], str] | None
) -> MessageContext:
    """``params``: a SendMessageRequest as JSON, inside ``document`` (the whole body)."""
    if not isinstance(params, dict):
        return _NOTHING
    try:
        request = ParseDict(params, SendMessageRequest(), ignore_unknown_fields=True)
    except (ParseError, TypeError, ValueError):
        return _NOTHING
    message = request.message
    if message.context_id:
        return MessageContext(_usable(message.context_id))
    message_json = params.get("message")
    if assign is None or message.task_id or not isinstance(message_json, dict):
        return _NOTHING
    context_id = assign()
    message_json.pop("context_id", None)  # an empty one under the proto name: one field only
    message_json["contextId"] = context_id
    return MessageContext(context_id, _dump(document))


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def message_context_http(
    method: str, path: str, body: bytes | None, *, assign: Callable[[], str] | None = None
) -> MessageContext:
    """The conversation of an HTTP call to the entry (nothing when it is no message);
    ``assign`` names a conversation a message starts (see the module's docstring)."""
    if method != "POST" or not body:
        return _NOTHING
    is_rest = path in _BUSINESS_INVOKE
    if not (is_rest or path == "/" or _HTTP_JSON_SEND.match(path)):
        return _NOTHING
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return _NOTHING
    if not isinstance(document, dict):
        return _NOTHING
    if is_rest:
        if "contextId" in document:
            return MessageContext(_usable(document["contextId"]))
        if assign is None or not isinstance(document.get("message"), str):
            return _NOTHING
        context_id = assign()
        document["contextId"] = context_id
        return MessageContext(context_id, _dump(document))
    if path == "/":
        if document.get("method") not in _SEND_METHODS:
            return _NOTHING
        return _from_send_request(document.get("params"), document, assign)
    return _from_send_request(document, document, assign)


def message_context_grpc(
    method: str, request: bytes, *, assign: Callable[[], str] | None = None
) -> MessageContext:
    """The conversation of a gRPC call (``method``: the A2A service's method name)."""
    if method not in _SEND_METHODS:
        return _NOTHING
    try:
        parsed = SendMessageRequest.FromString(request)
    except DecodeError:
        return _NOTHING
    message = parsed.message
    if message.context_id:
        return MessageContext(_usable(message.context_id))
    if assign is None or message.task_id or not parsed.HasField("message"):
        return _NOTHING
    message.context_id = assign()
    return MessageContext(message.context_id, parsed.SerializeToString())


def context_id_of_http(method: str, path: str, body: bytes | None) -> str | None:
    """The contextId an HTTP call carries; None when it has none or is no message."""
    return message_context_http(method, path, body).context_id


def context_id_of_grpc(method: str, request: bytes) -> str | None:
    """The contextId a gRPC call carries; None when it has none or is no message."""
    return message_context_grpc(method, request).context_id


@dataclass(frozen=True)
class _TrackPin:
    track: str
    canary_revision: int | None


class ConversationTracks:
    """(agent, contextId) -> the release track a conversation was routed to: the entry's
    own conversations (``agent`` left empty), and the egress's with each partner (the
    partner's name: contextIds of different partners never meet)."""

    def __init__(
        self,
        *,
        max_age: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pins: PinTable[tuple[str, str], _TrackPin] = PinTable(
            max_age=max_age, max_entries=max_entries, clock=clock
        )

    def __len__(self) -> int:
        return len(self._pins)

    def track(
        self, context_id: str | None, release: ReleaseSpec | None, *, agent: str = ""
    ) -> str | None:
        """The track the conversation (with ``agent``, whose release is ``release``) is
        pinned to, if the pin still holds under ``release`` (a canary pin: the same canary
        revision)."""
        if context_id is None:
            return None
        key = (agent, context_id)
        pin = self._pins.get(key)
        if pin is None:
            return None
        if pin.track == "canary":
            canary = release.canary_revision if release is not None else None
            if canary is None or canary != pin.canary_revision:
                self._pins.remove(key)
                return None
        return pin.track

    def remember(
        self,
        context_id: str | None,
        track: str | None,
        release: ReleaseSpec | None,
        *,
        agent: str = "",
    ) -> None:
        """Pin a conversation (with ``agent``) to the track its first message went to."""
        if context_id is None or track is None:
            return
        canary = release.canary_revision if release is not None else None
        self._pins.pin((agent, context_id), _TrackPin(track, canary))
