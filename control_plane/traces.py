"""The trace store: the spans the OTLP receiver takes in, and the Studio's queries on them.

- :class:`Span` (with :class:`SpanEvent`): one span, as the receiver decoded it.
- :class:`TraceStore`: ``add_spans``, ``get_trace`` (a waterfall: ordered by start, with
  parent ids), ``list_traces`` (:class:`TraceSummary`), ``token_usage``
  (:class:`TokenUsageRow`), ``turns`` (:class:`Turn`: one per engine ``invoke_agent``
  span, with its revision, outcome, duration and cost -- what release analysis reads),
  ``prune`` (retention); :class:`InMemoryTraceStore` and
  :class:`SqliteTraceStore` (the embedded default) implement it.
- :func:`retention_loop`: prune on a timer until stopped.

How spans are read (the engine follows the GenAI semantic conventions):

- **agent**: the resource attribute ``specmesh.agent.name`` (the engine sets it; every
  engine shares ``service.name=specmesh-engine``), else ``service.name`` (a service that
  is not a specmesh engine), else ``unknown_service``.
- **model calls**: spans whose ``gen_ai.operation.name`` is one of
  :data:`MODEL_OPERATIONS`. Only they count for tokens and cost: an ``invoke_agent`` span
  carries the whole turn's usage as well, and counting both would count it twice.
- **model**: ``gen_ai.request.model``, else ``gen_ai.response.model``, else ``unknown``.
- **cost**: what the engine recorded on the model call's span -- ``specmesh.cost.usd``
  (priced by :mod:`specmesh.prices` at the model part's price, else litellm's map) or
  ``specmesh.cost.unpriced`` (priced nowhere). A call without either (an older engine) is
  priced here by the same code over litellm's map. An unpriced call adds nothing to a cost
  and is counted (``unpricedCalls``, a trace's ``unpricedModels``): never a silent $0.
  A turn's ``invoke_agent`` span carries ``specmesh.cost.total_usd``: its own calls plus
  what its partners' answers carried -- the agent's cost "including downstream".
- **context**: ``gen_ai.conversation.id`` (the A2A contextId).
- **day**: the UTC date a span started.

Attributes are stored as they arrive: message content is there only if the engine
recorded it (its decision, off by default). A trace's spans are kept or pruned together:
retention drops a trace once its last span ended before the cut-off.

:class:`SqliteTraceStore` uses stdlib ``sqlite3`` (WAL) on one connection that lives in
one dedicated thread; every statement runs there, never on the event loop (the
connection keeps ``check_same_thread`` on, so a slip would raise).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

from control_plane.errors import BadRequestError
from specmesh.aio import wait_event
from specmesh.prices import PriceMap, default_price_map

__all__ = [
    "AGENT_ATTRIBUTE",
    "COST_ATTRIBUTE",
    "GROUP_KEYS",
    "MODEL_OPERATIONS",
    "UNPRICED_ATTRIBUTE",
    "InMemoryTraceStore",
    "MapPricer",
    "Pricer",
    "Span",
    "SpanEvent",
    "SqliteTraceStore",
    "TokenUsageRow",
    "TraceStore",
    "TraceSummary",
    "Turn",
    "retention_loop",
]

logger = logging.getLogger(__name__)

AGENT_ATTRIBUTE: Final = "specmesh.agent.name"
"""Resource attribute naming the agent (set by ``engine/telemetry.py``)."""
UNKNOWN_SERVICE: Final = "unknown_service"
UNKNOWN_MODEL: Final = "unknown"
COST_ATTRIBUTE: Final = "specmesh.cost.usd"
"""Span attribute: the model call's cost in USD, as the engine priced it."""
UNPRICED_ATTRIBUTE: Final = "specmesh.cost.unpriced"
"""Span attribute: true when the model call's model is priced nowhere."""
MODEL_OPERATIONS: Final = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
"""``gen_ai.operation.name`` values of a model call: the spans tokens are counted on."""
GROUP_KEYS: Final = ("agent", "model", "day")
"""What :meth:`TraceStore.token_usage` can group by."""
MAX_LIMIT: Final = 1000

_NS = 1_000_000_000
_INT64_MAX = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T = TypeVar("T")


