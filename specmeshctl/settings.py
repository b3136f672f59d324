"""Settings of the ``specmesh`` command; the only module of the CLI that reads the
environment.

Every command that reads or changes specs talks to one control plane, over gRPC:
``SPECMESH_SERVER`` (or ``--server``) is its gRPC address, ``host:port`` in plaintext or
``grpcs://host:port`` over TLS (``SPECMESH_CA_FILE`` names the CA bundle when it is not a
public one), with ``SPECMESH_TOKEN`` / ``SPECMESH_TOKEN_FILE`` (or ``--token``) as the bearer
token. When no server is given and ``specmesh up`` recorded a running control plane in
``<home>/fleet.json``, that one is the default (its ``controlPlaneGrpc`` address), with the
admin token in ``<home>/admin-token``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Which control plane the CLI talks to, and as whom."""

    model_config = SettingsConfigDict(env_prefix="SPECMESH_", extra="ignore", frozen=True)

    home: Path = Path(".specmesh")
    """Folder of the local fleet's data and state (``specmesh up``)."""
    server: str | None = None
    """The control plane's gRPC address: ``host:port`` (plaintext) or ``grpcs://host:port``
    (TLS); default: the running local fleet's."""
    ca_file: Path | None = None
    """PEM bundle of the CA that signed the control plane's certificate (``grpcs://``);
    default: the system's roots."""
    token: SecretStr | None = None
    """Bearer token for the control plane."""
    token_file: Path | None = None
    """File holding the bearer token (read when ``token`` is unset); default: the local
    fleet's ``<home>/admin-token`` when talking to the fleet's control plane."""

    @property
    def fleet_control_plane(self) -> str | None:
        """The gRPC address of the control plane the local fleet runs, if it runs one."""
        try:
            state: dict[str, Any] = json.loads((self.home / "fleet.json").read_text())
        except (OSError, ValueError):
            return None
        endpoint = state.get("endpoints", {}).get("controlPlaneGrpc")
        # `specmesh down` keeps the file but forgets the processes: none then.
        running = any(p.get("role") == "control-plane" for p in state.get("processes", []))
        return str(endpoint) if endpoint and running else None

    @model_validator(mode="after")
    def _from_local_fleet(self) -> Settings:
        endpoint = self.fleet_control_plane
        if endpoint is None:
            return self
        if self.server is None:
            object.__setattr__(self, "server", endpoint)
        admin_token = self.home / "admin-token"
        same = self.server == endpoint
        if same and self.token is None and self.token_file is None and admin_token.exists():
            object.__setattr__(self, "token_file", admin_token)
        return self
