"""The sidecar's data-plane policy, written once: every listener (HTTP and gRPC; egress,
inbound, entry) is an adapter that reads its request, asks this module, and renders the
decision -- or the :class:`~sidecar.errors.PolicyError` of the one error table
(:data:`~sidecar.errors.POLICY_ERRORS`) -- on its own wire.

* **declared or not** -- :meth:`EgressPolicy.partner` / :meth:`EgressPolicy.mcp_server`: the
  target a call names must be declared in the current snapshot's ``partnerAgents`` /
  ``mcpServers`` (compared by resource name), else ``NOT_DECLARED``; a target that is no
  valid name is ``INVALID_TARGET`` (naming the rule it breaks). Decisions are kept per
  snapshot (a snapshot is immutable; a reload brings a new one), so a call maps no declared
  name again.
* **credentials** -- :meth:`EgressPolicy.resolve` / :meth:`EgressPolicy.secrets`: the spec's
  ``vault://`` references resolved, else ``CREDENTIAL_UNAVAILABLE`` naming the reference.
* **caller authorization** -- :func:`admit_caller`: who is calling an inbound listener and
  whether it may (over :class:`~sidecar.callers.CallerPolicy`), else ``UNAUTHENTICATED`` /
  ``PERMISSION_DENIED``.
* **retries** -- :class:`Retries`: per call, which instance each try goes to and whether a
  failed try is tried again (the target's retry policy, its attempts and its retry budget);
  the same for HTTP and gRPC. gRPC retries only where its semantics allow: a try whose
  connection could not be established (nothing was sent).
* **cost budget** -- :meth:`EgressPolicy.partner_budget` / :meth:`EgressPolicy.model_budget`
  / :meth:`EgressPolicy.charge_model`: over the sidecar's own
  :class:`~sidecar.ledger.BudgetLedger` (the entry a call names in ``X-Specmesh-Ledger``;
  the engine's figures are not read), a call is refused with ``BUDGET_EXCEEDED`` -- a
  partner call when nothing is left (<= 0); a model call when its worst case passes what
  is left: the request body's bytes / 4 (rounded up) as input tokens at the input price,
  plus the request's ``max_tokens`` (``max_completion_tokens``; 0 when it sets neither) at
  the output price, priced as the engine prices it (the model part's ``price``, else
  litellm's map). A model priced nowhere has no worst case: only "nothing left" refuses it.
  The rule reads only the request and the entry. A model call is charged from its
  answer's ``usage`` at the same price (its worst case when the answer reports none).
* **conversation affinity** -- :class:`Retries` given ``tracks`` and the call's contextId:
  a conversation with a partner goes to the partner's release track its first call went to
  (:class:`~sidecar.affinity.ConversationTracks`, keyed by partner and contextId; a canary
  pin holds while the partner's release names the same canary revision; ``headerMatch``
  still wins); a conversation's first call pins it to the track it was answered from.
* **budgets** -- :meth:`EgressPolicy.enter` / :meth:`EgressPolicy.leave`: calls in flight to a
  partner are capped at its ``connectionPool`` (``maxConnections + maxPendingRequests``),
  else ``OVERFLOW``; retries draw on the router's :class:`~sidecar.router.RetryBudget`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from specmesh.errors import InvalidNameError
from specmesh.names import resource_name
from specmesh.prices import ModelPrice, PriceMap, default_price_map, spec_price
from specmesh.snapshot import ResolvedSnapshot
from specmesh.spec.models import ConnectionPoolSpec, McpServerRef, PartnerAgentRef

from .affinity import ConversationTracks
from .callers import CallerPolicy
from .credentials import CredentialResolver, CredentialUnavailableError
from .errors import PolicyError
from .ledger import BudgetLedger, LedgerEntry, UsageTap
from .router import NoInstanceError, RetryPolicy, Router, Target

__all__ = [
    "FAILURE_KINDS",
    "Admission",
    "EgressPolicy",
    "FailureKind",
    "Retries",
    "admit_caller",
    "log_refusal",
]

logger = logging.getLogger(__name__)

FailureKind = Literal["connect", "reset", "timeout"]
FAILURE_KINDS: dict[str, FailureKind] = {
    "UPSTREAM_UNREACHABLE": "connect",
    "UPSTREAM_IDENTITY": "connect",
    "UPSTREAM_RESET": "reset",
    "UPSTREAM_ERROR": "reset",
    "UPSTREAM_TIMEOUT": "timeout",
}
"""A try that got no answer, by the reason it failed with: what the retry policy sees."""

_ASKED_LIMIT = 1024
"""Names remembered per snapshot and kind (callers choose them: bounded)."""


# ---------------------------------------------------------------- declared or not


class _Declared:
    """One snapshot's declared targets of one kind, by resource name, and the decisions
    already taken for the names asked (a found entry, ``None`` for not declared, or the
    rule an invalid name breaks)."""

    __slots__ = ("_asked", "_by_name")

    def __init__(self, entries: Iterable[tuple[str, object]]) -> None:
        self._by_name: dict[str, tuple[str, object]] = {}
        for name, entry in entries:
            try:
                rn = resource_name(name)
            except InvalidNameError:
                continue  # a spec's names are validated; never matched if one is not
            self._by_name.setdefault(rn, (rn, entry))
        self._asked: dict[str, tuple[str, object] | str | None] = {}

    def get(self, wanted: str) -> tuple[str, object] | str | None:
        try:
            return self._asked[wanted]
        except KeyError:
            pass
        found: tuple[str, object] | str | None
        if not wanted:
            found = "it is empty"
        else:
            try:
                found = self._by_name.get(resource_name(wanted))
            except InvalidNameError as e:
                found = e.reason
        if len(self._asked) < _ASKED_LIMIT:
            self._asked[wanted] = found
        return found


class EgressPolicy:
    """What the engine may call, with which credentials, within which budgets: the
    decisions of the HTTP egress and the gRPC egress."""

    def __init__(
        self,
        *,
        credentials: CredentialResolver,
        prices: PriceMap | None = None,
        tracks: ConversationTracks | None = None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        """``prices``: where a model the spec does not price is looked up (default:
        litellm's file, read in a thread on the first budgeted model call); ``tracks``:
        partner conversations' tracks (None: every call is split by the release);
        ``ledger``: the requests' budgets (None: no budget is enforced)."""
        self._credentials = credentials
        self.ledger = ledger
        self._prices = prices or default_price_map()
        self.tracks = tracks
        self._snapshot: ResolvedSnapshot | None = None
        self._partners = _Declared(())
        self._mcp = _Declared(())
        self._inflight: dict[str, int] = {}

    def _tables(self, snapshot: ResolvedSnapshot) -> None:
        if snapshot is not self._snapshot:
            spec = snapshot.spec
            self._partners = _Declared((p.agent_name, p) for p in spec.partner_agents)
            self._mcp = _Declared((m.mcp_server_name, m) for m in spec.mcp_servers)
            self._snapshot = snapshot

    def partner(self, snapshot: ResolvedSnapshot, wanted: str) -> tuple[str, PartnerAgentRef]:
        """The partner declared under ``wanted``'s resource name, with that resource name;
        else ``INVALID_TARGET`` / ``NOT_DECLARED``."""
        self._tables(snapshot)
        found = self._partners.get(wanted)
        if type(found) is tuple:
            return found  # type: ignore[return-value]
        raise _refusal("partner agent", wanted, snapshot, found)  # type: ignore[arg-type]

    def mcp_server(self, snapshot: ResolvedSnapshot, wanted: str) -> McpServerRef:
        """The spec's reference to MCP server ``wanted``; else ``INVALID_TARGET`` /
        ``NOT_DECLARED``."""
        self._tables(snapshot)
        found = self._mcp.get(wanted)
        if type(found) is tuple:
            return found[1]  # type: ignore[return-value]
        raise _refusal("MCP server", wanted, snapshot, found)  # type: ignore[arg-type]

    async def resolve(self, value: str) -> str:
        """``value``, or the secret it references; else ``CREDENTIAL_UNAVAILABLE``."""
        try:
            return await self._credentials.resolve(value)
        except CredentialUnavailableError as e:
            raise PolicyError("CREDENTIAL_UNAVAILABLE", str(e), reference=e.reference) from e

    async def secrets(self, values: Mapping[str, str]) -> list[tuple[str, str]]:
        """``values`` (the spec's ``headers`` or ``queryParams``) with references resolved."""
        return [(key, await self.resolve(value)) for key, value in values.items()]

    def partner_budget(self, agent: str, headers: Mapping[str, str]) -> LedgerEntry | None:
        """The ledger entry the call to partner ``agent`` is charged to (None: no budget
        applies); ``BUDGET_EXCEEDED`` when it has nothing left, or names no entry while a
        budget applies."""
        if self.ledger is None:
            return None
        what = f"the call to agent {agent!r}"
        entry = self.ledger.entry(headers, what)
        left = entry.remaining_usd if entry is not None else None
        if entry is not None and left is not None and left <= 0:
            raise _over_budget(what, entry, worst=None, agent=agent)
        return entry

    async def model_budget(
        self,
        snapshot: ResolvedSnapshot,
        fallback: int | None,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> LedgerEntry | None:
        """The ledger entry the model call (the model, or fallback ``fallback``) is charged
        to (None: no budget applies); ``BUDGET_EXCEEDED`` when its worst case passes what
        the entry has left (see the module docstring)."""
        if self.ledger is None:
            return None
        name, price = await self._model_price(snapshot, fallback)
        what = f"a call to model {name!r}"
        entry = self.ledger.entry(headers, what)
        left = entry.remaining_usd if entry is not None else None
        if entry is None or left is None:
            return entry
        worst = _worst_case(price, body)
        if left <= 0 or (worst is not None and worst > left):
            raise _over_budget(what, entry, worst=worst, model=name)
        return entry

    async def charge_model(
        self,
        entry: LedgerEntry,
        snapshot: ResolvedSnapshot,
        fallback: int | None,
        body: bytes | None,
        answer: UsageTap,
    ) -> None:
        """Charge ``entry`` one model call: its answer's usage at the model's price, else
        (no usage reported) its worst case; an unpriced model is recorded, not charged."""
        name, price = await self._model_price(snapshot, fallback)
        if price is None:
            entry.unpriced.add(name)
            return
        usage = answer.usage()
        if usage is None:
            entry.charge(_worst_case(price, body) or 0.0)
        else:
            entry.charge(price.cost(prompt_tokens=usage[0], completion_tokens=usage[1]))

    async def _model_price(
        self, snapshot: ResolvedSnapshot, fallback: int | None
    ) -> tuple[str, ModelPrice | None]:
        """(model name, its price) of the model or fallback ``fallback``."""
        model = snapshot.spec.model
        name, provider, price = model.model, model.provider, model.price
        if fallback is not None and fallback < len(model.fallbacks):
            fb = model.fallbacks[fallback]
            name, provider, price = fb.model, fb.provider, fb.price
        found = spec_price(price)
        if found is None:
            if not self._prices.loaded:  # read once, off the event loop
                await asyncio.to_thread(self._prices.load)
            found = self._prices.price(f"{provider or 'openai'}/{name}")
        return name, found

    def enter(self, agent: str, pool: ConnectionPoolSpec) -> None:
        """Count one call in flight to ``agent``; ``OVERFLOW`` past its pool's limit
        (pair with :meth:`leave`)."""
        inflight = self._inflight.get(agent, 0)
        if inflight >= pool.max_connections + pool.max_pending_requests:
            raise PolicyError(
                "OVERFLOW", f"too many calls in flight to {agent!r} ({inflight})", agent=agent
            )
        self._inflight[agent] = inflight + 1

    def leave(self, agent: str) -> None:
        self._inflight[agent] -= 1


def _worst_case(price: ModelPrice | None, body: bytes | None) -> float | None:
    """The most a model call may cost (see the module docstring); None when unpriced."""
    if price is None:
        return None
    return price.worst_case(
        prompt_tokens=math.ceil(len(body or b"") / 4), max_completion_tokens=_max_tokens(body)
    )


def _max_tokens(body: bytes | None) -> int:
    """The request's ``max_tokens`` (or ``max_completion_tokens``); 0 when it sets none."""
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return 0
    if not isinstance(request, dict):
        return 0
    for key in ("max_completion_tokens", "max_tokens"):
        value = request.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _over_budget(
    what: str, entry: LedgerEntry, *, worst: float | None, **fields: str
) -> PolicyError:
    left, total = entry.remaining_usd or 0.0, entry.budget_usd
    message = (
        f"budget exceeded: {what} is refused: the request's budget is ${total:.6g}"
        f", ${left:.6g} is left"
        + (f", and this call may cost up to ${worst:.6g}" if worst is not None else "")
    )
    logger.warning("refused %s: over the request's budget", what, extra={"reason": message})
    details = {"remainingUsd": repr(left), "budgetUsd": repr(total), **fields}
    if worst is not None:
        details["worstCaseUsd"] = repr(worst)
    return PolicyError("BUDGET_EXCEEDED", message, **details)


def _refusal(
    what: str, wanted: str, snapshot: ResolvedSnapshot, invalid: str | None
) -> PolicyError:
    logger.warning(
        "refused a call to %s %r: %s",
        what,
        wanted,
        f"not a valid name ({invalid})"
        if invalid
        else f"agent {snapshot.agent_name}'s spec does not name it",
        extra={"refused": what, "target": wanted, "agent": snapshot.agent_name},
    )
    if invalid is not None:
        return PolicyError(
            "INVALID_TARGET", f"{what} {wanted!r} is not a valid name: {invalid}", target=wanted
        )
    return PolicyError(
        "NOT_DECLARED",
        f"{what} {wanted!r} is not declared in agent {snapshot.agent_name!r}'s spec",
        target=wanted,
    )


# ---------------------------------------------------------------- retries


class Retries:
    """One call to partner ``agent``: the instance of each try (:meth:`pick`, another one
    than those tried when it can) and, after each try, whether to try again
    (:meth:`answered`, :meth:`failed`): the target's retry policy allows it, attempts are
    left and the retry budget has room. Outcomes are reported to the router (outlier
    detection). ``on_retry`` is told of every retry (metrics). With ``tracks`` and the
    call's ``context_id``, every try goes to the track the conversation is pinned to; a
    conversation not pinned yet is pinned to the track of its last try.

    Tries follow one another at once: another instance is tried (a shared backoff helper
    can be added at :meth:`_take`)."""

    __slots__ = (
        "_context_id",
        "_on_retry",
        "_pinned",
        "_release",
        "_router",
        "_tracks",
        "agent",
        "count",
        "policy",
        "tried",
    )

    def __init__(
        self,
        router: Router,
        agent: str,
        *,
        on_retry: Callable[[str], None] | None = None,
        tracks: ConversationTracks | None = None,
        context_id: str | None = None,
    ) -> None:
        self._router = router
        self.agent = agent
        self._on_retry = on_retry
        self.policy: RetryPolicy = router.retry_policy(agent)
        self.tried: list[str] = []
        self.count = 0
        router.record_request(agent)
        self._find_pin(tracks, context_id)

    def _find_pin(self, tracks: ConversationTracks | None, context_id: str | None) -> None:
        """The track the call's conversation is pinned to, if any (conversation affinity)."""
        self._tracks = tracks if context_id is not None else None
        self._context_id = context_id
        self._release = self._router.release(self.agent) if self._tracks is not None else None
        self._pinned = (
            self._tracks.track(context_id, self._release, agent=self.agent)
            if self._tracks is not None
            else None
        )

    def pick(self, headers: Mapping[str, str]) -> Target:
        """Where the next try goes; ``NO_INSTANCE`` when nothing can take it."""
        try:
            target = self._router.pick(self.agent, headers, exclude=self.tried, pinned=self._pinned)
        except NoInstanceError as e:
            raise PolicyError("NO_INSTANCE", str(e), agent=self.agent) from e
        if target.instance is not None:
            self.tried.append(target.instance)
        if self._tracks is not None and self._pinned is None:
            self._tracks.remember(self._context_id, target.track, self._release, agent=self.agent)
        return target

    def answered(self, target: Target, status: int) -> bool:
        """The try got an answer with HTTP ``status``: whether to try again."""
        self._router.report(target, status)
        return self.policy.retriable_status(status) and self._take()

    def failed(self, target: Target, kind: FailureKind) -> bool:
        """The try got no answer (``kind`` of failure): whether to try again."""
        self._router.report_failure(target, timeout=kind == "timeout")
        return self.policy.retriable_failure(kind) and self._take()

    def _take(self) -> bool:
        if self.count >= self.policy.attempts or not self._router.try_retry(self.agent):
            return False
        self.count += 1
        if self._on_retry is not None:
            self._on_retry(self.agent)
        return True


# ---------------------------------------------------------------- callers


def log_refusal(listener: str, agent: str, error: PolicyError) -> None:
    """Log a call ``listener`` (``"inbound"``, ``"external gRPC"``...) refused to ``agent``."""
    logger.warning(
        "refused an %s call to %s: %s",
        listener,
        agent,
        error.message,
        extra={"agent": agent, "reason": error.reason},
    )


@dataclass(frozen=True, slots=True)
class Admission:
    """Who an admitted inbound call comes from: the calling agent and the external
    principal (either may be None), for ``X-Specmesh-Caller`` / ``X-Specmesh-Principal``."""

    caller: str | None
    principal: str | None


async def admit_caller(
    policy: CallerPolicy,
    *,
    secure: bool,
    cert_agent: str | None,
    sent_principal: str | None,
    xfcc: str | None,
    authorization: str | None,
    require_identity: bool,
    card: bool = False,
) -> Admission:
    """Whether an inbound call may reach the engine (HTTP and gRPC inbound alike); raises
    :class:`~sidecar.callers.CallerRefused`.

    mTLS (``secure``): the caller is the agent its certificate names (``cert_agent``; none
    -> ``UNAUTHENTICATED``) and must pass :meth:`CallerPolicy.check_agent` -- unless it is
    this very agent forwarding a principal it authenticated (``sent_principal``, an entry of
    another instance). Plaintext (Istio): the caller comes from ``X-Forwarded-Client-Cert``,
    a bearer token (``authorization``) is verified into the principal, and with
    ``require_identity`` a call naming neither is refused (but the agent card)."""
    if secure:
        if cert_agent is None:
            raise policy.refused("UNAUTHENTICATED", "the client certificate names no agent")
        if cert_agent == policy.agent and sent_principal:
            return Admission(caller=cert_agent, principal=sent_principal)
        policy.check_agent(cert_agent)
        return Admission(caller=cert_agent, principal=None)
    caller = policy.mesh_caller(xfcc)
    if caller is not None:
        policy.check_agent(caller)
    principal = None
    if authorization:
        principal = await policy.external(authorization)
    elif caller is None and require_identity and not card:
        # Istio admitted the connection, but nothing names the caller: a pod that reached
        # this port around the mesh's policy (ambient mode's waypoint), or a workload that
        # is no agent, without a token
        await policy.authenticate(None)
    return Admission(caller=caller, principal=principal)
