"""The public entry with the official a2a-sdk client on all three bindings (JSON-RPC,
HTTP+JSON, gRPC): bearer tokens from a test issuer (an EC key made here, its JWKS served by
a small aiohttp server), the agent's ``callers``, the card without a token, principals a
client forges never reaching the engine, and external calls following the release (canary
weight 100 -> the canary instance answers, through its mTLS inbound)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import httpx
import jwt
import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.errors import A2AClientError
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, StreamResponse, TaskState
from a2a.utils.constants import TransportProtocol
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2, status_pb2

from control_plane.evaluation import EVALUATION_SUBJECT
from control_plane.issuer import DEFAULT_ISSUER, TokenIssuer
from engine.server import EngineServer, ServerConfig
from engine.testing import ScriptedRunner
from sidecar.affinity import ConversationTracks
from sidecar.callers import CallerPolicy, CallerRefused, JwtVerifier
from sidecar.entry import CARD_PATH, EntryServer, GrpcEntry
from sidecar.grpcproxy import A2A_SERVICE, GrpcInbound, GrpcInstanceSource
from sidecar.inbound import InboundServer, InMemoryPartnerGraph
from sidecar.ledger import BudgetLedger
from sidecar.mtls import AgentCertificates, PkiClient, agent_dns_name
from sidecar.registry import Instance
from sidecar.router import InMemoryInstanceSource, InMemoryReleaseSource, Router
from sidecar.state import SnapshotHolder
from specmesh.budget import LEDGER_HEADER
from specmesh.callers import CALLER_HEADER, CALLER_KEY, PRINCIPAL_HEADER, PRINCIPAL_KEY
from specmesh.issuers import JwtIssuer
from specmesh.ports import free_port
from specmesh.snapshot import PromptBundle, ResolvedSnapshot
from specmesh.spec.models import AgentSpec, ReleaseSpec
from specmesh.vault import VaultClient
from tests.integration.test_sidecar_mtls import pki  # noqa: F401  (fixture)
from tests.polling import eventually

pytestmark = pytest.mark.integration

AGENT = "entry-agent"
ISSUER = "https://idp.test"
ALICE = f"{ISSUER}/alice"
WAIT = 20.0
BINDINGS = [TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON, TransportProtocol.GRPC]


# ---------------------------------------------------------------- the test issuer


@dataclass
class JwksIssuer:
    """An EC key and its JWKS served over HTTP; :meth:`token` signs JWTs."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    kid: str = "k1"
    fetches: int = 0
    runner: web.AppRunner | None = None
    jwks_uri: str = ""

    def jwks(self) -> dict[str, Any]:
        public = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "ES256"}]}

    async def _serve(self, _request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.jwks())

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.jwks_uri = f"http://127.0.0.1:{port}/jwks.json"

    def config(self) -> JwtIssuer:
        return JwtIssuer(issuer=ISSUER, jwks_uri=self.jwks_uri, audiences=("{agent}",))

    def token(self, sub: str = "alice", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": sub, "aud": AGENT, "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, self.key, algorithm="ES256", headers={"kid": self.kid})


@pytest.fixture
async def issuer() -> AsyncIterator[JwksIssuer]:
    it = JwksIssuer()
    await it.start()
    yield it
    assert it.runner is not None
    await it.runner.cleanup()


def _snapshot(agent: str, *, principals: list[str]) -> ResolvedSnapshot:
    spec = {
        "base": {
            "description": "entry test",
            "promptKey": "p",
            "callers": {"principals": principals},
        },
        "model": {"model": "scripted", "baseUrl": "http://127.0.0.1:9"},
    }
    return ResolvedSnapshot(
        agent_name=agent,
        revision=1,
        track="stable",
        spec=AgentSpec.model_validate(spec),
        prompt=PromptBundle(),
    )


# ---------------------------------------------------------------- one instance


@dataclass
class Rig:
    runner: ScriptedRunner
    engine: EngineServer
    entry: EntryServer
    grpc_entry: GrpcEntry
    issuer: JwksIssuer
    ledger: BudgetLedger


async def _caller_policy(
    issuer: JwksIssuer,
    *,
    snapshot: ResolvedSnapshot | None = None,
    partners: dict[str, list[str]] | None = None,
    mesh_trust_domain: str | None = None,
    mesh_namespace: str | None = None,
    extra_issuers: tuple[JwtIssuer, ...] = (),
) -> tuple[CallerPolicy, JwtVerifier]:
    """AGENT's caller policy over ``snapshot`` (default: ALICE may call) and ``partners``."""
    holder = SnapshotHolder()
    await holder.set(snapshot or _snapshot(AGENT, principals=[ALICE]), etcd_revision=1)
    verifier = JwtVerifier(issuers=[issuer.config(), *extra_issuers], agent=AGENT)
    policy = CallerPolicy(
        agent=AGENT,
        graph=InMemoryPartnerGraph(partners or {}),
        callers=lambda: holder.current.spec.base.callers if holder.current else None,
        verifier=verifier,
        mesh_trust_domain=mesh_trust_domain,
        mesh_namespace=mesh_namespace,
    )
    return policy, verifier


