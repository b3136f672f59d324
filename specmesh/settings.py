"""Settings of the CLI and the shared core; the only place that reads the environment.

Every value can be set with a ``SPECMESH_*`` variable. When the local services were
started by ``specmesh services up``, their endpoints and token (in
``<home>/services.json``) are the defaults.

The control plane the CLI talks to is ``SPECMESH_SERVER`` with ``SPECMESH_TOKEN`` (or
``SPECMESH_TOKEN_FILE``). When it is not set and ``specmesh up`` recorded a control plane in
``<home>/fleet.json``, that one is the default, with the admin token in
``<home>/admin-token``. With no server at all, the CLI writes etcd and Vault directly.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class Settings(BaseSettings):
    """Where etcd and Vault are, and who is acting."""

    model_config = SettingsConfigDict(env_prefix="SPECMESH_", extra="ignore", frozen=True)

    home: Path = Path(".specmesh")
    """Folder of the local services' data and state."""
    etcd_endpoint: str | None = None
    """etcd client URL; default: the local services', else http://127.0.0.1:2379."""
    etcd_prefix: str = "/specmesh"
    """Prefix of every specmesh key in etcd."""
    vault_addr: str | None = Field(
        default=None, validation_alias=AliasChoices("SPECMESH_VAULT_ADDR", "VAULT_ADDR")
    )
    """Vault/OpenBao address; default: the local services'."""
    vault_token: str | None = Field(
        default=None, validation_alias=AliasChoices("SPECMESH_VAULT_TOKEN", "VAULT_TOKEN")
    )
    """Vault token used to write secrets and policies; default: the local services' root token."""
    vault_kv_mount: str = "secret"
    """KV v2 mount holding agents' secrets."""
    actor: str = Field(default_factory=_default_actor)
    """Who is acting, recorded in the audit (direct writes only; the API records the token's
    name)."""
    server: str | None = None
    """Control-plane URL (``http://host:port``); default: the local fleet's, if it runs.
    Empty: no control plane (direct etcd/Vault), even when a fleet runs."""
    token: SecretStr | None = None
    """Bearer token for the control plane."""
    token_file: Path | None = None
    """File holding the bearer token (read when ``token`` is unset); default: the local
    fleet's ``<home>/admin-token`` when talking to the fleet's control plane."""

    @model_validator(mode="after")
    def _from_local_fleet(self) -> Settings:
        fleet_file = self.home / "fleet.json"
        if not fleet_file.exists():
            return self
        try:
            state: dict[str, Any] = json.loads(fleet_file.read_text())
        except (OSError, ValueError):
            return self
        endpoint = state.get("endpoints", {}).get("controlPlane")
        # `specmesh down` keeps the file but forgets the processes: no default then.
        running = any(p.get("role") == "control-plane" for p in state.get("processes", []))
        if not endpoint or not running:
            return self
        if self.server is None:
            object.__setattr__(self, "server", endpoint)
        admin_token = self.home / "admin-token"
        same = self.server is not None and self.server.rstrip("/") == endpoint.rstrip("/")
        if same and self.token is None and self.token_file is None and admin_token.exists():
            object.__setattr__(self, "token_file", admin_token)
        return self

    @model_validator(mode="after")
    def _from_local_services(self) -> Settings:
        state_file = self.home / "services.json"
        if not state_file.exists():
            if self.etcd_endpoint is None:
                object.__setattr__(self, "etcd_endpoint", "http://127.0.0.1:2379")
            return self
        state: dict[str, Any] = json.loads(state_file.read_text())
        defaults = {
            "etcd_endpoint": state.get("etcdEndpoint"),
            "vault_addr": state.get("baoAddress"),
            "vault_token": state.get("baoToken"),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None and value:
                object.__setattr__(self, name, value)
        return self
