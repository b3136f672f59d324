"""The etcd key layout, in one place.

::

    <prefix>/agents/<agent>/meta                  logical name, current revision (its etcd
                                                  version is the agent revision: the guard)
    <prefix>/agents/<agent>/spec/<part>           current value of each of the six parts
    <prefix>/agents/<agent>/revisions/<n>         immutable bundle of all parts at revision n
                                                  (n zero-padded to 10 digits so keys sort)
    <prefix>/agents/<agent>/release               release policy
    <prefix>/prompts/<promptKey>/versions/<v>     Prompt Center entries
    <prefix>/prompts/<promptKey>/release          labels, A/B weights
    <prefix>/mcp/<mcpServerName>                  MCP Registry
    <prefix>/registry/<agent>/<instance>          live instances, under a lease
    <prefix>/status/<agent>                       observed state of the agent's workload
                                                  (desired/ready per track, instances),
                                                  written by the controller
    <prefix>/analysis/<agent>                     progress of the agent's release analysis
                                                  (step, figures, decisions), written by
                                                  the control plane's analysis loop (not
                                                  under agents/: the sidecars' snapshot
                                                  watch would wake on every write)
    <prefix>/grants/<agent>/<id>                  secrets a secrets-admin shared with the
                                                  agent (outside its own Vault tree)
    <prefix>/audit/<ts>-<id>                      who changed what (diff)
    <prefix>/tokens/records/<id>                  API tokens (name, roles, sha256 of the
                                                  secret, expiry; never the secret)
    <prefix>/tokens/revoked/<sha256>              revoked tokens (API and token-file ones)

``<agent>``, ``<promptKey>`` and ``<mcpServerName>`` are resource names
(:func:`specmesh.names.resource_name`); the logical name is kept inside the values.
"""

from __future__ import annotations

from dataclasses import dataclass

from specmesh.names import resource_name

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix (default ``/specmesh``)."""

    prefix: str = "/specmesh"

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"etcd prefix must start and not end with '/' (got {self.prefix!r})")

    # agents
    def agents(self) -> str:
        return f"{self.prefix}/agents/"

    def agent(self, agent: str) -> str:
        return f"{self.prefix}/agents/{resource_name(agent)}/"

    def agent_meta(self, agent: str) -> str:
        return f"{self.agent(agent)}meta"

    def agent_part(self, agent: str, part: str) -> str:
        return f"{self.agent(agent)}spec/{part}"

    def agent_parts(self, agent: str) -> str:
        return f"{self.agent(agent)}spec/"

    def agent_revision(self, agent: str, revision: int) -> str:
        return f"{self.agent(agent)}revisions/{revision:010d}"

    def agent_revisions(self, agent: str) -> str:
        return f"{self.agent(agent)}revisions/"

    def agent_release(self, agent: str) -> str:
        return f"{self.agent(agent)}release"

    def agent_analysis(self, agent: str) -> str:
        return f"{self.prefix}/analysis/{resource_name(agent)}"

    # grants
    def grants(self, agent: str | None = None) -> str:
        return f"{self.prefix}/grants/" + (f"{resource_name(agent)}/" if agent else "")

    def grant(self, agent: str, grant_id: str) -> str:
        return f"{self.grants(agent)}{grant_id}"

    # prompts
    def prompts(self) -> str:
        return f"{self.prefix}/prompts/"

    def prompt(self, key: str) -> str:
        return f"{self.prefix}/prompts/{resource_name(key)}/"

    def prompt_version(self, key: str, version: str) -> str:
        return f"{self.prompt(key)}versions/{version}"

    def prompt_versions(self, key: str) -> str:
        return f"{self.prompt(key)}versions/"

    def prompt_release(self, key: str) -> str:
        return f"{self.prompt(key)}release"

    # MCP Registry, Agent Registry, audit
    def mcp_servers(self) -> str:
        return f"{self.prefix}/mcp/"

    def mcp_server(self, name: str) -> str:
        return f"{self.prefix}/mcp/{resource_name(name)}"

    def registry(self, agent: str | None = None) -> str:
        if agent is None:
            return f"{self.prefix}/registry/"
        return f"{self.prefix}/registry/{resource_name(agent)}/"

    def registry_instance(self, agent: str, instance: str) -> str:
        return f"{self.registry(agent)}{instance}"

    def audit(self) -> str:
        return f"{self.prefix}/audit/"

    # observed state, written by the controller
    def statuses(self) -> str:
        return f"{self.prefix}/status/"

    def status(self, agent: str) -> str:
        return f"{self.prefix}/status/{resource_name(agent)}"

    # API tokens of the control plane
    def tokens(self) -> str:
        return f"{self.prefix}/tokens/"

    def token_records(self) -> str:
        return f"{self.prefix}/tokens/records/"

    def token_record(self, token_id: str) -> str:
        return f"{self.prefix}/tokens/records/{token_id}"

    def token_revocations(self) -> str:
        return f"{self.prefix}/tokens/revoked/"

    def token_revocation(self, sha256: str) -> str:
        return f"{self.prefix}/tokens/revoked/{sha256}"

    def audit_entry(self, stamp: str, entry_id: str) -> str:
        return f"{self.prefix}/audit/{stamp}-{entry_id}"
