"""Who is calling an agent: the names every part agrees on.

An agent is called by one of two kinds of caller:

- **another agent** of the mesh, authenticated by its mesh certificate (mTLS; the
  sidecar's or Istio's). Its name is the agent's resource name.
- **an external client**, authenticated by a bearer token (a JWT of a configured issuer,
  or one the control plane issued in exchange for an API token). Its name is the
  *request principal* ``<iss>/<sub>`` -- the form Istio's ``requestPrincipals`` use.

The sidecar that authenticated the call tells its engine who the caller is in one header
(HTTP) or metadata key (gRPC); a value a client sent is always removed first. The engine
keys what belongs to a caller (its A2A tasks) by :func:`owner`.

Who may call is the ``callers`` field of the agent's ``base`` part
(:class:`specmesh.spec.models.CallersSpec`); :func:`principal_matches` is the one
matching rule, used by the sidecar and rendered into Istio's AuthorizationPolicy.
"""

from __future__ import annotations

__all__ = [
    "ANONYMOUS_OWNER",
    "CALLER_HEADER",
    "CALLER_KEY",
    "MAX_PRINCIPAL_LENGTH",
    "PRINCIPAL_HEADER",
    "PRINCIPAL_KEY",
    "TRACK_CLAIM",
    "check_principal_pattern",
    "owner",
    "principal_matches",
]

TRACK_CLAIM = "specmesh_track"
"""JWT claim of the control plane's evaluation tokens naming the release track
(``stable``/``canary``) the entry must send the call to; honoured only in tokens of the
issuer marked ``controlPlane`` in ``SPECMESH_JWT_ISSUERS``, ignored in any other."""

CALLER_HEADER = "X-Specmesh-Caller"
"""HTTP header naming the calling agent (resource name), set by the sidecar's inbound."""
CALLER_KEY = "x-specmesh-caller"
"""The same, as gRPC metadata."""
PRINCIPAL_HEADER = "X-Specmesh-Principal"
"""HTTP header naming the external caller's request principal ``<iss>/<sub>``, set by the
sidecar that verified its bearer token."""
PRINCIPAL_KEY = "x-specmesh-principal"
"""The same, as gRPC metadata."""

ANONYMOUS_OWNER = "anonymous"
"""Owner of what a caller that no sidecar named creates (a direct loopback call)."""

MAX_PRINCIPAL_LENGTH = 512
"""Longest request principal ``<iss>/<sub>`` (and ``callers.principals`` pattern)."""


def owner(*, caller: str | None, principal: str | None) -> str:
    """The owner key of a caller: ``agent:<rn>``, ``principal:<iss>/<sub>`` or
    :data:`ANONYMOUS_OWNER`. A principal wins over an agent (an entry forwarding an
    external call between instances of one agent names both)."""
    if principal:
        return f"principal:{principal}"
    if caller:
        return f"agent:{caller}"
    return ANONYMOUS_OWNER


def check_principal_pattern(pattern: str) -> str | None:
    """What is wrong with a ``callers.principals`` entry, or ``None``.

    Istio's rule: the exact ``<iss>/<sub>``, ``*`` (any authenticated caller), or one
    ``*`` at the start or the end only (``https://idp.example.com/*``)."""
    if not pattern:
        return "must not be empty"
    if len(pattern) > MAX_PRINCIPAL_LENGTH:
        return f"must be at most {MAX_PRINCIPAL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in pattern):
        return "must not contain whitespace or control characters"
    if pattern == "*":
        return None
    inner = pattern[1:-1] if len(pattern) > 1 else ""
    if "*" in inner or pattern == "**":
        return "'*' may only be the whole pattern, its first or its last character"
    if pattern.startswith("*") and pattern.endswith("*"):
        return "'*' may only be the whole pattern, its first or its last character"
    if "/" not in pattern.strip("*") and not (pattern.startswith("*") or pattern.endswith("*")):
        return "must be <issuer>/<subject> (the token's iss and sub claims)"
    return None


def principal_matches(pattern: str, principal: str) -> bool:
    """Whether ``principal`` (``<iss>/<sub>``) matches ``pattern`` (Istio's rule: exact,
    ``*``, ``prefix*`` or ``*suffix``)."""
    if pattern == "*":
        return bool(principal)
    if pattern.endswith("*"):
        return principal.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return principal.endswith(pattern[1:])
    return principal == pattern
