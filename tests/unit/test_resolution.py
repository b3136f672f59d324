"""What a revision records as resolved, and what its snapshot serves from that record."""

from __future__ import annotations

from typing import Any

import pytest

from specmesh.resolution import recorded_prompt, resolve, resolve_prompt
from specmesh.spec.models import AgentSpec, McpServerSpec, PromptEntry, PromptRelease

RELEASE = PromptRelease(
    labels={"prod": "1.0.0"}, weights={"1.0.0": 80, "1.1.0": 20, "2.0.0": 0}, current="1.0.0"
)


def _spec(**base: Any) -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "base": {"description": "d", "promptKey": "p", **base},
            "model": {"model": "m"},
            "mcpServers": [{"mcpServerName": "tools"}, {"mcpServerName": "unregistered"}],
        }
    )


@pytest.mark.parametrize(
    ("base", "release", "expected"),
    [
        ({"promptVersion": "1.1.0"}, RELEASE, {"versions": ["1.1.0"]}),
        ({"promptLabel": "prod"}, RELEASE, {"versions": ["1.0.0"]}),
        ({"promptLabel": "beta"}, RELEASE, {"versions": []}),
        ({}, RELEASE, {"weights": {"1.0.0": 80, "1.1.0": 20}}),
        ({}, PromptRelease(current="1.0.0"), {"versions": ["1.0.0"]}),
        ({}, None, {"versions": ["1.10.0"]}),
    ],
)
def test_the_prompt_resolves_as_the_engine_chooses(
    base: dict[str, Any], release: PromptRelease | None, expected: dict[str, Any]
) -> None:
    resolved = resolve_prompt(_spec(**base), ["1.0.0", "1.10.0", "1.9.0"], release)

    assert resolved.model_dump(mode="json", exclude_none=True) == {"key": "p", **expected}


def test_a_prompt_without_versions_resolves_to_none_and_missing_mcp_servers_are_left_out() -> None:
    tools = McpServerSpec(url="http://127.0.0.1:9/mcp")

    resolved = resolve(_spec(), [], None, {"tools": tools, "other": tools})

    assert resolved == {
        "prompt": {"key": "p", "versions": []},
        "mcpServers": {"tools": tools.model_dump(mode="json")},
    }


def test_the_recorded_prompt_serves_only_its_versions_through_a_release_that_chooses_them() -> None:
    entries = {
        v: PromptEntry(prompt_key="p", version=v, template=v) for v in ("1.0.0", "1.1.0", "2.0.0")
    }
    label = _spec(promptLabel="prod")
    split = {"prompt": {"key": "p", "weights": {"1.0.0": 50, "1.1.0": 50}}}

    fixed = recorded_prompt(label, {"prompt": {"key": "p", "versions": ["1.1.0"]}}, entries)
    weighted = recorded_prompt(_spec(), split, entries)
    none = recorded_prompt(_spec(), {"prompt": {"key": "p", "versions": []}}, entries)

    assert (list(fixed[0]), fixed[1]) == (
        ["1.1.0"],
        PromptRelease(labels={"prod": "1.1.0"}, current="1.1.0"),
    )
    assert (list(weighted[0]), weighted[1]) == (
        ["1.0.0", "1.1.0"],
        PromptRelease(weights={"1.0.0": 50, "1.1.0": 50}),
    )
    assert none == ({}, None)
