"""The Kubernetes mesh sink against the fake API server: server-side apply of every object,
and pruning of the specmesh-managed objects no longer rendered, of every kind (switching
the route mode removes the other mode's routes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest

from control_plane.mesh import MeshSettings, render_mesh
from control_plane.publisher import KubernetesMeshSink
from specmesh.issuers import JwtIssuer
from specmesh.spec.models import ReleaseSpec

from ..certs import self_signed
from .kube_api import APPLY_PATCH, FakeKubeApi, serving

NS = "agents"


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeKubeApi, str]]:
    fake = FakeKubeApi()
    async with serving(fake) as url:
        yield fake, url


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    """A service-account folder: a token and a CA bundle (a self-signed CA)."""
    _, cert = self_signed("test-ca")
    (tmp_path / "ca.crt").write_bytes(cert)
    (tmp_path / "token").write_text("cp-token\n")
    return tmp_path


def _render(routes: Literal["virtualservice", "gateway-api"]) -> list[dict[str, Any]]:
    settings = MeshSettings(
        namespace=NS,
        routes=routes,
        jwt_issuers=(JwtIssuer(issuer="specmesh", jwks_uri="http://cp:8090/jwks"),),
    )
    release = ReleaseSpec(stable_revision=1, canary_revision=2, canary_weight=20)
    return render_mesh({"front": release, "back": None}, {"front": ["back"]}, settings=settings)


async def test_apply_then_switch_route_mode_prunes_the_old_routes(
    api: tuple[FakeKubeApi, str], sa_dir: Path
) -> None:
    fake, url = api
    sink = KubernetesMeshSink(namespace=NS, api=url, sa_dir=sa_dir)
    objects = _render("virtualservice")
    await sink.publish(objects)
    patches = [c for c in fake.calls if c.method == "PATCH"]
    assert len(patches) == len(objects)
    assert {c.authorization for c in fake.calls} == {"Bearer cp-token"}
    assert {c.content_type for c in patches} == {APPLY_PATCH}
    assert fake.names("virtualservices") == {"front", "back"}
    assert fake.names("requestauthentications") == {"front", "back"}
    assert fake.get("authorizationpolicies", "back")["spec"]["rules"][0]["from"]

    before = len(fake.calls)
    await sink.publish(_render("gateway-api"))
    assert fake.names("httproutes") == fake.names("grpcroutes") == {"front", "back"}
    assert fake.names("virtualservices") == set()  # the other mode's routes are gone
    deleted = {(c.plural, c.name) for c in fake.calls[before:] if c.method == "DELETE"}
    assert deleted == {
        ("virtualservices", "front"), ("virtualservices", "back"),
        ("destinationrules", "front"), ("destinationrules", "back"),
    }  # fmt: skip
    assert fake.names("destinationrules") == {
        "front-stable", "front-canary", "back-stable", "back-canary",
    }  # fmt: skip
    # an object specmesh does not manage is never pruned
    fake.put({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
              "metadata": {"name": "admins", "namespace": NS}, "spec": {}})  # fmt: skip
    await sink.publish(_render("gateway-api"))
    assert fake.names("virtualservices") == {"admins"}
