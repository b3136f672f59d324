"""Bounds on input from outside: JSON nesting (specmesh.jsonbounds) and RE2 patterns
(specmesh.regex)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from specmesh import jsonbounds, regex

# ------------------------------------------------------------ JSON nesting


@pytest.mark.parametrize(
    "text",
    [b"[" * 100_000, b'{"a":' * 5000, b"[" * 65 + b"]" * 65, b'{"a": ' * 40 + b"[" * 25],
    ids=["lists", "objects", "balanced-65", "unbalanced-65"],
)
def test_text_nested_past_the_limit_is_refused_before_parsing(text: bytes) -> None:
    with pytest.raises(jsonbounds.JsonTooDeepError) as info:
        jsonbounds.loads(text, max_depth=64)

    assert str(info.value) == "nested more than 64 deep"


@pytest.mark.parametrize(
    "text",
    [
        b"[" * 64 + b"]" * 64,
        b"[" + b"[],[]," * 50_000 + b"[]]",
        b'["' + b"[" * 1000 + b'"]',  # brackets inside a string do not count
        b'["\\"' + b"[" * 1000 + b'"]',  # nor after an escaped quote
    ],
    ids=["at-the-limit", "flat", "in-a-string", "after-an-escaped-quote"],
)
def test_text_within_the_limit_parses(text: bytes) -> None:
    assert jsonbounds.loads(text, max_depth=64) == json.loads(text)


def test_an_unterminated_string_is_left_to_the_parser() -> None:
    with pytest.raises(json.JSONDecodeError):
        jsonbounds.loads(b'["' + b'\\"[' * 100_000, max_depth=64)


def _nested(rng: random.Random, depth: int) -> Any:
    if depth == 0:
        return rng.choice([1, "x[", {"a": "}"}, [], {}])
    kids = [_nested(rng, depth - 1)]
    kids += [_nested(rng, rng.randint(0, depth - 1)) for _ in range(rng.randint(0, 2))]
    if rng.random() < 0.5:
        return [*kids, 'q"]']
    return {f"k[{i}": kid for i, kid in enumerate(kids)}


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max([_depth(v) for v in value] + [0])
    if isinstance(value, dict):
        return 1 + max([_depth(v) for v in value.values()] + [0])
    return 0


def test_the_scan_agrees_with_the_real_depth() -> None:
    rng = random.Random(7)
    for _ in range(500):
        value = _nested(rng, rng.randint(1, 20))
        limit = rng.randint(1, 22)

        refused = jsonbounds.nesting_depth_exceeded(json.dumps(value), limit)

        assert refused == (_depth(value) > limit), (json.dumps(value)[:80], limit)


# ------------------------------------------------------------ RE2 patterns


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(", "not a valid RE2 pattern: missing ): ("),
        ("(?=a)", "not a valid RE2 pattern: invalid perl operator: (?="),
        ("a" * 257, "must be at most 256 characters (got 257)"),
    ],
)
def test_patterns_re2_refuses_are_named(pattern: str, reason: str) -> None:
    assert regex.check_pattern(pattern) == reason


def test_a_catastrophic_pattern_for_python_matches_linearly() -> None:
    assert regex.check_pattern("(a+)+b") is None
    assert not regex.fullmatch("(a+)+b", "a" * 100_000 + "c")
    assert regex.fullmatch("(a+)+b", "aaab")


def test_a_pattern_is_compiled_once() -> None:
    regex.compile_pattern.cache_clear()

    for _ in range(3):
        regex.fullmatch("[0-9]+", "42")

    assert regex.compile_pattern.cache_info().misses == 1
