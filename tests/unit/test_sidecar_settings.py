"""Sidecar settings: environment names, defaults, listen addresses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from sidecar.dataplane import conversation_tracks
from sidecar.settings import SidecarSettings
from specmesh.addresses import parse_listen


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> None:
    monkeypatch.chdir(tmp_path)  # no .specmesh/services.json from the repo
    for name in list(os.environ):
        if name.startswith(("SPECMESH_", "VAULT_")) or name == "AGENT_NAME":
            monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_reads_runtime_contract_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _env(
        monkeypatch,
        tmp_path,
        AGENT_NAME="Nacos_Helper",
        SPECMESH_TRACK="canary",
        SPECMESH_SYNC_ADDR="unix:///run/specmesh/sync.sock",
        SPECMESH_INBOUND="10.0.0.7:7100",
        SPECMESH_OPS="0.0.0.0:9000",
        SPECMESH_ETCD_ENDPOINT="http://etcd:2379",
        SPECMESH_ETCD_PREFIX="/mesh",
        VAULT_ADDR="http://vault:8200",
        SPECMESH_VAULT_K8S_ROLE="nacos-helper",
        SPECMESH_ISTIO="true",
        SPECMESH_REGISTRY_TTL="6",
    )
    s = SidecarSettings()
    assert (s.agent_name, s.track) == ("Nacos_Helper", "canary")
    assert s.sync_addr == "unix:///run/specmesh/sync.sock"
    assert (s.etcd_endpoint, s.keys.prefix, s.registry_ttl) == ("http://etcd:2379", "/mesh", 6)
    assert (s.vault_addr, s.vault_token, s.vault_k8s_role) == (
        "http://vault:8200",
        None,
        "nacos-helper",
    )
    assert s.istio and s.mtls is False  # Istio does mTLS
    assert s.inbound_url == "http://10.0.0.7:7100"
    assert s.snapshot_path == Path(".specmesh/sidecars/nacos-helper-canary/snapshot.json")
    assert s.instance_id  # host-pid


def test_defaults_and_local_services(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _env(monkeypatch, tmp_path, AGENT_NAME="helper")
    (tmp_path / ".specmesh").mkdir()
    (tmp_path / ".specmesh" / "services.json").write_text(
        '{"etcdEndpoint": "http://127.0.0.1:23790", "baoAddress": "http://127.0.0.1:8201",'
        ' "baoToken": "root-t"}'
    )
    s = SidecarSettings()
    assert s.track == "stable" and s.mtls is True
    assert (s.etcd_endpoint, s.vault_addr, s.vault_token) == (
        "http://127.0.0.1:23790",
        "http://127.0.0.1:8201",
        None,  # never the services' root token: a sidecar is given its agent's own
    )
    assert s.vault_pki_role == "specmesh-agent-helper"
    assert s.inbound_url == "https://127.0.0.1:7100"
    assert "root-t" not in repr(s)


def test_refuses_bad_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _env(monkeypatch, tmp_path, AGENT_NAME="helper", SPECMESH_TRACK="beta")
    with pytest.raises(ValidationError, match="track"):
        SidecarSettings()
    _env(monkeypatch, tmp_path, AGENT_NAME="-bad-", SPECMESH_TRACK="stable")
    with pytest.raises(ValidationError, match="must start with a letter"):
        SidecarSettings()
    _env(monkeypatch, tmp_path, AGENT_NAME="ok", SPECMESH_ETCD_PREFIX="mesh/")
    with pytest.raises(ValidationError, match="etcd prefix"):
        SidecarSettings()


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:7101", ("tcp", "127.0.0.1", 7101)),
        (":7101", ("tcp", "127.0.0.1", 7101)),
        ("[::1]:7101", ("tcp", "::1", 7101)),
        ("unix:/run/s.sock", ("unix", "/run/s.sock", 0)),
        ("unix:///run/s.sock", ("unix", "/run/s.sock", 0)),
    ],
)
def test_parse_listen_address(address: str, parsed: tuple[str, str, int]) -> None:
    assert parse_listen(address, setting="SPECMESH_SYNC_ADDR") == parsed


@pytest.mark.parametrize("address", ["localhost", "host:port", "unix:"])
def test_parse_listen_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match=r"^SPECMESH_SYNC_ADDR: .*(host:port|path)"):
        parse_listen(address, setting="SPECMESH_SYNC_ADDR")


@pytest.mark.parametrize(
    ("values", "kept"),
    [
        ({}, True),
        ({"SPECMESH_CONVERSATION_PIN_SECONDS": "0"}, False),
        ({"SPECMESH_ISTIO": "true"}, False),  # the mesh splits each request
    ],
)
def test_one_conversation_table_for_the_entry_and_the_egress(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, values: dict[str, str], kept: bool
) -> None:
    _env(monkeypatch, tmp_path, AGENT_NAME="a", SPECMESH_CONVERSATION_PIN_MAX="7", **values)
    tracks = conversation_tracks(SidecarSettings())
    if not kept:
        assert tracks is None
        return
    assert tracks is not None
    for n in range(8):  # the bound is the setting's, whichever agent a conversation is with
        tracks.remember(f"c{n}", "stable", None, agent="" if n % 2 else "partner-b")
    assert len(tracks) == 7
