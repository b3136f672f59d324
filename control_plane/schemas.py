"""The JSON Schemas that ``google.protobuf.Struct`` fields carry, by the name their
``(specmesh.v1.json_schema)`` field option gives (see ``proto/specmesh/v1/options.proto``).

==================================  ==========================================================
name                                 schema
==================================  ==========================================================
Manifest                             the union of the four manifests (specmesh.spec.models)
AgentManifest, PromptManifest,       the pydantic model of that name in specmesh.spec.models
McpServerManifest, AgentSpec,
McpServerSpec, ReleaseSpec,
PromptEntry
AgentCard                            a2a-sdk's ``AgentCard`` message in proto3 JSON
IstioObject                          a Kubernetes object (apiVersion, kind, metadata, spec)
JsonSchema                           an MCP tool's ``inputSchema``
Attributes                           OpenTelemetry span/resource attributes
AuditObject                          an object before or after an audited change
AuditDetails                         what a machine-made change decided on
ReleaseAnalysis                      the progress of a release analysis
                                     (control_plane.analysis_loop)
==================================  ==========================================================

:func:`json_schema` answers a name with its schema and the ``$defs`` it refers to (to be
put in ``#/components/schemas``); an unknown name is a ``LookupError``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

from specmesh.spec import models

__all__ = ["MODEL_NAMES", "REF_TEMPLATE", "json_schema", "names"]

REF_TEMPLATE = "#/components/schemas/{model}"
"""Where the OpenAPI document keeps every named schema."""

MODEL_NAMES = (
    "Manifest",
    "AgentManifest",
    "PromptManifest",
    "McpServerManifest",
    "AgentSpec",
    "McpServerSpec",
    "ReleaseSpec",
    "PromptEntry",
    "Resolution",
)
"""Names of pydantic models (or unions of them) in :mod:`specmesh.spec.models`."""

_ATTRIBUTE_VALUE: dict[str, Any] = {
    "type": ["string", "number", "boolean", "array"],
    "items": {"type": ["string", "number", "boolean"]},
}
_LITERAL: dict[str, dict[str, Any]] = {
    "IstioObject": {
        "type": "object",
        "description": "an Istio (or Gateway API) object as published to Kubernetes",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                    },
                },
                "additionalProperties": True,
            },
            "spec": {
                "type": "object",
                "description": "the object's spec, as its CRD defines it",
                "additionalProperties": True,
            },
        },
        "additionalProperties": True,
    },
    "JsonSchema": {
        "type": "object",
        "description": "a JSON Schema (an MCP tool's inputSchema)",
        "properties": {
            "type": {"type": ["string", "array"]},
            "properties": {"type": "object", "additionalProperties": True},
            "required": {"type": "array", "items": {"type": "string"}},
        },
        "additionalProperties": True,
    },
    "Attributes": {
        "type": "object",
        "description": "OpenTelemetry attributes: name -> value",
        "additionalProperties": _ATTRIBUTE_VALUE,
    },
    "AuditObject": {
        "type": "object",
        "description": "the object as stored before or after the change (a release: its "
        "ReleaseSpec)",
        "additionalProperties": True,
    },
    "AuditDetails": {
        "type": "object",
        "description": "what a machine-made change decided on, e.g. an auto-abort's step "
        "(step, weight) and figures (stable, canary, gates) -- see docs/analysis.md",
        "additionalProperties": True,
    },
    "ReleaseAnalysis": {
        "type": "object",
        "description": "the progress of a release analysis (docs/analysis.md)",
        "properties": {
            "canaryRevision": {"type": "integer"},
            "stableRevision": {"type": "integer"},
            "phase": {"type": "string", "enum": ["running", "aborted", "promoted", "cancelled"]},
            "step": {"type": "integer", "description": "the current step, from 0"},
            "steps": {"type": "integer"},
            "startedAt": {"type": "string", "format": "date-time"},
            "stepStartedAt": {"type": "string", "format": "date-time"},
            "updatedAt": {"type": "string", "format": "date-time"},
            "timeline": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "step": {"type": "integer"},
                        "weight": {"type": "integer"},
                        "startedAt": {"type": "string", "format": "date-time"},
                        "decision": {"type": "string", "enum": ["hold", "pass", "fail"]},
                        "reason": {"type": "string"},
                        "decidedAt": {"type": ["string", "null"], "format": "date-time"},
                        "updatedAt": {"type": "string", "format": "date-time"},
                        "figures": {
                            "type": ["object", "null"],
                            "description": "per track (stable, canary): requests, errors, "
                            "errorRate, p95Seconds, costPerTurn; gates: gate, threshold, "
                            "canary, stable, bound, judged, failed, reason",
                            "additionalProperties": True,
                        },
                        "evaluation": {
                            "type": ["object", "null"],
                            "description": "the evaluation run before the step raised the "
                            "canary's weight: passed, failures, maxFailures, cases (name, "
                            "passed, failed: the property that failed or 'error', excerpt)",
                            "additionalProperties": True,
                        },
                    },
                    "additionalProperties": True,
                },
            },
        },
        "additionalProperties": True,
    },
}


def names() -> tuple[str, ...]:
    """Every name :func:`json_schema` knows."""
    return (*MODEL_NAMES, "AgentCard", *_LITERAL)


def json_schema(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema named ``name``, the named schemas it refers to by ``$ref``)."""
    if name in _LITERAL:
        return dict(_LITERAL[name]), {}
    if name == "AgentCard":
        from a2a.types import AgentCard

        from control_plane.openapi import message_schemas

        descriptor: Any = AgentCard.DESCRIPTOR
        return message_schemas(descriptor, strict=False)
    if name not in MODEL_NAMES:
        raise LookupError(f"json_schema {name!r}: not one of {', '.join(names())}")
    target = getattr(models, name)
    if isinstance(target, type) and issubclass(target, BaseModel):
        schema = target.model_json_schema(by_alias=True, ref_template=REF_TEMPLATE)
    else:
        schema = TypeAdapter(target).json_schema(by_alias=True, ref_template=REF_TEMPLATE)
    defs = schema.pop("$defs", {})
    return schema, defs