@pytest.fixture
async def rig(issuer: JwksIssuer) -> AsyncIterator[Rig]:
    http_port, grpc_port = free_port(), free_port()
    runner = ScriptedRunner()
    config = ServerConfig(
        agent_name=AGENT,
        http_port=0,
        grpc_port=0,
        drain_timeout=2.0,
        public_http_url=f"http://127.0.0.1:{http_port}",
        public_grpc_url=f"127.0.0.1:{grpc_port}",
    )
    policy, verifier = await _caller_policy(issuer)
    ledger = BudgetLedger()
    async with EngineServer(runner=runner, config=config) as engine:
        entry = EntryServer(
            agent_name=AGENT,
            instance_id="i-1",
            engine_http=engine.http_url,
            policy=policy,
            port=http_port,
            ledger=ledger,
        )
        grpc_entry = GrpcEntry(
            agent_name=AGENT,
            instance_id="i-1",
            engine_grpc=engine.grpc_target,
            policy=policy,
            address=f"127.0.0.1:{grpc_port}",
            ledger=ledger,
        )
        async with entry, grpc_entry:
            yield Rig(runner, engine, entry, grpc_entry, issuer, ledger)
    await verifier.close()


class _AuthUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with(details, self.metadata), request)


class _AuthStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with(details, self.metadata), request)


def _with(details: Any, extra: list[tuple[str, str]]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *extra)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


ClientFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def client_for() -> AsyncIterator[ClientFactory]:
    """``await client_for(entry_url, binding, token=..., extra=...)``: an a2a-sdk client that
    discovers the agent by its card at the entry and sends the token on every call."""
    opened: list[Any] = []

    async def make(
        url: str,
        binding: str,
        *,
        token: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> Any:
        headers = dict(extra or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        http = httpx.AsyncClient(headers=headers, timeout=WAIT)
        opened.append(http)
        metadata = [(k.lower(), v) for k, v in headers.items()]

        def channel(target: str) -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(
                target, interceptors=[_AuthUnary(metadata), _AuthStream(metadata)]
            )

        config = ClientConfig(
            streaming=True,
            supported_protocol_bindings=[binding],
            httpx_client=http,
            grpc_channel_factory=channel,
        )
        client = await create_client(url, client_config=config)
        opened.append(client)
        return client

    yield make
    for item in reversed(opened):
        await item.close() if not hasattr(item, "aclose") else await item.aclose()


def _message(text: str, context_id: str = "") -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=uuid.uuid4().hex,
            context_id=context_id,
            parts=[Part(text=text)],
        )
    )


async def _send(client: Any, text: str, *, context_id: str = "") -> list[StreamResponse]:
    async with asyncio.timeout(WAIT):
        return [event async for event in client.send_message(_message(text, context_id))]


