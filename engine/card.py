"""The A2A agent card, built from the runner's :class:`~engine.turn_protocol.CardInfo`.

The card follows the spec: a hot reload changes the name, description, skills or
streaming capability, and the revision becomes the card's ``version``.
:class:`CardSource` rebuilds it only when the card info changed, and keeps one
:class:`AgentCard` instance current in place so that the a2a-sdk request handler, which
holds that instance, sees the same capabilities as the served card.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    MutualTlsSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol

from engine.ledger import COST_EXTENSION
from engine.turn_protocol import CardInfo

__all__ = [
    "BEARER_SCHEME",
    "DEFAULT_SECURITY",
    "MTLS_SCHEME",
    "SECURITY_SCHEMES",
    "CardSource",
    "CardUrls",
    "build_agent_card",
    "parse_card_security",
    "placeholder_card_info",
]

BEARER_SCHEME = "bearer"
"""Security scheme of the public entry: a bearer JWT (``Authorization: Bearer <jwt>``) of an
issuer the sidecar trusts, e.g. the control plane's invoke token."""
MTLS_SCHEME = "mtls"
"""Security scheme of a mesh that terminates mutual TLS in front of the agent (Istio mode:
the entry is the inbound and a partner agent authenticates with its certificate)."""
SECURITY_SCHEMES: dict[str, SecurityScheme] = {
    BEARER_SCHEME: SecurityScheme(
        http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="Bearer",
            bearer_format="JWT",
            description="A JWT of an issuer the agent trusts (e.g. the control plane's "
            "invoke token: POST /api/v1/agents/{name}/invoke-token), audience the agent; "
            "the agent's callers decide which principals may call.",
        )
    ),
    MTLS_SCHEME: SecurityScheme(
        mtls_security_scheme=MutualTlsSecurityScheme(
            description="Mutual TLS with the calling agent's mesh certificate "
            "(SPIFFE-style URI SAN), terminated by Istio."
        )
    ),
}
"""The schemes a card may declare, by name."""
DEFAULT_SECURITY: tuple[str, ...] = (BEARER_SCHEME,)


_COST = AgentExtension(
    uri=COST_EXTENSION,
    description="Answers carry their call chain's cost in artifact metadata 'cost' "
    "(totalUsd, ownUsd, downstreamUsd, unpriced); a message's metadata "
    "'specmesh.budgetUsd' caps what its chain may spend.",
    required=False,
)


def parse_card_security(raw: str) -> tuple[str, ...]:
    """The schemes of a comma list (``SPECMESH_CARD_SECURITY``: ``bearer``, ``mtls``), in
    the order of :data:`SECURITY_SCHEMES`; ValueError names an unknown or missing one."""
    names = {n.strip().lower() for n in raw.split(",") if n.strip()}
    unknown = sorted(names - set(SECURITY_SCHEMES))
    if unknown:
        raise ValueError(
            f"card security: unknown scheme {', '.join(unknown)} "
            f"(known: {', '.join(SECURITY_SCHEMES)})"
        )
    if not names:
        raise ValueError(f"card security: name at least one of {', '.join(SECURITY_SCHEMES)}")
    return tuple(n for n in SECURITY_SCHEMES if n in names)


_TEXT_MODES = ["text/plain"]
_OUTPUT_MODES = ["text/plain", "application/json"]


@dataclass(frozen=True, kw_only=True)
class CardUrls:
    """Where callers reach the agent, one URL per A2A binding."""

    jsonrpc: str
    """JSON-RPC endpoint, e.g. ``http://host:7103/``."""
    http_json: str
    """HTTP+JSON base URL, e.g. ``http://host:7103/v1``."""
    grpc: str
    """gRPC target, e.g. ``host:7104``."""


def placeholder_card_info(agent_name: str) -> CardInfo:
    """Card info for an engine that holds no spec yet (not ready)."""
    return CardInfo(
        name=agent_name,
        description=f"{agent_name} (no spec loaded yet)",
        revision=0,
        skills=(),
        streaming=True,
    )


