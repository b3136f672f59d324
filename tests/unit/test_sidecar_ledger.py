"""The sidecar's own cost ledger (``sidecar/ledger.py``): entries opened per message with
the smallest budget, charged, closed, and bounded; the caller's budget read from each
binding; the cost an answer carries read as it is relayed."""

from __future__ import annotations

import json

import pytest
from a2a.types.a2a_pb2 import (
    Artifact,
    Message,
    Part,
    SendMessageRequest,
    SendMessageResponse,
    StreamResponse,
    Task,
    TaskArtifactUpdateEvent,
)
from google.protobuf.struct_pb2 import Struct
from multidict import CIMultiDict

from sidecar.errors import PolicyError
from sidecar.ledger import (
    BudgetLedger,
    CostTap,
    UsageTap,
    caller_budget_grpc,
    caller_budget_http,
    grpc_answer_cost,
    open_for_engine,
)
from specmesh.budget import BUDGET_TOTAL_HEADER, LEDGER_HEADER


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_takes_the_smaller_budget_and_is_charged_down_to_nothing_left() -> None:
    spec: list[float | None] = [0.5]
    ledger = BudgetLedger(spec_budget=lambda: spec[0])

    callers = ledger.open(1.0)
    specs = ledger.open(0.2)
    spec[0] = None
    unbudgeted = ledger.open(None)
    callers.charge(0.3)
    callers.charge(-1.0)  # never a credit
    callers.charge(float("nan"))
    callers.charge(0.3)

    assert callers.budget_usd == 0.5 and specs.budget_usd == 0.2
    assert callers.spent_usd == pytest.approx(0.6)
    assert callers.remaining_usd == 0.0
    assert unbudgeted.budget_usd is None and unbudgeted.remaining_usd is None
    assert len({callers.id, specs.id, unbudgeted.id}) == 3


def test_a_call_names_its_entry_and_a_closed_entry_still_answers_for_its_turn() -> None:
    ledger = BudgetLedger()
    entry = ledger.open(1.0)

    ledger.close(entry)
    found = ledger.entry({LEDGER_HEADER: entry.id}, "a call")

    assert found is entry and entry.closed
    assert not ledger.budget_applies()  # no budgeted entry is open any more
    assert ledger.entry({}, "a call") is None


def test_calls_naming_no_entry_are_refused_while_a_budget_applies() -> None:
    spec: list[float | None] = [None]
    ledger = BudgetLedger(spec_budget=lambda: spec[0])
    assert ledger.entry({}, "a call to model 'm'") is None
    spec[0] = 1.0  # the spec sets a budget per request: every call must name its entry

    with pytest.raises(PolicyError) as info:
        ledger.entry({LEDGER_HEADER: "forged"}, "a call to model 'm'")

    assert info.value.reason == "BUDGET_EXCEEDED"
    assert info.value.message.startswith("budget exceeded: a call to model 'm' is refused")
    assert LEDGER_HEADER in info.value.message


def test_open_entries_are_bounded_closed_ones_leave_oldest_first_and_all_expire() -> None:
    clock = _Clock()
    ledger = BudgetLedger(max_open=2, max_closed=1, ttl_seconds=60, clock=clock)
    first, second = ledger.open(1.0), ledger.open(None)
    with pytest.raises(PolicyError) as full:
        ledger.open(None)

    ledger.close(first)
    third = ledger.open(None)  # room again
    ledger.close(second)  # max_closed=1: the older closed entry (first) leaves
    kept = ledger.entry({LEDGER_HEADER: second.id}, "a call")
    gone = ledger.entry({LEDGER_HEADER: first.id}, "a call")
    clock.now += 61  # past the TTL: every entry leaves, open or not
    after = len(ledger)

    assert full.value.reason == "OVERFLOW"
    assert kept is second and gone is None
    assert third.id not in {first.id, second.id}
    assert after == 0 and not ledger.budget_applies()


def _jsonrpc(metadata: dict[str, object] | None) -> bytes:
    message: dict[str, object] = {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "hi"}]}
    if metadata is not None:
        message["metadata"] = metadata
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message}}
    return json.dumps(rpc).encode()


def test_the_callers_budget_is_read_from_every_http_binding_and_the_smaller_wins() -> None:
    budget = {"specmesh.budgetUsd": 0.5}
    rest = json.dumps({"message": "hi", "budgetUsd": 0.25}).encode()
    http_json = json.dumps({"message": {"messageId": "m", "metadata": budget}}).encode()

    assert caller_budget_http("POST", "/", _jsonrpc(budget), {}) == (True, 0.5)
    assert caller_budget_http("POST", "/", _jsonrpc(None), {}) == (True, None)
    assert caller_budget_http("POST", "/v1/message:send", http_json, {}) == (True, 0.5)
    assert caller_budget_http("POST", "/v1/invoke", rest, {}) == (True, 0.25)
    # the calling agent's sidecar sends what its ledger had left: the smaller wins
    sidecar = {BUDGET_TOTAL_HEADER: "0.125"}
    assert caller_budget_http("POST", "/", _jsonrpc(budget), sidecar) == (True, 0.125)
    get_task = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {}})
    assert caller_budget_http("POST", "/", get_task.encode(), {}) == (False, None)
    assert caller_budget_http("GET", "/.well-known/agent-card.json", None, {}) == (False, None)


