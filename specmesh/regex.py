"""Regular expressions written in specs: RE2, never Python's ``re``.

A pattern in a spec (a release's ``headerMatch[].regex``) comes from outside and is
matched against request headers on the sidecar's event loop. Python's backtracking
``re`` takes exponential time on ``(a+)+b`` and raises on ``(``; RE2 matches in time
linear in the input and refuses what it cannot match that way (back-references,
look-arounds). Istio's VirtualService matches header regexes with RE2 too, so a pattern
behaves the same in both modes.

:func:`check_pattern` is the validation (a reason, or ``None``); :func:`fullmatch`
compiles each pattern once (a bounded cache) and matches the whole value, :func:`search`
finds it anywhere in the value (a release evaluation's ``matches``).
"""

from __future__ import annotations

import functools
from typing import Protocol, cast

import re2

__all__ = [
    "MAX_PATTERN_LENGTH",
    "Pattern",
    "PatternError",
    "check_pattern",
    "compile_pattern",
    "fullmatch",
    "search",
]

MAX_PATTERN_LENGTH = 256
"""Longest pattern accepted (a header condition is short; RE2's program grows with it)."""

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the reason is returned; RE2 would also print it to stderr


class Pattern(Protocol):
    """What is used of a compiled RE2 pattern."""

    def fullmatch(self, text: str) -> object | None: ...

    def search(self, text: str) -> object | None: ...


class PatternError(ValueError):
    """A pattern RE2 does not accept; ``reason`` is RE2's own words."""

    def __init__(self, *, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> Pattern:
    """The compiled pattern (cached); :class:`PatternError` when RE2 refuses it."""
    try:
        return cast(Pattern, re2.compile(pattern, _OPTIONS))
    except re2.error as e:
        raise PatternError(reason=_reason(e)) from None


def check_pattern(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid RE2 pattern, or ``None`` when it is."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"must be at most {MAX_PATTERN_LENGTH} characters (got {len(pattern)})"
    try:
        compile_pattern(pattern)
    except PatternError as e:
        return f"not a valid RE2 pattern: {e.reason}"
    return None


def fullmatch(pattern: str, value: str) -> bool:
    """Whether all of ``value`` matches ``pattern`` (a pattern RE2 refuses matches nothing)."""
    try:
        compiled = compile_pattern(pattern)
    except PatternError:
        return False
    return compiled.fullmatch(value) is not None


def search(pattern: str, value: str) -> bool:
    """Whether ``pattern`` matches somewhere in ``value`` (a pattern RE2 refuses matches
    nothing)."""
    try:
        compiled = compile_pattern(pattern)
    except PatternError:
        return False
    return compiled.search(value) is not None


def _reason(error: Exception) -> str:
    raw = error.args[0] if error.args else str(error)
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