def _to_ns(moment: datetime) -> int:
    """Unix nanoseconds (naive means UTC), clamped to what SQLite's INTEGER holds."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ns = (moment - _EPOCH) // timedelta(microseconds=1) * 1000
    return max(-_INT64_MAX, min(_INT64_MAX, ns))


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / _NS, tz=UTC).isoformat().replace("+00:00", "Z")


def _day(ns: int) -> str:
    return datetime.fromtimestamp(ns // _NS, tz=UTC).strftime("%Y-%m-%d")


def _int_or_none(value: Any) -> int | None:
    """A token count: an int (or an int-valued float or digit string), within int64."""
    integral = (
        (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, float) and value.is_integer())
        # OTLP/JSON may carry an int64 as a string
        or (isinstance(value, str) and value.isascii() and value.isdigit())
    )
    if not integral:
        return None
    number = int(value)
    return number if abs(number) <= _INT64_MAX else None


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "time": _iso(self.time_ns),
            "timeUnixNano": str(self.time_ns),
            "attributes": dict(self.attributes),
        }


@dataclass(frozen=True)
class Span:
    """One span. Ids are lower-case hex; times are Unix nanoseconds."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    """``INTERNAL``, ``SERVER``, ``CLIENT``, ``PRODUCER``, ``CONSUMER`` or ``UNSPECIFIED``."""
    start_ns: int
    end_ns: int
    status: str = "UNSET"
    """``UNSET``, ``OK`` or ``ERROR``."""
    status_message: str = ""
    service_name: str = UNKNOWN_SERVICE
    agent: str = UNKNOWN_SERVICE
    """See the module docstring: ``specmesh.agent.name``, else ``service.name``."""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    events: tuple[SpanEvent, ...] = ()
    resource: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def agent_of(resource: Mapping[str, Any]) -> str:
        """The agent a resource belongs to (see the module docstring)."""
        for key in (AGENT_ATTRIBUTE, "service.name"):
            value = resource.get(key)
            if isinstance(value, str) and value:
                return value
        return UNKNOWN_SERVICE

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def operation(self) -> str | None:
        value = self.attributes.get("gen_ai.operation.name")
        return value if isinstance(value, str) else None

    @property
    def is_model_call(self) -> bool:
        return self.operation in MODEL_OPERATIONS

    @property
    def model(self) -> str | None:
        for key in ("gen_ai.request.model", "gen_ai.response.model"):
            value = self.attributes.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    @property
    def context_id(self) -> str | None:
        value = self.attributes.get("gen_ai.conversation.id")
        return value if isinstance(value, str) and value else None

    @property
    def input_tokens(self) -> int | None:
        return _int_or_none(self.attributes.get("gen_ai.usage.input_tokens"))

    @property
    def output_tokens(self) -> int | None:
        return _int_or_none(self.attributes.get("gen_ai.usage.output_tokens"))

    @property
    def recorded_cost(self) -> float | None:
        """The cost the engine recorded on a model call's span (None: none recorded)."""
        value = self.attributes.get(COST_ATTRIBUTE)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None

    @property
    def unpriced(self) -> bool:
        """The engine found the call's model priced nowhere."""
        return self.attributes.get(UNPRICED_ATTRIBUTE) is True

    @property
    def is_error(self) -> bool:
        return self.status == "ERROR"

    def to_json(self) -> dict[str, Any]:
        """The wire form: camelCase; nanosecond times as strings (beyond JSON's 2^53)."""
        return {
            "traceId": self.trace_id,
            "spanId": self.span_id,
            "parentSpanId": self.parent_span_id,
            "name": self.name,
            "kind": self.kind,
            "start": _iso(self.start_ns),
            "startTimeUnixNano": str(self.start_ns),
            "endTimeUnixNano": str(self.end_ns),
            "durationMs": self.duration_ns / 1e6,
            "status": self.status,
            "statusMessage": self.status_message,
            "serviceName": self.service_name,
            "agent": self.agent,
            "attributes": dict(self.attributes),
            "events": [e.to_json() for e in self.events],
            "resource": dict(self.resource),
        }


