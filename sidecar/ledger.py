"""The sidecar's cost ledger: what each request handed to the engine may spend, and has spent.

The engine is not trusted with limits (as it is not with secrets), so the budget is kept
here, not in the engine:

* **open** -- the inbound or the entry (HTTP and gRPC) opens an entry for every message it
  hands the engine (A2A ``SendMessage`` / ``SendStreamingMessage`` in any binding, business
  REST ``/v1/invoke[/stream]``): its budget is the smallest of the caller's (the message's
  metadata ``specmesh.budgetUsd``, the REST body's ``budgetUsd``, and the header
  :data:`~specmesh.budget.BUDGET_TOTAL_HEADER` a calling agent's sidecar sets) and the
  spec's ``model.budgetPerRequestUsd``; None when none is set. The entry's id goes to the
  engine in :data:`~specmesh.budget.LEDGER_HEADER` (any value a caller sent is replaced),
  and the engine echoes it on every egress call of that turn.
* **charge** -- the egress charges each model call from its answer's ``usage`` (the JSON
  body, or the last ``usage`` of a streamed answer) at the spec's price, and each partner
  call from the ``cost`` its answer carries (its ``totalUsd``: the partner's chain);
  :class:`UsageTap` and :class:`CostTap` read the answer as it is relayed.
* **refuse** -- :meth:`EgressPolicy.model_budget` / :meth:`EgressPolicy.partner_budget`
  refuse, with ``BUDGET_EXCEEDED``, a model call whose worst case passes what the entry
  has left and a partner call when nothing is left; a partner gets what is left as its
  budget.
* **unattributed calls** -- a model call or partner message that names no entry, or one
  this sidecar does not hold (never opened, or dropped), is refused with
  ``BUDGET_EXCEEDED`` while a budget applies: the spec sets ``budgetPerRequestUsd``, or an
  entry with a budget is open. Otherwise no budget applies and it passes uncharged.
* **close** -- an entry is closed when the inbound request ends (the whole answer relayed),
  and kept, closed, for a while: a turn that goes on after its answer (a non-blocking
  send) is still charged and refused by it. At most ``max_open`` entries are open (another
  message is refused with ``OVERFLOW``), at most ``max_closed`` closed ones are kept (the
  oldest leave first), and any entry leaves ``ttl_seconds`` after it was opened.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from a2a.types.a2a_pb2 import SendMessageRequest, SendMessageResponse, StreamResponse
from aiohttp import web
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from multidict import CIMultiDict

from specmesh.budget import BUDGET_TOTAL_HEADER, LEDGER_HEADER, BudgetValueError, parse_budget

from .engine_calls import EngineCalls
from .errors import PolicyError
from .relay import forward_to_engine

__all__ = [
    "BUDGET_METADATA",
    "BudgetLedger",
    "CostTap",
    "LedgerEntry",
    "UsageTap",
    "caller_budget_grpc",
    "caller_budget_http",
    "forward_message",
    "grpc_answer_cost",
    "open_for_engine",
]

BUDGET_METADATA = "specmesh.budgetUsd"
"""Key of a request's budget (USD) in the A2A message metadata (as the engine reads it)."""

_SEND_METHODS = frozenset({"SendMessage", "SendStreamingMessage"})
_HTTP_JSON_SEND = re.compile(r"^(?:/[^/]+)?/v1/message:(?:send|stream)$")
_BUSINESS_INVOKE = frozenset({"/v1/invoke", "/v1/invoke/stream"})
_KEPT_BYTES = 1 << 20
"""How much of an answer a tap keeps to read its usage or cost (the tail of a stream)."""


@dataclass(eq=False)
class LedgerEntry:
    """One request's budget and what its turn has spent (USD)."""

    id: str
    budget_usd: float | None
    opened_at: float
    spent_usd: float = 0.0
    unpriced: set[str] = field(default_factory=set)
    closed: bool = False

    @property
    def remaining_usd(self) -> float | None:
        """What is left (never below 0); None without a budget."""
        if self.budget_usd is None:
            return None
        return max(0.0, self.budget_usd - self.spent_usd)

    def charge(self, usd: float) -> None:
        """Book one call's cost (a negative or not finite amount is ignored)."""
        if math.isfinite(usd) and usd > 0:
            self.spent_usd += usd


