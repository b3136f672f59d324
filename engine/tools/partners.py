"""Partner agents as tools: ``ask_<partner>`` sends an A2A message through the sidecar.

For each ``partnerAgents`` entry the model gets a tool whose description comes from the
partner's agent card, fetched through ``{egress}/a2a/<agent>/.well-known/agent-card.json``;
while the card cannot be fetched a generic description stands in and the fetch is
retried later. A call is an A2A ``SendMessage`` (JSON-RPC binding, official ``a2a-sdk``
client) to ``{egress}/a2a/<agent>``, whatever URL the card advertises: the sidecar routes
it. It carries ``X-Specmesh-Call-Depth: depth+1`` and the trace context, and is refused
with a tool error when ``depth+1`` would pass the limit (stops A -> B -> A loops).

The partner sees one conversation per caller conversation: the contextId sent is derived
from the caller's agent name and contextId.

Cost (:mod:`engine.ledger`): a call carries the sidecar's ledger entry of the turn (header
``X-Specmesh-Ledger``, which the sidecar charges and checks) and what the turn's own book
says is left (message metadata ``specmesh.budgetUsd``; the partner's sidecar also gets this
sidecar's figure); the ``cost`` metadata of the partner's answer is booked in the turn's
ledger. A call the sidecar refuses (``BUDGET_EXCEEDED``,
``NOT_DECLARED``...) is a tool error with the sidecar's message (its own text: no secret).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import httpx
from a2a.client import A2ACardResolver, ClientCallContext, ClientConfig
from a2a.client.base_client import BaseClient
from a2a.client.client_factory import minimal_agent_card
from a2a.client.transports.jsonrpc import JsonRpcTransport
from a2a.types.a2a_pb2 import (
    AgentCard,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    Task,
    TaskState,
)
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import A2AError
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct
from opentelemetry import propagate

from specmesh.aio import cancel_and_wait

from ..errors import CallDepthExceededError, ToolError, ToolTimeoutError
from ..ledger import BUDGET_METADATA, COST_METADATA
from . import ToolCallContext, ToolDefinition, tool_name

__all__ = ["CALL_DEPTH_HEADER", "PartnerTool"]

logger = logging.getLogger(__name__)

CALL_DEPTH_HEADER = "X-Specmesh-Call-Depth"
"""How many agents deep a call is; passed through unchanged by the sidecars."""

_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "message": {
            "type": "string",
            "description": "What to ask the agent, self-contained: it does not see this "
            "conversation.",
        }
    },
    "required": ["message"],
}
_FAILED = {
    TaskState.TASK_STATE_FAILED,
    TaskState.TASK_STATE_REJECTED,
    TaskState.TASK_STATE_CANCELED,
}


class PartnerTool:
    """``ask_<partner>``: one partner agent the model can ask."""

    kind = "agent"

    def __init__(
        self,
        *,
        caller: str,
        partner: str,
        egress_url: str,
        http: httpx.AsyncClient,
        max_depth: int = 4,
        card_timeout: float = 5.0,
        card_retry: float = 30.0,
    ) -> None:
        self.partner = partner
        self._caller = caller
        self._url = f"{egress_url.rstrip('/')}/a2a/{partner}"
        self._http = http
        self._max_depth = max_depth
        self._card_timeout = card_timeout
        self._card_retry = card_retry
        self._name = tool_name(f"ask_{partner}")
        self._description = (
            f"Ask the agent {partner!r} (its description is not available right now)."
        )
        self._card: AgentCard | None = None
        self._next_fetch = 0.0
        self._fetching: asyncio.Task[None] | None = None
        card = minimal_agent_card(self._url, [TransportProtocol.JSONRPC])
        self._client = BaseClient(
            card,
            ClientConfig(streaming=False, httpx_client=http),
            JsonRpcTransport(http, card, self._url, is_shared_httpx=True),
            [],
        )

    @property
    def definition(self) -> ToolDefinition:
        return ToolDefinition(
            name=self._name, description=self._description, parameters=_PARAMETERS
        )

    @property
    def card(self) -> AgentCard | None:
        """The partner's card, once fetched."""
        return self._card

    # ------------------------------------------------------------ agent card

    async def fetch_card(self) -> bool:
        """Fetch the partner's card now; True when it worked."""
        self._next_fetch = time.monotonic() + self._card_retry
        resolver = A2ACardResolver(self._http, self._url)
        try:
            card = await resolver.get_agent_card(http_kwargs={"timeout": self._card_timeout})
        except (A2AError, httpx.HTTPError, ValueError) as e:
            logger.warning(
                "agent card of partner %s unavailable (%s); using a generic description",
                self.partner,
                type(e).__name__,
            )
            return False
        self._card = card
        self._description = _describe_card(card, self.partner)
        return True

    def refresh_card_if_due(self) -> None:
        """Start fetching the card in the background if it is missing and a retry is due."""
        if self._card is not None or time.monotonic() < self._next_fetch:
            return
        if self._fetching is not None and not self._fetching.done():
            return
        self._fetching = asyncio.create_task(self._fetch_quietly())

    async def _fetch_quietly(self) -> None:
        await self.fetch_card()

    async def aclose(self) -> None:
        """Stop a background card fetch."""
        await cancel_and_wait(self._fetching)

    # ------------------------------------------------------------ calls

    async def call(self, arguments: Mapping[str, Any], *, context: ToolCallContext) -> str:
        depth = context.call_depth + 1
        if depth > self._max_depth:
            raise CallDepthExceededError(tool=self._name, depth=depth, limit=self._max_depth)
        text = arguments.get("message")
        if not isinstance(text, str) or not text.strip():
            raise ToolError(tool=self._name, reason="argument 'message' (a string) is required")
        headers: dict[str, str] = {CALL_DEPTH_HEADER: str(depth)}
        metadata = Struct()
        ledger = context.ledger
        if ledger is not None:
            headers.update(ledger.headers())
            if ledger.remaining_usd is not None:
                metadata.update({BUDGET_METADATA: ledger.remaining_usd})
        propagate.inject(headers)
        partner_context = str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"specmesh:{self._caller}:{context.context_id}")
        )
        request = SendMessageRequest(
            message=Message(
                role=Role.ROLE_USER,
                message_id=str(uuid.uuid4()),
                context_id=partner_context,
                parts=[Part(text=text)],
                metadata=metadata,
            ),
            configuration=SendMessageConfiguration(accepted_output_modes=["text/plain"]),
        )
        call_context = ClientCallContext(service_parameters=headers, timeout=context.timeout)
        last: StreamResponse | None = None
        try:
            async with asyncio.timeout(context.timeout):
                async for event in self._client.send_message(request, context=call_context):
                    last = event
        except TimeoutError as e:
            raise ToolTimeoutError(tool=self._name, timeout=context.timeout) from e
        except A2AError as e:
            why = _sidecar_refusal(e) or str(e)
            raise ToolError(
                tool=self._name, reason=f"agent {self.partner!r} could not answer: {why}"
            ) from e
        except (httpx.HTTPError, ValueError) as e:
            raise ToolError(
                tool=self._name,
                reason=f"agent {self.partner!r} could not answer: {type(e).__name__}",
            ) from e
        if ledger is not None:
            ledger.add_partner_answer(_answer_cost(last))
        return _answer(last, self.partner, self._name)


