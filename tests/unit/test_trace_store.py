"""The trace store: waterfall order, summaries, token usage and cost, retention, threads."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from control_plane.errors import BadRequestError
from control_plane.traces import (
    InMemoryTraceStore,
    Span,
    SpanEvent,
    SqliteTraceStore,
    TraceStore,
)
from specmesh.prices import default_price_map

NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
T0 = int(NOW.timestamp() * 1e9)
MS = 1_000_000
TRACE = "0af7651916cd43dd8448eb211c80319c"
OTHER = "4bf92f3577b34da6a3ce929d0e0e4736"


def _zero_pricer(model: str, tokens_in: int, tokens_out: int) -> float:
    return 0.0


def span(
    span_id: str,
    parent: str | None,
    name: str,
    start_ms: int,
    end_ms: int,
    *,
    trace_id: str = TRACE,
    agent: str = "planner",
    status: str = "UNSET",
    **attributes: Any,
) -> Span:
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind="INTERNAL",
        start_ns=T0 + start_ms * MS,
        end_ns=T0 + end_ms * MS,
        status=status,
        service_name="specmesh-engine",
        agent=agent,
        attributes={k.replace("__", "."): v for k, v in attributes.items()},
    )


def chat(span_id: str, parent: str, start_ms: int, tokens: tuple[int, int], **kw: Any) -> Span:
    model = kw.pop("model", "gpt-4o-mini")
    return span(
        span_id,
        parent,
        f"chat {model}",
        start_ms,
        start_ms + 10,
        gen_ai__operation__name="chat",
        gen_ai__request__model=model,
        gen_ai__usage__input_tokens=tokens[0],
        gen_ai__usage__output_tokens=tokens[1],
        **kw,
    )


def two_agent_trace() -> list[Span]:
    """planner -> chat, execute_tool (-> weather: invoke_agent -> chat), chat."""
    return [
        span(
            "a000000000000001",
            None,
            "invoke_agent planner",
            0,
            100,
            gen_ai__operation__name="invoke_agent",
            gen_ai__conversation__id="ctx-1",
            gen_ai__usage__input_tokens=300,  # the turn's total: must not be counted again
            gen_ai__usage__output_tokens=60,
        ),
        chat("a000000000000002", "a000000000000001", 1, (100, 20)),
        span(
            "a000000000000003",
            "a000000000000001",
            "execute_tool weather",
            20,
            60,
            gen_ai__operation__name="execute_tool",
        ),
        span(
            "b000000000000001",
            "a000000000000003",
            "invoke_agent weather",
            25,
            55,
            agent="weather",
            gen_ai__operation__name="invoke_agent",
        ),
        chat("b000000000000002", "b000000000000001", 30, (50, 10), agent="weather"),
        chat("a000000000000004", "a000000000000001", 70, (200, 40)),
    ]


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TraceStore]:
    if request.param == "memory":
        s: TraceStore = InMemoryTraceStore(pricer=_zero_pricer)
    else:
        s = SqliteTraceStore(path=tmp_path / "traces.db", pricer=_zero_pricer)
    async with s:
        yield s


async def test_get_trace_is_ordered_by_start_with_parent_links(store: TraceStore) -> None:
    spans = two_agent_trace()
    await store.add_spans(list(reversed(spans)))

    got = await store.get_trace(TRACE)

    assert [s.name for s in got] == [
        "invoke_agent planner",
        "chat gpt-4o-mini",
        "execute_tool weather",
        "invoke_agent weather",
        "chat gpt-4o-mini",
        "chat gpt-4o-mini",
    ]
    parents = {s.span_id: s.parent_span_id for s in got}
    assert parents["b000000000000001"] == "a000000000000003"
    assert parents["a000000000000001"] is None
    assert got == sorted(spans, key=lambda s: s.start_ns)  # every field round-trips
    assert await store.get_trace(OTHER) == []


async def test_a_span_sent_twice_is_kept_once(store: TraceStore) -> None:
    spans = two_agent_trace()
    await store.add_spans(spans)
    await store.add_spans(spans[:2])

    assert len(await store.get_trace(TRACE)) == len(spans)


async def test_events_and_nested_attributes_round_trip(store: TraceStore) -> None:
    s = Span(
        trace_id=TRACE,
        span_id="c000000000000001",
        parent_span_id=None,
        name="chat m",
        kind="CLIENT",
        start_ns=T0,
        end_ns=T0 + MS,
        status="ERROR",
        status_message="boom",
        attributes={"list": [1, "x", True], "map": {"k": 1.5}},
        events=(SpanEvent("exception", T0 + 5, {"exception.type": "ValueError"}),),
        resource={"service.name": "svc", "specmesh.agent.name": "a"},
    )
    await store.add_spans([s])

    assert await store.get_trace(TRACE) == [s]


async def test_list_traces_summarises_without_counting_turn_totals_twice(
    store: TraceStore,
) -> None:
    await store.add_spans(two_agent_trace())
    await store.add_spans(
        [span("d000000000000001", None, "invoke_agent other", 500, 510, trace_id=OTHER,
              agent="other", status="ERROR")]
    )  # fmt: skip

    newest, first = await store.list_traces()

    assert newest.trace_id == OTHER and newest.error and newest.total_tokens == 0
    assert first.trace_id == TRACE
    assert first.root_name == "invoke_agent planner"
    assert first.agents == ("planner", "weather")
    assert (first.start_ns, first.duration_ns) == (T0, 100 * MS)
    assert first.span_count == 6
    assert not first.error
    assert (first.input_tokens, first.output_tokens) == (350, 70)
    assert first.to_json()["startTimeUnixNano"] == str(T0)  # beyond JSON's safe integers


async def test_list_traces_filters(store: TraceStore) -> None:
    await store.add_spans(two_agent_trace())
    await store.add_spans(
        [span("d000000000000001", None, "x", 500, 510, trace_id=OTHER, agent="other")]
    )

    by_agent = await store.list_traces(agent="weather")
    by_context = await store.list_traces(context_id="ctx-1")
    since = await store.list_traces(since=NOW + timedelta(milliseconds=1))
    limited = await store.list_traces(limit=1)

    assert [t.trace_id for t in by_agent] == [TRACE]
    assert [t.trace_id for t in by_context] == [TRACE]
    assert [t.trace_id for t in since] == [OTHER]  # TRACE started before, though spans follow
    assert [t.trace_id for t in limited] == [OTHER]
    assert await store.list_traces(agent="nobody") == []
    with pytest.raises(BadRequestError, match="limit"):
        await store.list_traces(limit=0)


async def test_root_is_the_span_whose_parent_is_not_in_the_trace(store: TraceStore) -> None:
    # The caller's span (outside specmesh) never reaches the store.
    await store.add_spans(
        [
            span("e000000000000002", "e000000000000001", "chat m", 5, 6),
            span("e000000000000001", "ffffffffffffffff", "invoke_agent planner", 1, 9),
        ]
    )

    (summary,) = await store.list_traces()

    assert summary.root_name == "invoke_agent planner"


async def test_token_usage_per_agent_model_and_day(store: TraceStore) -> None:
    spans = two_agent_trace()
    yesterday = chat("a000000000000009", "a000000000000001", -24 * 3600 * 1000, (7, 3))
    other_model = chat("a00000000000000a", "a000000000000001", 80, (1, 1), model="scripted")
    await store.add_spans([*spans, yesterday, other_model])

    rows = [r.to_json() for r in await store.token_usage()]

    assert rows == [
        {"agent": "planner", "model": "gpt-4o-mini", "day": "2026-03-13", "calls": 1,
         "inputTokens": 7, "outputTokens": 3, "totalTokens": 10, "costUsd": 0.0,
         "unpricedCalls": 0},
        {"agent": "planner", "model": "gpt-4o-mini", "day": "2026-03-14", "calls": 2,
         "inputTokens": 300, "outputTokens": 60, "totalTokens": 360, "costUsd": 0.0,
         "unpricedCalls": 0},
        {"agent": "planner", "model": "scripted", "day": "2026-03-14", "calls": 1,
         "inputTokens": 1, "outputTokens": 1, "totalTokens": 2, "costUsd": 0.0,
         "unpricedCalls": 0},
        {"agent": "weather", "model": "gpt-4o-mini", "day": "2026-03-14", "calls": 1,
         "inputTokens": 50, "outputTokens": 10, "totalTokens": 60, "costUsd": 0.0,
         "unpricedCalls": 0},
    ]  # fmt: skip
    by_agent = await store.token_usage(group_by=["agent"], since=NOW)
    assert [(r.group, r.input_tokens, r.calls) for r in by_agent] == [
        ({"agent": "planner"}, 301, 3),
        ({"agent": "weather"}, 50, 1),
    ]
    (total,) = await store.token_usage(group_by=())
    assert (total.group, total.input_tokens, total.output_tokens) == ({}, 358, 74)


async def test_token_usage_rejects_an_unknown_group(store: TraceStore) -> None:
    with pytest.raises(BadRequestError, match=r"groupBy: must be among agent, model, day"):
        await store.token_usage(group_by=("tenant",))


async def test_cost_comes_from_litellms_price_map_and_is_zero_for_unknown_models() -> None:
    import litellm

    expected = sum(litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=350,
                                          completion_tokens=70))  # fmt: skip
    async with SqliteTraceStore() as store:  # the default pricer: specmesh.prices, as the engine
        await store.add_spans(
            [*two_agent_trace(),
             chat("a00000000000000a", "a000000000000001", 80, (1000, 1000), model="scripted")]
        )  # fmt: skip
        rows = {r.group["model"]: r for r in await store.token_usage(group_by=["model"])}

    assert expected > 0
    assert rows["gpt-4o-mini"].cost_usd == pytest.approx(expected)
    assert rows["gpt-4o-mini"].cost_usd == pytest.approx(
        default_price_map().cost("gpt-4o-mini", prompt_tokens=350, completion_tokens=70)
    )
    assert rows["scripted"].cost_usd == 0.0
    assert rows["scripted"].unpriced_calls == 1  # priced nowhere: flagged, not free
    assert rows["gpt-4o-mini"].unpriced_calls == 0


async def test_a_cost_the_engine_recorded_wins_and_unpriced_calls_are_flagged(
    store: TraceStore,
) -> None:
    # the engine priced these calls at the spec's prices; "mystery" is priced nowhere
    await store.add_spans(
        [span("b000000000000001", None, "invoke_agent planner", 0, 100,
              gen_ai__operation__name="invoke_agent", specmesh__cost__total_usd=0.75),
         chat("b000000000000002", "b000000000000001", 1, (100, 20), specmesh__cost__usd=0.25),
         chat("b000000000000003", "b000000000000001", 30, (10, 2), specmesh__cost__usd=0.5),
         chat("b000000000000004", "b000000000000001", 60, (5, 5), model="mystery",
              specmesh__cost__unpriced=True)]
    )  # fmt: skip

    rows = {r.group["model"]: r for r in await store.token_usage(group_by=["model"])}
    (summary,) = await store.list_traces()

    # the zero pricer would say 0: the recorded costs win
    assert rows["gpt-4o-mini"].cost_usd == pytest.approx(0.75)
    assert (rows["mystery"].cost_usd, rows["mystery"].unpriced_calls) == (0.0, 1)
    assert summary.cost_usd == pytest.approx(0.75)
    assert summary.unpriced_models == ("mystery",)
    assert summary.to_json()["unpricedModels"] == ["mystery"]


async def test_prune_drops_whole_traces_that_ended_before_the_cutoff(store: TraceStore) -> None:
    await store.add_spans(two_agent_trace())  # ends 100 ms after NOW
    ten_days_ago = -10 * 86_400_000
    await store.add_spans(
        [span("d000000000000001", None, "long root", ten_days_ago, 10_000, trace_id=OTHER),
         span("d000000000000002", "d000000000000001", "old child", ten_days_ago, ten_days_ago + 1,
              trace_id=OTHER)]
    )  # fmt: skip
    week = timedelta(days=7)

    dropped = await store.prune(older_than=week, now=NOW + week + timedelta(seconds=1))

    assert dropped == 6
    assert await store.get_trace(TRACE) == []
    assert len(await store.get_trace(OTHER)) == 2  # its old child stays with its live root
    assert await store.prune(older_than=week, now=NOW + week + timedelta(seconds=11)) == 2
    assert await store.list_traces() == []


class _RecordingConnection(sqlite3.Connection):
    """Records the thread every SQL statement runs on."""

    threads: set[int] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_trace_callback(lambda _sql: self.threads.add(threading.get_ident()))


async def test_sqlite_never_runs_on_the_event_loop_thread(tmp_path: Path) -> None:
    _RecordingConnection.threads = set()
    async with SqliteTraceStore(
        path=tmp_path / "t.db", pricer=_zero_pricer, connection_factory=_RecordingConnection
    ) as store:
        await asyncio.gather(
            store.add_spans(two_agent_trace()),
            store.get_trace(TRACE),
            store.list_traces(agent="weather"),
            store.token_usage(),
            store.prune(older_than=timedelta(days=1)),
        )

    assert _RecordingConnection.threads  # the callback did see statements
    assert threading.get_ident() not in _RecordingConnection.threads


async def test_sqlite_file_is_wal_and_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "traces.db"
    async with SqliteTraceStore(path=path, pricer=_zero_pricer) as store:
        await store.add_spans(two_agent_trace())

    async with SqliteTraceStore(path=path, pricer=_zero_pricer) as reopened:
        assert len(await reopened.get_trace(TRACE)) == 6
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_closed_sqlite_store_refuses_work() -> None:
    store = SqliteTraceStore(pricer=_zero_pricer)
    await store.close()

    with pytest.raises(RuntimeError, match="closed"):
        await store.get_trace(TRACE)
