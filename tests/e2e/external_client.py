"""An external A2A client as a real user would build one: the official a2a-sdk client made
from an agent's card alone, with a bearer JWT of a test issuer the fleet's sidecars trust."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import httpx
import jwt
from a2a.client import Client, ClientConfig, create_client
from a2a.types.a2a_pb2 import AgentCard, Message, Part, Role
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.json_format import ParseDict

__all__ = ["TEST_ISSUER", "TestIssuer", "card_from", "client_for", "user_message"]

TEST_ISSUER = "https://issuer.test.specmesh.invalid"


class TestIssuer:
    """An ES256 key and its JWKS (given inline to the sidecars)."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        public = jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        self.jwks = {"keys": [{**public, "kid": "test-1", "use": "sig", "alg": "ES256"}]}

    @property
    def config(self) -> dict[str, Any]:
        """This issuer as a ``SPECMESH_JWT_ISSUERS`` entry."""
        return {"issuer": TEST_ISSUER, "jwks": self.jwks, "audiences": ["{agent}"]}

    def token(self, subject: str, *, audience: str, ttl: int = 300) -> str:
        now = int(time.time())
        claims = {"iss": TEST_ISSUER, "sub": subject, "aud": audience, "iat": now, "exp": now + ttl}
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": "test-1"})


def _with_token(details: Any, token: str | None) -> Any:
    if token is None:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), ("authorization", f"Bearer {token}"))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _BearerUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <token>`` to unary calls."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _BearerStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <token>`` to server-streaming calls."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


def card_from(raw: dict[str, Any]) -> AgentCard:
    """The card as the SDK's type (unknown fields of newer cards ignored)."""
    card = AgentCard()
    ParseDict(raw, card, ignore_unknown_fields=True)
    return card


async def client_for(
    card: AgentCard, binding: str, token: str | None, *, streaming: bool
) -> Client:
    """A client of ``binding`` made from ``card`` alone; ``token`` (if any) on every call."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    config = ClientConfig(
        streaming=streaming,
        supported_protocol_bindings=[binding],
        httpx_client=httpx.AsyncClient(headers=headers, timeout=60),
        grpc_channel_factory=lambda target: grpc.aio.insecure_channel(
            target, interceptors=[_BearerUnary(token), _BearerStream(token)]
        ),
    )
    return await create_client(card, client_config=config)


def user_message(text: str) -> Message:
    return Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=[Part(text=text)])
