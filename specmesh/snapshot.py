"""What one agent instance serves: a resolved, secret-free snapshot.

The sidecar keeps the etcd keys it watches (the agent's own keys, its prompt's keys, the
MCP Registry) in a map and calls :func:`resolve_snapshot` on every change; the result is
what it streams to the engine. Resolution is a pure function of those keys:

* with no release policy, every track serves the agent's latest revision;
* with one, track ``stable`` serves ``stableRevision`` (latest when unset) and track
  ``canary`` serves ``canaryRevision`` (``stableRevision`` when unset, so a canary
  instance without a canary revision behaves as stable);
* the prompt part and the MCP entries are what the served revision recorded in its
  ``resolved`` (:mod:`specmesh.resolution`): only the recorded prompt versions, with a
  release that makes the engine choose them (the recorded version, or the recorded A/B
  split), and the recorded MCP Registry entries -- never the live release or entries, so a
  revision serves what it ran with when it was written, and rollback restores it;
* a revision written before ``resolved`` was recorded serves as it always did: every
  version of the agent's ``promptKey`` and its live release, so the engine can choose per
  conversation, and the live MCP entries the spec names.

The snapshot holds references (``vault://...``) only, never a secret value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field

from specmesh.errors import NotFoundError, SpecError, SpecIssue
from specmesh.keys import Keys
from specmesh.resolution import recorded_mcp_servers, recorded_prompt
from specmesh.secrets import is_reference
from specmesh.spec.models import (
    AgentSpec,
    McpServerSpec,
    PromptEntry,
    PromptRelease,
    ReleaseSpec,
    SpecModel,
)
from specmesh.spec.secretpaths import iter_secrets
from specmesh.spec.validation import format_path

__all__ = ["PromptBundle", "ResolvedSnapshot", "Track", "resolve_snapshot", "watched_prefixes"]

Track = Literal["stable", "canary"]


class PromptBundle(SpecModel):
    """Every version of one prompt, and its release."""

    versions: dict[str, PromptEntry] = {}
    """Version -> entry."""
    release: PromptRelease | None = None
    """Labels and A/B weights."""


class ResolvedSnapshot(SpecModel):
    """Everything an engine needs to serve one revision of one agent."""

    agent_name: str
    """Logical name of the agent."""
    revision: Annotated[int, Field(ge=1)]
    """Agent revision served."""
    track: Track
    """Track of this instance."""
    spec: AgentSpec
    """The six parts (secret-bearing fields hold references only)."""
    prompt: PromptBundle
    """The agent's prompt (its ``promptKey``)."""
    mcp_servers: dict[str, McpServerSpec] = {}
    """MCP Registry entries of the servers the spec names (missing ones are left out)."""
    release: ReleaseSpec | None = None
    """The agent's release policy, if any."""


def watched_prefixes(keys: Keys, agent: str, prompt_key: str | None) -> list[str]:
    """The etcd prefixes whose keys :func:`resolve_snapshot` reads."""
    out = [keys.agent(agent), keys.mcp_servers()]
    if prompt_key:
        out.append(keys.prompt(prompt_key))
    return out


def resolve_snapshot(
    kvs: Mapping[str, bytes], *, keys: Keys, agent: str, track: Track
) -> ResolvedSnapshot:
    """Resolve what ``agent``'s ``track`` serves from the given etcd keys."""
    meta_raw = kvs.get(keys.agent_meta(agent))
    if meta_raw is None:
        raise NotFoundError(kind="agent", name=agent)
    meta = json.loads(meta_raw)
    release_raw = kvs.get(keys.agent_release(agent))
    release = ReleaseSpec.model_validate_json(release_raw) if release_raw else None
    revision = int(meta["revision"])
    if release is not None:
        stable = release.stable_revision or revision
        revision = stable if track == "stable" else (release.canary_revision or stable)
    bundle_raw = kvs.get(keys.agent_revision(agent, revision))
    if bundle_raw is None:
        raise NotFoundError(kind="agent revision", name=f"{agent}@{revision}")
    bundle = json.loads(bundle_raw)
    spec = AgentSpec.model_validate(bundle["spec"])
    plain = [p for p, v in iter_secrets(spec) if not is_reference(v)]
    if plain:
        raise SpecError(
            [SpecIssue(format_path(p), "plaintext_secret", "plaintext secret") for p in plain]
        )
    prompt_key = spec.base.prompt_key
    versions: dict[str, PromptEntry] = {}
    prefix = keys.prompt_versions(prompt_key)
    for key, value in kvs.items():
        if key.startswith(prefix):
            entry = PromptEntry.model_validate_json(value)
            versions[entry.version] = entry
    prompt_release_raw = kvs.get(keys.prompt_release(prompt_key))
    prompt_release = (
        PromptRelease.model_validate_json(prompt_release_raw) if prompt_release_raw else None
    )
    servers: dict[str, McpServerSpec] = {}
    resolved = bundle.get("resolved")
    if resolved is not None:
        versions, prompt_release = recorded_prompt(spec, resolved, versions)
        servers = recorded_mcp_servers(resolved)
    else:
        for ref in spec.mcp_servers:
            raw = kvs.get(keys.mcp_server(ref.mcp_server_name))
            if raw is not None:
                data = json.loads(raw)
                data.pop("name", None)
                servers[ref.mcp_server_name] = McpServerSpec.model_validate(data)
    return ResolvedSnapshot(
        agent_name=bundle["agent"],
        revision=revision,
        track=track,
        spec=spec,
        prompt=PromptBundle(versions=versions, release=prompt_release),
        mcp_servers=servers,
        release=release,
    )
