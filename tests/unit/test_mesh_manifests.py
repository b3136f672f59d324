"""The Istio base manifests in ``mesh/`` validate against the Istio CRD schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.istio import CRDS_PATH
from control_plane.mesh import IstioValidator, MeshSettings, render_namespace

from ..conftest import REPO

MESH = REPO / "mesh"
FILES = sorted(MESH.glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> IstioValidator:
    return IstioValidator(CRDS_PATH)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for path in FILES for d in _docs(path)}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_mesh_file_validates(validator: IstioValidator, path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} holds no object"
    validator.check(docs)
    for doc in docs:
        # Applied with `kubectl apply -n <namespace>`: no namespace baked in.
        assert "namespace" not in doc["metadata"], path.name


def test_mesh_holds_the_namespace_wide_objects() -> None:
    kinds = _by_kind()
    assert set(kinds) == {"PeerAuthentication", "Sidecar", "Telemetry"}
    peer = kinds["PeerAuthentication"]
    assert "selector" not in peer["spec"]  # namespace-wide
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    sidecar = kinds["Sidecar"]["spec"]
    assert "workloadSelector" not in sidecar
    (egress,) = sidecar["egress"]
    assert {
        "./*",
        "istio-system/*",
        "default/kubernetes.default.svc.cluster.local",  # the control plane's API calls
    } <= set(egress["hosts"])
    assert sidecar["outboundTrafficPolicy"]["mode"] == "REGISTRY_ONLY"
    (tracing,) = kinds["Telemetry"]["spec"]["tracing"]
    assert tracing["randomSamplingPercentage"] == 100.0
    assert [p["name"] for p in tracing["providers"]] == ["specmesh-otel"]


def test_peer_authentication_matches_the_control_planes(validator: IstioValidator) -> None:
    (rendered,) = render_namespace(MeshSettings(namespace="agents"))
    peer = _by_kind()["PeerAuthentication"]
    assert (peer["metadata"]["name"], peer["spec"]) == (
        rendered["metadata"]["name"],
        rendered["spec"],
    )


def test_readme_explains_every_file() -> None:
    readme = (MESH / "README.md").read_text()
    for path in FILES:
        assert path.name in readme
