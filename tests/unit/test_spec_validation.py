"""Agent Spec validation: the seed's examples pass as written, bad specs fail precisely.

Every bad-spec case states the full list of issues, path and message, as a person reads
them (``str(issue)``), so a change in wording or in the path shows up here.
"""

from __future__ import annotations

import copy
import json
import random
import string
from pathlib import Path
from typing import Any

import pytest

from specmesh.errors import ManifestParseError, SpecError
from specmesh.names import is_dns1123_label, resource_name
from specmesh.spec.manifest import (
    load_agent_folder,
    load_path,
    parse_documents,
    parse_manifest,
)
from specmesh.spec.models import (
    AgentManifest,
    McpServerManifest,
    McpServersPart,
    ModelSpec,
    PartnerAgentsPart,
    PromptEntry,
    PromptManifest,
)
from specmesh.spec.validation import find_partner_cycles, validate_model

# ------------------------------------------------------------ the seed's examples

SEED_PROMPT_ENTRY = {
    "promptKey": "mse-nacos-helper",
    "version": "3.0.11",
    "template": "...",
    "variables": "{}",
    "description": "MSE Nacos assistant",
}
SEED_MODEL = {
    "model": "qwen-plus-latest",
    "baseUrl": "https://dashscope.aliyuncs.com/compatible-mode",
    "apiKey": "sk-51668897d94****",
    "temperature": 0.8,
    "maxTokens": 8192,
}
SEED_MCP_SERVERS = {
    "mcpServers": [
        {
            "mcpServerName": "gaode",
            "queryParams": {"key": "51668897d94*******"},
            "headers": {"key": "51668897d94*******"},
        },
        {"mcpServerName": "nacos-mcp-tools"},
    ]
}
SEED_PARTNER_AGENTS = {
    "agents": [
        {"agentName": "mse-gateway-assistant", "headers": {"key": "51668897d9410********"}},
        {"agentName": "scheduleX-assistant", "headers": {"key": "8897d941******c7465cff2"}},
    ]
}


def test_seed_prompt_entry_validates_as_written() -> None:
    entry = validate_model(PromptEntry, SEED_PROMPT_ENTRY)

    assert entry.prompt_key == "mse-nacos-helper"
    assert entry.version == "3.0.11"
    assert entry.template == "..."
    assert entry.variables == {}
    assert entry.description == "MSE Nacos assistant"


def test_seed_prompt_entry_is_read_as_a_prompt_manifest() -> None:
    manifest = parse_manifest(SEED_PROMPT_ENTRY, source="prompt.json")

    assert isinstance(manifest, PromptManifest)
    assert manifest.metadata.name == "mse-nacos-helper"
    assert manifest.spec.version == "3.0.11"


def test_seed_model_validates_as_written() -> None:
    model = validate_model(ModelSpec, SEED_MODEL)

    assert model.model == "qwen-plus-latest"
    assert model.base_url == "https://dashscope.aliyuncs.com/compatible-mode"
    assert model.api_key == "sk-51668897d94****"
    assert model.temperature == 0.8
    assert model.max_tokens == 8192
    assert model.model_dump(exclude_unset=True) == SEED_MODEL


def test_seed_mcp_servers_validate_as_written() -> None:
    part = validate_model(McpServersPart, SEED_MCP_SERVERS)

    assert [s.mcp_server_name for s in part.mcp_servers] == ["gaode", "nacos-mcp-tools"]
    assert part.mcp_servers[0].query_params == {"key": "51668897d94*******"}
    assert part.model_dump(exclude_unset=True) == SEED_MCP_SERVERS


def test_seed_partner_agents_validate_as_written() -> None:
    part = validate_model(PartnerAgentsPart, SEED_PARTNER_AGENTS)

    assert [a.agent_name for a in part.agents] == ["mse-gateway-assistant", "scheduleX-assistant"]
    assert part.model_dump(exclude_unset=True) == SEED_PARTNER_AGENTS


# ------------------------------------------------------------ bad specs, table-driven

_AGENT: dict[str, Any] = {
    "apiVersion": "specmesh.io/v1",
    "kind": "Agent",
    "metadata": {"name": "helper"},
    "spec": {
        "base": {"description": "Helps.", "promptKey": "mse-nacos-helper"},
        "model": {"model": "qwen-plus-latest"},
    },
}