def _refusal(error: BaseException) -> tuple[int | str, str, str]:
    """(HTTP status or gRPC code name, ErrorInfo reason, message) of an a2a-sdk client error
    caused by a refusal of the entry."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, httpx.HTTPStatusError):
            body = cause.response.json()["error"]
            [info] = body["details"]
            assert info["domain"] == "specmesh.io" and info["metadata"] == {"agent": AGENT}
            assert body["code"] == cause.response.status_code
            return cause.response.status_code, info["reason"], body["message"]
        if isinstance(cause, grpc.aio.AioRpcError):
            [raw] = [v for k, v in cause.trailing_metadata() if k == "grpc-status-details-bin"]
            status = status_pb2.Status.FromString(raw)
            [info] = [
                error_details_pb2.ErrorInfo.FromString(d.value)
                for d in status.details
                if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
            ]
            assert status.message == cause.details()
            return cause.code().name, info.reason, cause.details() or ""
        cause = cause.__cause__ or cause.__context__
    raise AssertionError(f"no HTTP or gRPC refusal behind {error!r}")


def _unavailable(binding: str) -> int | str:
    return "UNAVAILABLE" if binding == TransportProtocol.GRPC else 503


def _expected(binding: str, reason: str) -> int | str:
    if binding == TransportProtocol.GRPC:
        return reason
    return 401 if reason == "UNAUTHENTICATED" else 403


# ---------------------------------------------------------------- tests


async def test_card_is_readable_without_a_token(rig: Rig) -> None:
    async with aiohttp.ClientSession() as http, http.get(rig.entry.url + CARD_PATH) as r:
        assert r.status == 200
        card = await r.json()
    urls = {i["protocolBinding"]: i["url"] for i in card["supportedInterfaces"]}
    assert urls["GRPC"] == rig.grpc_entry.target
    assert rig.issuer.fetches == 0  # no token looked at


@pytest.mark.parametrize("binding", BINDINGS)
async def test_allowed_token_sends_and_names_the_principal(
    rig: Rig, client_for: ClientFactory, binding: str
) -> None:
    client = await client_for(
        rig.entry.url,
        binding,
        token=rig.issuer.token(),
        extra={PRINCIPAL_HEADER: f"{ISSUER}/admin", CALLER_HEADER: "forged-agent"},
    )
    events = await _send(client, f"hello over {binding}")

    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    [request] = rig.runner.requests
    assert request.text == f"hello over {binding}"
    # the entry's principal, never the forged one; no caller agent; no token
    assert request.headers[PRINCIPAL_KEY] == ALICE
    assert CALLER_KEY not in request.headers
    assert "authorization" not in request.headers


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_message_gets_a_ledger_entry_with_its_budget_named_to_the_engine(
    rig: Rig, client_for: ClientFactory, binding: str
) -> None:
    client = await client_for(
        rig.entry.url, binding, token=rig.issuer.token(), extra={LEDGER_HEADER: "forged"}
    )
    message = _message("on a budget")
    message.message.metadata.update({"specmesh.budgetUsd": 0.5})

    async with asyncio.timeout(WAIT):
        events = [event async for event in client.send_message(message)]

    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    [request] = rig.runner.requests
    named = request.headers[LEDGER_HEADER]
    entry = rig.ledger.entry({LEDGER_HEADER: named}, "a call")
    assert named != "forged" and entry is not None  # the entry's own, never the caller's
    assert entry.budget_usd == 0.5
    # closed once the whole answer was relayed (the client may see its end first)
    await eventually(lambda: entry.closed, timeout=WAIT, what="the ledger entry to close")


@pytest.mark.parametrize("binding", BINDINGS)
async def test_no_token_is_unauthenticated(
    rig: Rig, client_for: ClientFactory, binding: str
) -> None:
    client = await client_for(rig.entry.url, binding)
    with pytest.raises(A2AClientError) as info:
        await _send(client, "no token")
    status, reason, message = _refusal(info.value)
    assert (status, reason) == (_expected(binding, "UNAUTHENTICATED"), "UNAUTHENTICATED")
    assert "none was sent" in message
    assert rig.runner.requests == []


@pytest.mark.parametrize("binding", BINDINGS)
async def test_principal_not_in_callers_is_permission_denied(
    rig: Rig, client_for: ClientFactory, binding: str
) -> None:
    client = await client_for(rig.entry.url, binding, token=rig.issuer.token("bob"))
    with pytest.raises(A2AClientError) as info:
        await _send(client, "bob here")
    status, reason, message = _refusal(info.value)
    assert (status, reason) == (_expected(binding, "PERMISSION_DENIED"), "PERMISSION_DENIED")
    assert f"{ISSUER}/bob" in message and "callers.principals" in message
    assert rig.runner.requests == []


def _none_token() -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "alice", "aud": AGENT, "exp": now + 300}
    return jwt.encode(claims, None, algorithm="none")


_BAD_TOKENS: list[tuple[str, Callable[[JwksIssuer], str], str]] = [
    ("expired", lambda i: i.token(exp=int(time.time()) - 3600), "expired"),
    ("wrong audience", lambda i: i.token(aud="another-agent"), "wrong audience"),
    ("unknown issuer", lambda i: i.token(iss="https://evil.test"), "not trusted"),
    ("alg none", lambda _i: _none_token(), "'none' is not allowed"),
    (
        "other key",
        lambda i: jwt.encode(
            {"iss": ISSUER, "sub": "alice", "aud": AGENT, "exp": int(time.time()) + 60},
            ec.generate_private_key(ec.SECP256R1()),
            algorithm="ES256",
            headers={"kid": i.kid},
        ),
        "signature does not verify",
    ),
]


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize(("case", "make", "said"), _BAD_TOKENS, ids=[c[0] for c in _BAD_TOKENS])
async def test_bad_token_is_unauthenticated_naming_the_reason(
    rig: Rig,
    client_for: ClientFactory,
    binding: str,
    case: str,
    make: Callable[[JwksIssuer], str],
    said: str,
) -> None:
    token = make(rig.issuer)
    client = await client_for(rig.entry.url, binding, token=token)
    with pytest.raises(A2AClientError) as info:
        await _send(client, case)
    status, reason, message = _refusal(info.value)
    assert (status, reason) == (_expected(binding, "UNAUTHENTICATED"), "UNAUTHENTICATED")
    assert said in message
    assert token not in message
    assert rig.runner.requests == []


async def test_http_refusal_has_the_bearer_challenge(rig: Rig) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {}}
    async with aiohttp.ClientSession() as http:
        async with http.post(rig.entry.url + "/", json=body) as r:
            missing = (r.status, r.headers["WWW-Authenticate"])
        headers = {"Authorization": f"Bearer {rig.issuer.token(exp=1)}"}
        async with http.post(rig.entry.url + "/", json=body, headers=headers) as r:
            bad = (r.status, r.headers["WWW-Authenticate"], await r.json())
    assert missing == (401, 'Bearer realm="specmesh"')
    assert bad[:2] == (401, 'Bearer realm="specmesh", error="invalid_token"')
    assert bad[2]["error"]["status"] == "UNAUTHENTICATED"


# ---------------------------------------------------------------- the release


@dataclass
class TwoTracks:
    """The entry of the stable instance (whose engine is beside it) and a canary instance
    behind its mTLS inbound; ``releases`` is AGENT's release as both entries' routers see it."""

    entry: EntryServer
    grpc_entry: GrpcEntry
    stable: ScriptedRunner
    canary: ScriptedRunner
    releases: InMemoryReleaseSource
    instances: InMemoryInstanceSource


@asynccontextmanager
async def _two_tracks(
    issuer: JwksIssuer,
    pki: PkiClient,  # noqa: F811
    release: ReleaseSpec,
    *,
    tracks: ConversationTracks | None = None,
    extra_issuers: tuple[JwtIssuer, ...] = (),
    principals: list[str] | None = None,
) -> AsyncIterator[TwoTracks]:
    # no agent lists AGENT as a partner: only the entry's forwarding may pass the inbound
    policy, verifier = await _caller_policy(
        issuer,
        snapshot=_snapshot(AGENT, principals=principals) if principals else None,
        extra_issuers=extra_issuers,
    )
    http_port, grpc_port = free_port(), free_port()
    public = {
        "public_http_url": f"http://127.0.0.1:{http_port}",
        "public_grpc_url": f"127.0.0.1:{grpc_port}",
    }
    stable_runner, canary_runner = ScriptedRunner(), ScriptedRunner()
    async with (
        verifier,
        AgentCertificates(agent=AGENT, pki=pki) as certs,
        EngineServer(
            runner=stable_runner,
            config=ServerConfig(agent_name=AGENT, http_port=0, grpc_port=0, **public),
        ) as stable,
        EngineServer(
            runner=canary_runner,
            config=ServerConfig(agent_name=AGENT, http_port=0, grpc_port=0, **public),
        ) as canary,
        InboundServer(
            agent_name=AGENT, engine_http=canary.http_url, policy=policy, certificates=certs
        ) as canary_inbound,
        GrpcInbound(
            agent_name=AGENT, engine_grpc=canary.grpc_target, policy=policy, certificates=certs
        ) as canary_grpc_inbound,
    ):
        instances = InMemoryInstanceSource(
            [
                Instance(  # type: ignore[list-item]
                    "stable-1",
                    AGENT,
                    "https://127.0.0.1:9",
                    "stable",
                    state="serving",
                    grpc_endpoint="127.0.0.1:9",
                ),
                Instance(  # type: ignore[list-item]
                    "canary-1",
                    AGENT,
                    canary_inbound.url,
                    "canary",
                    state="serving",
                    grpc_endpoint=canary_grpc_inbound.target,
                ),
            ]
        )
        releases = InMemoryReleaseSource({AGENT: release})
        router = Router(instances=instances, releases=releases)
        grpc_router = Router(instances=GrpcInstanceSource(instances), releases=releases)
        entry = EntryServer(
            agent_name=AGENT,
            instance_id="stable-1",
            engine_http=stable.http_url,
            policy=policy,
            router=router,
            client_ssl=certs.client_context,
            port=http_port,
            tracks=tracks,
        )
        grpc_entry = GrpcEntry(
            agent_name=AGENT,
            instance_id="stable-1",
            engine_grpc=stable.grpc_target,
            policy=policy,
            router=grpc_router,
            certificates=certs,
            address=f"127.0.0.1:{grpc_port}",
            tracks=tracks,
        )
        async with entry, grpc_entry:
            yield TwoTracks(entry, grpc_entry, stable_runner, canary_runner, releases, instances)


async def test_external_calls_follow_the_release_to_the_canary(
    issuer: JwksIssuer,
    pki: PkiClient,  # noqa: F811
    client_for: ClientFactory,
) -> None:
    """Canary weight 100: the entry of the stable instance forwards every external call to
    the canary's mTLS inbound (as the agent itself), which passes the principal on."""
    release = ReleaseSpec.model_validate({"canaryRevision": 2, "canaryWeight": 100})
    async with _two_tracks(issuer, pki, release) as rig:
        for binding in BINDINGS:
            client = await client_for(rig.entry.url, binding, token=issuer.token())
            events = await _send(client, f"canary via {binding}")
            assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED

    assert rig.stable.requests == []
    assert [r.text for r in rig.canary.requests] == [f"canary via {b}" for b in BINDINGS]
    for request in rig.canary.requests:
        assert request.headers[PRINCIPAL_KEY] == ALICE
        assert request.headers[CALLER_KEY] == AGENT.replace("_", "-")