def _sidecar_refusal(error: A2AError) -> str | None:
    """The message of the sidecar's AIP-193 error body behind an HTTP error of the call
    (the sidecar's own text, never a secret); None when there is none."""
    cause = error.__cause__
    if not isinstance(cause, httpx.HTTPStatusError):
        return None
    try:
        message = cause.response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError, httpx.ResponseNotRead):
        return None
    return message if isinstance(message, str) else None


def _answer_cost(event: StreamResponse | None) -> Any:
    """The ``cost`` metadata of the partner's answer artifact, or of its failure's status
    message (a failed turn spent too); None when it has none or it is not JSON (an
    infinite or NaN number)."""
    if event is None or not event.HasField("task"):
        return None
    task = event.task
    holders = [a.metadata for a in task.artifacts]
    if task.status.HasField("message"):
        holders.append(task.status.message.metadata)
    for metadata in holders:
        if COST_METADATA in metadata:
            try:
                return MessageToDict(metadata).get(COST_METADATA)
            except ValueError:  # an infinite or NaN number: malformed, not booked
                return None
    return None


def _describe_card(card: AgentCard, partner: str) -> str:
    lines = [card.description or f"The agent {partner!r}."]
    for skill in card.skills:
        line = f"- {skill.name}"
        if skill.description:
            line += f": {skill.description}"
        lines.append(line)
    return "\n".join(lines)[:1024]


def _parts_text(parts: Any) -> str:
    return "\n".join(p.text for p in parts if p.HasField("text"))


def _task_text(task: Task) -> str:
    texts = [_parts_text(a.parts) for a in task.artifacts]
    text = "\n".join(t for t in texts if t)
    if not text and task.status.HasField("message"):
        text = _parts_text(task.status.message.parts)
    if not text:
        for m in reversed(task.history):
            if m.role == Role.ROLE_AGENT:
                text = _parts_text(m.parts)
                break
    return text


def _answer(event: StreamResponse | None, partner: str, tool: str) -> str:
    if event is None:
        raise ToolError(tool=tool, reason=f"agent {partner!r} sent no answer")
    if event.HasField("message"):
        return _parts_text(event.message.parts)
    if event.HasField("task"):
        task = event.task
        text = _task_text(task)
        if task.status.state in _FAILED:
            state = TaskState.Name(task.status.state).removeprefix("TASK_STATE_").lower()
            raise ToolError(tool=tool, reason=f"agent {partner!r} {state}: {text}".rstrip(": "))
        return text
    raise ToolError(tool=tool, reason=f"agent {partner!r} sent an unexpected answer")
