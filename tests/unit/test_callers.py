"""The caller names and the principal matching rule (Istio's requestPrincipals rule)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from specmesh.callers import check_principal_pattern, owner, principal_matches
from specmesh.spec.models import AgentBase, CallersSpec


@pytest.mark.parametrize(
    ("pattern", "principal", "expected"),
    [
        ("https://idp.example/alice", "https://idp.example/alice", True),
        ("https://idp.example/alice", "https://idp.example/alice2", False),
        ("https://idp.example/*", "https://idp.example/bob", True),
        ("https://idp.example/*", "https://idp.example.evil/bob", False),
        ("*/ci-bot", "specmesh/ci-bot", True),
        ("*/ci-bot", "specmesh/ci-bot2", False),
        ("*", "specmesh/anyone", True),
        ("*", "", False),
    ],
)
def test_principal_matching_follows_istios_rule(
    pattern: str, principal: str, expected: bool
) -> None:
    assert principal_matches(pattern, principal) is expected


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "must not be empty"),
        ("a*b/c", "'*' may only be"),
        ("*idp/*", "'*' may only be"),
        ("**", "'*' may only be"),
        ("alice", "must be <issuer>/<subject>"),
        ("idp/al ice", "whitespace"),
        ("x" * 513, "at most 512"),
    ],
)
def test_bad_principal_patterns_say_what_is_wrong(pattern: str, problem: str) -> None:
    found = check_principal_pattern(pattern)
    assert found is not None and problem in found


def test_callers_default_to_partners_only_and_bad_entries_name_their_place() -> None:
    base = AgentBase.model_validate({"description": "d", "promptKey": "p"})
    assert base.callers is None
    assert CallersSpec().agents == ["*"] and CallersSpec().principals == []
    with pytest.raises(ValidationError) as e:
        AgentBase.model_validate(
            {"description": "d", "promptKey": "p", "callers": {"principals": ["ok/x", "a*b/c"]}}
        )
    err = e.value.errors()[0]
    assert err["loc"] == ("callers", "principals", 1)
    assert "a*b/c" in err["msg"]
    with pytest.raises(ValidationError) as e:
        CallersSpec.model_validate({"agents": ["Not A Name"]})
    assert e.value.errors()[0]["loc"] == ("agents", 0)


def test_owner_prefers_the_principal_then_the_agent() -> None:
    assert owner(caller="planner", principal=None) == "agent:planner"
    assert owner(caller="planner", principal="specmesh/ops") == "principal:specmesh/ops"
    assert owner(caller=None, principal=None) == "anonymous"
