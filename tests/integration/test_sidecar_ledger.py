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
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from localfleet.modelserver import RecordedRequest, ScriptedModelServer
from sidecar.credentials import CredentialResolver
from sidecar.egress import EgressProxy
from sidecar.inbound import InboundServer, InMemoryPartnerGraph
from sidecar.ledger import BudgetLedger
from sidecar.router import InMemoryInstanceSource, InMemoryReleaseSource, Instance, Router
from sidecar.state import SnapshotHolder
from specmesh.budget import BUDGET_HEADER, BUDGET_TOTAL_HEADER, LEDGER_HEADER
from specmesh.vault import VaultClient
from tests.integration.test_sidecar_egress import _snapshot

pytestmark = pytest.mark.integration

AGENT = "ledger-agent"
PARTNER = "ledger-partner"
PARTNER_COST = 0.75
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
class Partner:
    """Stands in for a partner agent's inbound: answers every message with a task whose
    answer carries ``cost.totalUsd`` :data:`PARTNER_COST`, and records the headers."""

    headers: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        rpc = await request.json()
        artifact = {
            "artifactId": "answer",
            "parts": [{"text": "partner's answer"}],
            "metadata": {"cost": {"totalUsd": PARTNER_COST, "ownUsd": PARTNER_COST}},
        }
        task = {"id": "t", "status": {"state": "TASK_STATE_COMPLETED"}, "artifacts": [artifact]}
        return web.json_response({"jsonrpc": "2.0", "id": rpc["id"], "result": {"task": task}})


async def _serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{rest:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@dataclass
class Rig:
    partner: Partner
    engine: LyingEngine
    inbound: InboundServer
    egress: EgressProxy
    ledger: BudgetLedger
    model: ScriptedModelServer
    client: aiohttp.ClientSession


@pytest.fixture
async def rig(vault: VaultClient) -> AsyncIterator[Rig]:
    engine, partner = LyingEngine(), Partner()
    runner, engine_url = await _serve(engine.handle)
    partner_runner, partner_url = await _serve(partner.handle)
    router = Router(
        instances=InMemoryInstanceSource([Instance("p-1", PARTNER, partner_url, "stable")]),
        releases=InMemoryReleaseSource(),
    )
    async with ScriptedModelServer() as model:
        spec = {
            "base": {"description": "ledger test", "promptKey": "p"},
            "model": {
                "model": "scripted",
                "baseUrl": model.url,
                "price": {"inputPerMillion": PRICE, "outputPerMillion": PRICE},
            },
            "partnerAgents": [{"agentName": PARTNER}],
        }
        holder = SnapshotHolder()
        await holder.set(_snapshot(AGENT, spec, {}), etcd_revision=1)
        ledger = BudgetLedger()
        async with (
            CredentialResolver(source=vault) as resolver,
            EgressProxy(
                snapshots=holder,
                credentials=resolver,
                router=router,
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
                yield Rig(partner, engine, inbound, egress, ledger, model, client)
            finally:
                engine.release.set()
    await runner.cleanup()
    await partner_runner.cleanup()


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
    # a charged call asks for an answer the ledger can read (the engine asked for gzip)
    assert [r.headers.get("accept-encoding") for r in records] == ["identity", "identity"]
    assert json.loads(streamed.split(b"data: ")[1])["object"] == "chat.completion.chunk"


async def test_a_partner_call_is_charged_its_answers_cost_and_gets_what_is_left_as_budget(
    rig: Rig,
) -> None:
    entry = rig.ledger.open(1.0)
    lie = {LEDGER_HEADER: entry.id, BUDGET_HEADER: "1000", BUDGET_TOTAL_HEADER: "1000"}
    message = _send_message(1000.0)  # the engine's own metadata figure: the partner's sidecar
    # takes the smaller of it and the header this sidecar sets

    statuses = []
    for _ in range(3):
        async with rig.client.post(
            f"{rig.egress.url}/a2a/{PARTNER}", json=message, headers=lie
        ) as r:
            statuses.append(r.status)
            last = await r.json()
    card = await rig.client.get(f"{rig.egress.url}/a2a/{PARTNER}/.well-known/agent-card.json")
    card.release()

    assert statuses == [200, 200, 402]  # $0.75 + $0.75 spent of $1: nothing left for a third
    assert last["error"]["details"][0]["reason"] == "BUDGET_EXCEEDED"
    assert entry.spent_usd == pytest.approx(2 * PARTNER_COST)
    # what this sidecar's ledger had left, never the engine's figure; no ledger id leaks
    sent = [h.get(BUDGET_TOTAL_HEADER) for h in rig.partner.headers]
    assert sent == ["1.0", "0.25", None]  # the third: the card (a GET is no message)
    assert not any(LEDGER_HEADER in h or BUDGET_HEADER in h for h in rig.partner.headers)
