"""JSON from outside, parsed within bounds.

``json.loads`` recurses once per nested list or object: ``[`` * 100000 raises
``RecursionError`` (a 500 wherever a request body is parsed). :func:`loads` first
scans the text once, in linear time, for the deepest nesting, and refuses anything
nested more than ``max_depth`` deep before ``json.loads`` sees it. Size is the caller's
bound (each server caps its request bodies). The manifest reader
(:mod:`specmesh.spec.manifest`) does the same scan with line and column, plus its own
checks (duplicate keys, value count).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "JsonTooDeepError", "loads", "nesting_depth_exceeded"]

MAX_DEPTH = 64
"""Default most lists/objects nested inside each other (specs nest about ten deep)."""

# a string, to its closing quote or (unterminated) to the end: it never fails, so one pass
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_PAIR = re.compile(rb"\[\]|\{\}")  # one level per pass: a sub never rescans what it removed
_RUN = re.compile(rb"[\[{]+|[\]}]+")
_OPENERS = b"[{"
_PASSES = 8  # pair-removal passes before walking runs (a pass is C; a run is Python)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JsonTooDeepError(ValueError):
    """The text nests lists/objects more than ``limit`` deep."""

    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        super().__init__(f"nested more than {limit} deep")


def nesting_depth_exceeded(text: str | bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``text`` opens more than ``limit`` lists/objects inside each other.

    Strings are dropped, then everything but brackets (in C). A few passes remove the
    innermost ``[]``/``{}`` pairs, one level each (so ``[]`` * 10**6 is gone at once);
    what is left is walked run by run of openers or closers. Linear in the text; an
    unbalanced text counts as deep as its openers go (a parser would recurse into them).
    Malformed text is not judged otherwise: the parser reports it.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the common case
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    removed = 0  # levels removed; each pass lowers the deepest nesting by exactly one
    while removed < min(limit, _PASSES):
        shorter = _PAIR.sub(b"", brackets)
        if len(shorter) == len(brackets):
            break
        brackets, removed = shorter, removed + 1
    depth = 0
    for run in _RUN.findall(brackets):
        if run[0] in _OPENERS:
            depth += len(run)
            if removed + depth > limit:
                return True
        else:
            depth = max(0, depth - len(run))
    return False


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that refuses deep nesting first (:class:`JsonTooDeepError`);
    other errors are ``json.loads``'s own (``JSONDecodeError``, ``UnicodeDecodeError``)."""
    if nesting_depth_exceeded(text, max_depth):
        raise JsonTooDeepError(limit=max_depth)
    return json.loads(text)
