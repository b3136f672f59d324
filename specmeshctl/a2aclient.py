"""Talking to an agent over A2A with the official a2a-sdk client (``specmesh invoke``/``chat``).

The client is built from the agent's card alone (the card an instance published, which names
its public entry's URLs and security schemes); a bearer token, when given, is added by the
SDK's :class:`~a2a.client.auth.AuthInterceptor` for the card's HTTP Bearer scheme -- as the
``Authorization`` header on HTTP, as ``authorization`` metadata on gRPC.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from a2a.client import ClientCallContext, ClientConfig, create_client
from a2a.client.auth import AuthInterceptor, CredentialService
from a2a.client.card_resolver import parse_agent_card
from a2a.client.interceptors import ClientCallInterceptor
from a2a.types.a2a_pb2 import AgentCard, Message, Part, Role, SendMessageRequest, TaskState
from google.protobuf.json_format import MessageToDict

__all__ = ["BearerCredentials", "InvokeResult", "card_from_json", "invoke"]


class BearerCredentials(CredentialService):
    """One bearer token for every HTTP Bearer scheme a card declares (an invoke token is
    good for one agent, and the client talks to that one only)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def get_credentials(
        self, security_scheme_name: str, context: ClientCallContext | None
    ) -> str | None:
        return self._token


def card_from_json(data: dict[str, Any]) -> AgentCard:
    """An agent card as the control plane serves it (JSON), parsed the SDK's way."""
    return parse_agent_card(dict(data))


@dataclass
class InvokeResult:
    text: str
    context_id: str
    state: str
    tool_calls: list[str] = field(default_factory=list)


async def invoke(
    agent: str | AgentCard,
    text: str,
    *,
    context_id: str | None = None,
    on_text: Callable[[str], None] | None = None,
    binding: str = "JSONRPC",
    token: str | None = None,
) -> InvokeResult:
    """Send ``text`` to the agent (its card, or a base URL whose card the SDK fetches) and
    stream the answer (``on_text`` per piece); ``token`` is sent as a bearer token where the
    card declares a Bearer scheme."""
    config = ClientConfig(streaming=True, supported_protocol_bindings=[binding])
    interceptors: list[ClientCallInterceptor] | None = (
        [AuthInterceptor(BearerCredentials(token))] if token else None
    )
    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=uuid.uuid4().hex,
            context_id=context_id or "",
            parts=[Part(text=text)],
        )
    )
    streamed: list[str] = []
    final = ""
    state = "unknown"
    ctx = context_id or ""
    tools: list[str] = []
    async with await create_client(
        agent, client_config=config, interceptors=interceptors
    ) as client:
        async for event in client.send_message(request):
            if event.HasField("artifact_update"):
                update = event.artifact_update
                ctx = update.context_id or ctx
                piece = "".join(p.text for p in update.artifact.parts)
                if update.last_chunk:
                    final = piece
                else:
                    streamed.append(piece)
                    if on_text is not None:
                        on_text(piece)
            elif event.HasField("status_update"):
                status = event.status_update
                ctx = status.context_id or ctx
                state = TaskState.Name(status.status.state).removeprefix("TASK_STATE_").lower()
                meta = MessageToDict(status.metadata)
                call = meta.get("toolCall")
                if isinstance(call, dict) and call.get("state") == "started":
                    tools.append(str(call.get("name")))
                if status.status.HasField("message") and state in ("failed", "rejected"):
                    final = "".join(p.text for p in status.status.message.parts)
            elif event.HasField("task"):
                ctx = event.task.context_id or ctx
                state = TaskState.Name(event.task.status.state).removeprefix("TASK_STATE_").lower()
                for artifact in event.task.artifacts:
                    final = "".join(p.text for p in artifact.parts) or final
    text_out = final or "".join(streamed)
    if not streamed and on_text is not None and text_out:
        on_text(text_out)
    return InvokeResult(text=text_out, context_id=ctx, state=state, tool_calls=tools)
