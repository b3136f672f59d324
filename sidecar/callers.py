"""Who may call this agent: the one caller policy every listener of the sidecar applies.

The HTTP and gRPC listeners (entry and inbound) ask :class:`CallerPolicy` and nothing else:

* :meth:`CallerPolicy.check_agent` -- a partner agent authenticated by its mesh certificate
  may call when it lists this agent among its partners (:class:`PartnerGraph`) AND this
  agent's ``base.callers.agents`` holds ``"*"`` or its name;
* :meth:`CallerPolicy.authenticate` -- an external client's ``Authorization: Bearer <JWT>``
  is verified by :class:`JwtVerifier` against the configured issuers
  (``SPECMESH_JWT_ISSUERS``, :mod:`specmesh.issuers`): asymmetric signature with a key of
  the issuer's JWKS, ``exp``/``nbf`` with a small leeway, an audience of the issuer's list
  (``{agent}`` is this agent's resource name). The caller's request principal is ``<iss>/<sub>``;
* :meth:`CallerPolicy.check_principal` -- a principal may call when a pattern of
  ``base.callers.principals`` matches it (:func:`specmesh.callers.principal_matches`).

A refusal is a :class:`CallerRefused` (``UNAUTHENTICATED`` or ``PERMISSION_DENIED``), a
:class:`~sidecar.errors.PolicyError` of the one error table: rendered for HTTP by
:meth:`CallerRefused.http_response` (AIP-193 JSON with a ``google.rpc.ErrorInfo``) and for
gRPC by :meth:`CallerRefused.grpc_trailers` (``grpc-status-details-bin``). Messages
name what is wrong; a token is never logged, echoed or put on a span.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import aiohttp

from specmesh.callers import MAX_PRINCIPAL_LENGTH, TRACK_CLAIM, principal_matches
from specmesh.issuers import JwtIssuer
from specmesh.names import resource_name
from specmesh.spec.models import CallersSpec

from .errors import PolicyError
from .mtls import TRUST_DOMAIN

if TYPE_CHECKING:  # PyJWT (with cryptography, ~11 MB) is imported when a token is checked
    import jwt

__all__ = [
    "ALLOWED_ALGORITHMS",
    "CARD_PATH",
    "CallerPolicy",
    "CallerRefused",
    "JwtVerifier",
    "MalformedXfccError",
    "PartnerLookup",
    "VerifiedToken",
    "agent_from_spiffe",
    "agent_from_xfcc",
    "bearer_token",
    "parse_xfcc",
]

logger = logging.getLogger(__name__)

CARD_PATH = "/.well-known/agent-card.json"
"""The A2A agent card: the one path an entry serves without a token."""

ALLOWED_ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)
"""Asymmetric JWS algorithms only: never ``none``, never a shared secret (``HS*``)."""

Reason = Literal["UNAUTHENTICATED", "PERMISSION_DENIED"]


# ---------------------------------------------------------------- refusals


class CallerRefused(PolicyError):
    """A call the sidecar refuses: who is calling is unknown (``UNAUTHENTICATED``) or may
    not call (``PERMISSION_DENIED``); rendered from the one error table
    (:data:`~sidecar.errors.POLICY_ERRORS`), ``ErrorInfo.metadata`` ``{"agent": <this
    agent>}``, and for HTTP ``UNAUTHENTICATED`` a ``WWW-Authenticate`` challenge."""

    reason: Reason

    def __init__(
        self, reason: Reason, message: str, *, agent: str, bad_token: bool = False
    ) -> None:
        super().__init__(reason, message, agent=agent)
        self.agent = agent
        self.bad_token = bad_token
        """A token was sent but is not valid (``error="invalid_token"``)."""

    def http_headers(self) -> dict[str, str]:
        if self.reason != "UNAUTHENTICATED":
            return {}
        challenge = 'Bearer realm="specmesh"'
        if self.bad_token:
            challenge += ', error="invalid_token"'
        return {"WWW-Authenticate": challenge}


# ---------------------------------------------------------------- tokens


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; ``None`` when absent.
    Raises ``ValueError`` for another scheme or an empty token."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise ValueError("the Authorization header is not 'Bearer <token>'")
    token = token.strip()
    if not token:
        raise ValueError("the bearer token is empty")
    return token


@dataclass(frozen=True)
class VerifiedToken:
    """What a verified bearer token says."""

    principal: str
    """The request principal ``<iss>/<sub>``."""
    track: Literal["stable", "canary"] | None = None
    """The release track the call must go to: the :data:`~specmesh.callers.TRACK_CLAIM` of a
    token of the issuer marked ``controlPlane`` (the release evaluation's); ``None`` for
    every other token, whatever it claims."""


class _TokenInvalid(Exception):
    """What is wrong with a token (the message names it, never the token)."""


@dataclass
class _Key:
    jwk: jwt.PyJWK
    data: dict[str, Any]
    """The JWK as published (its ``kty`` and optional ``alg``)."""


@dataclass
class _KeySet:
    keys: dict[str | None, _Key]
    fetched_at: float


class JwtVerifier:
    """Verifies bearer tokens against trusted issuers; JWKS fetched with aiohttp and cached.

    A JWKS is refetched when older than ``jwks_ttl``, or at once for a ``kid`` it does not
    hold -- at most every ``min_refetch`` seconds per issuer (a flood of unknown ``kid``\\s
    does not become a flood of fetches)."""

    def __init__(
        self,
        *,
        issuers: Sequence[JwtIssuer],
        agent: str,
        leeway: float = 30.0,
        min_refetch: float = 5.0,
        jwks_ttl: float = 300.0,
        fetch_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = resource_name(agent)
        self._issuers = {i.issuer: i for i in issuers}
        self.leeway = leeway
        self.min_refetch = min_refetch
        self.jwks_ttl = jwks_ttl
        self.fetch_timeout = fetch_timeout
        self._clock = clock
        self._sets: dict[str, _KeySet] = {}
        self._attempted: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None
        for issuer in issuers:
            if issuer.jwks is not None:
                self._sets[issuer.issuer] = _KeySet(
                    keys=_parse_jwks(issuer.jwks, issuer.issuer), fetched_at=float("inf")
                )

    @property
    def configured(self) -> bool:
        return bool(self._issuers)

    async def __aenter__(self) -> JwtVerifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the JWKS client session (opened by the first fetch)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def audiences(self, issuer: JwtIssuer) -> list[str]:
        """The audiences a token of ``issuer`` may name for this agent (the very list the
        control plane renders into its RequestAuthentication)."""
        return issuer.audiences_for(self.agent)

    async def verify(self, token: str) -> str:
        """The request principal ``<iss>/<sub>`` of a valid token; raises
        :class:`_TokenInvalid` naming what is wrong."""
        return (await self.verify_token(token)).principal

    async def verify_token(self, token: str) -> VerifiedToken:
        """What a valid token says (its principal; the track it picks, only in a token of
        the control plane's issuer); raises :class:`_TokenInvalid` naming what is wrong."""
        import jwt  # lazily: see the imports at the top

        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            raise _TokenInvalid("the bearer token is not a well-formed JWT") from e
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise _TokenInvalid(
                f"token algorithm {alg!r} is not allowed (asymmetric signatures only)"
            )
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise _TokenInvalid("the token has no issuer (iss)")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise _TokenInvalid(f"token issuer {_short(iss)!r} is not trusted")
        key = await self._key(issuer, header.get("kid"))
        problem = _incompatible(key, alg)
        if problem:
            raise _TokenInvalid(f"issuer {iss!r}'s key {_short(header.get('kid'))!r} {problem}")
        audiences = self.audiences(issuer)
        try:
            verified = jwt.decode(
                token,
                key=key.jwk.key,
                algorithms=[alg],
                audience=audiences,
                issuer=iss,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError as e:
            raise _TokenInvalid("the token has expired") from e
        except jwt.ImmatureSignatureError as e:
            raise _TokenInvalid("the token is not valid yet (nbf/iat in the future)") from e
        except jwt.InvalidAudienceError as e:
            raise _TokenInvalid(
                f"wrong audience: the token is not for agent {self.agent!r} "
                f"(accepted: {', '.join(audiences)})"
            ) from e
        except jwt.MissingRequiredClaimError as e:
            raise _TokenInvalid(f"the token has no {e.claim!r} claim") from e
        except jwt.InvalidSignatureError as e:
            raise _TokenInvalid(f"the token's signature does not verify (issuer {iss!r})") from e
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise _TokenInvalid(f"the token is not valid ({type(e).__name__})") from e
        sub = verified.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _TokenInvalid("the token has no subject (sub)")
        principal = f"{iss}/{sub}"
        if len(principal) > MAX_PRINCIPAL_LENGTH or not principal.isprintable() or " " in sub:
            raise _TokenInvalid(
                "the token's subject is not a usable principal (spaces, control "
                f"characters, or <iss>/<sub> over {MAX_PRINCIPAL_LENGTH} characters)"
            )
        track = verified.get(TRACK_CLAIM) if issuer.control_plane else None
        return VerifiedToken(
            principal=principal, track=track if track in ("stable", "canary") else None
        )

    async def run(self) -> None:
        """Keep the JWKS of every ``jwksUri`` issuer fresh in the background: fetched at
        once (retried every ``min_refetch`` seconds until it succeeds) and then every
        ``jwks_ttl`` -- so tokens verify while an issuer is briefly unreachable, the
        control plane included, even when no token was checked before it went away."""
        remote = [i for i in self._issuers.values() if i.jwks_uri]
        while remote:
            for issuer in remote:
                await self._refresh(issuer, force=True)
            fetched = all(i.issuer in self._sets for i in remote)
            await asyncio.sleep(self.jwks_ttl / 2 if fetched else self.min_refetch)

    async def _key(self, issuer: JwtIssuer, kid: str | None) -> _Key:
        name = issuer.issuer
        now = self._clock()
        current = self._sets.get(name)
        stale = current is None or now - current.fetched_at > self.jwks_ttl
        wanted = current is None or stale or _find(current, kid) is None
        last = self._attempted.get(name, -float("inf"))
        if wanted and issuer.jwks_uri and now - last >= self.min_refetch:
            await self._refresh(issuer)
            current = self._sets.get(name)
        if current is None:
            raise _TokenInvalid(f"the keys of issuer {name!r} are not available")
        key = _find(current, kid)
        if key is None:
            raise _TokenInvalid(f"issuer {name!r} has no key {_short(kid)!r}")
        return key

    async def _refresh(self, issuer: JwtIssuer, *, force: bool = False) -> None:
        name = issuer.issuer
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            now = self._clock()
            if not force and now - self._attempted.get(name, -float("inf")) < self.min_refetch:
                return  # fetched by a concurrent call meanwhile
            self._attempted[name] = now
            assert issuer.jwks_uri is not None
            if self._session is None:
                self._session = aiohttp.ClientSession(trust_env=False)
            try:
                async with self._session.get(
                    issuer.jwks_uri, timeout=aiohttp.ClientTimeout(total=self.fetch_timeout)
                ) as r:
                    if r.status != 200:
                        raise ValueError(f"HTTP {r.status}")
                    data = await r.json(content_type=None)
                keys = _parse_jwks(data, name)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                logger.warning(
                    "could not fetch the JWKS of issuer %s from %s: %s",
                    name,
                    issuer.jwks_uri,
                    e,
                )
                return
            self._sets[name] = _KeySet(keys=keys, fetched_at=now)


def _short(value: object, limit: int = 80) -> object:
    """An untrusted value as it may appear in an error message or a log (bounded)."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def _parse_jwks(data: Any, issuer: str) -> dict[str | None, _Key]:
    import jwt  # lazily: only a sidecar trusting an issuer needs it

    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"the JWKS of issuer {issuer!r} is not {{'keys': [...]}}")
    keys: dict[str | None, _Key] = {}
    for item in data["keys"]:
        if not isinstance(item, dict) or item.get("kty") == "oct" or item.get("use") == "enc":
            continue  # no shared secrets, no encryption keys
        try:
            key = jwt.PyJWK(item)
        except jwt.PyJWTError as e:
            logger.warning("skipping a key of issuer %s's JWKS: %s", issuer, e)
            continue
        keys[item.get("kid")] = _Key(jwk=key, data=item)
    return keys


_FAMILIES = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}


def _incompatible(key: _Key, alg: str) -> str | None:
    """Why ``key`` may not verify a token of algorithm ``alg`` (its type, or the ``alg`` the
    JWK pins), or None."""
    data = key.data
    pinned = data.get("alg")
    if pinned and pinned != alg:
        return f"is for {pinned}, not {alg}"
    families = _FAMILIES.get(str(data.get("kty")), ())
    if not any(alg.startswith(f) for f in families):
        return f"({data.get('kty')}) cannot verify {alg}"
    return None


def _find(keys: _KeySet, kid: str | None) -> _Key | None:
    if kid is not None:
        return keys.keys.get(kid)
    if len(keys.keys) == 1:
        return next(iter(keys.keys.values()))  # no kid, one key: the key
    return None


# ---------------------------------------------------------------- identities


_SPIFFE_AGENT = f"spiffe://{TRUST_DOMAIN}/agent/"
_SA_PREFIX = "specmesh-agent-"


def agent_from_spiffe(
    uri: str, *, trust_domain: str | None = None, namespace: str | None = None
) -> str | None:
    """The agent resource name in a SPIFFE ID: the sidecar's own form
    (``spiffe://specmesh.local/agent/<rn>``) or Istio's
    (``spiffe://<trust domain>/ns/<ns>/sa/specmesh-agent-<rn>``). For Istio's form a given
    ``trust_domain`` / ``namespace`` must match (another mesh's or namespace's workload
    named like an agent is not that agent)."""
    if uri.startswith(_SPIFFE_AGENT):
        name = uri[len(_SPIFFE_AGENT) :]
        return name if _is_resource_name(name) else None
    if not uri.startswith("spiffe://"):
        return None
    parts = uri[len("spiffe://") :].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        return None
    if trust_domain is not None and parts[0] != trust_domain:
        return None
    if namespace is not None and parts[2] != namespace:
        return None
    sa = parts[4]
    name = sa[len(_SA_PREFIX) :] if sa.startswith(_SA_PREFIX) else ""
    return name if _is_resource_name(name) else None


def _is_resource_name(name: str) -> bool:
    try:
        return bool(name) and resource_name(name) == name
    except ValueError:
        return False


class MalformedXfccError(ValueError):
    """An ``X-Forwarded-Client-Cert`` value that is not well formed."""


def parse_xfcc(value: str) -> list[dict[str, str]]:
    """Envoy's ``X-Forwarded-Client-Cert``: elements separated by ``,``, each ``key=value``
    pairs separated by ``;``; a value may be double-quoted, with ``\\"`` and ``\\\\``
    escapes inside. Keys are lower-cased. Raises :class:`MalformedXfccError` on an
    unterminated quote, a dangling escape, a pair without ``=`` or a second ``URI``/``By``
    in one element -- a value a client could have shaped to hide the element the local
    proxy appended."""
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    buf: list[str] = []
    key: str | None = None
    quoted = escaped = False

    def end_pair() -> None:
        nonlocal key
        text = "".join(buf)
        buf.clear()
        if key is None:
            if text.strip():
                raise MalformedXfccError("a pair without '='")
            return
        if key in pairs and key in ("uri", "by"):
            raise MalformedXfccError(f"key {key!r} repeated in one element")
        pairs[key] = text
        key = None

    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == "=" and key is None:
            key = "".join(buf).strip().lower()
            buf.clear()
            if not key:
                raise MalformedXfccError("an empty key")
        elif ch in ";,":
            end_pair()
            if ch == ",":
                elements.append(pairs)
                pairs = {}
        else:
            buf.append(ch)
    if quoted or escaped:
        raise MalformedXfccError("an unterminated quote or escape")
    end_pair()
    elements.append(pairs)
    return elements


def agent_from_xfcc(
    value: str | None, *, trust_domain: str | None = None, namespace: str | None = None
) -> str | None:
    """The calling agent in Istio's ``X-Forwarded-Client-Cert``: the one ``URI`` of its
    LAST element (the one the local proxy appended for the connection it accepted; earlier
    elements came from further away and prove nothing). ``None`` when the value is
    malformed (see :func:`parse_xfcc`) or names no agent of this mesh and namespace."""
    if not value:
        return None
    try:
        last = parse_xfcc(value)[-1]
    except MalformedXfccError as e:
        logger.warning("ignored a malformed X-Forwarded-Client-Cert: %s", e)
        return None
    uri = last.get("uri")
    if uri is None:
        return None
    return agent_from_spiffe(uri.strip(), trust_domain=trust_domain, namespace=namespace)


# ---------------------------------------------------------------- the policy


class PartnerLookup(Protocol):
    """What the policy reads of the partner graph (``sidecar.inbound.PartnerGraph``)."""

    def partners(self, agent: str) -> frozenset[str]:
        """Resource names of the partners ``agent`` lists."""
        ...


class CallerPolicy:
    """The one place deciding who may call agent ``agent``.

    ``callers`` returns the agent's current ``base.callers`` (None: the defaults) -- the
    sidecar reads its own snapshot; ``graph`` is the mesh's partner graph; ``verifier``
    checks bearer tokens (None: no issuer is trusted, every token is refused)."""

    def __init__(
        self,
        *,
        agent: str,
        graph: PartnerLookup,
        callers: Callable[[], CallersSpec | None] = lambda: None,
        verifier: JwtVerifier | None = None,
        mesh_trust_domain: str | None = None,
        mesh_namespace: str | None = None,
    ) -> None:
        self.agent = resource_name(agent)
        self._graph = graph
        self._callers = callers
        self._verifier = verifier
        self._trust_domain = mesh_trust_domain
        self._namespace = mesh_namespace
        self._allowed: tuple[CallersSpec, frozenset[str] | None] | None = None

    def mesh_caller(self, xfcc: str | None) -> str | None:
        """Istio mode: the calling agent named by the ``X-Forwarded-Client-Cert`` the local
        proxy set (its last element), of this mesh's trust domain and this namespace when
        they are configured; ``None`` when it names no agent or is malformed."""
        return agent_from_xfcc(xfcc, trust_domain=self._trust_domain, namespace=self._namespace)

    def callers(self) -> CallersSpec:
        return self._callers() or _DEFAULT_CALLERS

    def _allowed_agents(self, callers: CallersSpec) -> frozenset[str] | None:
        """``callers.agents`` as resource names (None: ``"*"``), kept per ``callers``
        object -- a snapshot's spec is immutable, so this is computed once per snapshot."""
        held = self._allowed
        if held is None or held[0] is not callers:
            agents = callers.agents
            allowed = None if "*" in agents else frozenset(_rn(a) for a in agents)
            held = self._allowed = (callers, allowed)
        return held[1]

    def refused(self, reason: Reason, message: str, *, bad_token: bool = False) -> CallerRefused:
        return CallerRefused(reason, message, agent=self.agent, bad_token=bad_token)

    def check_agent(self, caller: str) -> None:
        """Raise :class:`CallerRefused` unless agent ``caller`` (resource name, from its
        certificate) may call: it lists this agent as a partner AND ``callers.agents``
        allows it."""
        if self.agent not in self._graph.partners(caller):
            raise self.refused(
                "PERMISSION_DENIED",
                f"agent {caller!r} may not call agent {self.agent!r}: "
                "it does not list it among its partners",
            )
        allowed = self._allowed_agents(self.callers())
        if allowed is not None and caller not in allowed:
            raise self.refused(
                "PERMISSION_DENIED",
                f"agent {caller!r} may not call agent {self.agent!r}: "
                "it is not in the agent's callers.agents",
            )

    async def authenticate(self, authorization: str | None) -> str:
        """The request principal of a valid bearer token in ``authorization`` (the header's
        value); raise :class:`CallerRefused` (``UNAUTHENTICATED``) naming what is wrong."""
        return (await self.authenticate_token(authorization)).principal

    async def authenticate_token(self, authorization: str | None) -> VerifiedToken:
        """:meth:`authenticate`, with the track the token picks (see :class:`VerifiedToken`)."""
        try:
            token = bearer_token(authorization)
        except ValueError as e:
            raise self.refused("UNAUTHENTICATED", str(e), bad_token=True) from e
        if token is None:
            raise self.refused(
                "UNAUTHENTICATED", f"agent {self.agent!r} needs a bearer token: none was sent"
            )
        if self._verifier is None or not self._verifier.configured:
            raise self.refused(
                "UNAUTHENTICATED",
                "no token issuer is trusted by this agent (SPECMESH_JWT_ISSUERS is empty)",
                bad_token=True,
            )
        try:
            return await self._verifier.verify_token(token)
        except _TokenInvalid as e:
            raise self.refused("UNAUTHENTICATED", str(e), bad_token=True) from e

    def check_principal(self, principal: str) -> None:
        """Raise :class:`CallerRefused` unless a ``callers.principals`` pattern matches."""
        patterns = self.callers().principals
        if not any(principal_matches(p, principal) for p in patterns):
            raise self.refused(
                "PERMISSION_DENIED",
                f"principal {principal!r} is not in agent {self.agent!r}'s callers.principals",
            )

    async def external(self, authorization: str | None) -> str:
        """Authenticate and authorise an external caller; its principal."""
        return (await self.external_call(authorization)).principal

    async def external_call(self, authorization: str | None) -> VerifiedToken:
        """:meth:`external`, with the track the token picks (see :class:`VerifiedToken`)."""
        verified = await self.authenticate_token(authorization)
        self.check_principal(verified.principal)
        return verified


_DEFAULT_CALLERS = CallersSpec()
"""``base.callers`` when the spec says nothing (a frozen model: shared, never changed)."""


def _rn(name: str) -> str:
    try:
        return resource_name(name)
    except ValueError:
        return name
