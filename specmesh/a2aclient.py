"""Talking to an agent over A2A with the official a2a-sdk client (``specmesh invoke``/``chat``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from a2a.client import ClientConfig, create_client
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, TaskState
from google.protobuf.json_format import MessageToDict

__all__ = ["InvokeResult", "invoke"]


@dataclass
class InvokeResult:
    text: str
    context_id: str
    state: str
    tool_calls: list[str] = field(default_factory=list)


async def invoke(
    url: str,
    text: str,
    *,
    context_id: str | None = None,
    on_text: Callable[[str], None] | None = None,
    binding: str = "JSONRPC",
) -> InvokeResult:
    """Send ``text`` to the agent at ``url`` and stream the answer (``on_text`` per piece)."""
    config = ClientConfig(streaming=True, supported_protocol_bindings=[binding])
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
    async with await create_client(url, client_config=config) as client:
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
