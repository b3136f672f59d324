"""The generated JSON Schemas: committed files are current and accept the seed's examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from specmesh.spec.schema import (
    SCHEMA_MODELS,
    check_schemas,
    generate_schemas,
    render_schema,
    write_schemas,
)

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"

SEED_EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    (
        "prompt-entry.schema.json",
        {
            "promptKey": "mse-nacos-helper",
            "version": "3.0.11",
            "template": "...",
            "variables": "{}",
            "description": "MSE Nacos assistant",
        },
    ),
    (
        "model.schema.json",
        {
            "model": "qwen-plus-latest",
            "baseUrl": "https://dashscope.aliyuncs.com/compatible-mode",
            "apiKey": "sk-51668897d94****",
            "temperature": 0.8,
            "maxTokens": 8192,
        },
    ),
    (
        "mcp-servers.schema.json",
        {
            "mcpServers": [
                {
                    "mcpServerName": "gaode",
                    "queryParams": {"key": "51668897d94*******"},
                    "headers": {"key": "51668897d94*******"},
                },
                {"mcpServerName": "nacos-mcp-tools"},
            ]
        },
    ),
    (
        "partner-agents.schema.json",
        {
            "agents": [
                {"agentName": "mse-gateway-assistant", "headers": {"key": "51668897d9410********"}},
                {"agentName": "scheduleX-assistant", "headers": {"key": "8897d941******c7465cff2"}},
            ]
        },
    ),
    (
        "agent.schema.json",
        {
            "apiVersion": "specmesh.io/v1",
            "kind": "Agent",
            "metadata": {"name": "scheduleX-assistant"},
            "spec": {
                "base": {"description": "Schedules jobs.", "promptKey": "mse-nacos-helper"},
                "model": {"model": "qwen-plus-latest", "temperature": 0.8},
                "memory": {"storageType": "redis", "address": "redis://cache:6379/0"},
            },
        },
    ),
]


def test_committed_schemas_are_current() -> None:
    stale = check_schemas(SCHEMAS_DIR)

    assert stale == [], f"schemas out of date: {', '.join(stale)}; run `specmesh schema --write`"


def test_every_schema_file_is_generated() -> None:
    names = set(generate_schemas())

    assert names == {
        "agent.schema.json",
        "prompt.schema.json",
        "mcp-server.schema.json",
        "release.schema.json",
        "agent-base.schema.json",
        "model.schema.json",
        "mcp-servers.schema.json",
        "partner-agents.schema.json",
        "knowledge.schema.json",
        "memory.schema.json",
        "deployment.schema.json",
        "prompt-entry.schema.json",
    }
    assert names == set(SCHEMA_MODELS)


def test_schema_declares_dialect_and_id() -> None:
    schema = generate_schemas()["model.schema.json"]

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://specmesh.io/schemas/v1/model.schema.json"


def test_schema_uses_wire_names() -> None:
    properties = generate_schemas()["model.schema.json"]["properties"]

    assert {"baseUrl", "apiKey", "maxTokens"} <= set(properties)
    assert "base_url" not in properties


def test_field_docstrings_become_descriptions() -> None:
    schemas = generate_schemas()
    temperature = schemas["model.schema.json"]["properties"]["temperature"]
    agent_name = schemas["partner-agents.schema.json"]["$defs"]["PartnerAgentRef"]["properties"]

    assert temperature["description"] == "Sampling temperature, 0 to 2."
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert agent_name["agentName"]["description"] == "Logical name of the partner agent."


def test_write_then_check_round_trips(tmp_path: Path) -> None:
    written = write_schemas(tmp_path / "schemas")

    assert sorted(p.name for p in written) == sorted(SCHEMA_MODELS)
    assert check_schemas(tmp_path / "schemas") == []
    text = (tmp_path / "schemas" / "agent.schema.json").read_text()
    assert text == render_schema(json.loads(text))


def test_check_reports_missing_and_stale_files(tmp_path: Path) -> None:
    write_schemas(tmp_path)
    (tmp_path / "model.schema.json").unlink()
    (tmp_path / "memory.schema.json").write_text("{}\n")

    assert check_schemas(tmp_path) == ["model.schema.json", "memory.schema.json"]


@pytest.mark.parametrize("filename", sorted(SCHEMA_MODELS))
def test_schema_is_valid_draft_2020_12(filename: str) -> None:

    jsonschema.Draft202012Validator.check_schema(generate_schemas()[filename])


@pytest.mark.parametrize(
    ("filename", "example"), SEED_EXAMPLES, ids=[name for name, _ in SEED_EXAMPLES]
)
def test_schema_accepts_seed_example(filename: str, example: dict[str, Any]) -> None:

    validator = jsonschema.Draft202012Validator(generate_schemas()[filename])

    assert [e.message for e in validator.iter_errors(example)] == []


def test_schema_refuses_what_validation_refuses() -> None:

    validator = jsonschema.Draft202012Validator(generate_schemas()["model.schema.json"])

    errors = {
        tuple(e.absolute_path): e.validator
        for e in validator.iter_errors({"model": "m", "temperature": 7, "temprature": 1})
    }

    assert errors == {("temperature",): "maximum", (): "additionalProperties"}