async def test_only_the_control_planes_track_claim_sends_a_call_to_the_canary(
    issuer: JwksIssuer,
    pki: PkiClient,  # noqa: F811
    vault: VaultClient,
    client_for: ClientFactory,
) -> None:
    """Canary weight 0: a token the control plane minted with ``specmesh_track: canary``
    (its issuer marked ``controlPlane``) reaches the canary on every binding; the same claim
    in another trusted issuer's token is ignored (stable answers); with no canary instance
    serving, the claim's call fails (NO_INSTANCE) instead of falling back to stable."""
    minter = TokenIssuer(vault=vault, key_path=f"test/issuer-{uuid.uuid4().hex}")
    control_plane = JwtIssuer(
        issuer=DEFAULT_ISSUER, jwks=await minter.jwks(), audiences=("{agent}",), control_plane=True
    )
    evaluator = f"{DEFAULT_ISSUER}/{EVALUATION_SUBJECT}"
    release = ReleaseSpec.model_validate({"canaryRevision": 2, "canaryWeight": 0})
    async with _two_tracks(
        issuer,
        pki,
        release,
        extra_issuers=(control_plane,),
        principals=[evaluator, f"{ISSUER}/*"],
    ) as rig:
        for binding in BINDINGS:
            minted = await minter.mint(subject=EVALUATION_SUBJECT, audience=AGENT, track="canary")
            client = await client_for(rig.entry.url, binding, token=minted.token)
            events = await _send(client, f"evaluate via {binding}")
            assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
            forged = issuer.token("mallory", specmesh_track="canary")
            client = await client_for(rig.entry.url, binding, token=forged)
            await _send(client, f"forged via {binding}")
            plain = await minter.mint(subject=EVALUATION_SUBJECT, audience=AGENT)
            client = await client_for(rig.entry.url, binding, token=plain.token)
            await _send(client, f"no claim via {binding}")

        rig.instances.remove(AGENT, "canary-1")
        for binding in BINDINGS:
            minted = await minter.mint(subject=EVALUATION_SUBJECT, audience=AGENT, track="canary")
            client = await client_for(rig.entry.url, binding, token=minted.token)
            with pytest.raises(Exception) as refused:
                await _send(client, f"no canary via {binding}")
            status, reason, message = _refusal(refused.value)
            assert (reason, status) == ("NO_INSTANCE", _unavailable(binding)), message
            assert "none serving on track 'canary'" in message

    assert [r.text for r in rig.canary.requests] == [f"evaluate via {b}" for b in BINDINGS]
    for request in rig.canary.requests:
        assert request.headers[PRINCIPAL_KEY] == evaluator
    assert sorted(r.text for r in rig.stable.requests) == sorted(
        [f"forged via {b}" for b in BINDINGS] + [f"no claim via {b}" for b in BINDINGS]
    )


