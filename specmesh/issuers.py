"""The trusted JWT issuers (``SPECMESH_JWT_ISSUERS``): one model, one parser, one rule.

The sidecar verifies bearer tokens against these issuers; the control plane renders the
same list into every agent's Istio RequestAuthentication. Both read the variable with
:func:`parse_jwt_issuers` and take an issuer's audiences for an agent from
:meth:`JwtIssuer.audiences_for`, so what Istio admits and what the sidecar admits cannot
differ.

The wire format is a JSON list of::

    {"issuer": "<iss>", "jwksUri": "<http(s) URL>" | "jwks": {"keys": [...]},
     "audiences": ["{agent}", ...], "controlPlane": false}

* exactly one of ``jwksUri`` and ``jwks`` (the other absent or ``null``);
* ``audiences`` defaults to ``["{agent}"]`` and is never empty (an empty list would mean
  "any audience" to Istio: a token minted for one agent would open every other);
  ``{agent}`` (:data:`AGENT_PLACEHOLDER`) is the agent's resource name;
* ``controlPlane: true`` marks the control plane's own issuer (at most one): only its
  tokens' ``specmesh_track`` claim (:data:`specmesh.callers.TRACK_CLAIM`) is honoured;
* unknown fields are refused;
* no issuer is listed twice, and none is another followed by ``/`` and more: a request
  principal is ``<iss>/<sub>``, so issuer ``a`` with subject ``b/c`` and issuer ``a/b``
  with subject ``c`` would be one principal -- one caller, owning the other's tasks.

Errors are :class:`ValueError`\\s naming the entry and field:
``SPECMESH_JWT_ISSUERS[1].jwksUri: must be an http:// or https:// URL``.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specmesh.names import resource_name

__all__ = ["AGENT_PLACEHOLDER", "ENV_NAME", "JwtIssuer", "parse_jwt_issuers"]

AGENT_PLACEHOLDER = "{agent}"
"""An audience that stands for the agent's resource name."""
ENV_NAME = "SPECMESH_JWT_ISSUERS"
"""The variable the issuers are read from (the sidecar's and the control plane's)."""

_WIRE_FIELDS = ("issuer", "jwksUri", "jwks", "audiences", "controlPlane")


class JwtIssuer(BaseModel):
    """One trusted token issuer (an entry of ``SPECMESH_JWT_ISSUERS``)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True
    )

    issuer: str
    """The tokens' ``iss`` claim (no whitespace: it starts every request principal)."""
    jwks_uri: str | None = Field(default=None, alias="jwksUri")
    """Where the issuer's public keys are (an http:// or https:// URL)."""
    jwks: dict[str, Any] | None = None
    """The public keys inline, a JWK Set ``{"keys": [...]}``, instead of ``jwksUri``."""
    audiences: tuple[str, ...] = (AGENT_PLACEHOLDER,)
    """Accepted ``aud`` values, never empty; ``{agent}`` is the agent's resource name."""
    control_plane: bool = Field(default=False, alias="controlPlane")
    """This issuer is the specmesh control plane (at most one is): a ``specmesh_track``
    claim in its tokens (the release evaluation's) sends the entry's call to that track.
    The claim is ignored in every other issuer's tokens."""

    @field_validator("issuer", mode="before")
    @classmethod
    def _issuer(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty string")
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError("must not contain whitespace or control characters")
        return value

    @field_validator("jwks_uri", mode="before")
    @classmethod
    def _jwks_uri(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("must be an http:// or https:// URL")
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("jwks", mode="before")
    @classmethod
    def _jwks(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
            raise ValueError('must be a JWK Set ({"keys": [...]})')
        return value

    @field_validator("audiences", mode="before")
    @classmethod
    def _audiences(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple) or not all(isinstance(a, str) and a for a in value):
            raise ValueError("must be a list of non-empty strings")
        if not value:
            raise ValueError(
                "must name at least one audience: an empty list would admit any audience "
                f"(omit audiences for the default ['{AGENT_PLACEHOLDER}'])"
            )
        return tuple(value)

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtIssuer:
        if (self.jwks_uri is None) == (self.jwks is None):
            raise ValueError("set exactly one of jwksUri and jwks")
        return self

    def audiences_for(self, agent: str) -> list[str]:
        """The accepted audiences of tokens for ``agent`` (logical or resource name):
        :data:`AGENT_PLACEHOLDER` replaced by its resource name, duplicates dropped."""
        rn = resource_name(agent)
        return list(dict.fromkeys(rn if a == AGENT_PLACEHOLDER else a for a in self.audiences))


def parse_jwt_issuers(value: str | Sequence[Any] | None) -> tuple[JwtIssuer, ...]:
    """``SPECMESH_JWT_ISSUERS`` -- JSON text, or already parsed (a list of mappings or
    :class:`JwtIssuer`\\s) -- as issuers; empty text or ``None``: none. Raises
    :class:`ValueError` naming the entry and field that is wrong."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    data: Any = value
    if isinstance(value, str):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ENV_NAME}: not JSON ({e})") from e
    if not isinstance(data, list | tuple):
        raise ValueError(
            f"{ENV_NAME}: must be a JSON list of issuers ({{issuer, jwksUri | jwks, audiences}})"
        )
    out: list[JwtIssuer] = []
    for i, entry in enumerate(data):
        issuer = entry if isinstance(entry, JwtIssuer) else _entry(i, entry)
        _check_distinct(i, issuer, out)
        if issuer.control_plane and any(o.control_plane for o in out):
            raise ValueError(
                f"{ENV_NAME}[{i}].controlPlane: only one issuer may be the control plane"
            )
        out.append(issuer)
    return tuple(out)


def _entry(i: int, entry: Any) -> JwtIssuer:
    where = f"{ENV_NAME}[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be an object ({{issuer, jwksUri | jwks, audiences}})")
    unknown = sorted(str(k) for k in entry if k not in _WIRE_FIELDS)
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(_WIRE_FIELDS)})"
        )
    try:
        return JwtIssuer.model_validate(entry)
    except ValidationError as e:
        raise ValueError("; ".join(_problem(where, err) for err in e.errors())) from None


def _problem(where: str, err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        message = "must be a non-empty string" if loc == "issuer" else "is required"
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}.{loc}: {message}" if loc else f"{where}: {message}"


def _check_distinct(i: int, issuer: JwtIssuer, earlier: Sequence[JwtIssuer]) -> None:
    where = f"{ENV_NAME}[{i}].issuer"
    for j, other in enumerate(earlier):
        a, b = issuer.issuer, other.issuer
        if a == b:
            raise ValueError(f"{where}: {a!r} is listed twice (also {ENV_NAME}[{j}])")
        short, long = (a, b) if len(a) < len(b) else (b, a)
        if long.startswith(short + "/"):
            raise ValueError(
                f"{where}: {a!r} and {b!r} ({ENV_NAME}[{j}]) overlap: request principals "
                f"are <iss>/<sub>, so issuer {short!r} with subject "
                f"{long[len(short) + 1 :] + '/x'!r} and issuer {long!r} with subject 'x' "
                "would be the same caller"
            )
