"""The sidecar keeps the budget, not the engine: an engine that lies about what is left (an
inflated ``X-Specmesh-Budget-Remaining-Usd``, or none at all) is refused once the sidecar's
own ledger is spent.

The real inbound and egress share one :class:`~sidecar.ledger.BudgetLedger`; the model is
the scripted model server (real HTTP, its recorded token counts); the engine is a test-only
stand-in that holds the inbound request open (so its ledger entry stays open) while the
test, playing a lying engine, sends model calls straight to the egress.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from localfleet.modelserver import RecordedRequest, ScriptedModelServer
from sidecar.credentials import CredentialResolver
from sidecar.egress import EgressProxy
from sidecar.inbound import InboundServer, InMemoryPartnerGraph
from sidecar.ledger import BudgetLedger
from sidecar.state import SnapshotHolder
from specmesh.budget import BUDGET_HEADER, BUDGET_TOTAL_HEADER, LEDGER_HEADER
from specmesh.vault import VaultClient
from tests.integration.test_sidecar_egress import _snapshot

pytestmark = pytest.mark.integration

AGENT = "ledger-agent"
PRICE = 100_000.0  # USD per 1M tokens, in and out: $0.10 a token
BUDGET = 5.0
WAIT = 20.0


@dataclass
class LyingEngine:
    """Stands in for the engine behind the inbound: records each request's headers and
    answers only once :attr:`release` is set."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})


@dataclass
class Rig:
    engine: LyingEngine
    inbound: InboundServer
    egress: EgressProxy
    ledger: BudgetLedger
    model: ScriptedModelServer
    client: aiohttp.ClientSession


@pytest.fixture
async def rig(vault: VaultClient) -> AsyncIterator[Rig]:
    engine = LyingEngine()
    app = web.Application()
    app.router.add_route("*", "/{rest:.*}", engine.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    engine_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with ScriptedModelServer() as model:
        spec = {
            "base": {"description": "ledger test", "promptKey": "p"},
            "model": {
                "model": "scripted",
                "baseUrl": model.url,
                "price": {"inputPerMillion": PRICE, "outputPerMillion": PRICE},
            },
        }
        holder = SnapshotHolder()
        await holder.set(_snapshot(AGENT, spec, {}), etcd_revision=1)
        ledger = BudgetLedger()
        async with (
            CredentialResolver(source=vault) as resolver,
            EgressProxy(
                snapshots=holder,
                credentials=resolver,
                registry=CollectorRegistry(),
                ledger=ledger,
            ) as egress,
            InboundServer(
                agent_name=AGENT,
                engine_http=engine_url,
                graph=InMemoryPartnerGraph(),
                certificates=None,
                ledger=ledger,
            ) as inbound,
            aiohttp.ClientSession() as client,
        ):
            try:
                yield Rig(engine, inbound, egress, ledger, model, client)
            finally:
                engine.release.set()
    await runner.cleanup()


def _send_message(budget: float) -> dict[str, object]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {
            "message": {
                "messageId": uuid.uuid4().hex,
                "role": "ROLE_USER",
                "parts": [{"text": "spend"}],
                "metadata": {"specmesh.budgetUsd": budget},
            }
        },
    }


async def _model_call(rig: Rig, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with rig.client.post(
        f"{rig.egress.url}/llm/v1/chat/completions", json=body, headers=headers
    ) as r:
        return r.status, await r.json()


def _cost(record: RecordedRequest) -> float:
    assert record.usage is not None
    tokens = record.usage["prompt_tokens"] + record.usage["completion_tokens"]
    return tokens * PRICE / 1_000_000


async def test_an_engine_that_lies_about_its_budget_is_refused_once_the_ledger_is_spent(
    rig: Rig,
) -> None:
    # a caller sends a message with a $5 budget; the inbound hands it to the engine
    turn = asyncio.create_task(
        rig.client.post(rig.inbound.url, json=_send_message(BUDGET), headers={LEDGER_HEADER: "x"})
    )
    async with asyncio.timeout(WAIT):
        await rig.engine.arrived.wait()
    (seen,) = rig.engine.headers
    entry_id = seen[LEDGER_HEADER]
    # the lying engine: every call claims a million dollars are left
    lie = {LEDGER_HEADER: entry_id, BUDGET_HEADER: "1000000", BUDGET_TOTAL_HEADER: "1000000"}

    answers = []
    for _ in range(10):  # the ledger runs out well before: each call costs ~$1
        answers.append(await _model_call(rig, lie))
        if answers[-1][0] != 200:
            break
    no_header = await _model_call(rig, {LEDGER_HEADER: entry_id})
    no_entry = await _model_call(rig, {BUDGET_HEADER: "1000000"})
    rig.engine.release.set()
    async with asyncio.timeout(WAIT):
        response = await turn
        response.release()
    after_close = await _model_call(rig, lie)

    records = [r for r in rig.model.requests() if r.endpoint == "chat.completions"]
    spent = sum(_cost(r) for r in records)
    status, refusal = answers[-1]
    assert entry_id != "x"  # the sidecar's own entry, not what the caller sent
    assert 1 < len(answers) < 10 and status == 402
    assert refusal["error"]["details"][0]["reason"] == "BUDGET_EXCEEDED"  # type: ignore[index]
    assert "the request's budget is $5" in refusal["error"]["message"]  # type: ignore[index]
    assert len(records) == len(answers) - 1  # the refused call never reached the model
    assert spent <= BUDGET
    assert [no_header[0], no_entry[0], after_close[0]] == [402, 402, 402]
    assert "names no cost ledger entry" in no_entry[1]["error"]["message"]  # type: ignore[index]
    # neither the ledger id nor any budget figure reaches the model provider
    assert not any(
        h in r.headers for r in records for h in (LEDGER_HEADER, BUDGET_HEADER, BUDGET_TOTAL_HEADER)
    )


async def test_a_model_call_is_charged_what_the_model_server_counted(rig: Rig) -> None:
    entry = rig.ledger.open(BUDGET)

    status, _ = await _model_call(rig, {LEDGER_HEADER: entry.id})
    streamed_body = {
        "model": "scripted",
        "messages": [{"role": "user", "content": "stream it"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with rig.client.post(
        f"{rig.egress.url}/llm/v1/chat/completions",
        json=streamed_body,
        headers={LEDGER_HEADER: entry.id},
    ) as r:
        streamed = await r.read()

    records = [r for r in rig.model.requests() if r.endpoint == "chat.completions"]
    assert status == 200 and b"data: [DONE]" in streamed
    assert len(records) == 2
    assert entry.spent_usd == pytest.approx(sum(_cost(r) for r in records), rel=1e-9)
    assert json.loads(streamed.split(b"data: ")[1])["object"] == "chat.completion.chunk"