def _context_of(events: list[StreamResponse]) -> str:
    """The contextId the agent answered with (the task's, on every binding)."""
    [context_id] = {e.task.context_id for e in events if e.HasField("task")} | {
        e.status_update.context_id for e in events if e.HasField("status_update")
    }
    return context_id


async def test_a_conversation_keeps_its_track_when_the_weight_changes(
    issuer: JwksIssuer,
    pki: PkiClient,  # noqa: F811
    client_for: ClientFactory,
) -> None:
    """A conversation routed to the canary keeps going there after the weight drops to 0,
    on every binding (its first message carried no contextId: the entry named it); new
    conversations follow the new weight; an abort (no canary) moves it back."""
    release = ReleaseSpec.model_validate({"canaryRevision": 2, "canaryWeight": 100})
    tracks = ConversationTracks(max_age=1800, max_entries=100)
    async with _two_tracks(issuer, pki, release, tracks=tracks) as rig:
        clients = {b: await client_for(rig.entry.url, b, token=issuer.token()) for b in BINDINGS}
        started = {b: _context_of(await _send(clients[b], f"start {b}")) for b in BINDINGS}

        rig.releases.set(AGENT, release.model_copy(update={"canary_weight": 0}))
        for b in BINDINGS:
            await _send(clients[b], f"again {b}", context_id=started[b])
            await _send(clients[b], f"new {b}")
        rig.releases.set(AGENT, ReleaseSpec())  # aborted: no canary any more
        for b in BINDINGS:
            await _send(clients[b], f"after abort {b}", context_id=started[b])

    on_canary = [(r.text, r.context_id) for r in rig.canary.requests]
    assert on_canary == [(f"start {b}", started[b]) for b in BINDINGS] + [
        (f"again {b}", started[b]) for b in BINDINGS
    ]
    assert [r.text for r in rig.stable.requests] == [f"new {b}" for b in BINDINGS] + [
        f"after abort {b}" for b in BINDINGS
    ]
    assert len(set(started.values())) == len(BINDINGS)