@dataclass(frozen=True)
class TraceSummary:
    trace_id: str
    root_name: str
    """Name of the span without a parent in the trace (the earliest such, else the earliest)."""
    agents: tuple[str, ...]
    start_ns: int
    duration_ns: int
    span_count: int
    error: bool
    input_tokens: int
    output_tokens: int
    cost_usd: float = 0.0
    """What the trace's model calls cost, as the engines recorded it (every agent's calls:
    the whole chain)."""
    unpriced_models: tuple[str, ...] = ()
    """Models of the trace priced nowhere (their calls are not in ``cost_usd``)."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "traceId": self.trace_id,
            "rootName": self.root_name,
            "agents": list(self.agents),
            "start": _iso(self.start_ns),
            "startTimeUnixNano": str(self.start_ns),
            "durationMs": self.duration_ns / 1e6,
            "spanCount": self.span_count,
            "error": self.error,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "totalTokens": self.total_tokens,
            "costUsd": self.cost_usd,
            "unpricedModels": list(self.unpriced_models),
        }


@dataclass(frozen=True)
class TokenUsageRow:
    group: Mapping[str, str]
    """The group's key: a value for each of the requested ``group_by`` keys."""
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    unpriced_calls: int = 0
    """Calls whose model is priced nowhere: not in ``cost_usd``."""

    def to_json(self) -> dict[str, Any]:
        return {
            **self.group,
            "calls": self.calls,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "totalTokens": self.input_tokens + self.output_tokens,
            "costUsd": self.cost_usd,
            "unpricedCalls": self.unpriced_calls,
        }


# ---------------------------------------------------------------- pricing

Pricer = Callable[[str, int, int], float | None]
"""``(model, input tokens, output tokens) -> USD``; None for a model priced nowhere. May
block. Prices calls whose span records no cost (see the module docstring)."""


TURN_OPERATION: Final = "invoke_agent"
"""``gen_ai.operation.name`` of an engine's turn span (it carries ``specmesh.spec.revision``)."""
REVISION_ATTRIBUTE: Final = "specmesh.spec.revision"


@dataclass(frozen=True)
class Turn:
    """One turn an agent answered, as its spans tell it (what release analysis reads)."""

    trace_id: str
    revision: int | None
    start_ns: int
    seconds: float
    error: bool
    cost_usd: float


def _turns(spans: Iterable[Span], pricer: Pricer) -> list[Turn]:
    """Turns (``invoke_agent`` spans) with the cost of the model calls inside each."""
    calls: dict[str, list[Span]] = {}
    turns: list[Span] = []
    for span in spans:
        if span.operation == TURN_OPERATION:
            turns.append(span)
        elif span.is_model_call:
            calls.setdefault(span.trace_id, []).append(span)
    out = []
    for turn in sorted(turns, key=lambda t: (t.start_ns, t.span_id)):
        cost = sum(
            _call_cost(c, pricer)
            for c in calls.get(turn.trace_id, [])
            if turn.start_ns <= c.start_ns <= turn.end_ns
        )
        revision = _int_or_none(turn.attributes.get(REVISION_ATTRIBUTE))
        out.append(
            Turn(
                trace_id=turn.trace_id,
                revision=revision,
                start_ns=turn.start_ns,
                seconds=turn.duration_ns / _NS,
                error=turn.is_error,
                cost_usd=cost,
            )
        )
    return out


def _call_cost(span: Span, pricer: Pricer) -> float:
    """A model call's cost: what its span recorded, else the price map's; 0.0 for a model
    priced nowhere (the analysis's cost gate judges nothing while stable costs 0)."""
    if span.recorded_cost is not None:
        return span.recorded_cost
    if span.unpriced:
        return 0.0
    priced = pricer(span.model or UNKNOWN_MODEL, span.input_tokens or 0, span.output_tokens or 0)
    return priced or 0.0


class MapPricer:
    """Prices from :mod:`specmesh.prices` -- litellm's bundled price map, read without
    importing litellm; the engine's ``specmesh.agent.cost`` comes from the same code.

    The first call reads the file (~75 ms): call it from a thread.
    """

    def __init__(self, prices: PriceMap | None = None) -> None:
        """``prices``: the map (default: the process's, over litellm's file)."""
        self.prices = prices or default_price_map()

    def __call__(self, model: str, input_tokens: int, output_tokens: int) -> float | None:
        if model == UNKNOWN_MODEL:
            return None
        return self.prices.charge(
            model, prompt_tokens=input_tokens, completion_tokens=output_tokens
        )


