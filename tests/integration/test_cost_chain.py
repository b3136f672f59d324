"""The cost ledger along a chain of three real agents (A -> B -> C), each an engine and a
sidecar process run by the supervisor (mTLS between the sidecars, real etcd and OpenBao),
every model call answered by the scripted model server, which records the token counts it
answered.

* A's answer carries the chain's total: the sum over the three agents' model calls of
  (prompt tokens x input price + completion tokens x output price), at each spec's prices.
* A budget smaller than C's cost: C's sidecar refuses C's model call (its worst case passes
  what is left), B's call to C fails with the budget error -- which B's model sees as the
  tool's result -- and A still answers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from a2a.client import ClientConfig
from a2a.client.base_client import BaseClient
from a2a.client.client_factory import minimal_agent_card
from a2a.client.transports.jsonrpc import JsonRpcTransport
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, StreamResponse, TaskState
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER, TransportProtocol
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

from localfleet.installer import LocalServices
from localfleet.modelserver import RecordedRequest, ScriptedModelServer
from sidecar.mtls import setup_pki
from specmesh.budget import BUDGET_HEADER
from specmesh.spec.models import AgentSpec
from specmesh.spec_apply import SpecService
from specmesh.store import SpecStore
from specmesh.supervisor import Supervisor, SupervisorConfig
from specmesh.vault import VaultClient
from specmesh.workloads import AgentWorkload
from tests.polling import eventually

from ..conftest import publish_prompt, supervisor_token

pytestmark = pytest.mark.integration

PRICES = {  # USD per 1M tokens: (input, output)
    "model-a": (1.0, 2.0),
    "model-b": (3.0, 4.0),
    "model-c": (5.0, 1_000_000.0),  # $1 per output token: C is the costly one
}
C_MAX_TOKENS = 64
"""C's worst case is at least $64 (64 output tokens at $1): more than any budget here."""

SCRIPT = {
    "rules": [
        {
            "match": {"model": "model-a", "lastMessageIsTool": False},
            "reply": {
                "type": "toolCalls",
                "toolCalls": [{"name": "ask_cost-b", "arguments": {"message": "part b"}}],
            },
        },
        {
            "match": {"model": "model-a", "lastMessageIsTool": True},
            "reply": {"type": "text", "text": "A done: {{last_tool_result}}"},
        },
        {
            "match": {"model": "model-b", "lastMessageIsTool": False},
            "reply": {
                "type": "toolCalls",
                "toolCalls": [{"name": "ask_cost-c", "arguments": {"message": "part c"}}],
            },
        },
        {
            "match": {"model": "model-b", "lastMessageIsTool": True},
            "reply": {"type": "text", "text": "B done: {{last_tool_result}}"},
        },
        {"match": {"model": "model-c"}, "reply": {"type": "text", "text": "C answer"}},
    ],
}


def _spec(name: str, model: str, partner: str | None, **base: Any) -> AgentSpec:
    price_in, price_out = PRICES[model]
    model_part: dict[str, Any] = {
        "model": model,
        "price": {"inputPerMillion": price_in, "outputPerMillion": price_out},
    }
    if model == "model-c":
        model_part["maxTokens"] = C_MAX_TOKENS
    return AgentSpec.model_validate(
        {
            "base": {"description": f"agent {name}", "promptKey": "p", **base},
            "model": model_part,
            "partnerAgents": [{"agentName": partner}] if partner else [],
        }
    )


def _cost(record: RecordedRequest) -> float:
    assert record.model is not None and record.usage is not None
    price_in, price_out = PRICES[record.model]
    return (
        record.usage["prompt_tokens"] * price_in + record.usage["completion_tokens"] * price_out
    ) / 1_000_000


class Chain:
    """The three agents, running; :meth:`ask` sends A a message through its public entry."""

    def __init__(self, *, entry: str, key: ec.EllipticCurvePrivateKey, model: ScriptedModelServer):
        self.entry = entry
        self.key = key
        self.model = model

    async def ask(self, text: str, *, budget: float | None = None) -> tuple[TaskState, str, Any]:
        """(final state, answer text, the answer's ``cost`` metadata)."""
        now = int(time.time())
        claims = {"iss": "https://idp.test", "sub": "alice", "aud": "cost-a", "exp": now + 300}
        bearer = jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "k"})
        metadata = Struct()
        if budget is not None:
            metadata.update({"specmesh.budgetUsd": budget})
        request = SendMessageRequest(
            message=Message(
                role=Role.ROLE_USER,
                message_id=str(uuid.uuid4()),
                parts=[Part(text=text)],
                metadata=metadata,
            )
        )
        headers = {"Authorization": f"Bearer {bearer}", VERSION_HEADER: PROTOCOL_VERSION_CURRENT}
        async with httpx.AsyncClient(headers=headers, timeout=90) as http:
            card = minimal_agent_card(self.entry, [TransportProtocol.JSONRPC])
            client = BaseClient(
                card,
                ClientConfig(streaming=False, httpx_client=http),
                JsonRpcTransport(http, card, self.entry, is_shared_httpx=True),
                [],
            )
            last: StreamResponse | None = None
            async for event in client.send_message(request):
                last = event
        assert last is not None and last.HasField("task"), last
        task = last.task
        (artifact,) = task.artifacts
        text = "".join(p.text for p in artifact.parts)
        return task.status.state, text, MessageToDict(artifact.metadata).get("cost")