def _skill_id(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "default"


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _skill(raw: Mapping[str, Any], info: CardInfo) -> AgentSkill:
    name = str(raw.get("name") or raw.get("id") or info.name)
    return AgentSkill(
        id=str(raw.get("id") or _skill_id(name)),
        name=name,
        description=str(raw.get("description") or info.description),
        tags=_strings(raw.get("tags")) or ["chat"],
        examples=_strings(raw.get("examples")),
        input_modes=_strings(raw.get("inputModes", raw.get("input_modes"))),
        output_modes=_strings(raw.get("outputModes", raw.get("output_modes"))),
    )


def _default_skill(info: CardInfo) -> AgentSkill:
    return AgentSkill(
        id=_skill_id(info.name),
        name=info.name,
        description=info.description,
        tags=["chat"],
    )


def build_agent_card(
    info: CardInfo, urls: CardUrls, *, security: tuple[str, ...] = DEFAULT_SECURITY
) -> AgentCard:
    """The A2A 1.0 card for ``info``, served on the three ``urls`` (the public entry's),
    declaring the ``security`` schemes (names of :data:`SECURITY_SCHEMES`): one security
    requirement per scheme, so that any one of them suffices."""
    skills = [_skill(s, info) for s in info.skills] or [_default_skill(info)]
    interfaces = [
        AgentInterface(
            url=urls.jsonrpc,
            protocol_binding=TransportProtocol.JSONRPC.value,
            protocol_version=PROTOCOL_VERSION_CURRENT,
        ),
        AgentInterface(
            url=urls.http_json,
            protocol_binding=TransportProtocol.HTTP_JSON.value,
            protocol_version=PROTOCOL_VERSION_CURRENT,
        ),
        AgentInterface(
            url=urls.grpc,
            protocol_binding=TransportProtocol.GRPC.value,
            protocol_version=PROTOCOL_VERSION_CURRENT,
        ),
    ]
    return AgentCard(
        name=info.name,
        description=info.description or info.name,
        version=str(info.revision),
        supported_interfaces=interfaces,
        capabilities=AgentCapabilities(
            streaming=info.streaming,
            push_notifications=False,
            extensions=[_COST],
        ),
        security_schemes={name: SECURITY_SCHEMES[name] for name in security},
        security_requirements=[
            SecurityRequirement(schemes={name: StringList(list=[])}) for name in security
        ],
        default_input_modes=_TEXT_MODES,
        default_output_modes=_OUTPUT_MODES,
        skills=skills,
    )


class CardSource:
    """The current card: rebuilt from ``card_info()`` whenever that changes.

    :attr:`card` is one long-lived instance updated in place (hand it to the request
    handler); :meth:`current` refreshes it and returns it.
    """

    def __init__(
        self,
        *,
        card_info: Callable[[], CardInfo | None],
        urls: CardUrls,
        agent_name: str,
        security: tuple[str, ...] = DEFAULT_SECURITY,
    ) -> None:
        self._card_info = card_info
        self._urls = urls
        self._security = security
        self._placeholder = placeholder_card_info(agent_name)
        self._lock = threading.Lock()
        self._built_from: CardInfo | None = None
        self.card = AgentCard()
        self.current()

    @property
    def ready(self) -> bool:
        """Whether the card reflects a loaded spec (the runner's card info is not ``None``)."""
        return self._card_info() is not None

    def current(self) -> AgentCard:
        """The card for the runner's current card info (the placeholder until ready)."""
        info = self._card_info() or self._placeholder
        with self._lock:
            if info != self._built_from:
                self.card.CopyFrom(build_agent_card(info, self._urls, security=self._security))
                self._built_from = info
            snapshot = AgentCard()
            snapshot.CopyFrom(self.card)
        return snapshot