@dataclass
class _Usage:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0


@dataclass
class _Calls:
    """Model calls of one (agent, model, day): all of them, and those whose span settled
    the cost (a recorded cost, or the unpriced flag) -- the rest are priced here."""

    key: Mapping[str, str]
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    recorded_usd: float = 0.0
    settled_calls: int = 0
    settled_input: int = 0
    settled_output: int = 0
    unpriced_calls: int = 0

    def add(self, span: Span) -> None:
        self.calls += 1
        self.input_tokens += span.input_tokens or 0
        self.output_tokens += span.output_tokens or 0
        cost = span.recorded_cost
        if cost is None and not span.unpriced:
            return
        self.settled_calls += 1
        self.settled_input += span.input_tokens or 0
        self.settled_output += span.output_tokens or 0
        if cost is None:
            self.unpriced_calls += 1
        else:
            self.recorded_usd += cost


def _check_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    keys = tuple(group_by)
    for key in keys:
        if key not in GROUP_KEYS:
            raise BadRequestError(f"groupBy: must be among {', '.join(GROUP_KEYS)} (got {key!r})")
    if len(set(keys)) != len(keys):
        raise BadRequestError(f"groupBy: a key appears twice (got {', '.join(keys)})")
    return keys


def _check_limit(limit: int) -> int:
    if limit < 1:
        raise BadRequestError(f"limit: must be >= 1 (got {limit})")
    return min(limit, MAX_LIMIT)


def _price(raw: Iterable[_Calls], group_by: tuple[str, ...], pricer: Pricer) -> list[TokenUsageRow]:
    """Fold the calls of each (agent, model, day) into the requested groups: their recorded
    costs, plus the calls no span settled priced by ``pricer`` (each model separately even
    when not grouped by)."""
    folded: dict[tuple[str, ...], _Usage] = {}
    for c in raw:
        usage = folded.setdefault(tuple(c.key[k] for k in group_by), _Usage())
        usage.calls += c.calls
        usage.input_tokens += c.input_tokens
        usage.output_tokens += c.output_tokens
        usage.cost_usd += c.recorded_usd
        usage.unpriced_calls += c.unpriced_calls
        rest = c.calls - c.settled_calls
        if rest:
            usd = pricer(
                c.model, c.input_tokens - c.settled_input, c.output_tokens - c.settled_output
            )
            if usd is None:
                usage.unpriced_calls += rest
            else:
                usage.cost_usd += usd
    return [
        TokenUsageRow(
            group=dict(zip(group_by, key, strict=True)),
            calls=u.calls,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cost_usd=round(u.cost_usd, 10),
            unpriced_calls=u.unpriced_calls,
        )
        for key, u in sorted(folded.items())
    ]


# ---------------------------------------------------------------- interface


