"""The agent card built from the runner's card info."""

from __future__ import annotations

import pytest
from a2a.types.a2a_pb2 import AgentCard
from a2a.utils.proto_utils import validate_proto_required_fields
from google.protobuf.json_format import MessageToDict, ParseDict

from engine.card import (
    BEARER_SCHEME,
    MTLS_SCHEME,
    CardSource,
    CardUrls,
    build_agent_card,
    parse_card_security,
)
from engine.ledger import COST_EXTENSION
from engine.turn_protocol import CardInfo

URLS = CardUrls(jsonrpc="http://a:1/", http_json="http://a:1/v1", grpc="a:2")
INFO = CardInfo(name="mse-nacos-helper", description="Answers Nacos questions.", revision=7)


def test_card_carries_the_spec_revision_interfaces_and_bearer() -> None:
    card = build_agent_card(INFO, URLS)

    validate_proto_required_fields(card)
    assert (card.name, card.description, card.version) == (
        "mse-nacos-helper",
        "Answers Nacos questions.",
        "7",
    )
    assert [(i.protocol_binding, i.url, i.protocol_version) for i in card.supported_interfaces] == [
        ("JSONRPC", "http://a:1/", "1.0"),
        ("HTTP+JSON", "http://a:1/v1", "1.0"),
        ("GRPC", "a:2", "1.0"),
    ]
    assert list(card.security_schemes) == [BEARER_SCHEME]
    bearer = card.security_schemes[BEARER_SCHEME].http_auth_security_scheme
    assert (bearer.scheme, bearer.bearer_format) == ("Bearer", "JWT")
    assert [list(r.schemes) for r in card.security_requirements] == [[BEARER_SCHEME]]
    assert card.capabilities.streaming and not card.capabilities.push_notifications
    # answers carry their chain's cost (engine.ledger): an optional A2A extension
    (cost,) = card.capabilities.extensions
    assert (cost.uri, cost.required) == (COST_EXTENSION, False)


def test_istio_mode_card_offers_bearer_or_mtls() -> None:
    card = build_agent_card(INFO, URLS, security=parse_card_security("mtls, bearer"))

    assert sorted(card.security_schemes) == [BEARER_SCHEME, MTLS_SCHEME]
    assert card.security_schemes[MTLS_SCHEME].HasField("mtls_security_scheme")
    # one requirement per scheme: either one suffices (OR), not both (AND)
    assert [list(r.schemes) for r in card.security_requirements] == [
        [BEARER_SCHEME],
        [MTLS_SCHEME],
    ]


@pytest.mark.parametrize(
    ("raw", "message"), [("bearer,oauth", "unknown scheme oauth"), (" , ", "at least one")]
)
def test_card_security_setting_names_what_is_wrong(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_card_security(raw)


def test_card_without_skills_gets_one_default_skill() -> None:
    [skill] = build_agent_card(INFO, URLS).skills

    assert (skill.id, skill.name, skill.description, list(skill.tags)) == (
        "mse-nacos-helper",
        "mse-nacos-helper",
        "Answers Nacos questions.",
        ["chat"],
    )


def test_skills_come_from_the_spec_with_defaults_filled_in() -> None:
    info = CardInfo(
        name="a",
        description="d",
        revision=1,
        skills=(
            {
                "id": "cfg",
                "name": "Config",
                "description": "Config help",
                "tags": ["nacos"],
                "examples": ["How do I publish a config?"],
            },
            {"name": "Service Discovery"},
        ),
        streaming=False,
    )
    card = build_agent_card(info, URLS)

    validate_proto_required_fields(card)
    assert [(s.id, s.name, s.description, list(s.tags)) for s in card.skills] == [
        ("cfg", "Config", "Config help", ["nacos"]),
        ("service-discovery", "Service Discovery", "d", ["chat"]),
    ]
    assert list(card.skills[0].examples) == ["How do I publish a config?"]
    assert not card.capabilities.streaming


def test_card_round_trips_through_json() -> None:
    card = build_agent_card(INFO, URLS)
    parsed = ParseDict(MessageToDict(card), AgentCard())
    assert parsed == card


def test_card_source_follows_card_info_and_updates_its_card_in_place() -> None:
    current: list[CardInfo | None] = [None]
    source = CardSource(card_info=lambda: current[0], urls=URLS, agent_name="mse-nacos-helper")
    shared = source.card

    assert not source.ready
    assert source.current().version == "0"  # placeholder until ready
    validate_proto_required_fields(source.current())

    current[0] = INFO
    assert source.ready
    assert source.current().version == "7"
    assert shared.version == "7"  # the request handler's instance follows

    current[0] = CardInfo(name="mse-nacos-helper", description="New.", revision=8, streaming=False)
    served = source.current()
    assert (served.version, served.description) == ("8", "New.")
    assert not shared.capabilities.streaming
    served.name = "changed by a caller"
    assert source.current().name == "mse-nacos-helper"  # callers get a copy
