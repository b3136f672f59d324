"""The engine's book of one turn: what it spent, what its partners' chains spent, and what
is left of the request's budget -- for the answer's ``cost`` metadata. It is advisory: the
limit is kept and enforced by the sidecar's own ledger (``sidecar/ledger.py``), whose entry
this turn names in :data:`LEDGER_HEADER` on every model and partner call.

A turn's cost is its own model calls (each priced by :mod:`specmesh.prices` with the model
part's prices, :class:`~engine.llm.ModelClient`) plus the cost every partner's answer
carried (that partner's own calls and its partners', recursively): the answer's A2A
metadata ``cost`` (the :data:`COST_EXTENSION` extension, declared on the agent card)::

    {"totalUsd": own + downstream, "ownUsd": ..., "downstreamUsd": ...,
     "unpriced": ["model", ...],         # models priced nowhere in the chain (not counted)
     "budgetUsd": ..., "remainingUsd": ...}   # when the request had a budget

so the agent that started the chain answers with the whole chain's total.

The budget of a request is the smaller of the caller's (message metadata
:data:`BUDGET_METADATA`) and the model part's ``budgetPerRequestUsd``. What is left
(budget - spent so far in this turn, never below 0) goes to a partner as its message's
:data:`BUDGET_METADATA` (the partner's sidecar also gets the caller's sidecar's own figure,
and takes the smaller). Every model and partner call carries the sidecar's ledger entry of
the turn (:data:`LEDGER_HEADER`, from the request the sidecar handed the engine), which the
sidecar charges and checks (``BUDGET_EXCEEDED``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from specmesh.budget import (
    BUDGET_HEADER,
    BUDGET_TOTAL_HEADER,
    LEDGER_HEADER,
    BudgetValueError,
    parse_budget,
)

__all__ = [
    "BUDGET_HEADER",
    "BUDGET_METADATA",
    "BUDGET_TOTAL_HEADER",
    "COST_EXTENSION",
    "COST_METADATA",
    "LEDGER_HEADER",
    "BudgetValueError",
    "CostLedger",
    "parse_budget",
]

COST_EXTENSION = "https://specmesh.io/a2a/extensions/cost/v1"
"""URI of the A2A extension: answers carry their chain's cost in metadata ``cost``; a
message's metadata ``specmesh.budgetUsd`` is the most its chain may spend."""
COST_METADATA = "cost"
"""Key of the cost in an answer artifact's metadata."""
BUDGET_METADATA = "specmesh.budgetUsd"
"""Key of a request's budget (USD) in the A2A message metadata."""


MAX_USD = 1e12
"""Most one partner answer's ``totalUsd`` is booked at (a larger figure is clamped to it):
keeps a forged figure from overflowing the turn's total to inf."""


def _smallest(*budgets: float | None) -> float | None:
    given = [b for b in budgets if b is not None]
    return min(given) if given else None


class CostLedger:
    """One turn's spending; shared by its model calls and its partner calls."""

    def __init__(
        self,
        *,
        budget_usd: float | None = None,
        spec_budget_usd: float | None = None,
        ledger_id: str | None = None,
    ):
        """The budget is the smaller of the caller's and the spec's (None: unlimited);
        ``ledger_id``: the sidecar's entry for the turn (its request's :data:`LEDGER_HEADER`)."""
        self.budget_usd = _smallest(budget_usd, spec_budget_usd)
        self.ledger_id = ledger_id
        self.own_usd = 0.0
        self.downstream_usd = 0.0
        self.unpriced: set[str] = set()

    @property
    def total_usd(self) -> float:
        return self.own_usd + self.downstream_usd

    @property
    def remaining_usd(self) -> float | None:
        """What is left of the budget (never below 0); None without a budget."""
        if self.budget_usd is None:
            return None
        return max(0.0, self.budget_usd - self.total_usd)

    def add_model_call(self, model: str, usd: float, *, unpriced: bool = False) -> None:
        """One model call of this turn; ``unpriced``: the model is priced nowhere."""
        if unpriced:
            self.unpriced.add(model)
        else:
            self.own_usd += usd

    def add_partner_answer(self, cost: Any) -> None:
        """The ``cost`` metadata of a partner's answer (ignored when malformed)."""
        if not isinstance(cost, Mapping):
            return
        total = cost.get("totalUsd")
        # a partner's figure is its word: never inf/NaN, never past MAX_USD, so the sum
        # (and this turn's own answer) stays a finite, serializable number
        if not isinstance(total, int | float) or isinstance(total, bool):
            total = None
        if total is not None and math.isfinite(total) and total >= 0:
            self.downstream_usd += min(float(total), MAX_USD)
        unpriced = cost.get("unpriced")
        if isinstance(unpriced, list | tuple):
            self.unpriced.update(str(m) for m in unpriced)

    def headers(self) -> dict[str, str]:
        """The header naming the sidecar's ledger entry, for every call through the sidecar
        (none when the request named none)."""
        return {LEDGER_HEADER: self.ledger_id} if self.ledger_id else {}

    def metadata(self) -> dict[str, Any]:
        """The answer's ``cost`` metadata (see the module docstring)."""
        cost: dict[str, Any] = {
            "totalUsd": self.total_usd,
            "ownUsd": self.own_usd,
            "downstreamUsd": self.downstream_usd,
            "unpriced": sorted(self.unpriced),
        }
        if self.budget_usd is not None:
            cost["budgetUsd"] = self.budget_usd
            cost["remainingUsd"] = self.remaining_usd
        return cost