def _agent(*, name: str = "helper", **parts: Any) -> dict[str, Any]:
    """A valid Agent manifest with ``parts`` merged into its spec (dicts are updated)."""
    doc = copy.deepcopy(_AGENT)
    doc["metadata"]["name"] = name
    for part, value in parts.items():
        current = doc["spec"].get(part)
        if isinstance(current, dict) and isinstance(value, dict):
            current.update(value)
        else:
            doc["spec"][part] = value
    return doc


def _manifest(kind: str, spec: Any, *, name: str = "helper") -> dict[str, Any]:
    return {"apiVersion": "specmesh.io/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def _without(doc: dict[str, Any], *path: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def _with(doc: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


_NAME_RULE = (
    "invalid name: must start with a letter, end with a letter or digit, and hold only "
    "letters, digits, '-', '_' and '.'"
)
_KNOWLEDGE_ON = {
    "enabled": True,
    "store": {"type": "chroma", "collection": "docs"},
    "embeddingModel": {"model": "text-embedding-v3"},
}

# Each case: the document (a parsed value, or ``(source, text)`` to parse first) and
# every issue it must produce, in order, as ``str(issue)``.
BAD_SPECS = [
    # ---- wrong types
    pytest.param(
        _agent(model={"temperature": "hot"}),
        ['spec.model.temperature: must be a number (got a string "hot")'],
        id="string-for-number",
    ),
    pytest.param(
        _agent(model={"maxTokens": "many"}),
        ['spec.model.maxTokens: must be an integer (got a string "many")'],
        id="string-for-int",
    ),
    pytest.param(
        _agent(model={"maxTokens": 1.5}),
        ["spec.model.maxTokens: must be an integer (got a number 1.5)"],
        id="fraction-for-int",
    ),
    pytest.param(
        _agent(mcpServers={"mcpServerName": "gaode"}),
        ['spec.mcpServers: must be a list (got an object {"mcpServerName": "gaode"})'],
        id="object-for-list",
    ),
    pytest.param(
        _agent(model={"model": 5}),
        ["spec.model.model: must be a string (got an integer 5)"],
        id="number-for-string",
    ),
    pytest.param(
        _agent(model={"stream": "maybe"}),
        ['spec.model.stream: must be true or false (got a string "maybe")'],
        id="bad-bool",
    ),
    pytest.param(
        _agent(model="qwen-plus-latest"),
        ['spec.model: must be an object (got a string "qwen-plus-latest")'],
        id="string-for-part",
    ),
    # ---- out of range
    pytest.param(
        _agent(model={"temperature": 7}),
        ["spec.model.temperature: must be <= 2 (got 7)"],
        id="temperature-above-2",
    ),
    pytest.param(
        _agent(model={"maxTokens": 0}),
        ["spec.model.maxTokens: must be >= 1 (got 0)"],
        id="max-tokens-zero",
    ),
    pytest.param(
        _agent(model={"topP": 0}),
        ["spec.model.topP: must be > 0 (got 0)"],
        id="top-p-zero",
    ),
    pytest.param(
        _agent(knowledge={**_KNOWLEDGE_ON, "retrieval": {"topK": 0}}),
        ["spec.knowledge.retrieval.topK: must be >= 1 (got 0)"],
        id="top-k-zero",
    ),
    pytest.param(
        _manifest("Release", {"canaryRevision": 2, "canaryWeight": 101}),
        ["spec.canaryWeight: must be <= 100 (got 101)"],
        id="canary-weight-101",
    ),
    pytest.param(
        _agent(memory={"ttlSeconds": -5}),
        ["spec.memory.ttlSeconds: must be >= 60 (got -5)"],
        id="negative-ttl",
    ),
    pytest.param(
        _agent(model={"temperature": 7, "maxTokens": 0, "zzz": 1}),
        [
            "spec.model.maxTokens: must be >= 1 (got 0)",
            "spec.model.temperature: must be <= 2 (got 7)",
            "spec.model.zzz: unknown field 'zzz'; valid fields are apiKey, baseUrl, "
            "budgetPerRequestUsd, fallbacks, maxRetries, maxTokens, model, price, provider, "
            "stream, temperature, timeoutSeconds, topP",
        ],
        id="every-issue-listed-in-path-order",
    ),
    # ---- unknown fields
    pytest.param(
        _agent(model={"temprature": 0.5}),
        ["spec.model.temprature: unknown field 'temprature' (did you mean 'temperature'?)"],
        id="unknown-field-with-suggestion",
    ),
    pytest.param(
        _with(_AGENT, {"app": "x"}, "metadata", "lables"),
        ["metadata.lables: unknown field 'lables' (did you mean 'labels'?)"],
        id="unknown-metadata-field",
    ),
    pytest.param(
        _agent(model={"zzz": 1}),
        [
            "spec.model.zzz: unknown field 'zzz'; valid fields are apiKey, baseUrl, "
            "budgetPerRequestUsd, fallbacks, maxRetries, maxTokens, model, price, provider, "
            "stream, temperature, timeoutSeconds, topP"
        ],
        id="unknown-field-lists-valid-fields",
    ),
    # ---- names
    pytest.param(
        _agent(name="my agent"),
        [f"metadata.name: {_NAME_RULE} (got 'my agent')"],
        id="name-with-space",
    ),
    pytest.param(
        _agent(name="1agent"),
        [f"metadata.name: {_NAME_RULE} (got '1agent')"],
        id="name-starts-with-digit",
    ),
    pytest.param(
        _agent(name="a" * 64),
        ["metadata.name: must be at most 63 characters (got 64)"],
        id="name-64-chars",
    ),
    pytest.param(
        _agent(name="agent-"),
        [f"metadata.name: {_NAME_RULE} (got 'agent-')"],
        id="name-trailing-dash",
    ),
    pytest.param(
        _agent(partnerAgents=[{"agentName": "-gateway"}]),
        [f"spec.partnerAgents[0].agentName: {_NAME_RULE} (got '-gateway')"],
        id="partner-name-leading-dash",
    ),
    # ---- secret references
    pytest.param(
        _agent(model={"apiKey": "vault://secret"}),
        ["spec.model.apiKey: bad secret reference: missing '#<field>' after the path"],
        id="vault-ref-without-field",
    ),
    pytest.param(
        _agent(model={"apiKey": "vault://#token"}),
        ["spec.model.apiKey: bad secret reference: must be vault://<mount>/<path>#<field>"],
        id="vault-ref-empty-path",
    ),
    pytest.param(
        _agent(mcpServers=[{"mcpServerName": "gaode", "headers": {"key": "vault://kv/a//b#k"}}]),
        [
            "spec.mcpServers[0].headers.key: bad secret reference: path segment '' is empty "
            "or holds characters other than letters, digits and '_.@=-'"
        ],
        id="vault-ref-empty-segment",
    ),
    # ---- URLs and fields required together
    pytest.param(
        _agent(model={"baseUrl": "ftp://x"}),
        ["spec.model.baseUrl: must be an http:// or https:// URL (got 'ftp://x')"],
        id="base-url-ftp",
    ),
    pytest.param(
        _agent(memory={"storageType": "redis"}),
        ["spec.memory: address is required when storageType is redis"],
        id="redis-without-address",
    ),
    pytest.param(
        _agent(memory={"storageType": "redis", "address": "http://cache:6379"}),
        ["spec.memory: address must be a redis:// or rediss:// URL (got 'http://cache:6379')"],
        id="redis-with-http-address",
    ),
    pytest.param(
        _agent(knowledge={"enabled": True}),
        ["spec.knowledge: store and embeddingModel are required when enabled is true"],
        id="knowledge-enabled-without-store",
    ),
    pytest.param(
        _agent(knowledge={"chunking": {"size": 100, "overlap": 100}}),
        ["spec.knowledge.chunking: overlap must be smaller than size (got overlap 100, size 100)"],
        id="chunk-overlap-equals-size",
    ),
    pytest.param(
        _agent(base={"promptVersion": "3.0.11", "promptLabel": "prod"}),
        ["spec.base: set promptVersion or promptLabel, not both"],
        id="prompt-version-and-label",
    ),
    pytest.param(
        _manifest(
            "Release",
            {
                "canaryRevision": 2,
                "headerMatch": [{"name": "x-canary", "exact": "1", "prefix": "1"}],
            },
        ),
        ["spec.headerMatch[0]: set exactly one of exact, prefix, regex (got 2)"],
        id="header-match-exact-and-prefix",
    ),
    # ---- release regexes are RE2, bounded
    pytest.param(
        _manifest("Release", {"canaryRevision": 2, "headerMatch": [{"name": "x", "regex": "("}]}),
        ["spec.headerMatch[0].regex: not a valid RE2 pattern: missing ): ("],
        id="header-match-regex-unbalanced",
    ),
    pytest.param(
        _manifest(
            "Release", {"canaryRevision": 2, "headerMatch": [{"name": "x", "regex": r"(a)\1"}]}
        ),
        ["spec.headerMatch[0].regex: not a valid RE2 pattern: invalid escape sequence: \\1"],
        id="header-match-regex-backreference",
    ),
    pytest.param(
        _manifest(
            "Release", {"canaryRevision": 2, "headerMatch": [{"name": "x", "regex": "a" * 257}]}
        ),
        ["spec.headerMatch[0].regex: must be at most 256 characters (got 257)"],
        id="header-match-regex-too-long",
    ),
    pytest.param(
        _manifest(
            "Release", {"canaryRevision": 2, "headerMatch": [{"name": "x\r\n", "exact": "1"}]}
        ),
        ['spec.headerMatch[0].name: must match ^[A-Za-z0-9-]+$ (got "x\\r\\n")'],
        id="header-match-name-crlf",
    ),
    # ---- header names and values (RFC 9110): values are secrets, never shown
    pytest.param(
        _agent(mcpServers=[{"mcpServerName": "gaode", "headers": {"key": "v\r\nX-Evil: 1"}}]),
        [
            "spec.mcpServers[0].headers.key: a header value must not hold control characters; "
            "found a carriage return (CR) at character 2 (the value is not shown)"
        ],
        id="mcp-header-value-crlf",
    ),
    pytest.param(
        _agent(partnerAgents=[{"agentName": "gateway", "headers": {"key": "v\nw"}}]),
        [
            "spec.partnerAgents[0].headers.key: a header value must not hold control "
            "characters; found a line feed (LF) at character 2 (the value is not shown)"
        ],
        id="partner-header-value-lf",
    ),
    pytest.param(
        _agent(partnerAgents=[{"agentName": "gateway", "headers": {"key": "v\x00"}}]),
        [
            "spec.partnerAgents[0].headers.key: a header value must not hold control "
            "characters; found a NUL at character 2 (the value is not shown)"
        ],
        id="partner-header-value-nul",
    ),
    pytest.param(
        _agent(model={"apiKey": "sk-1\x1b"}),
        [
            "spec.model.apiKey: a header value must not hold control characters; found "
            "control character U+001B at character 5 (the value is not shown)"
        ],
        id="api-key-control-character",
    ),
    pytest.param(
        _agent(partnerAgents=[{"agentName": "gateway", "headers": {"X-Key\r\n": "v"}}]),
        [
            'spec.partnerAgents[0].headers["X-Key\\r\\n"]: must match ^[A-Za-z0-9_.-]+$ '
            "(got <redacted>)"
        ],
        id="partner-header-name-crlf",
    ),
    pytest.param(
        _manifest(
            "McpServer",
            {"url": "http://gaode/mcp", "credentialTemplate": {"headers": ["X Key"]}},
            name="gaode",
        ),
        ['spec.credentialTemplate.headers[0]: must match ^[A-Za-z0-9_.-]+$ (got "X Key")'],
        id="credential-template-header-name-space",
    ),
    # ---- URLs carry no credentials (they would be stored in etcd as written)
    pytest.param(
        _agent(model={"baseUrl": "http://user:s3cr3t-pw@llm.example/v1"}),
        [
            "spec.model.baseUrl: credentials in the URL are not allowed; put them in apiKey "
            "(a vault:// reference)"
        ],
        id="base-url-with-credentials",
    ),
    pytest.param(
        _agent(model={"fallbacks": [{"model": "m2", "baseUrl": "https://tok@llm.example"}]}),
        [
            "spec.model.fallbacks[0].baseUrl: credentials in the URL are not allowed; put "
            "them in apiKey (a vault:// reference)"
        ],
        id="fallback-base-url-with-credentials",
    ),
    pytest.param(
        _agent(memory={"storageType": "redis", "address": "redis://:s3cr3t-pw@cache:6379/0"}),
        [
            "spec.memory.address: credentials in the URL are not allowed; put them in "
            "credentials (a vault:// reference)"
        ],
        id="redis-address-with-credentials",
    ),
    pytest.param(
        _agent(
            knowledge={
                **_KNOWLEDGE_ON,
                "store": {"type": "chroma", "collection": "d", "address": "http://u:p@chroma"},
            }
        ),
        [
            "spec.knowledge.store.address: credentials in the URL are not allowed; put them "
            "in credentials (a vault:// reference)"
        ],
        id="chroma-address-with-credentials",
    ),
    pytest.param(
        _manifest("McpServer", {"url": "http://u:s3cr3t-pw@gaode/mcp"}, name="gaode"),
        [
            "spec.url: credentials in the URL are not allowed; put them in each agent's "
            "mcpServers[].headers or queryParams (a vault:// reference)"
        ],
        id="mcp-url-with-credentials",
    ),
    pytest.param(
        _agent(model={"baseUrl": "http://llm.example/v1\r\nX-Evil: 1"}),
        ["spec.model.baseUrl: must not hold spaces or control characters (CR, LF, NUL...)"],
        id="base-url-with-crlf",
    ),
    pytest.param(
        _agent(base={"variables": "[" * 100_000}),
        [
            "spec.base.variables: must be a JSON object or a string holding one "
            "(nested more than 64 deep)"
        ],
        id="variables-string-nested-too-deep",
    ),
    pytest.param(
        _manifest("Release", {"canaryWeight": 10}),
        ["spec: canaryRevision is required when canaryWeight > 0 or headerMatch is set"],
        id="canary-weight-without-revision",
    ),
    pytest.param(
        _manifest(
            "Prompt",
            {"version": "2", "template": "t", "release": {"weights": {"1": 50, "2": 30}}},
            name="mse-nacos-helper",
        ),
        ["spec.release: weights must sum to 100 (got 80)"],
        id="prompt-weights-not-100",
    ),
    pytest.param(
        _agent(memory={"searchStrategy": {"type": "fuzzy"}}),
        [
            "spec.memory.searchStrategy: 'type' must be one of 'recent', 'keyword', "
            "'semantic' (got \"fuzzy\")"
        ],
        id="search-strategy-bad-type",
    ),
    pytest.param(
        _agent(memory={"searchStrategy": {"type": "keyword", "topK": 0}}),
        ["spec.memory.searchStrategy.topK: must be >= 1 (got 0)"],
        id="search-strategy-variant-field",
    ),
    # ---- oversized values
    pytest.param(
        _agent(base={"description": "x" * 4097}),
        ["spec.base.description: must be at most 4096 characters (got 4097)"],
        id="description-too-long",
    ),
    pytest.param(
        _agent(mcpServers=[{"mcpServerName": f"server{i}"} for i in range(65)]),
        ["spec.mcpServers: must have at most 64 items (got 65)"],
        id="too-many-mcp-servers",
    ),
    pytest.param(
        _agent(
            mcpServers=[{"mcpServerName": "gaode", "headers": {f"h{i}": "v" for i in range(65)}}]
        ),
        ["spec.mcpServers[0].headers: must have at most 64 items (got 65)"],
        id="too-many-headers",
    ),
    pytest.param(
        {**SEED_PROMPT_ENTRY, "template": "x" * 262_145},
        ["template: must be at most 262144 characters (got 262145)"],
        id="template-too-long",
    ),
    pytest.param(
        {**SEED_PROMPT_ENTRY, "variables": "{oops"},
        [
            "variables: must be a JSON object or a string holding one "
            "(Expecting property name enclosed in double quotes)"
        ],
        id="variables-bad-json-string",
    ),
    # ---- documents and envelopes
    pytest.param(
        ("t.json", '{\n  "kind": "Agent",\n    oops\n}'),
        ["t.json:3:5: invalid JSON: Expecting property name enclosed in double quotes"],
        id="malformed-json",
    ),
    pytest.param(
        ("t.yaml", "apiVersion: specmesh.io/v1\nkind: Agent\nmetadata: name: helper\n"),
        ["t.yaml:3:15: invalid YAML: mapping values are not allowed here"],
        id="malformed-yaml",
    ),
    pytest.param(
        ("t.yaml", "- kind: Agent\n"),
        ["a manifest must be an object (got list)"],
        id="not-an-object",
    ),
    pytest.param(
        _with(_AGENT, "Agnet", "kind"),
        ["kind: must be one of 'Agent', 'Prompt', 'McpServer', 'Release' (got \"Agnet\")"],
        id="unknown-kind",
    ),
    pytest.param(
        _without(_AGENT, "kind"),
        [
            "kind: required field is missing "
            "(a manifest has apiVersion: specmesh.io/v1, kind, metadata, spec)"
        ],
        id="missing-kind",
    ),
    pytest.param(
        _with(_AGENT, "specmesh.io/v2", "apiVersion"),
        ["apiVersion: must be 'specmesh.io/v1' (got \"specmesh.io/v2\")"],
        id="wrong-api-version",
    ),
    pytest.param(
        _without(_AGENT, "metadata", "name"),
        ["metadata.name: required field is missing"],
        id="missing-metadata-name",
    ),
    # ---- checks across fields
    pytest.param(
        _agent(mcpServers=[{"mcpServerName": "gaode"}, {"mcpServerName": "gaode"}]),
        [
            "spec.mcpServers[1].mcpServerName: duplicate MCP server 'gaode' "
            "(already at mcpServers[0])"
        ],
        id="duplicate-mcp-server",
    ),
    pytest.param(
        _agent(name="Foo", partnerAgents=[{"agentName": "foo"}]),
        ["spec.partnerAgents[0].agentName: an agent cannot list itself as a partner (got 'foo')"],
        id="self-partner-case-insensitive",
    ),
    pytest.param(
        _agent(
            partnerAgents=[{"agentName": "gateway.assistant"}, {"agentName": "Gateway_Assistant"}]
        ),
        [
            "spec.partnerAgents[1].agentName: duplicate partner agent 'Gateway_Assistant' "
            "(already at partnerAgents[0])"
        ],
        id="duplicate-partner-by-resource-name",
    ),
]


def _problems(document: Any) -> list[str]:
    """Validate ``document`` as a manifest; return every issue of the SpecError raised."""
    with pytest.raises(SpecError) as info:
        if isinstance(document, tuple):
            source, text = document
            for src, parsed in parse_documents(text, source=source):
                parse_manifest(parsed, source=src)
        else:
            parse_manifest(document, source="t.yaml")
    return [str(issue) for issue in info.value.issues]


@pytest.mark.parametrize(("document", "expected"), BAD_SPECS)
def test_bad_spec_is_refused_with_path_and_rule(document: Any, expected: list[str]) -> None:
    assert _problems(document) == expected


def test_bad_spec_table_covers_at_least_30_cases() -> None:
    assert len(BAD_SPECS) >= 30
    assert len({case.id for case in BAD_SPECS}) == len(BAD_SPECS)


def test_parse_error_carries_line_and_column() -> None:
    with pytest.raises(ManifestParseError) as info:
        parse_documents('{\n  "kind": "Agent",\n    oops\n}', source="t.json")

    assert (info.value.source, info.value.line, info.value.column) == ("t.json", 3, 5)


def test_yaml_error_in_a_later_document_counts_lines_from_the_file_start() -> None:
    text = "kind: Agent\n---\nkind: [\n"

    with pytest.raises(ManifestParseError) as info:
        parse_documents(text, source="many.yaml")

    assert (info.value.line, info.value.column) == (4, 1)


# ------------------------------------------------------------ secrets stay out of errors


def test_oversized_secret_is_refused_without_echoing_it() -> None:
    secret = "sk-" + "51668897d94" * 818  # 9001 characters
    doc = _agent(model={"apiKey": secret})

    with pytest.raises(SpecError) as info:
        parse_manifest(doc, source="t.yaml")

    assert [str(i) for i in info.value.issues] == [
        "spec.model.apiKey: must be at most 8192 characters (got 9001)"
    ]
    assert "51668897d94" not in str(info.value)


def test_secret_of_the_wrong_type_is_redacted_in_the_error() -> None:
    # An unquoted all-digit key in YAML arrives as an integer: still a secret.
    text = (
        "apiVersion: specmesh.io/v1\nkind: Agent\nmetadata: {name: helper}\nspec:\n"
        "  base: {description: Helps., promptKey: p}\n"
        "  model: {model: m, apiKey: 5166889794101234}\n"
        "  mcpServers:\n  - mcpServerName: gaode\n    headers: {key: 8897941746}\n"
    )

    assert _problems(("t.yaml", text)) == [
        "spec.mcpServers[0].headers.key: must be a string (got an integer <redacted>)",
        "spec.model.apiKey: must be a string (got an integer <redacted>)",
    ]


def test_bad_secret_reference_names_the_problem_not_the_reference() -> None:
    # A reference is not a secret, but the message needs only the reason.
    doc = _agent(model={"apiKey": "vault://kv/agents/helper"})

    problems = _problems(doc)

    assert problems == [
        "spec.model.apiKey: bad secret reference: missing '#<field>' after the path"
    ]
    assert "kv/agents/helper" not in problems[0]


def test_a_header_value_with_crlf_is_refused_without_echoing_it() -> None:
    doc = _agent(
        partnerAgents=[{"agentName": "gateway", "headers": {"key": "tok-51668897\r\nX-A: 1"}}]
    )

    with pytest.raises(SpecError) as info:
        parse_manifest(doc, source="t.yaml")

    assert [i.path for i in info.value.issues] == ["spec.partnerAgents[0].headers.key"]
    assert "51668897" not in str(info.value)
    assert "X-A" not in str(info.value)


def test_url_credentials_are_refused_without_echoing_them() -> None:
    doc = _agent(model={"baseUrl": "ftp://user:s3cr3t-pw@llm.example"})

    problems = _problems(doc)

    assert [p.split(":")[0] for p in problems] == ["spec.model.baseUrl"]
    assert "s3cr3t-pw" not in "".join(problems)


def test_header_values_with_tabs_and_non_ascii_are_accepted() -> None:
    doc = _agent(
        model={"apiKey": "sk-\tabc"},
        partnerAgents=[{"agentName": "gateway", "headers": {"key": "Bearer é\tx"}}],
    )

    manifest = parse_manifest(doc, source="t.yaml")

    assert manifest.spec.partner_agents[0].headers == {"key": "Bearer é\tx"}


# ------------------------------------------------------------ partner cycles


def test_two_agent_cycle_is_found() -> None:
    assert find_partner_cycles({"a": ["b"], "b": ["a"]}, "a") == [["a", "b", "a"]]


def test_no_cycle_when_partners_do_not_lead_back() -> None:
    graph = {"a": ["b", "c"], "b": ["c"], "c": []}

    assert find_partner_cycles(graph, "a") == []


def test_cycle_not_through_start_is_not_reported() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["b"]}

    assert find_partner_cycles(graph, "a") == []


