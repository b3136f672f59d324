"""What an agent revision runs with besides its spec: its prompt versions and MCP entries.

An agent revision records ``resolved`` when it is written::

    {"prompt": {"key": K, "versions": ["1.0.0"]}        # a pin, a label, current, highest
            |  {"key": K, "weights": {"1.0.0": 50, "1.1.0": 50}},   # the release's A/B split
     "mcpServers": {name: <MCP Registry entry JSON>}}    # the servers the spec names

The prompt is chosen as the engine chooses it (:mod:`engine.prompt`): ``base.promptVersion``
pins one version; ``base.promptLabel`` takes the version the prompt's release labels so;
the release's A/B ``weights`` split conversations; otherwise the release's ``current``
version, else the highest. A label no version has yet, or a prompt with no version, resolves
to no version (the engine then reports it, as it did before revisions recorded this).

The snapshot (:func:`specmesh.snapshot.resolve_snapshot`) serves what the revision recorded
-- :func:`recorded_prompt` and :func:`recorded_mcp_servers` -- never the live resolution.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from specmesh.spec.models import (
    AgentSpec,
    McpServerSpec,
    PromptEntry,
    PromptRelease,
    Resolution,
    ResolvedPrompt,
)

__all__ = [
    "recorded_mcp_servers",
    "recorded_prompt",
    "resolve",
    "resolve_prompt",
    "uses_mcp_server",
    "uses_prompt",
    "version_key",
]

_VERSION_PART = re.compile(r"\d+|[A-Za-z]+")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a version: numeric parts by value, others by text, numbers first."""
    return tuple(
        (0, int(p)) if p.isdigit() else (1, p.lower()) for p in _VERSION_PART.findall(version)
    )


def resolve_prompt(
    spec: AgentSpec, versions: Collection[str], release: PromptRelease | None
) -> ResolvedPrompt:
    """The prompt part of ``resolved``: which versions of the agent's prompt it serves."""
    base = spec.base
    key = base.prompt_key
    if base.prompt_version is not None:
        return ResolvedPrompt(key=key, versions=[base.prompt_version])
    if base.prompt_label is not None:
        label = release.labels.get(base.prompt_label) if release else None
        return ResolvedPrompt(key=key, versions=[label] if label else [])
    if release is not None and release.weights:
        weights = {v: w for v, w in sorted(release.weights.items()) if w > 0}
        return ResolvedPrompt(key=key, weights=weights)
    if release is not None and release.current is not None:
        return ResolvedPrompt(key=key, versions=[release.current])
    return ResolvedPrompt(key=key, versions=[max(versions, key=version_key)] if versions else [])


def resolve(
    spec: AgentSpec,
    versions: Collection[str],
    release: PromptRelease | None,
    mcp_servers: Mapping[str, McpServerSpec],
) -> dict[str, Any]:
    """``resolved`` of a revision of ``spec``, from the Prompt Center and MCP Registry as
    they are now (MCP servers the registry lacks are left out, as the snapshot does), as
    the JSON of :class:`~specmesh.spec.models.Resolution`."""
    resolution = Resolution(
        prompt=resolve_prompt(spec, versions, release),
        mcp_servers={
            ref.mcp_server_name: mcp_servers[ref.mcp_server_name]
            for ref in spec.mcp_servers
            if ref.mcp_server_name in mcp_servers
        },
    )
    return resolution.model_dump(mode="json", exclude_none=True)


def uses_prompt(spec: AgentSpec, key: str) -> bool:
    return spec.base.prompt_key == key


def uses_mcp_server(spec: AgentSpec, name: str) -> bool:
    return any(ref.mcp_server_name == name for ref in spec.mcp_servers)


def recorded_prompt(
    spec: AgentSpec, resolved: Mapping[str, Any], entries: Mapping[str, PromptEntry]
) -> tuple[dict[str, PromptEntry], PromptRelease | None]:
    """The prompt versions and release a revision serves: the recorded versions only (taken
    from ``entries``, the published ones -- versions are immutable), with a release that
    makes the engine choose what was recorded."""
    prompt = Resolution.model_validate(resolved).prompt
    weights = prompt.weights or {}
    chosen = list(weights) or list(prompt.versions or [])
    versions = {v: entries[v] for v in chosen if v in entries}
    if weights:
        return versions, PromptRelease(weights=weights)
    if not chosen:
        return versions, None
    label = spec.base.prompt_label
    return versions, PromptRelease(labels={label: chosen[0]} if label else {}, current=chosen[0])


def recorded_mcp_servers(resolved: Mapping[str, Any]) -> dict[str, McpServerSpec]:
    """The MCP Registry entries a revision recorded."""
    return dict(Resolution.model_validate(resolved).mcp_servers)
