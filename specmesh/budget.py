"""A request's cost budget on the wire, shared by the engine and the sidecar: header
names and their parsing.

The sidecar keeps the budget (``sidecar/ledger.py``): its inbound or entry opens a ledger
entry for each message it hands the engine and names it in :data:`LEDGER_HEADER`; the
engine echoes that header on every model and partner call of the turn, and the egress
charges the entry and refuses a call that would pass what is left (``BUDGET_EXCEEDED``,
:mod:`sidecar.policy`). A partner gets what is left as its whole budget in
:data:`BUDGET_TOTAL_HEADER`, set by the caller's sidecar. :data:`BUDGET_HEADER` is the
engine's own, advisory figure: no sidecar reads it, and none forwards it. See
``engine/ledger.py`` for the engine's own (advisory) book of a turn.
"""

from __future__ import annotations

import math

__all__ = [
    "BUDGET_HEADER",
    "BUDGET_TOTAL_HEADER",
    "LEDGER_HEADER",
    "BudgetValueError",
    "parse_budget",
]

BUDGET_HEADER = "x-specmesh-budget-remaining-usd"
"""What the engine thinks is left of the request's budget (USD): advisory, never read nor
forwarded by a sidecar."""
BUDGET_TOTAL_HEADER = "x-specmesh-budget-usd"
"""A partner call's whole budget (USD): what the caller's sidecar's ledger had left, set by
that sidecar (the engine's value is replaced); the partner's sidecar takes it as the
caller's budget."""
LEDGER_HEADER = "x-specmesh-ledger"
"""The sidecar's ledger entry of a turn: set by the inbound/entry on the message it hands
the engine, echoed by the engine on every egress call the turn makes."""


class BudgetValueError(ValueError):
    """A budget is not a non-negative finite number (``where`` names the field/header)."""

    def __init__(self, where: str, value: object) -> None:
        super().__init__(f"{where}: must be a non-negative number of USD (got {value!r})")
        self.where = where
        self.value = value


def parse_budget(value: object, *, where: str) -> float | None:
    """A budget from metadata or a header (a number, or its text); None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BudgetValueError(where, value)
    try:
        number = float(value)
    except ValueError:
        raise BudgetValueError(where, value) from None
    if not math.isfinite(number) or number < 0:
        raise BudgetValueError(where, value)
    return number
