"""The evaluation gate: prompts with expected answers, run against a release's canary
through the agent's public entry before each analysis step raises its weight.

:func:`check_answer` judges one answer against a case's properties (``contains``,
``notContains``, ``matches`` -- an RE2 pattern searched in the answer). :class:`Evaluator`
runs every case of an :class:`~specmesh.spec.models.EvaluationSpec`, at most
:data:`CONCURRENCY` at a time, each as a new A2A conversation (JSON-RPC ``SendMessage``) to
the public entry of a ready instance of the agent (the controller's observed state), with
an invoke token the control plane mints for itself: subject :data:`EVALUATION_SUBJECT`,
audience the agent, a lifetime of the case's timeout (at most the issuer's), and the
``specmesh_track: "canary"`` claim. An entry that trusts this issuer as the control
plane's (``controlPlane: true``) sends the call to a canary instance and to nothing else;
no canary instance serving is an error. A case that cannot run -- no entry, refused,
unreachable, timed out, a failed task -- fails: it never passes.

The agent's ``callers.principals`` must admit ``<issuer>/specmesh-analysis`` (as any
caller's); otherwise every case fails with the entry's ``PERMISSION_DENIED``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from a2a.client.transports.jsonrpc import JsonRpcTransport
from a2a.types.a2a_pb2 import (
    AgentCard,
    Message,
    Part,
    Role,
    SendMessageRequest,
    SendMessageResponse,
    TaskState,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER

from specmesh import regex
from specmesh.names import resource_name
from specmesh.spec.models import EvaluationCase, EvaluationSpec

__all__ = [
    "CONCURRENCY",
    "EVALUATION_SUBJECT",
    "EXCERPT_CHARS",
    "CaseResult",
    "EntryLocator",
    "EvaluationResult",
    "Evaluator",
    "StatusEntries",
    "TokenMinter",
    "check_answer",
    "not_run",
    "status_entries",
]

logger = logging.getLogger(__name__)

EVALUATION_SUBJECT = "specmesh-analysis"
"""The ``sub`` of evaluation tokens: calls arrive as principal ``<issuer>/specmesh-analysis``."""
CONCURRENCY = 4
"""Most cases run at once."""
EXCERPT_CHARS = 200
"""How much of an answer the timeline keeps."""


@dataclass(frozen=True)
class CaseResult:
    """One case's outcome."""

    name: str
    passed: bool
    failed: str | None = None
    """What failed: ``contains "x"``, ``notContains "y"``, ``matches "z"`` or ``error``."""
    excerpt: str = ""
    """The start of the answer (or of the error)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "failed": self.failed,
            "excerpt": self.excerpt,
        }


@dataclass(frozen=True)
class EvaluationResult:
    """Every case's outcome and the verdict."""

    cases: list[CaseResult]
    max_failures: int

    @property
    def failures(self) -> int:
        return sum(not c.passed for c in self.cases)

    @property
    def passed(self) -> bool:
        return self.failures <= self.max_failures

    @property
    def reason(self) -> str:
        return (
            f"evaluation: {self.failures} of {len(self.cases)} cases failed "
            f"(at most {self.max_failures} may)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "maxFailures": self.max_failures,
            "cases": [c.to_json() for c in self.cases],
        }


def _excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def check_answer(case: EvaluationCase, answer: str, *, name: str = "") -> CaseResult:
    """Whether ``answer`` has every property ``case`` expects; the first that fails."""
    name = case.name or name
    failed: str | None = None
    for text in case.contains:
        if text not in answer:
            failed = f"contains {text!r}"
            break
    else:
        for text in case.not_contains:
            if text in answer:
                failed = f"notContains {text!r}"
                break
        else:
            if case.matches is not None and not regex.search(case.matches, answer):
                failed = f"matches {case.matches!r}"
    return CaseResult(name=name, passed=failed is None, failed=failed, excerpt=_excerpt(answer))


class TokenMinter(Protocol):
    """Mints evaluation tokens (:meth:`control_plane.issuer.TokenIssuer.mint`)."""

    async def mint(
        self, *, subject: str, audience: str, track: Any = None, ttl_seconds: int | None = None
    ) -> Any: ...


class StatusEntries(Protocol):
    """Where the controller's observed state is read (the spec store)."""

    async def get_status(self, agent: str) -> dict[str, Any] | None: ...


