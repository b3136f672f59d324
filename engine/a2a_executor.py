"""The a2a-sdk :class:`AgentExecutor` that runs each A2A task as one turn of the runner.

Mapping (A2A 1.0, the same for JSON-RPC, HTTP+JSON and gRPC)::

    message (text parts joined by "\\n"), contextId,   ->  TurnRequest
      header X-Specmesh-Call-Depth (default 0),
      metadata specmesh.budgetUsd (engine.ledger)
    start                                              ->  Task SUBMITTED, status WORKING
    TextDelta (streaming calls only)                   ->  artifact "answer" chunk (append)
    ToolCallStarted / ToolCallFinished                 ->  status WORKING, metadata.toolCall
    TurnCompleted                                      ->  artifact "answer" replaced by the
                                                           whole text (lastChunk), metadata
                                                           revision/promptVersion/usage
                                                           {promptTokens, completionTokens,
                                                           totalTokens}/citations/
                                                           cost (engine.ledger: the
                                                           chain's total, the
                                                           COST_EXTENSION);
                                                           status COMPLETED
    TurnFailed                                         ->  status FAILED, its message
                                                           (metadata code/revision/cost)
    CancelTask                                         ->  the running turn is cancelled,
                                                           status CANCELED

Streaming clients (``SendStreamingMessage``: the request handler marks the call with
:data:`STREAMING_STATE`) see the answer grow chunk by chunk, and the model is streamed
for them; the stored task ends with one artifact holding the whole answer, because the
final chunk replaces the streamed ones. A ``SendMessage`` caller waits for the whole
answer: the model is called non-streamed and the answer is one artifact event. A
``SendMessage`` with ``returnImmediately`` does not wait, so it is streamed too: a
``GetTask`` poller or a ``SubscribeToTask`` follower sees the answer grow.

Metadata keys are camelCase. Metadata is a protobuf ``Struct``, whose numbers are
doubles: over gRPC ``revision`` is ``1.0``; the HTTP bindings write it ``1``
(:mod:`engine.json_numbers`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from a2a.helpers.proto_helpers import new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types.a2a_pb2 import Message, Task, TaskState, TaskStatus

from engine.ledger import BUDGET_METADATA, COST_METADATA, BudgetValueError, parse_budget
from engine.turn_protocol import (
    AgentRunner,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnCompleted,
    TurnEvent,
    TurnFailed,
    TurnRequest,
)

__all__ = [
    "ANSWER_ARTIFACT_ID",
    "CALL_DEPTH_HEADER",
    "STREAMING_STATE",
    "CallDepthError",
    "EngineAgentExecutor",
    "call_headers",
    "parse_call_depth",
    "passed_on_headers",
]

logger = logging.getLogger(__name__)

CALL_DEPTH_HEADER = "x-specmesh-call-depth"
ANSWER_ARTIFACT_ID = "answer"
STREAMING_STATE = "specmesh.streaming"
"""Key of ``ServerCallContext.state``: true when the caller streams the answer."""
_PASSED_ON_PREFIX = "x-specmesh-"
_CANCEL_WAIT_S = 10.0
_TERMINAL = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_REJECTED,
    }
)


class CallDepthError(ValueError):
    """The call-depth header is not a non-negative integer."""

    def __init__(self, value: str) -> None:
        super().__init__(
            f"header {CALL_DEPTH_HEADER}: must be a non-negative integer (got {value!r})"
        )
        self.value = value


def parse_call_depth(headers: Mapping[str, str]) -> int:
    """The call depth from lower-cased ``headers``; 0 when absent."""
    raw = headers.get(CALL_DEPTH_HEADER)
    if raw is None or raw.strip() == "":
        return 0
    try:
        depth = int(raw.strip())
    except ValueError:
        raise CallDepthError(raw) from None
    if depth < 0:
        raise CallDepthError(raw)
    return depth


def call_headers(call_context: ServerCallContext) -> dict[str, str]:
    """The request's headers (HTTP) or metadata (gRPC), lower-cased, text values only."""
    headers = call_context.state.get("headers")
    if isinstance(headers, Mapping):
        return {str(k).lower(): str(v) for k, v in headers.items()}
    grpc_context = call_context.state.get("grpc_context")
    if grpc_context is not None:
        metadata = grpc_context.invocation_metadata() or ()
        return {str(k).lower(): v for k, v in metadata if isinstance(v, str)}
    return {}


