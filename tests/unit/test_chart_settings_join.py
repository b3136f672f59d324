"""Every environment variable the Helm chart sets is one its process really reads: the
chart and the settings modules cannot drift apart silently."""

from __future__ import annotations

import typing
from collections.abc import Iterator

import helm_python
import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from control_plane.settings import ControlPlaneSettings, KubernetesRuntimeSettings
from engine.main import ServeSettings
from engine.settings import EngineSettings
from sidecar.settings import SidecarSettings

from .test_helm_chart import CHART, MATRIX, _of, _render

# read by libraries rather than by a settings module
_THIRD_PARTY_PREFIXES = ("OTEL_",)
_THIRD_PARTY = {
    "POD_IP", "POD_NAME", "POD_NAMESPACE",  # downward API, substituted into other values
    "VAULT_CACERT",  # hvac
    "REQUESTS_CA_BUNDLE",  # requests (hvac)
    "HOME",
}  # fmt: skip


def _accepted(*models: type[BaseSettings]) -> set[str]:
    names: set[str] = set()
    for model in models:
        prefix = str(model.model_config.get("env_prefix", ""))
        for name, info in model.model_fields.items():
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                names |= {str(c) for c in alias.choices if isinstance(c, str)}
            elif isinstance(alias, str):
                names.add(alias)
            names.add(f"{prefix}{name}".upper())
    return names


ROLES: dict[str, set[str]] = {
    "sidecar": _accepted(SidecarSettings),
    "engine": _accepted(EngineSettings, ServeSettings),
    "control-plane": _accepted(ControlPlaneSettings, KubernetesRuntimeSettings),
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as c:
        yield c


def _role(container: dict[str, typing.Any]) -> str:
    """The process a container runs: ``python -m <role>`` (the agents' containers, started
    without the CLI) or the image's ``specmesh`` entrypoint with ``args: [<role>]``."""
    command = container.get("command", [])
    if "-m" in command:
        return str(command[command.index("-m") + 1])
    return str(container["args"][0])


@pytest.mark.parametrize("case", list(MATRIX))
def test_every_env_var_the_chart_sets_is_read_by_its_process(
    chart: helm_python.Chart, case: str
) -> None:
    unread: list[str] = []
    for deployment in _of(_render(chart, MATRIX[case]), "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            role = _role(container)
            accepted = ROLES[role]
            for env in container.get("env", []):
                name = env["name"]
                if (
                    name in accepted
                    or name in _THIRD_PARTY
                    or name.startswith(_THIRD_PARTY_PREFIXES)
                ):
                    continue
                unread.append(f"{deployment['metadata']['name']}/{container['name']}: {name}")
    assert unread == [], "the chart sets variables no settings field reads"


def test_settings_types_are_simple_enough_for_env(chart: helm_python.Chart) -> None:
    # guard for the join above: every field is readable from one environment variable
    for model in (
        SidecarSettings,
        EngineSettings,
        ServeSettings,
        ControlPlaneSettings,
        KubernetesRuntimeSettings,
    ):
        for name, info in model.model_fields.items():
            assert typing.get_origin(info.annotation) is not dict, f"{model.__name__}.{name}"