# ---------------------------------------------------------------- the inbound


def _rpc_send(text: str) -> dict[str, Any]:
    message = {"role": "ROLE_USER", "messageId": uuid.uuid4().hex, "parts": [{"text": text}]}
    return {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message}}


@dataclass
class InboundRig:
    runner: ScriptedRunner
    inbound: InboundServer
    grpc_inbound: GrpcInbound
    pki: PkiClient


@pytest.fixture
async def inbound_rig(issuer: JwksIssuer, pki: PkiClient) -> AsyncIterator[InboundRig]:  # noqa: F811
    """AGENT's mTLS inbounds; partners ``partner-a`` and ``partner-b`` both list AGENT, but
    AGENT's ``callers.agents`` admits ``partner-a`` only."""
    snapshot = _snapshot(AGENT, principals=[ALICE])
    callers = snapshot.spec.base.callers
    assert callers is not None
    spec = snapshot.spec.model_copy(
        update={
            "base": snapshot.spec.base.model_copy(
                update={"callers": callers.model_copy(update={"agents": ["partner-a"]})}
            )
        }
    )
    policy, verifier = await _caller_policy(
        issuer,
        snapshot=snapshot.model_copy(update={"spec": spec}),
        partners={"partner-a": [AGENT], "partner-b": [AGENT]},
    )
    runner = ScriptedRunner()
    config = ServerConfig(agent_name=AGENT, http_port=0, grpc_port=0, drain_timeout=2.0)
    async with (
        verifier,
        AgentCertificates(agent=AGENT, pki=pki) as certs,
        EngineServer(runner=runner, config=config) as engine,
        InboundServer(
            agent_name=AGENT, engine_http=engine.http_url, policy=policy, certificates=certs
        ) as inbound,
        GrpcInbound(
            agent_name=AGENT, engine_grpc=engine.grpc_target, policy=policy, certificates=certs
        ) as grpc_inbound,
    ):
        yield InboundRig(runner, inbound, grpc_inbound, pki)


async def _call_inbound_http(
    rig: InboundRig, certs: AgentCertificates, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            rig.inbound.url + "/",
            json=_rpc_send("over http"),
            headers={"A2A-Version": "1.0", **headers},
            ssl=certs.client_context,
            server_hostname=agent_dns_name(AGENT),
        ) as r,
    ):
        return r.status, await r.json()


async def _call_inbound_grpc(
    rig: InboundRig, certs: AgentCertificates, metadata: list[tuple[str, str]]
) -> bytes:
    cert = certs.current
    creds = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_pem.encode(),
        private_key=cert.private_key.encode(),
        certificate_chain=(cert.certificate + "\n" + cert.ca_chain).encode(),
    )
    options = [("grpc.ssl_target_name_override", agent_dns_name(AGENT))]
    async with grpc.aio.secure_channel(rig.grpc_inbound.target, creds, options=options) as ch:
        call = ch.unary_unary(f"/{A2A_SERVICE}/SendMessage")
        response: bytes = await call(
            _message("over grpc").SerializeToString(), metadata=metadata, timeout=WAIT
        )
        return response


