"""The whole local fleet (`specmesh up`) as separate processes: etcd, OpenBao, the scripted
model server, two real MCP servers (one third-party, bridged), the control plane and every
example agent as engine + sidecar (mTLS between sidecars, credentials from Vault).

One fleet is started for the module; the tests use it in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import hvac
import pytest
import redis
import requests
from a2a.client import ClientConfig, create_client
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import TaskNotFoundError

from localfleet.fleet import Fleet, FleetOptions
from specmeshctl.a2aclient import InvokeResult, invoke
from specmeshctl.main import main as cli
from tests.polling import eventually_sync

from ..integration.test_sidecar_grpc import _TargetStream, _TargetUnary
from .external_client import TEST_ISSUER, TestIssuer, card_from, client_for, user_message

pytestmark = pytest.mark.e2e

ISSUER = TestIssuer()
"""A JWT issuer outside the fleet, trusted by every sidecar (``FleetOptions.jwt_issuers``)."""

SEED_SECRETS = ["sk-51668897d94****", "51668897d9410********", "8897d941******c7465cff2"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("fleet")
    # the control plane's own Istio CRD schemas; sidecars trust the test issuer too
    f = Fleet(FleetOptions(home=home, jwt_issuers=(ISSUER.config,)))
    state = f.up()
    state["_fleet"] = f
    state["_home"] = home
    yield state
    f.down()


def _invoke_token(state: dict[str, Any], agent: str) -> str:
    """An invoke token for ``agent``, minted by the control plane for the fleet's admin
    (principal ``specmesh/local-admin``, which the examples' ``callers`` admit)."""
    token = Path(state["adminTokenFile"]).read_text().strip()
    r = requests.post(
        f"{state['endpoints']['controlPlane']}/api/v1/agents/{agent}/invoke-token",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    r.raise_for_status()
    return str(r.json()["token"])


def _ask(
    state: dict[str, Any],
    agent: str,
    text: str,
    track: str = "stable",
    *,
    context_id: str | None = None,
) -> InvokeResult:
    """Ask through the public way in: the entry of one of the agent's instances (the card it
    serves names the entry), with an invoke token. The entry routes by the agent's release,
    so ``track`` picks whose entry is dialled, not which engine answers."""
    url = state["agents"][agent][track]["entry"]
    token = _invoke_token(state, agent)
    return asyncio.run(asyncio.wait_for(invoke(url, text, context_id=context_id, token=token), 60))


def _api(state: dict[str, Any], path: str) -> Any:
    token = Path(state["adminTokenFile"]).read_text().strip()
    r = requests.get(
        f"{state['endpoints']['controlPlane']}{path}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    r.raise_for_status()
    return r.json()


def test_question_uses_an_mcp_tool_and_a_partner_over_a2a(fleet: dict[str, Any]) -> None:
    result = _ask(fleet, "mse-nacos-helper", "Which Nacos services are registered?")

    assert result.state == "completed"
    assert result.tool_calls == ["nacos-mcp-tools__list_services", "ask_mse-gateway-assistant"]
    assert "[gateway] Routes /nacos and /console point at the Nacos services" in result.text


def test_one_trace_holds_the_spans_of_both_agents(fleet: dict[str, Any]) -> None:
    # its own question (not the previous test's), found by its conversation id
    asked = _ask(fleet, "mse-nacos-helper", "Which Nacos services are registered?")
    assert asked.state == "completed"
    expected = {
        ("mse-nacos-helper", "invoke_agent mse-nacos-helper"),
        ("mse-nacos-helper", "execute_tool nacos-mcp-tools__list_services"),
        ("mse-nacos-helper", "execute_tool ask_mse-gateway-assistant"),
        ("mse-gateway-assistant", "invoke_agent mse-gateway-assistant"),
        ("mse-gateway-assistant", "chat qwen-plus-latest"),
    }
    seen: dict[str, set[tuple[str, str]]] = {}

    def two_agent_trace() -> dict[str, Any] | None:
        # each process exports its spans in its own batches: wait until all have arrived
        listed = _api(fleet, f"/api/v1/traces?contextId={asked.context_id}&pageSize=100")
        for t in listed["traces"]:
            spans = _api(fleet, f"/api/v1/traces/{t['traceId']}")["spans"]
            names = seen[t["traceId"]] = {(s["agent"], s["name"]) for s in spans}
            if expected <= names:
                return {"trace": t, "names": names, "spans": spans}
        return None

    try:
        found = eventually_sync(two_agent_trace, what="the turn's trace", timeout=60)
    except AssertionError as e:
        missing = {t: sorted(expected - names) for t, names in seen.items()}
        raise AssertionError(f"{e}: spans missing per trace {missing}") from None

    assert {"mse-nacos-helper", "mse-gateway-assistant"} <= set(found["trace"]["agents"])
    assert int(found["trace"]["totalTokens"]) > 0  # an int64: a string in the JSON
    assert len(found["spans"]) < 100  # the SDK's internal spans are off


def test_the_agent_registry_holds_the_card_and_each_instance(fleet: dict[str, Any]) -> None:
    card = _api(fleet, "/api/v1/agents/mse-nacos-helper/card")["agentCard"]
    assert card["name"] == "mse-nacos-helper" and card["description"] == "MSE Nacos assistant"
    instances = _api(fleet, "/api/v1/instances?agentName=schedulex-assistant")["instances"]
    assert sorted(i["track"] for i in instances) == ["canary", "stable"]
    assert all(i["agentName"] == "schedulex-assistant" for i in instances)
    assert all(i["state"] == "ENGINE_STATE_SERVING" and i["endpoint"] for i in instances)


def test_a_conversation_is_remembered_in_redis(fleet: dict[str, Any]) -> None:
    first = _ask(fleet, "mse-nacos-helper", "Remember the word pineapple, please.")
    model = fleet["endpoints"]["llm"].removesuffix("/v1")
    requests.delete(f"{model}/_scripted/requests", timeout=10)
    second = _ask(fleet, "mse-nacos-helper", "Which word was it?", context_id=first.context_id)

    assert second.state == "completed" and second.context_id == first.context_id
    recorded = json.dumps(requests.get(f"{model}/_scripted/requests", timeout=10).json())
    assert "Remember the word pineapple" in recorded  # the history reached the model
    services = json.loads((fleet["_home"] / "services.json").read_text())
    vault = hvac.Client(url=services["baoAddress"], token=services["baoToken"])
    secret = vault.secrets.kv.v2.read_secret_version(
        path="specmesh/shared/fleet-redis", mount_point="secret", raise_on_deleted_version=True
    )
    r = redis.Redis.from_url(
        fleet["endpoints"]["redis"], password=secret["data"]["data"]["password"]
    )
    memory_keys = r.keys("specmesh:memory:mse-nacos-helper:*")
    assert memory_keys
    # the A2A tasks of that conversation are in the same Redis, under the task store's ACL
    # user, which every agent's sidecar may use -- and which cannot read the memory
    assert r.keys("specmesh:a2a:mse-nacos-helper:*")
    tasks_password = vault.secrets.kv.v2.read_secret_version(
        path="specmesh/infra/task-store", mount_point="secret", raise_on_deleted_version=True
    )["data"]["data"]["password"]
    as_tasks = redis.Redis.from_url(
        fleet["endpoints"]["redis"], username="specmesh-tasks", password=tasks_password
    )
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_tasks.get(memory_keys[0])


def test_a2a_over_grpc_crosses_both_sidecars(fleet: dict[str, Any]) -> None:
    """mse-nacos-helper's sidecar egress (gRPC) -> mTLS -> mse-gateway-assistant's sidecar
    inbound (gRPC) -> its engine, with the official a2a-sdk client over the GRPC binding."""
    helper = fleet["agents"]["mse-nacos-helper"]["stable"]
    gateway = fleet["agents"]["mse-gateway-assistant"]["stable"]
    target = "mse-gateway-assistant"

    def channel(_url: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            helper["egressGrpc"], interceptors=[_TargetUnary(target), _TargetStream(target)]
        )

    async def ask() -> list[Any]:
        config = ClientConfig(
            streaming=True,
            supported_protocol_bindings=[TransportProtocol.GRPC],
            grpc_channel_factory=channel,
        )
        request = SendMessageRequest(
            message=Message(
                role=Role.ROLE_USER,
                message_id=uuid.uuid4().hex,
                parts=[Part(text="Any route problems?")],
            )
        )
        async with await create_client(gateway["a2a"], client_config=config) as client:
            return [event async for event in client.send_message(request)]

    events = asyncio.run(asyncio.wait_for(ask(), 60))
    text = "".join(
        p.text
        for e in events
        if e.HasField("artifact_update") and e.artifact_update.last_chunk
        for p in e.artifact_update.artifact.parts
    )
    assert text.startswith("[gateway]")


ENTRY_AGENT = "mse-nacos-helper"
BINDINGS = [TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON, TransportProtocol.GRPC]


def _admit(state: dict[str, Any], agent: str, principals: list[str]) -> None:
    """Apply the agent's current spec again with ``base.callers.principals`` set."""
    spec = _api(state, f"/api/v1/agents/{agent}")["agent"]["spec"]
    spec["base"]["callers"] = {"principals": principals}
    token = Path(state["adminTokenFile"]).read_text().strip()
    manifest = {"apiVersion": "specmesh.io/v1", "kind": "Agent", "metadata": {"name": agent}}
    r = requests.post(
        f"{state['endpoints']['controlPlane']}/api/v1/apply",
        json={"manifest": {**manifest, "spec": spec}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    r.raise_for_status()


def _state_of(events: list[Any]) -> tuple[str, int]:
    """(task id, last task state) of a response stream."""
    task_id, state = "", TaskState.TASK_STATE_UNSPECIFIED
    for e in events:
        if e.HasField("task"):
            task_id, state = e.task.id, e.task.status.state
        elif e.HasField("status_update"):
            task_id, state = e.status_update.task_id, e.status_update.status.state
        elif e.HasField("artifact_update"):
            task_id = e.artifact_update.task_id or task_id
    return task_id, state


def _answer(events: list[Any]) -> str:
    parts = []
    for e in events:
        if e.HasField("task"):
            parts += [p.text for a in e.task.artifacts for p in a.parts]
        elif e.HasField("artifact_update"):
            parts += [p.text for p in e.artifact_update.artifact.parts]
    return "".join(parts)


async def _conversation(card: Any, binding: str) -> dict[str, Any]:
    """Everything an A2A client does, on one binding, as alice; carol and bob look on."""
    alice = ISSUER.token("alice", audience=ENTRY_AGENT)
    carol = ISSUER.token("carol", audience=ENTRY_AGENT)
    bob = ISSUER.token("bob", audience=ENTRY_AGENT)
    seen: dict[str, Any] = {}
    question = SendMessageRequest(message=user_message("Which Nacos services are registered?"))
    async with await client_for(card, binding, alice, streaming=False) as client:
        sent = [e async for e in client.send_message(question)]
        seen["sent"] = _state_of(sent)
        task_id = seen["sent"][0]
        got = await client.get_task(GetTaskRequest(id=task_id))
        seen["got"] = (got.id, got.status.state)
        listed = await client.list_tasks(ListTasksRequest())
        seen["listed"] = {t.id for t in listed.tasks}
        slow = SendMessageRequest(
            message=user_message("Please take your time."),
            configuration=SendMessageConfiguration(return_immediately=True),
        )
        to_cancel = _state_of([e async for e in client.send_message(slow)])[0]
        cancelled = await client.cancel_task(CancelTaskRequest(id=to_cancel))
        seen["cancelled"] = cancelled.status.state
        to_follow = _state_of([e async for e in client.send_message(slow)])[0]
    async with await client_for(card, binding, alice, streaming=True) as client:
        streamed = [e async for e in client.send_message(question)]
        seen["streamed"] = (_state_of(streamed)[1], _answer(streamed))
        followed = [e async for e in client.subscribe(SubscribeToTaskRequest(id=to_follow))]
        seen["followed"] = (_state_of(followed)[1], _answer(followed))
    async with await client_for(card, binding, carol, streaming=False) as client:
        seen["carol lists"] = {t.id for t in (await client.list_tasks(ListTasksRequest())).tasks}
        try:
            await client.get_task(GetTaskRequest(id=task_id))
            seen["carol gets"] = "found"
        except TaskNotFoundError:
            seen["carol gets"] = "TaskNotFound"
    for who, token in (("nobody", None), ("bob", bob)):
        async with await client_for(card, binding, token, streaming=False) as client:
            try:
                [e async for e in client.send_message(question)]
                seen[who] = "answered"
            except Exception as e:  # the SDK raises its own error types per binding
                seen[who] = f"{type(e).__name__}: {e}"
    seen["task"] = task_id
    return seen


def test_an_external_client_finds_the_entry_by_its_card_and_uses_every_binding(
    fleet: dict[str, Any],
) -> None:
    """An external client with a JWT of its own issuer: the card names the entry (the
    sidecar's public listeners, never the engine's), and on JSON-RPC, HTTP+JSON and gRPC
    send, stream, get, list, cancel and subscribe work; another caller does not see the
    task; no token -> UNAUTHENTICATED; a principal ``callers`` omits -> PERMISSION_DENIED."""
    before = int(_api(fleet, f"/api/v1/agents/{ENTRY_AGENT}")["agent"]["revisionInfo"]["revision"])
    _admit(fleet, ENTRY_AGENT, ["specmesh/*", f"{TEST_ISSUER}/alice", f"{TEST_ISSUER}/carol"])
    instance = fleet["agents"][ENTRY_AGENT]["stable"]

    def current_card() -> Any:
        raw = _api(fleet, f"/api/v1/agents/{ENTRY_AGENT}/card")["agentCard"]
        return card_from(raw) if int(raw["version"]) > before else None

    card = eventually_sync(
        current_card, what="the card of the revision admitting alice", timeout=60
    )
    urls = {i.protocol_binding: i.url for i in card.supported_interfaces}
    assert urls == {
        "JSONRPC": f"{instance['entry']}/",
        "HTTP+JSON": f"{instance['entry']}/v1",
        "GRPC": instance["entryGrpc"].removeprefix("grpc://"),
    }
    assert instance["a2a"].rstrip("/") not in {u.rstrip("/") for u in urls.values()}
    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    # the entry serves the same card to anyone, without a token (discovery)
    public = requests.get(f"{instance['entry']}/.well-known/agent-card.json", timeout=30)
    assert public.status_code == 200 and card_from(public.json()) == card

    for binding in BINDINGS:
        seen = asyncio.run(asyncio.wait_for(_conversation(card, binding), 120))
        task = seen["task"]
        assert seen["sent"] == (task, TaskState.TASK_STATE_COMPLETED), binding
        assert seen["got"] == (task, TaskState.TASK_STATE_COMPLETED), binding
        assert task in seen["listed"], binding
        assert seen["cancelled"] == TaskState.TASK_STATE_CANCELED, binding
        assert seen["streamed"][0] == TaskState.TASK_STATE_COMPLETED, binding
        assert "asked mse-gateway-assistant" in seen["streamed"][1], binding
        assert seen["followed"][0] == TaskState.TASK_STATE_COMPLETED, binding
        assert "[slow]" in seen["followed"][1], binding
        assert task not in seen["carol lists"], binding
        assert seen["carol gets"] == "TaskNotFound", binding
        assert "401" in seen["nobody"] or "UNAUTHENTICATED" in seen["nobody"], seen["nobody"]
        assert "403" in seen["bob"] or "PERMISSION_DENIED" in seen["bob"], seen["bob"]


def test_the_third_party_mcp_server_answers_through_the_bridge(fleet: dict[str, Any]) -> None:
    result = _ask(fleet, "schedulex-assistant", "What time is it?")
    assert result.tool_calls == ["time__get_current_time"]
    assert '"timezone": "UTC"' in result.text


def test_the_mcp_registry_shows_the_tools_servers_really_offer(fleet: dict[str, Any]) -> None:
    nacos = {t["name"] for t in _api(fleet, "/api/v1/mcp-servers/nacos-mcp-tools/tools")["tools"]}
    time_tools = {t["name"] for t in _api(fleet, "/api/v1/mcp-servers/time/tools")["tools"]}
    assert {"list_services", "get_service", "get_config", "list_configs"} == nacos
    assert {"get_current_time", "convert_time"} == time_tools


def test_a_prompt_change_is_used_by_the_next_invoke_without_restart(
    fleet: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = {p["name"]: p["pid"] for p in fleet["processes"]}
    manifest = tmp_path / "prompt.yaml"
    manifest.write_text(
        "apiVersion: specmesh.io/v1\nkind: Prompt\nmetadata: {name: mse-gateway-assistant}\n"
        "spec:\n  version: '1.1.0'\n"
        "  template: You are the MSE gateway assistant, second edition.\n"
    )
    services = json.loads((fleet["_home"] / "services.json").read_text())
    monkeypatch.setenv("SPECMESH_HOME", str(fleet["_home"]))
    monkeypatch.setenv("SPECMESH_ETCD_ENDPOINT", services["etcdEndpoint"])
    assert cli(["apply", "-f", str(manifest)]) == 0
    model = fleet["endpoints"]["llm"].removesuffix("/v1")

    def served_new_prompt() -> bool:
        requests.delete(f"{model}/_scripted/requests", timeout=10)
        _ask(fleet, "mse-gateway-assistant", "Any route problems?")
        recorded = requests.get(f"{model}/_scripted/requests", timeout=10).json()
        bodies = recorded if isinstance(recorded, list) else recorded.get("requests", [])
        return any("second edition" in json.dumps(r) for r in bodies)

    eventually_sync(
        served_new_prompt, what="the new prompt version in the model's request", timeout=30
    )
    status = Fleet(FleetOptions(home=fleet["_home"])).status()
    assert {p["name"]: p["pid"] for p in status["processes"] if p["running"]} == pids


def test_engines_never_hold_a_secret(fleet: dict[str, Any]) -> None:
    services = json.loads((fleet["_home"] / "services.json").read_text())
    vault = hvac.Client(url=services["baoAddress"], token=services["baoToken"])
    redis_password = vault.secrets.kv.v2.read_secret_version(
        path="specmesh/shared/fleet-redis", mount_point="secret", raise_on_deleted_version=True
    )["data"]["data"]["password"]
    secrets = [*SEED_SECRETS, services["baoToken"], redis_password]
    for p in fleet["processes"]:
        if p["role"] != "engine":
            continue
        environ = Path(f"/proc/{p['pid']}/environ").read_bytes().decode(errors="replace")
        assert "VAULT" not in environ and not [s for s in secrets if s in environ], p["name"]
        log = Path(p["log"]).read_text(errors="replace")
        assert not [s for s in secrets if s in log], p["name"]
    traces = json.dumps(_api(fleet, "/api/v1/traces?pageSize=200"))
    assert not [s for s in secrets if s in traces]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


def test_each_process_holds_its_own_vault_identity_and_no_root_token(
    fleet: dict[str, Any],
) -> None:
    services = json.loads((fleet["_home"] / "services.json").read_text())
    root = services["baoToken"]
    address = services["baoAddress"]
    sidecars = {(p["agent"], p["track"]): p for p in fleet["processes"] if p["role"] == "sidecar"}
    # nothing the fleet runs holds the root token (set-up used it, and stopped)
    for p in fleet["processes"]:
        environ = Path(f"/proc/{p['pid']}/environ").read_bytes().decode(errors="replace")
        assert root not in environ, p["name"]

    # the control plane runs with its own policy
    cp = next(p for p in fleet["processes"] if p["role"] == "control-plane")
    cp_vault = hvac.Client(url=address, token=_environ(cp["pid"])["SPECMESH_VAULT_TOKEN"])
    assert sorted(cp_vault.auth.token.lookup_self()["data"]["policies"]) == [
        "default",
        "specmesh-control-plane",
    ]

    # a sidecar's real token reads its agent's key, and OpenBao refuses another agent's
    helper_token = _environ(sidecars[("mse-nacos-helper", "stable")]["pid"])["SPECMESH_VAULT_TOKEN"]
    as_helper = hvac.Client(url=address, token=helper_token)
    info = as_helper.auth.token.lookup_self()["data"]
    assert sorted(info["policies"]) == ["default", "specmesh-agent-mse-nacos-helper"]
    assert info["ttl"] > 0  # a periodic token, renewed by the sidecar
    own = _api(fleet, "/api/v1/agents/mse-nacos-helper")["agent"]["spec"]["model"]["apiKey"]
    other = _api(fleet, "/api/v1/agents/mse-gateway-assistant")["agent"]["spec"]["model"]["apiKey"]
    for ref, allowed in ((own, True), (other, False)):
        path, _, rest = ref.removeprefix("vault://secret/").partition("#")
        version = int(rest.partition("@")[2])
        read = lambda p=path, v=version: as_helper.secrets.kv.v2.read_secret_version(  # noqa: E731
            path=p, version=v, mount_point="secret", raise_on_deleted_version=True
        )
        if allowed:
            assert read()["data"]["data"]["value"] == "sk-51668897d94****"
        else:
            with pytest.raises(hvac.exceptions.Forbidden):
                read()
    # nor the fleet's Redis password unless shared (it is: mse-nacos-helper's memory)
    as_gateway = hvac.Client(
        url=address,
        token=_environ(sidecars[("mse-gateway-assistant", "stable")]["pid"])[
            "SPECMESH_VAULT_TOKEN"
        ],
    )
    with pytest.raises(hvac.exceptions.Forbidden):
        as_gateway.secrets.kv.v2.read_secret_version(
            path="specmesh/shared/fleet-redis", mount_point="secret", raise_on_deleted_version=True
        )
    assert as_helper.secrets.kv.v2.read_secret_version(
        path="specmesh/shared/fleet-redis", mount_point="secret", raise_on_deleted_version=True
    )

    # PKI: an agent's token gets a certificate for its own SPIFFE ID only
    def issue(client: hvac.Client, role: str, agent: str) -> Any:
        return client.secrets.pki.generate_certificate(
            name=role,
            common_name=f"{agent}.agent.specmesh.local",
            extra_params={
                "uri_sans": f"spiffe://specmesh.local/agent/{agent}",
                "alt_names": f"{agent}.agent.specmesh.local",
                "ttl": "60s",
                "exclude_cn_from_sans": True,
            },
            mount_point="specmesh-pki",
        )

    assert (
        "BEGIN CERTIFICATE"
        in issue(as_helper, "specmesh-agent-mse-nacos-helper", "mse-nacos-helper")["data"][
            "certificate"
        ]
    )
    with pytest.raises(hvac.exceptions.InvalidRequest):  # its own role, another's identity
        issue(as_helper, "specmesh-agent-mse-nacos-helper", "mse-gateway-assistant")
    with pytest.raises(hvac.exceptions.Forbidden):  # another agent's role
        issue(as_helper, "specmesh-agent-mse-gateway-assistant", "mse-gateway-assistant")
    with pytest.raises(hvac.exceptions.Forbidden):  # the old shared role
        issue(as_helper, "specmesh-agent", "mse-gateway-assistant")

    # the engine: no Vault address or token, and a HOME of its own with nothing of the
    # services' state in it
    for p in fleet["processes"]:
        if p["role"] != "engine":
            continue
        environ = _environ(p["pid"])
        assert not [k for k in environ if "VAULT" in k or "TOKEN" in k], p["name"]
        home = Path(environ["HOME"])
        assert home != fleet["_home"] and fleet["_home"] in home.parents
        names = {f.name for f in home.rglob("*")}
        assert not names & {"services.json", "init.json", "admin-token", "tokens.json"}
        assert Path(f"/proc/{p['pid']}/cwd").resolve() == home.resolve()


def test_killing_one_agent_leaves_the_others_answering_and_it_comes_back(
    fleet: dict[str, Any],
) -> None:
    victims = [p for p in fleet["processes"] if p.get("agent") == "schedulex-assistant"
               and p.get("track") == "canary"]  # fmt: skip
    for p in victims:
        os.kill(p["pid"], signal.SIGKILL)

    result = _ask(fleet, "mse-nacos-helper", "Which Nacos services are registered?")
    assert result.state == "completed" and "[gateway]" in result.text
    assert _ask(fleet, "schedulex-assistant", "How did the job run?").state == "completed"

    # the supervisor restarts both processes; the registry serves the canary again
    def canary_back() -> bool:
        instances = _api(fleet, "/api/v1/instances?agentName=schedulex-assistant")["instances"]
        serving = sorted(i["track"] for i in instances if i["state"] == "ENGINE_STATE_SERVING")
        running = Fleet(FleetOptions(home=fleet["_home"])).status()["processes"]
        restarted = [p for p in running if p.get("instance") == "schedulex-assistant-canary-0"]
        return (
            serving == ["canary", "stable"]
            and len(restarted) == 2
            and all(p["running"] and p["pid"] not in {v["pid"] for v in victims} for p in restarted)
        )

    eventually_sync(canary_back, what="the killed canary to be restarted and serving", timeout=40)
