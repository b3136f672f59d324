"""Talking to an agent: ``invoke`` (one question) and ``chat`` (interactive).

They go through the agent's public entry, as any A2A client does: the agent's card
(GetAgentCard: the entry's URLs) and an invoke token (IssueInvokeToken, for the caller's API
token; role operator, admin or invoker) come from the control plane, and the official
a2a-sdk client built from that card makes the call (:mod:`specmeshctl.a2aclient`). The
agent's ``callers.principals`` must admit ``specmesh/<token name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from specmesh.protojson import message_json
from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.context import Context
from specmeshctl.errors import (
    EXIT_OK,
    EXIT_OTHER,
    AgentCallError,
    AgentCallRefusedError,
    InvokeTimeoutError,
    UsageError,
)
from specmeshctl.parsing import Registrar

__all__ = ["register"]

_TOKEN_MARGIN_SECONDS = 30.0
"""An invoke token this close to its expiry is replaced before the next message."""


def _refused(error: BaseException) -> bool:
    """Whether an a2a-sdk error came from a 401/403 answer (HTTP) or an UNAUTHENTICATED /
    PERMISSION_DENIED status (gRPC)."""
    cause = error.__cause__
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if status in (401, 403):
        return True
    code = getattr(cause, "code", None)
    if callable(code):
        try:
            name = getattr(code(), "name", "")
        except TypeError:
            return False
        return name in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    return False


class _Target:
    """Where ``invoke``/``chat`` send: the agent's card from the control plane (or the
    ``--url`` whose card the SDK fetches), and an invoke token, minted again when it is
    about to expire (a long chat outlives one)."""

    def __init__(self, args: argparse.Namespace, ctx: Context) -> None:
        self._args = args
        self._ctx = ctx
        self.agent: Any = args.url
        self.where: str = args.url or args.agent
        self._token: str | None = None
        self._expires = 0.0

    async def resolve(self) -> None:
        args = self._args
        if getattr(args, "track", None):
            raise UsageError(
                "--track: calls go through the agent's public entry and follow its release "
                "(weights, header match) like every external call; to reach one instance, "
                "give --url with its entry (`specmesh status -o json`: instances[].endpoints)"
            )
        if args.url:
            return
        from specmeshctl.a2aclient import card_from_json

        cp = self._ctx.cp
        reply = await cp.call(
            cp.registry.GetAgentCard, pb.GetAgentCardRequest(agent_name=args.agent)
        )
        card = card_from_json(_card_json(reply))
        self.agent = card
        self.where = card.supported_interfaces[0].url if card.supported_interfaces else args.agent

    async def token(self) -> str | None:
        """A valid invoke token (from the control plane, when one is configured)."""
        loop = asyncio.get_running_loop()
        if self._token is not None and loop.time() < self._expires - _TOKEN_MARGIN_SECONDS:
            return self._token
        if not self._ctx.settings.server:
            return None  # --url without a control plane: an agent that asks for no token
        cp = self._ctx.cp
        minted = await cp.call(
            cp.registry.IssueInvokeToken, pb.IssueInvokeTokenRequest(agent_name=self._args.agent)
        )
        left = minted.expires_at.ToSeconds() - time.time()
        self._token, self._expires = minted.token, loop.time() + left
        return self._token


def _card_json(reply: Any) -> dict[str, Any]:
    data: dict[str, Any] = message_json(reply.agent_card)
    return data


async def _invoke(
    args: argparse.Namespace, target: _Target, text: str, context_id: str | None
) -> Any:
    from a2a.utils.errors import A2AError

    from specmeshctl.a2aclient import invoke

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    token = await target.token()
    try:
        async with asyncio.timeout(args.timeout):
            return await invoke(
                target.agent, text, context_id=context_id, on_text=show, token=token
            )
    except TimeoutError:
        raise InvokeTimeoutError(agent=args.agent, url=target.where, seconds=args.timeout) from None
    except A2AError as e:
        refused = AgentCallRefusedError if _refused(e) else AgentCallError
        raise refused(agent=args.agent, url=target.where, reason=str(e) or type(e).__name__) from e


async def cmd_invoke(args: argparse.Namespace, ctx: Context) -> int:
    target = _Target(args, ctx)
    await target.resolve()
    result = await _invoke(args, target, args.message, args.context_id)
    sys.stdout.write("\n")
    if args.verbose_result:
        sys.stderr.write(
            f"[state {result.state}; contextId {result.context_id}; "
            f"tools {', '.join(result.tool_calls) or 'none'}]\n"
        )
    return EXIT_OK if result.state == "completed" else EXIT_OTHER


async def cmd_chat(args: argparse.Namespace, ctx: Context) -> int:
    target = _Target(args, ctx)
    await target.resolve()
    context_id: str | None = None
    sys.stdout.write(f"chatting with {args.agent} (empty line or Ctrl-D to leave)\n")
    while True:
        try:
            line = await asyncio.to_thread(input, "> ")
        except EOFError:
            break
        if not line.strip():
            break
        result = await _invoke(args, target, line, context_id)
        context_id = result.context_id
        sys.stdout.write("\n")
    return EXIT_OK


def register(r: Registrar) -> None:
    for name, helptext, run in (
        ("invoke", "ask an agent one question over A2A", cmd_invoke),
        ("chat", "talk to an agent over A2A, interactively", cmd_chat),
    ):
        p = r.api(name, helptext, run)
        p.add_argument("agent")
        if name == "invoke":
            p.add_argument("message")
            p.add_argument("--context-id", default=None)
            p.add_argument(
                "--verbose-result",
                action="store_true",
                help="print the task state and tools used to stderr",
            )
        # gone: calls follow the release (an error names what to do instead)
        p.add_argument("--track", default=None, help=argparse.SUPPRESS)
        p.add_argument(
            "--url",
            default=None,
            help="an A2A base URL whose agent card to use instead of the one the control "
            "plane serves (an invoke token is still sent when a control plane is configured)",
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=300.0,
            help="seconds an answer may take (default 300; exit 5 past it)",
        )