async def test_inbound_strips_a_principal_sent_by_another_agent(inbound_rig: InboundRig) -> None:
    async with AgentCertificates(agent="partner-a", pki=inbound_rig.pki) as certs:
        status, _ = await _call_inbound_http(inbound_rig, certs, {PRINCIPAL_HEADER: ALICE})
        await _call_inbound_grpc(inbound_rig, certs, [(PRINCIPAL_KEY, ALICE)])
    assert status == 200
    assert [r.text for r in inbound_rig.runner.requests] == ["over http", "over grpc"]
    for request in inbound_rig.runner.requests:
        assert request.headers[CALLER_KEY] == "partner-a"
        assert PRINCIPAL_KEY not in request.headers


async def test_inbound_applies_callers_agents_on_both_bindings(inbound_rig: InboundRig) -> None:
    async with AgentCertificates(agent="partner-b", pki=inbound_rig.pki) as certs:
        status, body = await _call_inbound_http(inbound_rig, certs, {})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call_inbound_grpc(inbound_rig, certs, [])
    assert status == 403
    assert body["error"]["status"] == "PERMISSION_DENIED"
    assert "callers.agents" in body["error"]["message"]
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "callers.agents" in (info.value.details() or "")
    assert inbound_rig.runner.requests == []


# ---------------------------------------------------------------- Istio mode


