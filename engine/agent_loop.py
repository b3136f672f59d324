"""The agent loop: model -> tool calls -> results back -> ... -> a final answer.

One turn, on one :class:`RuntimeContext`:

1. choose the prompt version for the conversation, recall its history (search strategy,
   compression: :mod:`engine.recall`); with a knowledge
   base in ``auto`` mode, search it with the user's message and add the passages as a
   system message (in ``tool`` mode, offer ``search_knowledge`` instead);
2. call the model with the tools the context offers, its text as :class:`TextDelta` s
   (streamed when the caller streams, ``TurnRequest.stream``; else one);
3. if it asks for tools, run them concurrently (a task group, each call with the tool
   timeout), report :class:`ToolCallStarted` / :class:`ToolCallFinished`, append the
   results and call the model again; a failing tool's error is its result, the turn
   goes on;
   Every model call is priced and booked in the turn's :class:`~engine.ledger.CostLedger`
   with what partners' answers carried; what is left of the request's budget goes with
   each model and partner call (the sidecar refuses a call that would pass it);
4. stop at the first answer without tool calls (:class:`TurnCompleted`, the history is
   extended) or after ``max_steps`` model calls (:class:`TurnFailed` ``step_limit``).

Exactly one TurnCompleted or TurnFailed ends the stream. Closing or cancelling the
iteration cancels the model call or tool calls in flight; the ``invoke_agent`` span then
says ``specmesh.turn.outcome=cancelled`` and ``error.type=cancelled`` -- unless the last
event was already out (a consumer that stops after TurnCompleted closes a completed turn).
Spans: ``invoke_agent`` around the turn, ``chat`` per model call (in :mod:`engine.llm`),
``execute_tool`` per tool call, ``retrieve`` per knowledge search (in
:mod:`engine.knowledge`); no message content unless ``record_content``. The passages
retrieved become the answer's citations.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .context import RuntimeContext
from .errors import MemoryStoreError, ModelError, ToolError
from .knowledge.base import KnowledgeBase, Passage, passages_message
from .knowledge.errors import KnowledgeError
from .ledger import LEDGER_HEADER, CostLedger
from .llm import ModelReply, TextChunk, ToolCallRequest
from .tools import Tool, ToolCallContext
from .turn_protocol import (
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnCompleted,
    TurnEvent,
    TurnFailed,
    TurnRequest,
)

__all__ = ["LoopLimits", "run_turn"]

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


@dataclass(frozen=True)
class LoopLimits:
    """Bounds of one turn."""

    max_steps: int = 8
    """Model calls per turn."""
    tool_timeout: float = 30.0
    """Seconds one tool call may take."""
    record_content: bool = False
    """Record message content and tool arguments/results in spans."""


async def run_turn(
    context: RuntimeContext,
    request: TurnRequest,
    *,
    limits: LoopLimits,
    parent: otel_context.Context | None = None,
) -> AsyncGenerator[TurnEvent, None]:
    """Run one turn on ``context``; see the module docstring."""
    prompt = context.prompt.choose(request.context_id)
    span = tracer.start_span(
        f"invoke_agent {context.agent_name}", context=parent, kind=SpanKind.INTERNAL
    )
    span.set_attributes(
        {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": context.agent_name,
            "gen_ai.conversation.id": request.context_id,
            "gen_ai.request.model": context.model.name,
            "specmesh.spec.revision": context.revision,
            "specmesh.prompt.key": context.prompt.prompt_key,
            "specmesh.prompt.version": prompt.version,
            "specmesh.call_depth": request.call_depth,
        }
    )
    turn_ctx = trace.set_span_in_context(span, parent)
    chat_attributes = {
        "specmesh.prompt.version": prompt.version,
        "specmesh.spec.revision": context.revision,
    }
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    ledger = CostLedger(
        budget_usd=request.budget_usd,
        spec_budget_usd=context.model.spec.budget_per_request_usd,
        ledger_id=request.headers.get(LEDGER_HEADER),
    )
    outcome = "error"
    ended = False  # the last event is out: the consumer closing us now is no cancellation
    try:
        tools = context.tools()
        passages: list[Passage] = []
        knowledge = context.knowledge
        if knowledge is not None and knowledge.mode == "tool":
            search = knowledge.tool(passages)
            tools.setdefault(search.definition.name, search)
        definitions = [t.definition.openai() for t in tools.values()]
        recalled = await context.recall.recall(
            request.context_id,
            request.text,
            system=[{"role": "system", "content": prompt.text}],
            tools=definitions,
            parent=turn_ctx,
            headers=ledger.headers(),
        )
        history = recalled.messages
        user = {"role": "user", "content": request.text}
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": prompt.text},
            *history,
        ]
        if knowledge is not None and knowledge.mode == "auto":
            passages.extend(await _retrieve(knowledge, request.text, parent=turn_ctx))
            if passages:
                messages.append(passages_message(passages))
        messages.append(user)
        for _step in range(limits.max_steps):
            reply: ModelReply | None = None
            stream = context.model.stream(
                messages,
                tools=definitions,
                parent=turn_ctx,
                attributes=chat_attributes,
                streaming=request.stream,
                headers=ledger.headers(),
            )
            async with aclosing(stream):
                async for item in stream:
                    if isinstance(item, TextChunk):
                        yield TextDelta(item.text)
                    else:
                        reply = item
            assert reply is not None
            for key in usage:
                usage[key] += reply.usage.get(key, 0)
            ledger.add_model_call(reply.model, reply.cost_usd, unpriced=reply.unpriced)
            if not reply.tool_calls:
                await context.recall.record(recalled, reply.text, parent=turn_ctx)
                outcome, ended = "completed", True
                if limits.record_content:
                    span.set_attribute("specmesh.answer", reply.text)
                yield TurnCompleted(
                    text=reply.text,
                    revision=context.revision,
                    prompt_version=prompt.version,
                    usage=dict(usage),
                    citations=_citations(passages),
                    model=context.model.name,
                    cost=ledger.metadata(),
                )
                return
            messages.append(reply.assistant_message())
            for call in reply.tool_calls:
                yield ToolCallStarted(
                    call_id=call.id, name=call.name, arguments=_arguments_for_event(call)
                )
            results = await _run_tools(
                reply.tool_calls, tools, request, ledger, limits=limits, parent=turn_ctx
            )
            for call, (ok, text) in zip(reply.tool_calls, results, strict=True):
                messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
                yield ToolCallFinished(call_id=call.id, name=call.name, ok=ok, result=text)
        outcome, ended = "step_limit", True
        yield TurnFailed(
            code="step_limit",
            message=f"no answer after {limits.max_steps} model calls (the step limit)",
            revision=context.revision,
            cost=ledger.metadata(),
        )
    except ModelError as e:
        outcome = e.code
        span.set_status(Status(StatusCode.ERROR, e.reason))
        span.set_attribute("error.type", type(e).__name__)
        yield TurnFailed(
            code=e.code, message=str(e), revision=context.revision, cost=ledger.metadata()
        )
    except MemoryStoreError as e:
        outcome = e.code
        span.set_status(Status(StatusCode.ERROR, e.reason))
        span.set_attribute("error.type", type(e).__name__)
        yield TurnFailed(
            code=e.code, message=str(e), revision=context.revision, cost=ledger.metadata()
        )
    except (asyncio.CancelledError, GeneratorExit):
        if not ended:
            outcome = "cancelled"
            span.set_attribute("error.type", "cancelled")
        raise
    except Exception as e:  # top of the turn: report, never crash the server
        logger.exception("turn failed in agent %s", context.agent_name)
        span.set_status(Status(StatusCode.ERROR, type(e).__name__))
        span.set_attribute("error.type", type(e).__name__)
        yield TurnFailed(
            code="internal",
            message="internal error",
            revision=context.revision,
            cost=ledger.metadata(),
        )
    finally:
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": usage["prompt_tokens"],
                "gen_ai.usage.output_tokens": usage["completion_tokens"],
                "specmesh.turn.outcome": outcome,
                "specmesh.cost.usd": ledger.own_usd,
                "specmesh.cost.total_usd": ledger.total_usd,
            }
        )
        if ledger.unpriced:
            span.set_attribute("specmesh.cost.unpriced_models", sorted(ledger.unpriced))
        span.end()


async def _retrieve(
    knowledge: KnowledgeBase, query: str, *, parent: otel_context.Context
) -> list[Passage]:
    """Passages for ``auto`` mode; a failing search is logged and the turn goes on."""
    try:
        return await knowledge.search(query, parent=parent)
    except KnowledgeError as e:
        logger.warning("knowledge search failed, answering without passages: %s", e.reason)
        return []


def _citations(passages: list[Passage]) -> tuple[dict[str, Any], ...]:
    """One citation per chunk used, best score first."""
    best: dict[str, Passage] = {}
    for p in passages:
        if p.chunk_id not in best or p.score > best[p.chunk_id].score:
            best[p.chunk_id] = p
    return tuple(p.citation() for p in sorted(best.values(), key=lambda p: -p.score))


def _arguments_for_event(call: ToolCallRequest) -> Mapping[str, Any]:
    try:
        parsed = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return {"_raw": call.arguments}
    return parsed if isinstance(parsed, dict) else {"_value": parsed}


async def _run_tools(
    calls: Sequence[ToolCallRequest],
    tools: Mapping[str, Tool],
    request: TurnRequest,
    ledger: CostLedger,
    *,
    limits: LoopLimits,
    parent: otel_context.Context,
) -> list[tuple[bool, str]]:
    """Run the calls concurrently; each result is (ok, text for the model)."""
    call_context = ToolCallContext(
        context_id=request.context_id,
        call_depth=request.call_depth,
        timeout=limits.tool_timeout,
        ledger=ledger,
    )
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(
                _run_tool(call, tools.get(call.name), call_context, limits=limits, parent=parent)
            )
            for call in calls
        ]
    return [t.result() for t in tasks]


async def _run_tool(
    call: ToolCallRequest,
    tool: Tool | None,
    call_context: ToolCallContext,
    *,
    limits: LoopLimits,
    parent: otel_context.Context,
) -> tuple[bool, str]:
    span = tracer.start_span(f"execute_tool {call.name}", context=parent)
    span.set_attributes(
        {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": call.name,
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "function",
            "specmesh.tool.kind": tool.kind if tool is not None else "unknown",
        }
    )
    if limits.record_content:
        span.set_attribute("gen_ai.tool.call.arguments", call.arguments)
    with trace.use_span(span, end_on_exit=True, record_exception=False):
        ok, text = await _call_tool(call, tool, call_context)
        if not ok:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", "tool_error")
        if limits.record_content:
            span.set_attribute("gen_ai.tool.call.result", text)
        return ok, text


async def _call_tool(
    call: ToolCallRequest, tool: Tool | None, call_context: ToolCallContext
) -> tuple[bool, str]:
    if tool is None:
        return False, f"error: there is no tool named {call.name!r}"
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as e:
        return False, f"error: the arguments are not valid JSON ({e.msg})"
    if not isinstance(arguments, dict):
        return False, "error: the arguments must be a JSON object"
    try:
        async with asyncio.timeout(call_context.timeout):
            return True, await tool.call(arguments, context=call_context)
    except ToolError as e:
        return False, f"error: {e.reason}"
    except TimeoutError:
        return False, f"error: tool {call.name!r} timed out after {call_context.timeout:g} s"
    except Exception:  # top of the tool task: the model gets an error, the turn goes on
        logger.exception("tool %s failed unexpectedly", call.name)
        return False, f"error: tool {call.name!r} failed unexpectedly"