def test_a_budget_that_is_no_number_is_refused_naming_where_it_is() -> None:
    with pytest.raises(PolicyError) as metadata:
        caller_budget_http("POST", "/", _jsonrpc({"specmesh.budgetUsd": "lots"}), {})
    with pytest.raises(PolicyError) as header:
        caller_budget_http("POST", "/", _jsonrpc(None), {BUDGET_TOTAL_HEADER: "-1"})

    assert metadata.value.reason == "INVALID_TARGET"
    assert "message metadata specmesh.budgetUsd" in metadata.value.message
    assert f"header {BUDGET_TOTAL_HEADER}" in header.value.message


def test_the_callers_budget_is_read_from_a_grpc_message() -> None:
    metadata = Struct()
    metadata.update({"specmesh.budgetUsd": 0.75})
    request = SendMessageRequest(message=Message(message_id="m", metadata=metadata))

    found = caller_budget_grpc("SendMessage", request.SerializeToString(), {})
    capped = caller_budget_grpc(
        "SendStreamingMessage", request.SerializeToString(), {BUDGET_TOTAL_HEADER: "0.5"}
    )

    assert found == (True, 0.75) and capped == (True, 0.5)
    assert caller_budget_grpc("GetTask", b"", {}) == (False, None)


def test_the_engine_gets_the_sidecars_entry_never_the_callers() -> None:
    ledger = BudgetLedger()
    headers: CIMultiDict[str] = CIMultiDict(
        {LEDGER_HEADER: "callers-own", BUDGET_TOTAL_HEADER: "9", "traceparent": "t"}
    )
    metadata: list[tuple[str, str | bytes]] = [(LEDGER_HEADER, "callers-own"), ("k", "v")]

    entry = open_for_engine(ledger, (True, 1.0), headers)
    grpc_entry = open_for_engine(ledger, (True, None), metadata)
    none = open_for_engine(ledger, (False, None), CIMultiDict({LEDGER_HEADER: "x"}))

    assert entry is not None and grpc_entry is not None and none is None
    assert headers.getall(LEDGER_HEADER) == [entry.id]
    assert BUDGET_TOTAL_HEADER not in headers and headers["traceparent"] == "t"
    assert metadata == [("k", "v"), (LEDGER_HEADER, grpc_entry.id)]


def test_a_streamed_model_answer_is_read_for_its_last_usage() -> None:
    tap = UsageTap("text/event-stream; charset=utf-8")
    tap.feed(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n')
    tap.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion')
    tap.feed(b'_tokens": 3, "total_tokens": 15}}\n\ndata: [DONE]\n\n')
    silent = UsageTap("application/json")
    silent.feed(b'{"choices": []}')

    assert tap.usage() == (12, 3)
    assert silent.usage() is None


def test_a_partner_answer_is_charged_its_chains_total_in_any_binding() -> None:
    answer = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "task": {
                "artifacts": [{"metadata": {"cost": {"totalUsd": 0.25, "ownUsd": 0.05}}}],
                "status": {"state": "TASK_STATE_COMPLETED"},
            }
        },
    }
    tap = CostTap("application/json")
    tap.feed(json.dumps(answer).encode())
    stream = CostTap("text/event-stream")
    stream.feed(b'data: {"result": {"statusUpdate": {}}}\n\n')
    stream.feed(b'data: {"result": {"artifactUpdate": {"artifact": {"metadata": ')
    stream.feed(b'{"cost": {"totalUsd": 0.5}}}}}}\n\n')
    metadata = Struct()
    metadata.update({"cost": {"totalUsd": 0.125}})
    task = Task(id="t", artifacts=[Artifact(artifact_id="a", parts=[Part(text="x")])])
    task.artifacts[0].metadata.CopyFrom(metadata)
    unary = SendMessageResponse(task=task).SerializeToString()
    event = StreamResponse(
        artifact_update=TaskArtifactUpdateEvent(task_id="t", artifact=task.artifacts[0])
    ).SerializeToString()

    assert tap.total_usd() == 0.25
    assert stream.total_usd() == 0.5
    assert grpc_answer_cost("SendMessage", unary) == 0.125
    assert grpc_answer_cost("SendStreamingMessage", event) == 0.125
    assert grpc_answer_cost("SendMessage", b"\xff\xff") == 0.0
