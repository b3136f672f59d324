"""Fixtures the integration tests share beyond tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from localfleet.installer import LocalServices, RedisProcess
from localfleet.modelserver import ScriptedModelServer
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

from .memory_support import MemoryRig


@pytest.fixture
def memory_rig(
    services: LocalServices,
    store: SpecStore,
    vault: VaultClient,
    model: ScriptedModelServer,
    redis_server: RedisProcess,
    tmp_path: Path,
) -> MemoryRig:
    """For the memory tests; ``model`` is the requesting module's scripted model server."""
    return MemoryRig(services, store, store.etcd, store.keys, vault, model, redis_server, tmp_path)
