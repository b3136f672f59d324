"""A request's cost budget on the wire, shared by the engine (which sends it) and the
sidecar (which enforces it): header names and their parsing.

The engine sends what is left of the request's budget with every model and partner call
it makes through its sidecar (:data:`BUDGET_HEADER`, USD; the whole budget beside it in
:data:`BUDGET_TOTAL_HEADER`); the sidecar refuses a call that would pass it
(``BUDGET_EXCEEDED``, :mod:`sidecar.policy`). See ``engine/ledger.py`` for how a budget
is set and spent.
"""

from __future__ import annotations

import math

__all__ = ["BUDGET_HEADER", "BUDGET_TOTAL_HEADER", "BudgetValueError", "parse_budget"]

BUDGET_HEADER = "x-specmesh-budget-remaining-usd"
"""What is left of the request's budget (USD), on every model and partner call the engine
makes through its sidecar."""
BUDGET_TOTAL_HEADER = "x-specmesh-budget-usd"
"""The request's whole budget (USD), beside :data:`BUDGET_HEADER` (for the refusal's text)."""


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