def test_longer_cycle_is_found_once() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["d"], "d": ["a"]}

    assert find_partner_cycles(graph, "a") == [["a", "b", "c", "d", "a"]]


def test_cycle_compares_names_by_resource_name() -> None:
    graph = {"scheduleX-assistant": ["mse_gateway"], "mse-gateway": ["schedulex-assistant"]}

    assert find_partner_cycles(graph, "scheduleX-assistant") == [
        ["schedulex-assistant", "mse-gateway", "schedulex-assistant"]
    ]


# ------------------------------------------------------------ names


def test_resource_name_lowercases() -> None:
    assert resource_name("scheduleX-assistant") == "schedulex-assistant"


def test_resource_name_maps_underscore_and_dot_to_dash() -> None:
    assert resource_name("mse_gateway.assistant") == "mse-gateway-assistant"


def _logical_names(count: int) -> list[str]:
    """Valid logical names of every length and mix of allowed characters (seeded)."""
    rng = random.Random(20240601)
    middle = string.ascii_letters + string.digits + "-_."
    names = ["a", "A", "a" * 63, "A-_.9", "x.y_z-1"]
    for _ in range(count):
        length = rng.randint(0, 61)
        names.append(
            rng.choice(string.ascii_letters)
            + "".join(rng.choice(middle) for _ in range(length))
            + rng.choice(string.ascii_letters + string.digits)
        )
    return names


