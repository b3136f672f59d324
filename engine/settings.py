"""Settings of the engine; the only place in ``engine`` that reads the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["EngineSettings"]


class EngineSettings(BaseSettings):
    """What the engine runs and how (``AGENT_NAME``, ``SPECMESH_*`` variables)."""

    model_config = SettingsConfigDict(
        env_prefix="SPECMESH_", extra="ignore", frozen=True, validate_by_name=True
    )

    agent_name: str = Field(
        default="", validation_alias=AliasChoices("AGENT_NAME", "SPECMESH_AGENT_NAME")
    )
    """Logical name of the agent this engine runs."""
    sync_addr: str = "127.0.0.1:7101"
    """The sidecar's SpecSyncService (gRPC), e.g. ``unix:///run/specmesh/sync.sock``."""
    egress_url: str = "http://127.0.0.1:7102"
    """The sidecar's egress: every LLM, MCP and A2A call goes there."""
    redis_proxy: str = "127.0.0.1:7105"
    """The sidecar's Redis proxy (``host:port`` or ``unix:path``): Redis memory goes there,
    without a password (the sidecar adds it)."""
    redis_timeout_seconds: float = Field(default=5.0, gt=0)
    """Timeout of one memory-store command (connect, read, write)."""
    spec_dir: Path | None = None
    """Development: read the spec from this folder instead of the sidecar."""
    spec_poll_seconds: float = Field(default=0.5, gt=0)
    """How often ``spec_dir`` is checked for changes."""
    max_steps: int = Field(default=8, ge=1, le=100)
    """Model calls per turn before the turn is refused with ``step_limit``."""
    max_call_depth: int = Field(default=4, ge=0, le=64)
    """Deepest agent-to-agent call chain this engine takes part in."""
    tool_timeout_seconds: float = Field(default=30.0, gt=0)
    """Timeout of one tool call (MCP tool or partner agent)."""
    mcp_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long a context build waits for an MCP server's handshake and tool list."""
    card_timeout_seconds: float = Field(default=5.0, gt=0)
    """Timeout of fetching a partner's agent card."""
    card_retry_seconds: float = Field(default=30.0, gt=0)
    """How long an unreachable partner's generic description is used before retrying."""
    record_content: bool = False
    """Record message content (prompts, answers, tool arguments) in spans."""
    reconnect_initial_seconds: float = Field(default=0.2, gt=0)
    """First delay before reconnecting to the sidecar or an MCP server."""
    reconnect_max_seconds: float = Field(default=5.0, gt=0)
    """Longest delay between reconnection attempts (MCP servers; a snapshot feed that broke)."""
    sidecar_reconnect_max_seconds: float = Field(default=1.0, gt=0)
    """Longest delay between attempts to reopen the sidecar's snapshot stream (a local
    process: short, so that a restarted sidecar learns what the engine serves at once)."""
    conversation_pin_seconds: float = Field(default=1800.0, ge=0)
    """How long a conversation (A2A ``contextId``) stays on the snapshot that served its
    first turn, measured from that turn; a newer snapshot serves it after that. 0 disables
    pinning (every turn takes the newest snapshot)."""
    conversation_pin_max: int = Field(default=10000, ge=1)
    """Most conversations pinned at once; the least recently used one leaves first."""
    conversation_pin_max_contexts: int = Field(default=4, ge=0)
    """Most older snapshots kept alive for pinned conversations; when one more is retired,
    the conversations of the oldest move to the newest snapshot."""
    data_dir: Path = Path("data")
    """The engine's own data folder; the embedded knowledge store lives in
    ``<data_dir>/knowledge`` unless ``knowledge.store.address`` names another folder."""

    @model_validator(mode="after")
    def _reconnect_delays(self) -> EngineSettings:
        for name in ("reconnect_max_seconds", "sidecar_reconnect_max_seconds"):
            if getattr(self, name) < self.reconnect_initial_seconds:
                raise ValueError(
                    f"SPECMESH_{name.upper()} must be >= SPECMESH_RECONNECT_INITIAL_SECONDS "
                    f"(got {getattr(self, name)} < {self.reconnect_initial_seconds})"
                )
        return self
