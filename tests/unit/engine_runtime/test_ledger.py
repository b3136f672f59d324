"""The turn's cost ledger, and what a partner call sends and books (the partner's HTTP
answer scripted at the httpx boundary)."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

from engine.errors import ToolError
from engine.ledger import BUDGET_HEADER, BUDGET_METADATA, CostLedger, parse_budget
from engine.tools import ToolCallContext
from engine.tools.partners import PartnerTool
from specmesh.budget import LEDGER_HEADER, BudgetValueError


def test_the_smaller_budget_wins_and_what_is_left_never_goes_below_zero() -> None:
    ledger = CostLedger(budget_usd=0.5, spec_budget_usd=0.2)
    ledger.add_model_call("m", 0.15)
    left = ledger.remaining_usd

    ledger.add_partner_answer({"totalUsd": 0.1, "unpriced": ["mystery"]})

    assert ledger.budget_usd == 0.2
    assert left == pytest.approx(0.05)
    assert ledger.remaining_usd == 0.0
    assert ledger.metadata() == {
        "totalUsd": pytest.approx(0.25),
        "ownUsd": 0.15,
        "downstreamUsd": 0.1,
        "unpriced": ["mystery"],
        "budgetUsd": 0.2,
        "remainingUsd": 0.0,
    }
    assert ledger.headers() == {}  # the request named no sidecar ledger entry


def test_an_unpriced_call_is_flagged_not_counted_and_no_budget_sends_no_header() -> None:
    ledger = CostLedger()
    ledger.add_model_call("mystery", 0.0, unpriced=True)
    ledger.add_partner_answer({"totalUsd": "lots"})  # malformed: ignored

    assert ledger.metadata() == {
        "totalUsd": 0.0,
        "ownUsd": 0.0,
        "downstreamUsd": 0.0,
        "unpriced": ["mystery"],
    }
    assert ledger.headers() == {}


@pytest.mark.parametrize("value", ["-1", "nan", "inf", True, "lots", [1]])
def test_a_bad_budget_is_refused_naming_where(value: Any) -> None:
    with pytest.raises(BudgetValueError, match=f"metadata {BUDGET_METADATA}: must be"):
        parse_budget(value, where=f"metadata {BUDGET_METADATA}")


def _partner(handler: Any) -> PartnerTool:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return PartnerTool(caller="a", partner="b", egress_url="http://egress", http=http)


async def test_a_partner_call_sends_what_is_left_and_books_the_cost_its_answer_carried() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        rpc = json.loads(request.content)
        task = {
            "id": "t1",
            "contextId": "c1",
            "status": {"state": "TASK_STATE_COMPLETED"},
            "artifacts": [
                {
                    "artifactId": "answer",
                    "parts": [{"text": "B's answer"}],
                    "metadata": {"cost": {"totalUsd": 0.125, "unpriced": ["x"]}},
                }
            ],
        }
        return httpx.Response(
            200, json={"jsonrpc": "2.0", "id": rpc["id"], "result": {"task": task}}
        )

    ledger = CostLedger(budget_usd=1.0, ledger_id="entry-1")
    ledger.add_model_call("m", 0.25)
    context = ToolCallContext(context_id="ctx", call_depth=0, timeout=5, ledger=ledger)

    text = await _partner(answer).call({"message": "hi"}, context=context)

    (request,) = seen
    sent = json.loads(request.content)["params"]["message"]
    assert text == "B's answer"
    assert request.headers[LEDGER_HEADER] == "entry-1"  # the sidecar's entry, echoed
    assert BUDGET_HEADER not in request.headers  # the engine's own figure stays in it
    assert sent["metadata"] == {BUDGET_METADATA: 0.75}
    assert ledger.downstream_usd == 0.125 and ledger.unpriced == {"x"}


async def test_a_sidecar_refusal_is_a_tool_error_with_the_sidecars_message() -> None:
    refusal = {
        "error": {
            "code": 402,
            "status": "RESOURCE_EXHAUSTED",
            "message": "budget exceeded: the call to agent 'b' is refused: the request's "
            "budget is $1, $0 is left",
            "details": [{"reason": "BUDGET_EXCEEDED"}],
        }
    }
    context = ToolCallContext(
        context_id="ctx", call_depth=0, timeout=5, ledger=CostLedger(budget_usd=1.0)
    )

    with pytest.raises(ToolError) as info:
        await _partner(lambda _: httpx.Response(402, json=refusal)).call(
            {"message": "hi"}, context=context
        )

    assert info.value.reason == (
        "agent 'b' could not answer: budget exceeded: the call to agent 'b' is refused: "
        "the request's budget is $1, $0 is left"
    )


async def test_a_partner_that_failed_is_a_tool_error_and_what_it_spent_is_booked() -> None:
    def failed(request: httpx.Request) -> httpx.Response:
        rpc = json.loads(request.content)
        message = {
            "messageId": "m1",
            "role": "ROLE_AGENT",
            "parts": [{"text": "no answer after 8 model calls (the step limit)"}],
            "metadata": {"code": "step_limit", "cost": {"totalUsd": 0.5}},
        }
        task = {
            "id": "t1",
            "contextId": "c1",
            "status": {"state": "TASK_STATE_FAILED", "message": message},
        }
        return httpx.Response(
            200, json={"jsonrpc": "2.0", "id": rpc["id"], "result": {"task": task}}
        )

    ledger = CostLedger()
    context = ToolCallContext(context_id="ctx", call_depth=0, timeout=5, ledger=ledger)

    with pytest.raises(ToolError, match="agent 'b' failed: no answer after 8 model calls"):
        await _partner(failed).call({"message": "hi"}, context=context)

    assert ledger.downstream_usd == 0.5


@pytest.mark.parametrize("forged", ["1e999", "-1e999", "NaN", "1.7e308"])
async def test_a_partner_forged_cost_leaves_the_callers_answer_serializable(forged: str) -> None:
    """A partner's answer claiming an infinite, NaN or near-overflow cost must not make
    the caller's own ``cost`` metadata unserializable (protobuf Struct refuses inf/NaN)."""

    def answer(request: httpx.Request) -> httpx.Response:
        rpc = json.loads(request.content)
        body = (
            '{"jsonrpc":"2.0","id":' + json.dumps(rpc["id"]) + ',"result":{"task":{"id":"t1",'
            '"contextId":"c1","status":{"state":"TASK_STATE_COMPLETED"},"artifacts":[{'
            '"artifactId":"answer","parts":[{"text":"ok"}],'
            '"metadata":{"cost":{"totalUsd":' + forged + "}}}]}}}"
        )
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    ledger = CostLedger(budget_usd=1.0)
    context = ToolCallContext(context_id="ctx", call_depth=0, timeout=5, ledger=ledger)
    partner = _partner(answer)

    for _ in range(2):  # two answers of 1.7e308 overflow the sum
        assert await partner.call({"message": "hi"}, context=context) == "ok"

    metadata = Struct()
    metadata.update({"cost": ledger.metadata()})
    MessageToDict(metadata)  # raises ValueError on inf/NaN
    assert math.isfinite(ledger.total_usd)