EntryLocator = Callable[[str], Awaitable[list[str]]]
"""agent -> the public entry URLs to try (first first)."""


def status_entries(store: StatusEntries) -> EntryLocator:
    """The public entries (``endpoints.entry``) of an agent's ready instances, stable ones
    first, from the controller's observed state (the local runtime publishes them)."""

    async def locate(agent: str) -> list[str]:
        status = await store.get_status(agent) or {}
        ready = [i for i in status.get("instances") or [] if i.get("ready")]
        ready.sort(key=lambda i: i.get("track") != "stable")
        return [
            str(i["endpoints"]["entry"]) for i in ready if (i.get("endpoints") or {}).get("entry")
        ]

    return locate


@dataclass
class Evaluator:
    """Runs an evaluation against an agent's canary; see the module docstring."""

    tokens: TokenMinter
    entries: EntryLocator
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)
    """For tests (an ``httpx`` transport); the network otherwise."""

    async def run(self, agent: str, spec: EvaluationSpec) -> EvaluationResult:
        """Every case of ``spec`` against ``agent``'s canary."""
        gate = asyncio.Semaphore(CONCURRENCY)
        urls = await self.entries(agent)

        async def one(index: int, case: EvaluationCase) -> CaseResult:
            async with gate:
                return await self._case(agent, urls, index, case)

        results = await asyncio.gather(*(one(i, c) for i, c in enumerate(spec.cases)))
        return EvaluationResult(cases=list(results), max_failures=spec.max_failures)

    async def _case(
        self, agent: str, urls: Sequence[str], index: int, case: EvaluationCase
    ) -> CaseResult:
        name = case.name or f"case {index}"
        if not urls:
            return _error(name, f"agent {agent!r} has no public entry of a ready instance")
        try:
            async with asyncio.timeout(case.timeout_seconds):
                answer = await self._ask(agent, urls[index % len(urls)], case)
        except TimeoutError:
            return _error(name, f"no answer within {case.timeout_seconds:g} s")
        except Exception as e:  # the top of one case: whatever went wrong fails it
            logger.info("evaluation case %r of %s could not run: %r", name, agent, e)
            return _error(name, f"{type(e).__name__}: {e}")
        if isinstance(answer, CaseResult):
            return CaseResult(name=name, passed=False, failed=answer.failed, excerpt=answer.excerpt)
        return check_answer(case, answer, name=name)

    async def _ask(self, agent: str, url: str, case: EvaluationCase) -> str | CaseResult:
        minted = await self.tokens.mint(
            subject=EVALUATION_SUBJECT,
            audience=resource_name(agent),
            track="canary",
            ttl_seconds=int(case.timeout_seconds) + 30,
        )
        async with httpx.AsyncClient(
            headers={
                "Authorization": f"Bearer {minted.token}",
                VERSION_HEADER: PROTOCOL_VERSION_CURRENT,
            },
            timeout=case.timeout_seconds,
            transport=self.transport,
            trust_env=False,
        ) as client:
            transport = JsonRpcTransport(client, AgentCard(), url.rstrip("/") + "/")
            response = await transport.send_message(
                SendMessageRequest(
                    message=Message(
                        role=Role.ROLE_USER,
                        message_id=uuid.uuid4().hex,
                        parts=[Part(text=case.prompt)],
                    )
                )
            )
        return _answer(response)


def _error(name: str, message: str) -> CaseResult:
    return CaseResult(name=name, passed=False, failed="error", excerpt=_excerpt(message))


def _answer(response: SendMessageResponse) -> str | CaseResult:
    """The answer's text, or a failed case for a task that did not complete."""
    if response.HasField("message"):
        return "".join(p.text for p in response.message.parts)
    task = response.task
    state = TaskState.Name(task.status.state).removeprefix("TASK_STATE_").lower()
    if state != "completed":
        said = "".join(p.text for p in task.status.message.parts)
        return _error("", f"the task ended {state}" + (f": {said}" if said else ""))
    return "".join(p.text for a in task.artifacts for p in a.parts)


def not_run(spec: EvaluationSpec, why: str) -> EvaluationResult:
    """An evaluation that could not run: every case failed, for ``why``."""
    return EvaluationResult(
        cases=[_error(c.name or f"case {i}", why) for i, c in enumerate(spec.cases)],
        max_failures=spec.max_failures,
    )
