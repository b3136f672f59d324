"""Secret references, redaction, secret discovery in specs, and diffs."""

from __future__ import annotations

import pytest

from specmesh.errors import SecretReferenceError
from specmesh.secrets import REDACTED, VaultRef, redact, redact_text
from specmesh.spec.diff import diff_json
from specmesh.spec.models import AgentSpec
from specmesh.spec.secretpaths import iter_secrets, replace_values
from specmesh.spec_apply import secret_ref_for


def test_reference_round_trips() -> None:
    ref = VaultRef.parse("vault://secret/specmesh/agents/a/model/apiKey#value")
    assert (ref.mount, ref.path, ref.field) == ("secret", "specmesh/agents/a/model/apiKey", "value")
    assert str(ref) == "vault://secret/specmesh/agents/a/model/apiKey#value"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("secret/x#y", "must start with 'vault://'"),
        ("vault://secret/x", "missing '#<field>' after the path"),
        ("vault://secret#f", "must be vault://<mount>/<path>#<field>"),
        ("vault://secret/a//b#f", "path segment '' is empty"),
        ("vault://secret/a b#f", "path segment 'a b' is empty or holds characters"),
        # walking out of an agent's tree (issue: `..` reached another agent's key)
        (
            "vault://secret/specmesh/agents/thief/../mse-nacos-helper/model/apiKey#value",
            "path segment '..' is not allowed",
        ),
        ("vault://secret/specmesh/agents/a/./model#value", "path segment '.' is not allowed"),
        ("vault://secret/specmesh/agents/a/%2e%2e/b#value", "path segment '%2e%2e' is empty"),
        ("vault://secret/specmesh/agents/a/x\n#value", "path segment 'x\\n' is empty"),
        ("vault://../specmesh/x#value", "bad mount '..'"),
        # Vault policy globs: a grant must never match more than its one path
        ("vault://secret/specmesh/+/b/model/apiKey#value", "path segment '+' is empty"),
        ("vault://secret/specmesh/*#value", "path segment '*' is empty"),
        ("vault://secret/a#f\n", "bad field"),
    ],
)
def test_bad_references_say_what_is_wrong(value: str, reason: str) -> None:
    with pytest.raises(SecretReferenceError) as info:
        VaultRef.parse(value)
    assert info.value.reason.startswith(reason)


def test_redact_masks_secret_keys_but_keeps_references() -> None:
    data = {
        "model": {"model": "m", "apiKey": "sk-live-123"},
        "mcpServers": [{"headers": {"key": "abc", "ref": "vault://secret/p#f"}}],
        "description": "plain text stays",
    }

    out = redact(data)

    assert out["model"] == {"model": "m", "apiKey": REDACTED}
    assert out["mcpServers"][0]["headers"] == {"key": REDACTED, "ref": "vault://secret/p#f"}
    assert out["description"] == "plain text stays"
    assert data["model"]["apiKey"] == "sk-live-123"  # the input is not changed


def test_redact_text_replaces_every_known_secret() -> None:
    assert (
        redact_text("auth sk-1 and sk-12", ["sk-1", "sk-12"]) == f"auth {REDACTED} and {REDACTED}"
    )


def _spec() -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "base": {"description": "d", "promptKey": "p"},
            "model": {
                "model": "m",
                "apiKey": "sk-1",
                "fallbacks": [{"model": "f", "apiKey": "sk-2"}],
            },
            "mcpServers": [{"mcpServerName": "gaode", "headers": {"key": "h"}}],
            "partnerAgents": [{"agentName": "scheduleX-assistant", "queryParams": {"t": "q"}}],
            "memory": {
                "storageType": "redis",
                "address": "redis://r:6379/0",
                "credentials": {"password": "pw"},
            },
        }
    )


def test_every_secret_field_is_found_wherever_it_is() -> None:
    found = dict(iter_secrets(_spec()))

    assert found == {
        ("model", "apiKey"): "sk-1",
        ("model", "fallbacks", 0, "apiKey"): "sk-2",
        ("mcpServers", 0, "headers", "key"): "h",
        ("partnerAgents", 0, "queryParams", "t"): "q",
        ("memory", "credentials", "password"): "pw",
    }


def test_secret_locations_use_list_element_names() -> None:
    spec_json = _spec().model_dump(mode="json")
    where = {
        p: str(secret_ref_for("Helper_A", p, spec_json, mount="secret"))
        for p, _ in iter_secrets(_spec())
    }

    assert where[("mcpServers", 0, "headers", "key")] == (
        "vault://secret/specmesh/agents/helper-a/mcpServers/gaode/headers/key#value"
    )
    assert where[("partnerAgents", 0, "queryParams", "t")] == (
        "vault://secret/specmesh/agents/helper-a/partnerAgents/schedulex-assistant/queryParams/t#value"
    )
    assert where[("model", "fallbacks", 0, "apiKey")].endswith("/model/fallbacks/0/apiKey#value")


def test_replace_values_swaps_only_the_given_paths() -> None:
    data = {"a": {"b": "x", "c": ["y", "z"]}}
    assert replace_values(data, {("a", "c", 1): "R"}) == {"a": {"b": "x", "c": ["y", "R"]}}


def test_diff_reports_add_remove_replace_by_path() -> None:
    old = {"model": {"temperature": 0.1, "x": 1}, "mcpServers": [{"n": "a"}]}
    new = {"model": {"temperature": 0.2}, "mcpServers": [{"n": "a"}, {"n": "b"}]}

    changes = [str(c) for c in diff_json(old, new)]

    assert changes == [
        '+ mcpServers[1]: {"n": "b"}',
        "~ model.temperature: 0.1 -> 0.2",
        "- model.x: 1",
    ]