def test_resource_name_is_always_dns1123() -> None:
    for name in _logical_names(200):
        mapped = resource_name(name)
        assert is_dns1123_label(mapped), (name, mapped)
        assert resource_name(mapped) == mapped, name


@pytest.mark.parametrize(
    "name", ["", "1agent", "my agent", "agent-", "-agent", "a" * 64, "agent/x", "agént"]
)
def test_invalid_logical_name_raises(name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        resource_name(name)


# ------------------------------------------------------------ documents and folders

_MULTI = """\
apiVersion: specmesh.io/v1
kind: Agent
metadata: {name: scheduleX-assistant}
spec:
  base: {description: Schedules jobs., promptKey: mse-nacos-helper}
  model: {model: qwen-plus-latest}
  mcpServers:
  - mcpServerName: gaode
---
apiVersion: specmesh.io/v1
kind: McpServer
metadata: {name: gaode}
spec:
  url: http://localhost:8000/mcp
"""


def test_multi_document_yaml_loads_every_manifest() -> None:
    docs = parse_documents(_MULTI, source="fleet.yaml")
    manifests = [parse_manifest(doc, source=src) for src, doc in docs]

    assert [src for src, _ in docs] == ["fleet.yaml#1", "fleet.yaml#2"]
    assert isinstance(manifests[0], AgentManifest)
    assert manifests[0].metadata.name == "scheduleX-assistant"
    assert isinstance(manifests[1], McpServerManifest)
    assert manifests[1].spec.url == "http://localhost:8000/mcp"


def test_multi_document_file_loads_through_load_path(tmp_path: Path) -> None:
    file = tmp_path / "fleet.yaml"
    file.write_text(_MULTI)

    loaded = load_path(file)

    assert [(m.kind, m.name) for m in loaded] == [
        ("Agent", "scheduleX-assistant"),
        ("McpServer", "gaode"),
    ]


def _write_folder(folder: Path, parts: dict[str, Any]) -> Path:
    folder.mkdir()
    for filename, content in parts.items():
        (folder / filename).write_text(json.dumps(content, indent=2))
    return folder


def _six_parts() -> dict[str, Any]:
    return {
        "agent-base.json": {"description": "Schedules jobs.", "promptKey": "mse-nacos-helper"},
        "model.json": SEED_MODEL,
        "mcp-servers.json": SEED_MCP_SERVERS,
        "partner-agents.json": {"agents": SEED_PARTNER_AGENTS["agents"][:1]},
        "knowledge.json": {"enabled": False},
        "memory.json": {"storageType": "inMemory", "ttlSeconds": 3600},
    }


def test_folder_of_six_parts_loads_as_one_agent(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "scheduleX-assistant", _six_parts())

    loaded = load_path(folder)

    assert len(loaded) == 1
    manifest = loaded[0].manifest
    assert isinstance(manifest, AgentManifest)
    assert manifest.metadata.name == "scheduleX-assistant"
    assert manifest.spec.model.model == "qwen-plus-latest"
    assert [s.mcp_server_name for s in manifest.spec.mcp_servers] == ["gaode", "nacos-mcp-tools"]
    assert [p.agent_name for p in manifest.spec.partner_agents] == ["mse-gateway-assistant"]
    assert manifest.spec.memory.ttl_seconds == 3600


def test_folder_missing_a_required_part_file_is_refused(tmp_path: Path) -> None:
    base = _six_parts()["agent-base.json"]
    folder = _write_folder(tmp_path / "helper", {"agent-base.json": base})

    with pytest.raises(SpecError) as info:
        load_agent_folder(folder)

    assert [str(i) for i in info.value.issues] == ["model.json: required part file is missing"]
    assert info.value.source == str(folder)


def test_error_inside_a_part_file_is_prefixed_with_the_file_name(tmp_path: Path) -> None:
    parts = _six_parts()
    parts["model.json"] = {**SEED_MODEL, "temperature": 7}
    parts["memory.json"] = {"ttlSeconds": 5, "bogus": 1}
    folder = _write_folder(tmp_path / "helper", parts)

    with pytest.raises(SpecError) as info:
        load_agent_folder(folder)

    assert [str(i) for i in info.value.issues] == [
        "model.json: temperature: must be <= 2 (got 7)",
        "memory.json: bogus: unknown field 'bogus'; valid fields are address, compression, "
        "credentials, searchStrategy, storageType, ttlSeconds",
        "memory.json: ttlSeconds: must be >= 60 (got 5)",
    ]


def test_cross_field_error_in_a_folder_names_the_part_file(tmp_path: Path) -> None:
    parts = _six_parts()
    parts["partner-agents.json"] = {"agents": [{"agentName": "schedulex_assistant"}]}
    folder = _write_folder(tmp_path / "scheduleX-assistant", parts)

    with pytest.raises(SpecError) as info:
        load_agent_folder(folder)

    assert [str(i) for i in info.value.issues] == [
        "partner-agents.json: agents[0].agentName: an agent cannot list itself as a partner "
        "(got 'schedulex_assistant')"
    ]


def test_malformed_part_file_reports_file_line_and_column(tmp_path: Path) -> None:
    base = _six_parts()["agent-base.json"]
    folder = _write_folder(tmp_path / "helper", {"agent-base.json": base})
    (folder / "model.json").write_text('{"model": "m",\n  "temperature": }\n')

    with pytest.raises(ManifestParseError) as info:
        load_agent_folder(folder)

    assert [str(i) for i in info.value.issues] == [
        f"{folder / 'model.json'}:2:18: invalid JSON: Expecting value"
    ]


def test_a_misspelt_part_file_is_refused_with_the_likely_name(tmp_path: Path) -> None:
    parts = _six_parts()
    parts["mcp-server.json"] = parts.pop("mcp-servers.json")
    folder = _write_folder(tmp_path / "helper", parts)

    with pytest.raises(SpecError) as e:
        load_agent_folder(folder)

    (issue,) = e.value.issues
    assert issue.path == "mcp-server.json"
    assert issue.rule == "unknown_part_file"
    assert "did you mean 'mcp-servers.json'?" in issue.message
