"""JSON Schemas of the Agent Spec, generated from the pydantic models.

The models are the single source; the files under ``schemas/`` are generated from them
(``specmesh schema --write``) so that editors and the Studio can validate and document
specs. :func:`check_schemas` tells whether the committed files are still current.
Each schema describes the wire form (camelCase aliases) that validation accepts, and
field docstrings become its ``description`` s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .models import (
    AgentBase,
    AgentManifest,
    DeploymentSpec,
    KnowledgeSpec,
    McpServerManifest,
    McpServersPart,
    MemorySpec,
    ModelSpec,
    PartnerAgentsPart,
    PromptEntry,
    PromptManifest,
    ReleaseManifest,
)

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "SCHEMA_BASE_URL",
    "SCHEMA_MODELS",
    "check_schemas",
    "generate_schemas",
    "render_schema",
    "write_schemas",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_BASE_URL = "https://specmesh.io/schemas/v1/"

#: file name -> model it describes: the manifests, then one per agent part file.
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "agent.schema.json": AgentManifest,
    "prompt.schema.json": PromptManifest,
    "mcp-server.schema.json": McpServerManifest,
    "release.schema.json": ReleaseManifest,
    "agent-base.schema.json": AgentBase,
    "model.schema.json": ModelSpec,
    "mcp-servers.schema.json": McpServersPart,
    "partner-agents.schema.json": PartnerAgentsPart,
    "knowledge.schema.json": KnowledgeSpec,
    "memory.schema.json": MemorySpec,
    "deployment.schema.json": DeploymentSpec,
    "prompt-entry.schema.json": PromptEntry,
}


def generate_schemas() -> dict[str, dict[str, Any]]:
    """Every schema, by file name, as the models define it today."""
    out: dict[str, dict[str, Any]] = {}
    for filename, model in SCHEMA_MODELS.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        out[filename] = {
            "$schema": JSON_SCHEMA_DIALECT,
            "$id": f"{SCHEMA_BASE_URL}{filename}",
            **schema,
        }
    return out


def render_schema(schema: dict[str, Any]) -> str:
    """The text of a schema file: stable key order, so a diff shows real changes only."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema into ``directory`` (created if needed); return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for filename, schema in generate_schemas().items():
        path = directory / filename
        path.write_text(render_schema(schema), encoding="utf-8")
        written.append(path)
    return written


def check_schemas(directory: Path) -> list[str]:
    """Names of the schema files in ``directory`` that are missing or out of date."""
    stale: list[str] = []
    for filename, schema in generate_schemas().items():
        path = directory / filename
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            stale.append(filename)
            continue
        if current != render_schema(schema):
            stale.append(filename)
    return stale
