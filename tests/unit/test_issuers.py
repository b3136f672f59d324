"""The one contract of ``SPECMESH_JWT_ISSUERS`` (:mod:`specmesh.issuers`): defaults, the
refusals, and messages naming the entry and field."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from specmesh.issuers import JwtIssuer, parse_jwt_issuers

KEYS = {"keys": [{"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "BBBB", "kid": "k1"}]}


def test_audiences_default_to_the_agent_and_resolve_to_its_resource_name() -> None:
    (issuer,) = parse_jwt_issuers('[{"issuer": "specmesh", "jwksUri": "http://cp/jwks"}]')
    assert issuer.audiences == ("{agent}",)
    assert issuer.audiences_for("Billing_Bot") == ["billing-bot"]
    assert JwtIssuer(issuer="a", jwks=KEYS).audiences == ("{agent}",)


def test_audiences_for_keeps_literals_and_drops_duplicates() -> None:
    issuer = JwtIssuer(issuer="a", jwks=KEYS, audiences=("{agent}", "all", "billing-bot", "all"))
    assert issuer.audiences_for("Billing_Bot") == ["billing-bot", "all"]


def test_either_key_source_is_read() -> None:
    remote, inline = parse_jwt_issuers(
        [
            {"issuer": "a", "jwksUri": "https://idp.example.com/jwks", "jwks": None},
            {"issuer": "b", "jwksUri": None, "jwks": KEYS},
        ]
    )
    assert (remote.jwks_uri, remote.jwks) == ("https://idp.example.com/jwks", None)
    assert (inline.jwks_uri, inline.jwks) == (None, KEYS)


def test_empty_text_or_none_is_no_issuer() -> None:
    assert parse_jwt_issuers("") == parse_jwt_issuers("  ") == parse_jwt_issuers(None) == ()
    assert parse_jwt_issuers("[]") == ()


def test_parsed_data_and_issuer_objects_are_accepted() -> None:
    built = JwtIssuer(issuer="a", jwks_uri="http://k/j")
    assert parse_jwt_issuers([built]) == parse_jwt_issuers(
        '[{"issuer": "a", "jwksUri": "http://k/j"}]'
    )


def test_the_model_refuses_what_the_parser_refuses() -> None:
    with pytest.raises(ValidationError, match="at least one audience"):
        JwtIssuer(issuer="a", jwks=KEYS, audiences=())
    with pytest.raises(ValidationError, match="http:// or https:// URL"):
        JwtIssuer(issuer="a", jwks_uri="ftp://k/j")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        JwtIssuer.model_validate({"issuer": "a", "jwks": KEYS, "keys": []})


def _entries(*entries: dict[str, object]) -> str:
    return json.dumps(list(entries))


U = "http://k/j"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[", "SPECMESH_JWT_ISSUERS: not JSON"),
        ("{}", "SPECMESH_JWT_ISSUERS: must be a JSON list of issuers"),
        ('["a"]', "SPECMESH_JWT_ISSUERS[0]: must be an object"),
        ("[{}]", "SPECMESH_JWT_ISSUERS[0].issuer: must be a non-empty string"),
        (_entries({"issuer": "", "jwksUri": U}),
         "SPECMESH_JWT_ISSUERS[0].issuer: must be a non-empty string"),
        (_entries({"issuer": "a b", "jwksUri": U}),
         "SPECMESH_JWT_ISSUERS[0].issuer: must not contain whitespace"),
        (_entries({"issuer": "a", "jwksUri": U}, {"issuer": "b", "jwksUri": "file:///k"}),
         "SPECMESH_JWT_ISSUERS[1].jwksUri: must be an http:// or https:// URL"),
        (_entries({"issuer": "a", "jwksUri": "http://"}),
         "SPECMESH_JWT_ISSUERS[0].jwksUri: must be an http:// or https:// URL"),
        (_entries({"issuer": "a", "jwks": {"k": []}}),
         'SPECMESH_JWT_ISSUERS[0].jwks: must be a JWK Set ({"keys": [...]})'),
        (_entries({"issuer": "a"}), "SPECMESH_JWT_ISSUERS[0]: set exactly one of jwksUri and jwks"),
        (_entries({"issuer": "a", "jwksUri": U, "jwks": KEYS}),
         "SPECMESH_JWT_ISSUERS[0]: set exactly one of jwksUri and jwks"),
        (_entries({"issuer": "a", "jwksUri": U, "audiences": "x"}),
         "SPECMESH_JWT_ISSUERS[0].audiences: must be a list of non-empty strings"),
        (_entries({"issuer": "a", "jwksUri": U, "audiences": [""]}),
         "SPECMESH_JWT_ISSUERS[0].audiences: must be a list of non-empty strings"),
        (_entries({"issuer": "a", "jwksUri": U, "audiences": []}),
         "SPECMESH_JWT_ISSUERS[0].audiences: must name at least one audience"),
        (_entries({"issuer": "a", "jwksUri": U, "keys": 1, "jwks_uri": U}),
         "SPECMESH_JWT_ISSUERS[0]: unknown field(s) jwks_uri, keys"),
        (_entries({"issuer": "a", "jwksUri": U}, {"issuer": "a", "jwks": KEYS}),
         "SPECMESH_JWT_ISSUERS[1].issuer: 'a' is listed twice"),
    ],
)  # fmt: skip
def test_errors_name_the_entry_and_field(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_jwt_issuers(text)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("https://idp.example.com", "https://idp.example.com/tenant"),
        ("https://idp.example.com/tenant", "https://idp.example.com"),  # either order
        ("a", "a/b/c"),
    ],
)
def test_an_issuer_extending_another_by_a_slash_is_refused(first: str, second: str) -> None:
    # principal <iss>/<sub>: 'a' with sub 'b/x' and 'a/b' with sub 'x' are one caller
    text = _entries({"issuer": first, "jwksUri": U}, {"issuer": second, "jwksUri": U})
    with pytest.raises(ValueError, match=r"^SPECMESH_JWT_ISSUERS\[1\]\.issuer: .* overlap"):
        parse_jwt_issuers(text)


def test_issuers_sharing_a_prefix_without_a_slash_are_distinct() -> None:
    text = _entries(
        {"issuer": "https://idp", "jwksUri": U}, {"issuer": "https://idp2", "jwksUri": U}
    )
    assert [i.issuer for i in parse_jwt_issuers(text)] == ["https://idp", "https://idp2"]


def test_one_issuer_at_most_is_the_control_plane() -> None:
    entry = {"jwks": {"keys": []}, "controlPlane": True}
    [cp, other] = parse_jwt_issuers(
        json.dumps([{"issuer": "specmesh", **entry}, {"issuer": "idp", "jwks": {"keys": []}}])
    )

    assert (cp.control_plane, other.control_plane) == (True, False)
    with pytest.raises(ValueError, match=r"SPECMESH_JWT_ISSUERS\[1\].controlPlane: only one"):
        parse_jwt_issuers([{"issuer": "a", **entry}, {"issuer": "b", **entry}])