@pytest.fixture
async def chain(
    tmp_path: Path, services: LocalServices, vault: VaultClient, store: SpecStore
) -> AsyncIterator[Chain]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k"}
    issuers = [{"issuer": "https://idp.test", "jwks": {"keys": [jwk]}, "audiences": ["{agent}"]}]
    await setup_pki(address=services.bao.address, token=services.bao.root_token)
    await publish_prompt(store)
    specs = SpecService(store=store, vault=vault, pki_mount="specmesh-pki")
    agents = {
        "cost-a": _spec(
            "a", "model-a", "cost-b", callers={"principals": ["https://idp.test/alice"]}
        ),
        "cost-b": _spec("b", "model-b", "cost-c"),
        "cost-c": _spec("c", "model-c", None),
    }
    for name, spec in agents.items():
        await store.apply_agent(name, spec, actor="t")
        await specs.write_identity(name)
    async with ScriptedModelServer(script=SCRIPT) as model:
        config = SupervisorConfig(
            home=tmp_path / "home",
            etcd_endpoint=f"http://{services.etcd.host}:{services.etcd.client_port}",
            etcd_prefix=store.keys.prefix,
            vault_addr=services.bao.address,
            vault_token=await supervisor_token(vault),
            mtls=True,
            llm_override_url=model.url,
            jwt_issuers=json.dumps(issuers),
        )
        sup = Supervisor(config)
        await sup.start()
        try:
            for name in agents:
                await sup.apply(AgentWorkload(agent=name, revision=1, replicas={"stable": 1}))

            async def serving() -> bool:
                for name in agents:
                    got = await store.etcd.range(store.keys.registry(name), prefix=True)
                    states = [json.loads(kv.value)["state"] for kv in got.kvs]
                    if "serving" not in states:
                        return False
                return True

            await eventually(serving, what="all three agents serving", timeout=90.0)
            entry = f"http://127.0.0.1:{sup.instances['cost-a-stable-0'].ports['entry']}"
            async with httpx.AsyncClient() as http:

                async def a_ready() -> bool:
                    try:
                        r = await http.get(entry + "/.well-known/agent-card.json", timeout=5)
                    except httpx.HTTPError:
                        return False
                    return r.status_code == 200

                await eventually(a_ready, what="A's entry to serve its card", timeout=60.0)
            yield Chain(entry=entry, key=key, model=model)
        finally:
            await sup.stop(stop_instances=True)


async def test_the_first_agent_answers_with_the_whole_chains_cost(chain: Chain) -> None:
    state, text, cost = await chain.ask("what does the chain cost?")

    records = [r for r in chain.model.requests() if r.endpoint == "chat.completions"]
    assert state == TaskState.TASK_STATE_COMPLETED, text
    assert text == "A done: B done: C answer"
    assert sorted(r.model for r in records) == [
        "model-a",
        "model-a",
        "model-b",
        "model-b",
        "model-c",
    ]
    expected = sum(_cost(r) for r in records)
    own_a = sum(_cost(r) for r in records if r.model == "model-a")
    assert cost["totalUsd"] == pytest.approx(expected, rel=1e-9)
    assert cost["ownUsd"] == pytest.approx(own_a, rel=1e-9)
    assert cost["downstreamUsd"] == pytest.approx(expected - own_a, rel=1e-9)
    assert cost["unpriced"] == []


async def test_a_budget_smaller_than_cs_cost_fails_bs_call_to_c_and_a_still_answers(
    chain: Chain,
) -> None:
    budget = 1.0  # C's answer alone costs more: 2 output tokens at $1 each, plus its input

    state, text, cost = await chain.ask("spend at most a dollar", budget=budget)

    records = [r for r in chain.model.requests() if r.endpoint == "chat.completions"]
    assert state == TaskState.TASK_STATE_COMPLETED, text
    # C's model was never called: its sidecar refused the call
    assert [r.model for r in records].count("model-c") == 0
    # the budget headers are for the sidecars: the model provider never sees them
    assert records and not any(BUDGET_HEADER in r.headers for r in records)
    # what B's model saw as ask_cost-c's result: the budget error, naming what was left
    (b_after_tool,) = [
        r for r in records if r.model == "model-b" and r.messages[-1]["role"] == "tool"
    ]
    seen = b_after_tool.messages[-1]["content"]
    assert seen.startswith("error: agent 'cost-c' failed: ")
    assert "budget exceeded: a call to model 'model-c' is refused" in seen
    assert "is left, and this call may cost up to $" in seen
    assert text.startswith("A done: B done: error: agent 'cost-c' failed:")
    # A's answer carries what was spent (A's and B's calls) and its budget
    spent = sum(_cost(r) for r in records)
    assert cost["totalUsd"] == pytest.approx(spent, rel=1e-9) and spent < budget
    assert cost["budgetUsd"] == budget
    assert cost["remainingUsd"] == pytest.approx(budget - spent, rel=1e-9)