class TraceStore(ABC):
    """Where the OTLP receiver keeps spans, and what the Studio queries."""

    @abstractmethod
    async def add_spans(self, spans: Sequence[Span]) -> None:
        """Keep spans (a span sent twice, by a retrying exporter, is kept once)."""

    @abstractmethod
    async def get_trace(self, trace_id: str) -> list[Span]:
        """Every span of a trace ordered by start (parents first on a tie); ``[]`` if none."""

    @abstractmethod
    async def list_traces(
        self,
        *,
        agent: str | None = None,
        context_id: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> list[TraceSummary]:
        """Traces, newest first: those an agent took part in, those of one conversation
        (``gen_ai.conversation.id``), those that started at or after ``since``."""

    @abstractmethod
    async def token_usage(
        self, *, group_by: Sequence[str] = GROUP_KEYS, since: datetime | None = None
    ) -> list[TokenUsageRow]:
        """Tokens and cost of model calls (see the module docstring), grouped by any of
        :data:`GROUP_KEYS` (none: one total row), from model calls started since ``since``."""

    @abstractmethod
    async def prune(self, *, older_than: timedelta, now: datetime | None = None) -> int:
        """Drop every trace whose last span ended before ``now - older_than``; the number
        of spans dropped."""

    @abstractmethod
    async def turns(self, *, agents: Sequence[str], since: datetime, until: datetime) -> list[Turn]:
        """The turns of an agent (any of its names) started in ``[since, until)``, oldest
        first, each with the cost of its model calls."""

    async def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release what the store holds."""

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# ---------------------------------------------------------------- in memory


def _root_name(spans: Sequence[Span]) -> str:
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_span_id is None or s.parent_span_id not in ids]
    return min(roots or spans, key=lambda s: (s.start_ns, -s.end_ns)).name


class InMemoryTraceStore(TraceStore):
    """Spans in a dict (tests, and a control plane run without a database)."""

    async def turns(self, *, agents: Sequence[str], since: datetime, until: datetime) -> list[Turn]:
        low, high = _to_ns(since), _to_ns(until)
        names = set(agents)
        spans = [
            s
            for by_id in self._traces.values()
            for s in by_id.values()
            if s.agent in names and low <= s.start_ns < high
        ]
        return await asyncio.to_thread(_turns, spans, self._pricer)

    def __init__(self, *, pricer: Pricer | None = None) -> None:
        self._traces: dict[str, dict[str, Span]] = {}
        self._pricer = pricer or MapPricer()

    async def add_spans(self, spans: Sequence[Span]) -> None:
        for span in spans:
            self._traces.setdefault(span.trace_id, {})[span.span_id] = span

    async def get_trace(self, trace_id: str) -> list[Span]:
        spans = self._traces.get(trace_id.lower(), {}).values()
        return sorted(spans, key=lambda s: (s.start_ns, -s.end_ns, s.span_id))

    async def list_traces(
        self,
        *,
        agent: str | None = None,
        context_id: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> list[TraceSummary]:
        limit = _check_limit(limit)
        since_ns = _to_ns(since) if since is not None else None
        out: list[TraceSummary] = []
        for trace_id, by_id in self._traces.items():
            spans = list(by_id.values())
            start = min(s.start_ns for s in spans)
            if since_ns is not None and start < since_ns:
                continue
            if agent is not None and all(s.agent != agent for s in spans):
                continue
            if context_id is not None and all(s.context_id != context_id for s in spans):
                continue
            calls = [s for s in spans if s.is_model_call]
            out.append(
                TraceSummary(
                    trace_id=trace_id,
                    root_name=_root_name(spans),
                    agents=tuple(sorted({s.agent for s in spans})),
                    start_ns=start,
                    duration_ns=max(s.end_ns for s in spans) - start,
                    span_count=len(spans),
                    error=any(s.is_error for s in spans),
                    input_tokens=sum(s.input_tokens or 0 for s in calls),
                    output_tokens=sum(s.output_tokens or 0 for s in calls),
                    cost_usd=round(sum(s.recorded_cost or 0.0 for s in calls), 10),
                    unpriced_models=tuple(
                        sorted({s.model or UNKNOWN_MODEL for s in calls if s.unpriced})
                    ),
                )
            )
        out.sort(key=lambda t: (t.start_ns, t.trace_id), reverse=True)
        return out[:limit]

    async def token_usage(
        self, *, group_by: Sequence[str] = GROUP_KEYS, since: datetime | None = None
    ) -> list[TokenUsageRow]:
        keys = _check_group_by(group_by)
        since_ns = _to_ns(since) if since is not None else None
        raw: dict[tuple[str, str, str], _Calls] = {}
        for by_id in self._traces.values():
            for s in by_id.values():
                if not s.is_model_call or (since_ns is not None and s.start_ns < since_ns):
                    continue
                agent, model, day = s.agent, s.model or UNKNOWN_MODEL, _day(s.start_ns)
                calls = raw.get((agent, model, day))
                if calls is None:
                    key = {"agent": agent, "model": model, "day": day}
                    calls = raw[(agent, model, day)] = _Calls(key, model, 0, 0, 0)
                calls.add(s)
        return await asyncio.to_thread(_price, list(raw.values()), keys, self._pricer)

    async def prune(self, *, older_than: timedelta, now: datetime | None = None) -> int:
        cutoff = _to_ns((now or datetime.now(UTC)) - older_than)
        dropped = 0
        for trace_id in [
            t for t, by_id in self._traces.items() if max(s.end_ns for s in by_id.values()) < cutoff
        ]:
            dropped += len(self._traces.pop(trace_id))
        return dropped


# ---------------------------------------------------------------- sqlite

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id        TEXT    NOT NULL,
    span_id         TEXT    NOT NULL,
    parent_span_id  TEXT,
    name            TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    start_ns        INTEGER NOT NULL,
    end_ns          INTEGER NOT NULL,
    status          TEXT    NOT NULL,
    status_message  TEXT    NOT NULL,
    service_name    TEXT    NOT NULL,
    agent           TEXT    NOT NULL,
    operation       TEXT,
    model           TEXT,
    context_id      TEXT,
    input_tokens    INTEGER,
    output_tokens   INTEGER,
    attributes      TEXT    NOT NULL,
    events          TEXT    NOT NULL,
    resource        TEXT    NOT NULL,
    PRIMARY KEY (trace_id, span_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spans_start ON spans (start_ns);
CREATE INDEX IF NOT EXISTS spans_agent ON spans (agent, trace_id);
CREATE INDEX IF NOT EXISTS spans_context ON spans (context_id) WHERE context_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS spans_model_calls ON spans (start_ns) WHERE {model_call};
"""
_MODEL_CALL = f"operation IN ({', '.join(repr(op) for op in sorted(MODEL_OPERATIONS))})"
_SCHEMA = _SCHEMA.format(model_call=_MODEL_CALL)
_COST = f"""json_extract(attributes, '$."{COST_ATTRIBUTE}"')"""
"""A span's recorded cost (a number, NULL when absent or not a number)."""
_UNPRICED = f"""COALESCE(json_extract(attributes, '$."{UNPRICED_ATTRIBUTE}"') = 1, 0)"""
_SETTLED = f"({_COST} IS NOT NULL OR {_UNPRICED})"

_COLUMNS = (
    "trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, status, status_message, "
    "service_name, agent, operation, model, context_id, input_tokens, output_tokens, "
    "attributes, events, resource"
)


def _json_default(value: Any) -> str:
    return repr(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=_json_default)


def _row_of(span: Span) -> tuple[Any, ...]:
    return (
        span.trace_id,
        span.span_id,
        span.parent_span_id,
        span.name,
        span.kind,
        span.start_ns,
        span.end_ns,
        span.status,
        span.status_message,
        span.service_name,
        span.agent,
        span.operation,
        span.model,
        span.context_id,
        span.input_tokens,
        span.output_tokens,
        _dumps(dict(span.attributes)),
        _dumps([{"name": e.name, "t": e.time_ns, "a": dict(e.attributes)} for e in span.events]),
        _dumps(dict(span.resource)),
    )


def _span_of(row: sqlite3.Row) -> Span:
    return Span(
        trace_id=row["trace_id"],
        span_id=row["span_id"],
        parent_span_id=row["parent_span_id"],
        name=row["name"],
        kind=row["kind"],
        start_ns=row["start_ns"],
        end_ns=row["end_ns"],
        status=row["status"],
        status_message=row["status_message"],
        service_name=row["service_name"],
        agent=row["agent"],
        attributes=json.loads(row["attributes"]),
        events=tuple(SpanEvent(e["name"], e["t"], e["a"]) for e in json.loads(row["events"])),
        resource=json.loads(row["resource"]),
    )


class SqliteTraceStore(TraceStore):
    """Spans in SQLite (a file, or ``":memory:"``), WAL, one connection in one thread.

    Open it with ``async with`` (or call :meth:`close` when done); the database is created
    on first use. ``connection_factory`` is ``sqlite3.connect``'s ``factory``.
    """

    def __init__(
        self,
        *,
        path: str | Path = ":memory:",
        pricer: Pricer | None = None,
        connection_factory: type[sqlite3.Connection] = sqlite3.Connection,
    ) -> None:
        self.path = str(path)
        self._pricer = pricer or MapPricer()
        self._factory = connection_factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-store")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    # ------------------------------------------------------------ the store's thread

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, factory=self._factory, timeout=10.0)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                conn.close()
                raise RuntimeError(
                    f"trace store {self.path}: schema version {version} is newer than "
                    f"this control plane's ({_SCHEMA_VERSION})"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            self._conn = conn
        return self._conn

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the trace store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: job(self._connection()))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close_connection() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close_connection)
        self._executor.shutdown(wait=False)  # its one job is done: the thread exits on its own

    # ------------------------------------------------------------ the interface

    async def add_spans(self, spans: Sequence[Span]) -> None:
        rows = [_row_of(s) for s in spans]
        if not rows:
            return

        def insert(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany(
                    f"INSERT OR REPLACE INTO spans ({_COLUMNS}) "
                    f"VALUES ({', '.join('?' * len(rows[0]))})",
                    rows,
                )

        await self._run(insert)

    async def get_trace(self, trace_id: str) -> list[Span]:
        def select(conn: sqlite3.Connection) -> list[Span]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM spans WHERE trace_id = ? "
                "ORDER BY start_ns, end_ns DESC, span_id",
                (trace_id.lower(),),
            ).fetchall()
            return [_span_of(r) for r in rows]

        return await self._run(select)

    async def list_traces(
        self,
        *,
        agent: str | None = None,
        context_id: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> list[TraceSummary]:
        limit = _check_limit(limit)
        where: list[str] = []
        params: list[Any] = []
        if agent is not None:
            where.append("trace_id IN (SELECT trace_id FROM spans WHERE agent = ?)")
            params.append(agent)
        if context_id is not None:
            where.append("trace_id IN (SELECT trace_id FROM spans WHERE context_id = ?)")
            params.append(context_id)
        having = ""
        if since is not None:
            # Traces that *started* since then: a candidate has a span since then, and
            # its earliest span (over all of them, hence HAVING) is not older.
            where.append("trace_id IN (SELECT trace_id FROM spans WHERE start_ns >= ?)")
            having = "HAVING MIN(start_ns) >= ?"
            params += [_to_ns(since), _to_ns(since)]
        params.append(limit)
        # The root name is looked up only for the page of traces, after the LIMIT.
        sql = f"""
            SELECT t.*, (
                SELECT r.name FROM spans r WHERE r.trace_id = t.trace_id
                ORDER BY (r.parent_span_id IS NULL OR NOT EXISTS (
                    SELECT 1 FROM spans p
                    WHERE p.trace_id = r.trace_id AND p.span_id = r.parent_span_id)) DESC,
                    r.start_ns, r.end_ns DESC
                LIMIT 1) AS root_name
            FROM (
                SELECT trace_id,
                       MIN(start_ns) AS start_ns,
                       MAX(end_ns) AS end_ns,
                       COUNT(*) AS span_count,
                       MAX(status = 'ERROR') AS error,
                       TOTAL(CASE WHEN {_MODEL_CALL} THEN input_tokens END) AS input_tokens,
                       TOTAL(CASE WHEN {_MODEL_CALL} THEN output_tokens END) AS output_tokens,
                       TOTAL(CASE WHEN {_MODEL_CALL} THEN {_COST} END) AS cost_usd,
                       json_group_array(DISTINCT CASE WHEN {_MODEL_CALL} AND {_UNPRICED}
                           THEN COALESCE(model, '{UNKNOWN_MODEL}') END) AS unpriced,
                       json_group_array(DISTINCT agent) AS agents
                FROM spans
                {"WHERE " + " AND ".join(where) if where else ""}
                GROUP BY trace_id
                {having}
                ORDER BY start_ns DESC, trace_id DESC
                LIMIT ?
            ) t
            ORDER BY t.start_ns DESC, t.trace_id DESC
        """

        def select(conn: sqlite3.Connection) -> list[TraceSummary]:
            return [
                TraceSummary(
                    trace_id=r["trace_id"],
                    root_name=r["root_name"],
                    agents=tuple(sorted(json.loads(r["agents"]))),
                    start_ns=r["start_ns"],
                    duration_ns=r["end_ns"] - r["start_ns"],
                    span_count=r["span_count"],
                    error=bool(r["error"]),
                    input_tokens=int(r["input_tokens"]),
                    output_tokens=int(r["output_tokens"]),
                    cost_usd=round(r["cost_usd"], 10),
                    unpriced_models=tuple(sorted(m for m in json.loads(r["unpriced"]) if m)),
                )
                for r in conn.execute(sql, params)
            ]

        return await self._run(select)

    async def token_usage(
        self, *, group_by: Sequence[str] = GROUP_KEYS, since: datetime | None = None
    ) -> list[TokenUsageRow]:
        keys = _check_group_by(group_by)
        sql = f"""
            SELECT agent,
                   COALESCE(model, '{UNKNOWN_MODEL}') AS model,
                   strftime('%Y-%m-%d', start_ns / {_NS}, 'unixepoch') AS day,
                   COUNT(*) AS calls,
                   TOTAL(input_tokens) AS input_tokens,
                   TOTAL(output_tokens) AS output_tokens,
                   TOTAL({_COST}) AS recorded_usd,
                   TOTAL({_SETTLED}) AS settled_calls,
                   TOTAL(CASE WHEN {_SETTLED} THEN input_tokens END) AS settled_input,
                   TOTAL(CASE WHEN {_SETTLED} THEN output_tokens END) AS settled_output,
                   TOTAL({_COST} IS NULL AND {_UNPRICED}) AS unpriced_calls
            FROM spans
            WHERE {_MODEL_CALL} {"AND start_ns >= ?" if since is not None else ""}
            GROUP BY 1, 2, 3
        """
        params = (_to_ns(since),) if since is not None else ()

        def select(conn: sqlite3.Connection) -> list[_Calls]:
            return [
                _Calls(
                    key={"agent": r["agent"], "model": r["model"], "day": r["day"]},
                    model=r["model"],
                    calls=r["calls"],
                    input_tokens=int(r["input_tokens"]),
                    output_tokens=int(r["output_tokens"]),
                    recorded_usd=r["recorded_usd"],
                    settled_calls=int(r["settled_calls"]),
                    settled_input=int(r["settled_input"]),
                    settled_output=int(r["settled_output"]),
                    unpriced_calls=int(r["unpriced_calls"]),
                )
                for r in conn.execute(sql, params)
            ]

        raw = await self._run(select)
        # Pricing may read the price file (first call): its own thread, not the store's.
        return await asyncio.to_thread(_price, raw, keys, self._pricer)

    async def turns(self, *, agents: Sequence[str], since: datetime, until: datetime) -> list[Turn]:
        names = list(dict.fromkeys(agents))
        sql = f"""
            SELECT {_COLUMNS} FROM spans
            WHERE agent IN ({", ".join("?" for _ in names)})
              AND start_ns >= ? AND start_ns < ?
              AND (operation = '{TURN_OPERATION}' OR {_MODEL_CALL})
        """
        params = (*names, _to_ns(since), _to_ns(until))

        def select(conn: sqlite3.Connection) -> list[Span]:
            return [_span_of(r) for r in conn.execute(sql, params)]

        spans = await self._run(select)
        return await asyncio.to_thread(_turns, spans, self._pricer)

    async def prune(self, *, older_than: timedelta, now: datetime | None = None) -> int:
        cutoff = _to_ns((now or datetime.now(UTC)) - older_than)

        def delete(conn: sqlite3.Connection) -> int:
            with conn:
                expired = conn.execute(
                    "SELECT DISTINCT o.trace_id FROM spans o WHERE o.start_ns < ? AND NOT EXISTS"
                    " (SELECT 1 FROM spans n WHERE n.trace_id = o.trace_id AND n.end_ns >= ?)",
                    (cutoff, cutoff),
                ).fetchall()
                cursor = conn.executemany(
                    "DELETE FROM spans WHERE trace_id = ?", [(r[0],) for r in expired]
                )
                return max(cursor.rowcount, 0)

        dropped = await self._run(delete)
        if dropped:
            logger.info("trace retention: dropped %d spans older than %s", dropped, older_than)
        return dropped


# ---------------------------------------------------------------- retention


async def retention_loop(
    store: TraceStore,
    *,
    older_than: timedelta,
    every: timedelta = timedelta(hours=1),
    stop: asyncio.Event,
) -> None:
    """Prune ``store`` now and then every ``every``, until ``stop`` is set."""
    while not stop.is_set():
        try:
            await store.prune(older_than=older_than)
        except Exception:  # top of a background task: log, keep going
            logger.exception("trace retention failed")
        await wait_event(stop, every.total_seconds())