class BudgetLedger:
    """The entries of the requests in flight (and recently ended) on this sidecar; see the
    module docstring. ``spec_budget`` gives the current spec's ``budgetPerRequestUsd``."""

    def __init__(
        self,
        *,
        spec_budget: Callable[[], float | None] = lambda: None,
        max_open: int = 4096,
        max_closed: int = 4096,
        ttl_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spec_budget = spec_budget
        self.max_open = max_open
        self.max_closed = max_closed
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[str, LedgerEntry] = OrderedDict()  # oldest first
        self._open = 0
        self._budgeted_open = 0
        self._closed: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def open(self, caller_budget: float | None) -> LedgerEntry:
        """A new entry for a message handed to the engine; ``OVERFLOW`` when ``max_open``
        entries are open."""
        self._expire()
        if self._open >= self.max_open:
            raise PolicyError(
                "OVERFLOW", f"too many requests in flight ({self._open} hold a cost ledger entry)"
            )
        given = [b for b in (caller_budget, self._spec_budget()) if b is not None]
        entry = LedgerEntry(
            id=uuid.uuid4().hex, budget_usd=min(given) if given else None, opened_at=self._clock()
        )
        self._entries[entry.id] = entry
        self._open += 1
        self._budgeted_open += entry.budget_usd is not None
        return entry

    def close(self, entry: LedgerEntry) -> None:
        """The request ended: keep the entry, closed, for calls its turn still makes."""
        if entry.closed or self._entries.get(entry.id) is not entry:
            return
        self._mark_closed(entry)
        self._closed[entry.id] = None
        while len(self._closed) > self.max_closed:
            oldest, _ = self._closed.popitem(last=False)
            self._entries.pop(oldest, None)

    def _mark_closed(self, entry: LedgerEntry) -> None:
        entry.closed = True
        self._open -= 1
        self._budgeted_open -= entry.budget_usd is not None

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_seconds
        while self._entries:
            entry = next(iter(self._entries.values()))
            if entry.opened_at > deadline:
                return
            del self._entries[entry.id]
            if entry.closed:
                self._closed.pop(entry.id, None)
            else:
                self._mark_closed(entry)

    def budget_applies(self) -> bool:
        """Whether a call that names no entry must be refused (see the module docstring)."""
        self._expire()
        return self._budgeted_open > 0 or self._spec_budget() is not None

    def entry(self, headers: Mapping[str, str], what: str) -> LedgerEntry | None:
        """The entry an egress call names (``headers``' :data:`LEDGER_HEADER`); None when it
        names none and no budget applies; else ``BUDGET_EXCEEDED`` naming ``what``."""
        self._expire()
        wanted = headers.get(LEDGER_HEADER)
        found = self._entries.get(wanted) if wanted else None
        if found is not None or not self.budget_applies():
            return found
        why = "names no cost ledger entry" if not wanted else "names an unknown ledger entry"
        raise PolicyError(
            "BUDGET_EXCEEDED",
            f"budget exceeded: {what} is refused: it {why} (header {LEDGER_HEADER}) while a "
            "cost budget applies",
            header=LEDGER_HEADER,
        )


# ---------------------------------------------------------------- the caller's budget


def _parsed(value: object, where: str) -> float | None:
    try:
        return parse_budget(value, where=where)
    except BudgetValueError as e:
        raise PolicyError("INVALID_TARGET", str(e), field=e.where) from e


def _smallest(*budgets: float | None) -> float | None:
    given = [b for b in budgets if b is not None]
    return min(given) if given else None


def _header_budget(headers: Mapping[str, str]) -> float | None:
    return _parsed(headers.get(BUDGET_TOTAL_HEADER), f"header {BUDGET_TOTAL_HEADER}")


def _metadata_budget(message: object) -> float | None:
    metadata = message.get("metadata") if isinstance(message, dict) else None
    if not isinstance(metadata, dict):
        return None
    return _parsed(metadata.get(BUDGET_METADATA), f"message metadata {BUDGET_METADATA}")


def caller_budget_http(
    method: str, path: str, body: bytes | None, headers: Mapping[str, str]
) -> tuple[bool, float | None]:
    """(whether the call hands the engine a message, the caller's budget); a budget that
    is no non-negative number is ``INVALID_TARGET`` naming where it is."""
    if method != "POST" or not body:
        return False, None
    is_rest = path in _BUSINESS_INVOKE
    if not (is_rest or path == "/" or _HTTP_JSON_SEND.match(path)):
        return False, None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return False, None
    if not isinstance(document, dict):
        return False, None
    if is_rest:
        budget = _parsed(document.get("budgetUsd"), "budgetUsd")
    elif path == "/":
        if document.get("method") not in _SEND_METHODS:
            return False, None
        params = document.get("params")
        budget = _metadata_budget(params.get("message") if isinstance(params, dict) else None)
    else:
        budget = _metadata_budget(document.get("message"))
    return True, _smallest(budget, _header_budget(headers))


def caller_budget_grpc(
    method: str, request: bytes, headers: Mapping[str, str]
) -> tuple[bool, float | None]:
    """As :func:`caller_budget_http`, for a gRPC call (``method``: the A2A method name)."""
    if method not in _SEND_METHODS:
        return False, None
    try:
        parsed = SendMessageRequest.FromString(request)
    except DecodeError:
        return False, None
    budget = None
    if BUDGET_METADATA in parsed.message.metadata:
        budget = _parsed(
            parsed.message.metadata[BUDGET_METADATA], f"message metadata {BUDGET_METADATA}"
        )
    return True, _smallest(budget, _header_budget(headers))


# ---------------------------------------------------------------- reading answers


class _Tap:
    """Keeps the tail of a relayed answer (at most :data:`_KEPT_BYTES`) and reads its JSON
    documents when it ends: the body, or each ``data:`` event of a stream. A
    :class:`~sidecar.relay.RelayTap`."""

    def __init__(self, content_type: str | None = None) -> None:
        self.broken: str | None = None
        self._stream = False
        self._kept = bytearray()
        self._cut = False
        self.begin_body(content_type or "")

    def begin_body(self, content_type: str) -> None:
        self._stream = content_type.startswith("text/event-stream")

    def feed(self, chunk: bytes) -> None:
        self._kept += chunk
        if len(self._kept) > _KEPT_BYTES:
            del self._kept[: len(self._kept) - _KEPT_BYTES]
            self._cut = True

    def documents(self) -> Iterator[Any]:
        """The answer's JSON documents, last first."""
        if not self._stream:
            if not self._cut:
                try:
                    yield json.loads(self._kept)
                except (ValueError, RecursionError):
                    return
            return
        for line in reversed(bytes(self._kept).splitlines()):
            if line.startswith(b"data:"):
                try:
                    yield json.loads(line[5:])
                except (ValueError, RecursionError):
                    continue


class UsageTap(_Tap):
    """A model's answer: its token ``usage`` (the last one a stream sent)."""

    def usage(self) -> tuple[int, int] | None:
        """(prompt tokens, completion tokens); None when the answer reported none."""
        for document in self.documents():
            usage = document.get("usage") if isinstance(document, dict) else None
            if isinstance(usage, dict):
                prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
                if _count(prompt) and _count(completion):
                    assert isinstance(prompt, int) and isinstance(completion, int)
                    return prompt, completion
        return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class CostTap(_Tap):
    """A partner's answer: the largest ``cost.totalUsd`` it carries (its chain's total, in
    the answer artifact's or the failed status message's metadata, any binding)."""

    def total_usd(self) -> float:
        return max((_largest_cost(d, 0) for d in self.documents()), default=0.0)


def grpc_answer_cost(method: str, answer: bytes) -> float:
    """The largest ``cost.totalUsd`` in a gRPC answer of ``method`` (SendMessage's
    response, or one event of SendStreamingMessage); 0 when it carries none."""
    kind: type[SendMessageResponse | StreamResponse] = (
        StreamResponse if method == "SendStreamingMessage" else SendMessageResponse
    )
    try:
        parsed = kind.FromString(answer)
    except DecodeError:
        return 0.0
    return _largest_cost(MessageToDict(parsed), 0)


def _largest_cost(node: Any, depth: int) -> float:
    if depth > 12:
        return 0.0
    found = 0.0
    if isinstance(node, dict):
        cost = node.get("cost")
        if isinstance(cost, dict):
            total = cost.get("totalUsd")
            if isinstance(total, int | float) and not isinstance(total, bool):
                found = max(found, float(total) if math.isfinite(total) else 0.0)
        for value in node.values():
            if isinstance(value, dict | list):
                found = max(found, _largest_cost(value, depth + 1))
    elif isinstance(node, list):
        for value in node:
            found = max(found, _largest_cost(value, depth + 1))
    return found


# ---------------------------------------------------------------- the listeners' side


_TO_ENGINE_DROPPED = (LEDGER_HEADER, BUDGET_TOTAL_HEADER)
"""Cost headers a caller sent that never reach the engine (the ledger id is the sidecar's)."""


def open_for_engine(
    ledger: BudgetLedger | None,
    found: tuple[bool, float | None],
    headers: Any,
) -> LedgerEntry | None:
    """Open the entry of a call about to be handed to the engine (``found``: what
    :func:`caller_budget_http` / :func:`caller_budget_grpc` read of it) and name it in
    ``headers`` (HTTP headers, a ``CIMultiDict``; or gRPC metadata, a list of pairs), from
    which any cost header the caller sent is removed first; None when the call is no
    message (or there is no ledger). Close it with :meth:`BudgetLedger.close`."""
    if isinstance(headers, list):
        headers[:] = [(k, v) for k, v in headers if k not in _TO_ENGINE_DROPPED]
    else:
        for name in _TO_ENGINE_DROPPED:
            headers.popall(name, None)
    is_message, budget = found
    if ledger is None or not is_message:
        return None
    entry = ledger.open(budget)
    if isinstance(headers, list):
        headers.append((LEDGER_HEADER, entry.id))
    else:
        headers[LEDGER_HEADER] = entry.id
    return entry


async def forward_message(
    ledger: BudgetLedger | None,
    session: aiohttp.ClientSession,
    request: web.BaseRequest,
    headers: CIMultiDict[str],
    body: bytes | None,
    engine_url: str,
    read_timeout: float,
    calls: EngineCalls | None = None,
) -> web.StreamResponse:
    """:func:`~sidecar.relay.forward_to_engine` (counted on ``calls``), a message with its
    ledger entry, closed once the answer is relayed (the HTTP inbound and entry)."""
    try:
        found = caller_budget_http(request.method, request.path, body, request.headers)
        entry = open_for_engine(ledger, found, headers)
    except PolicyError as e:
        return e.http_response()
    try:
        return await forward_to_engine(
            session, request, headers, body, engine_url, read_timeout, calls
        )
    finally:
        if entry is not None and ledger is not None:
            ledger.close(entry)