async def test_istio_inbound_verifies_tokens_and_takes_the_caller_from_xfcc(
    issuer: JwksIssuer,
) -> None:
    """Istio mode: the caller is the agent the local proxy's XFCC element names (of this
    trust domain and namespace, and admitted like a partner over mTLS); a token is verified
    when sent; a call naming neither is refused (a pod that went around the mesh's policy),
    and an XFCC a client shaped to hide the proxy's element names nobody."""
    policy, verifier = await _caller_policy(
        issuer,
        partners={"partner-a": [AGENT], "victim": [AGENT]},
        mesh_trust_domain="cluster.local",
        mesh_namespace="default",
    )
    runner = ScriptedRunner()
    config = ServerConfig(agent_name=AGENT, http_port=0, grpc_port=0, drain_timeout=2.0)
    forged = "By=x;URI=spiffe://cluster.local/ns/default/sa/specmesh-agent-forged"
    real = (
        'By=y;Hash=ab;Subject="";URI=spiffe://cluster.local/ns/default/sa/specmesh-agent-partner-a'
    )
    shaped = 'URI=spiffe://cluster.local/ns/default/sa/specmesh-agent-victim;X="'
    elsewhere = "By=y;URI=spiffe://cluster.local/ns/other/sa/specmesh-agent-victim"
    async with (
        verifier,
        EngineServer(runner=runner, config=config) as engine,
        InboundServer(
            agent_name=AGENT,
            engine_http=engine.http_url,
            policy=policy,
            certificates=None,
            require_identity=True,
        ) as inbound,
        GrpcInbound(
            agent_name=AGENT,
            engine_grpc=engine.grpc_target,
            policy=policy,
            certificates=None,
            require_identity=True,
        ) as grpc_inbound,
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(grpc_inbound.target) as channel,
    ):
        v1 = {"A2A-Version": "1.0"}

        async def post(text: str, headers: dict[str, str]) -> tuple[int, Any]:
            async with http.post(
                inbound.url + "/", json=_rpc_send(text), headers={**v1, **headers}
            ) as r:
                return r.status, await r.json()

        token = {"Authorization": f"Bearer {issuer.token()}"}
        xfcc = "X-Forwarded-Client-Cert"
        sent = await post("istio", {xfcc: f"{forged},{real}", CALLER_HEADER: "forged", **token})
        assert sent[0] == 200
        assert (await post("partner alone", {xfcc: real}))[0] == 200
        nobody = await post("no token", {})
        shaped_alone = await post("shaped", {xfcc: f"{shaped},{real}"})
        shaped_token = await post("shaped with token", {xfcc: f"{shaped},{real}", **token})
        other_ns = await post("other namespace", {xfcc: elsewhere})
        bad = await post("bad", {"Authorization": f"Bearer {issuer.token(aud='x')}"})
        async with http.get(inbound.url + "/.well-known/agent-card.json", headers=v1) as r:
            card_status = r.status
        call = channel.unary_unary(f"/{A2A_SERVICE}/SendMessage")
        await call(
            _message("istio grpc").SerializeToString(),
            metadata=[
                ("x-forwarded-client-cert", real),
                ("authorization", f"Bearer {issuer.token()}"),
                (PRINCIPAL_KEY, "forged/principal"),
            ],
            timeout=WAIT,
        )
        refusals = []
        for metadata in (
            [("authorization", f"Bearer {issuer.token('bob')}")],
            [],
            [("x-forwarded-client-cert", f"{shaped},{real}")],
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(_message("refused").SerializeToString(), metadata=metadata, timeout=WAIT)
            refusals.append(info.value.code())
    assert nobody[0] == 401 and nobody[1]["error"]["status"] == "UNAUTHENTICATED"
    assert shaped_alone[0] == 401  # the shaped XFCC names nobody: no agent, no token
    assert shaped_token[0] == 200
    assert other_ns[0] == 401
    assert bad[0] == 401 and "wrong audience" in bad[1]["error"]["message"]
    assert card_status == 200  # the card needs no identity
    assert refusals == [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNAUTHENTICATED,
    ]
    texts = [r.text for r in runner.requests]
    assert texts == ["istio", "partner alone", "shaped with token", "istio grpc"]
    by_text = {r.text: r.headers for r in runner.requests}
    assert (by_text["istio"][CALLER_KEY], by_text["istio"][PRINCIPAL_KEY]) == ("partner-a", ALICE)
    assert by_text["partner alone"][CALLER_KEY] == "partner-a"
    assert CALLER_KEY not in by_text["shaped with token"]
    assert by_text["shaped with token"][PRINCIPAL_KEY] == ALICE
    grpc_headers = by_text["istio grpc"]
    assert (grpc_headers[CALLER_KEY], grpc_headers[PRINCIPAL_KEY]) == ("partner-a", ALICE)


# ---------------------------------------------------------------- JWKS fetching


async def test_jwks_is_cached_and_refetched_for_a_new_kid_at_most_every_few_seconds(
    issuer: JwksIssuer,
) -> None:
    now = [1000.0]
    verifier = JwtVerifier(
        issuers=[issuer.config()], agent=AGENT, min_refetch=5.0, clock=lambda: now[0]
    )
    policy = CallerPolicy(
        agent=AGENT, graph=InMemoryPartnerGraph({}), callers=lambda: None, verifier=verifier
    )
    async with verifier:
        assert await policy.authenticate(f"Bearer {issuer.token()}") == ALICE
        assert await policy.authenticate(f"Bearer {issuer.token('bob')}") == f"{ISSUER}/bob"
        assert issuer.fetches == 1  # cached
        # the issuer rotates its key: a token with the new kid
        issuer.key, issuer.kid = ec.generate_private_key(ec.SECP256R1()), "k2"
        now[0] += 1.0  # too soon after the last fetch: no refetch, the kid is unknown
        with pytest.raises(CallerRefused, match="has no key 'k2'"):
            await policy.authenticate(f"Bearer {issuer.token()}")
        assert issuer.fetches == 1
        now[0] += 5.0
        assert await policy.authenticate(f"Bearer {issuer.token()}") == ALICE
        assert issuer.fetches == 2
        # a flood of unknown kids does not become a flood of fetches
        issuer.kid = "k3"
        for _ in range(5):
            with pytest.raises(CallerRefused):
                await policy.authenticate(f"Bearer {issuer.token()}")
        assert issuer.fetches == 2


async def test_keys_fetched_in_the_background_verify_tokens_while_the_issuer_is_down(
    issuer: JwksIssuer,
) -> None:
    """The verifier fetches every issuer's JWKS as it starts, not at the first token: an
    issuer (the control plane) that goes away before any token arrives leaves the keys."""
    verifier = JwtVerifier(issuers=[issuer.config()], agent=AGENT, min_refetch=0.1)
    policy = CallerPolicy(
        agent=AGENT, graph=InMemoryPartnerGraph({}), callers=lambda: None, verifier=verifier
    )
    async with verifier:
        refresher = asyncio.create_task(verifier.run())
        try:
            await eventually(lambda: issuer.fetches >= 1, timeout=WAIT, what="the JWKS fetch")
            assert issuer.runner is not None
            await issuer.runner.cleanup()  # the issuer is gone
            assert await policy.authenticate(f"Bearer {issuer.token()}") == ALICE
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher


async def test_a_subject_that_is_no_usable_principal_is_refused_and_untrusted_values_bounded(
    issuer: JwksIssuer,
) -> None:
    verifier = JwtVerifier(issuers=[issuer.config()], agent=AGENT)
    policy = CallerPolicy(
        agent=AGENT, graph=InMemoryPartnerGraph({}), callers=lambda: None, verifier=verifier
    )
    async with verifier:
        for sub in ("al\r\nice", "al ice", "a" * 600):
            with pytest.raises(CallerRefused, match="not a usable principal"):
                await policy.authenticate(f"Bearer {issuer.token(sub)}")
        with pytest.raises(CallerRefused) as info:
            await policy.authenticate(f"Bearer {issuer.token(iss='x' * 5000)}")
    assert "is not trusted" in info.value.message and len(info.value.message) < 200