def passed_on_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a turn may pass on: ``x-specmesh-*`` only (never credentials)."""
    return {k: v for k, v in headers.items() if k.startswith(_PASSED_ON_PREFIX)}


async def _aclose(events: AsyncIterator[TurnEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


class EngineAgentExecutor(AgentExecutor):
    """Runs A2A tasks on an :class:`~engine.turn_protocol.AgentRunner`; reports via
    ``TaskUpdater``."""

    def __init__(self, *, runner: AgentRunner, report_tool_calls: bool = True) -> None:
        self._runner = runner
        self._report_tool_calls = report_tool_calls
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: dict[str, asyncio.Event] = {}

    @property
    def running(self) -> int:
        """Turns running now."""
        return len(self._running)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id = context.task_id or ""
        # registered before the first await, so a cancel always finds the turn
        turn = asyncio.create_task(self._run_task(context, event_queue), name=f"turn:{task_id}")
        self._running[task_id] = turn
        try:
            await turn
        except asyncio.CancelledError:
            reported = self._cancel_requested.get(task_id)
            if reported is None or not turn.cancelled():
                raise  # execute itself was cancelled (shutdown): the turn went with it
            # cancelled through cancel(): report it before the framework moves on
            updater = TaskUpdater(event_queue, task_id, context.context_id or "")
            await updater.cancel()
            reported.set()
        finally:
            self._running.pop(task_id, None)
            if not turn.done():
                turn.cancel()

    async def _run_task(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id = context.task_id or ""
        context_id = context.context_id or ""
        updater = TaskUpdater(event_queue, task_id, context_id)
        if context.current_task is None:
            await event_queue.enqueue_event(
                Task(
                    id=task_id,
                    context_id=context_id,
                    status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                    history=[context.message] if context.message is not None else [],
                )
            )
        headers = call_headers(context.call_context)
        try:
            depth = parse_call_depth(headers)
            budget = _budget(context.message)
        except (CallDepthError, BudgetValueError) as e:
            await updater.reject(updater.new_agent_message([new_text_part(str(e))]))
            return
        request = TurnRequest(
            context_id=context_id,
            text=context.get_user_input("\n"),
            call_depth=depth,
            headers=passed_on_headers(headers),
            task_id=task_id,
            stream=context.call_context.state.get(STREAMING_STATE) is True,
            budget_usd=budget,
        )
        await updater.start_work()
        await self._play(request, updater)

    async def _play(self, request: TurnRequest, updater: TaskUpdater) -> None:
        streamed = False
        events = self._runner.run(request)
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    if not event.text or not request.stream:
                        continue  # a whole-answer caller gets the text with TurnCompleted
                    await updater.add_artifact(
                        [new_text_part(event.text)],
                        artifact_id=ANSWER_ARTIFACT_ID,
                        name="answer",
                        append=streamed,
                        last_chunk=False,
                    )
                    streamed = True
                elif isinstance(event, ToolCallStarted | ToolCallFinished):
                    if self._report_tool_calls:
                        await updater.update_status(
                            TaskState.TASK_STATE_WORKING, metadata=_tool_metadata(event)
                        )
                elif isinstance(event, TurnCompleted):
                    await updater.add_artifact(
                        [new_text_part(event.text)],
                        artifact_id=ANSWER_ARTIFACT_ID,
                        name="answer",
                        metadata=_answer_metadata(event),
                        append=False,
                        last_chunk=True,
                    )
                    await updater.complete()
                    return
                elif isinstance(event, TurnFailed):
                    await updater.failed(_failure_message(updater, event))
                    return
            await updater.failed(
                _failure_message(
                    updater, TurnFailed(code="internal", message="the turn ended without an answer")
                )
            )
        finally:
            await _aclose(events)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id = context.task_id or ""
        turn = self._running.get(task_id)
        if turn is None or turn.done():
            task = context.current_task
            if task is None or task.status.state not in _TERMINAL:
                # not running here (parked): close it out
                await TaskUpdater(event_queue, task_id, context.context_id or "").cancel()
            return
        reported = self._cancel_requested.setdefault(task_id, asyncio.Event())
        turn.cancel()
        try:
            await asyncio.wait_for(reported.wait(), _CANCEL_WAIT_S)
        except TimeoutError:
            logger.warning("turn of task %s did not report its cancellation in time", task_id)
        finally:
            self._cancel_requested.pop(task_id, None)


def _budget(message: Message | None) -> float | None:
    """The caller's budget: the message's metadata ``specmesh.budgetUsd``."""
    if message is None or BUDGET_METADATA not in message.metadata:
        return None
    return parse_budget(message.metadata[BUDGET_METADATA], where=f"metadata {BUDGET_METADATA}")


def _tool_metadata(event: ToolCallStarted | ToolCallFinished) -> dict[str, Any]:
    if isinstance(event, ToolCallStarted):
        return {"toolCall": {"callId": event.call_id, "name": event.name, "state": "started"}}
    return {
        "toolCall": {
            "callId": event.call_id,
            "name": event.name,
            "state": "finished",
            "ok": event.ok,
        }
    }


def _camel(key: str) -> str:
    """``prompt_tokens`` -> ``promptTokens``: metadata keys are camelCase, as A2A's own."""
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _answer_metadata(event: TurnCompleted) -> dict[str, Any]:
    return {
        "revision": event.revision,
        "promptVersion": event.prompt_version,
        "usage": {_camel(k): v for k, v in event.usage.items()},
        "citations": [{_camel(k): v for k, v in c.items()} for c in event.citations],
        **({COST_METADATA: dict(event.cost)} if event.cost is not None else {}),
    }


def _failure_message(updater: TaskUpdater, event: TurnFailed) -> Message:
    metadata: dict[str, Any] = {"code": event.code}
    if event.revision is not None:
        metadata["revision"] = event.revision
    if event.cost is not None:
        metadata[COST_METADATA] = dict(event.cost)
    return updater.new_agent_message([new_text_part(event.message)], metadata=metadata)
