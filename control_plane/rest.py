"""The REST API (aiohttp): the same :class:`~control_plane.api.ControlPlane` as gRPC.

Routes are declared once in :data:`ROUTES`; the OpenAPI document served at
``/api/v1/openapi.json`` is generated from that table, so the two cannot drift. Every
route but health, readiness, the OpenAPI document and the invoke-token signing keys
(``/.well-known/jwks.json``) needs ``Authorization: Bearer``.
Errors are ``{"error": {"code", "message", "issues"?}}`` with the status of
:func:`control_plane.errors.status_for`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from control_plane.api import ControlPlane
from control_plane.auth import Authenticator, Principal, Role
from control_plane.errors import BadRequestError, BodyTooLargeError, error_body, status_for
from control_plane.studio import add_studio_routes
from control_plane.tokens import MAX_TTL_SECONDS, TokenRequest
from control_plane.traces import GROUP_KEYS
from specmesh import jsonbounds
from specmesh.errors import SpecError
from specmesh.names import resource_name
from specmesh.spec.manifest import MAX_NESTING_DEPTH
from specmesh.spec.models import MAX_REPLICAS, Manifest, PromptRelease, ReleaseSpec
from specmesh.spec.validation import issues_from_validation_error

__all__ = ["ROUTES", "build_app", "openapi_document"]

logger = logging.getLogger(__name__)

Handler = Callable[[ControlPlane, Principal, web.Request], Awaitable[Any]]

_OBJ: dict[str, Any] = {"type": "object"}
_ARR: dict[str, Any] = {"type": "array", "items": {"type": "object"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}

MAX_BODY_BYTES = 2 * 1024 * 1024
"""Largest request body (413 past it); a manifest is at most 1 MiB."""
MAX_BODY_DEPTH = MAX_NESTING_DEPTH + 1
"""Most lists/objects nested in a body (400 past it): a manifest's bound, plus the
``{"manifest": ...}`` around it."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    params: list[dict[str, Any]] = field(default_factory=list)
    body: dict[str, Any] | None = None
    response: dict[str, Any] = field(default_factory=lambda: dict(_OBJ))
    status: int = 200


# ---------------------------------------------------------------- request helpers


async def _json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLargeError(limit=MAX_BODY_BYTES) from None
    try:
        return jsonbounds.loads(raw or b"null", max_depth=MAX_BODY_DEPTH)
    except jsonbounds.JsonTooDeepError as e:
        raise BadRequestError(f"body: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequestError(f"body: invalid JSON ({e})") from None


def _int(request: web.Request, name: str, *, required: bool = False) -> int | None:
    raw = request.query.get(name) if name not in request.match_info else request.match_info[name]
    if raw is None or raw == "":
        if required:
            raise BadRequestError(f"{name}: required")
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name}: must be an integer (got {raw!r})") from None
    if value < 0:
        raise BadRequestError(f"{name}: must be >= 0 (got {value})")
    return value


def _object(body: Any, what: str = "body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequestError(f"{what}: must be a JSON object")
    return body


def _validate(model: Any, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(issues_from_validation_error(e, model)) from None


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequestError(f"{key}: must be a non-negative integer")
    return value


# ---------------------------------------------------------------- handlers


async def _apply(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    body = _object(await _json(r))
    if "manifest" not in body:
        raise BadRequestError("manifest: required")
    dry_run = body.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise BadRequestError("dryRun: must be true or false")
    outcome = await cp.apply(
        p,
        body["manifest"],
        expected_revision=_opt_int(body, "expectedRevision"),
        dry_run=dry_run,
    )
    return outcome.to_json()


async def _list_agents(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    statuses = await cp.agent_statuses(p)
    out = []
    for a in await cp.list_agents(p):
        status = statuses.get(resource_name(a.name))
        if status is not None:
            summary: dict[str, Any] | None = {"phase": status["phase"], "ready": status["ready"]}
        else:  # applied a moment ago (a controller runs), or nothing runs agents at all
            summary = None if cp.runtime == "none" else {"phase": "Pending", "ready": "-"}
        out.append({**a.to_json(), "status": summary})
    return out


async def _agent_status(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return await cp.agent_status(p, r.match_info["name"])


async def _scale(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    body = _object(await _json(r))
    replicas = body.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise BadRequestError("replicas: required, a whole number")
    track = body.get("track", "stable")
    if not isinstance(track, str):
        raise BadRequestError("track: must be a string")
    outcome = await cp.scale(
        p,
        r.match_info["name"],
        replicas=replicas,
        track=track,
        expected_revision=_opt_int(body, "expectedRevision"),
    )
    return outcome.to_json()


async def _get_agent(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return (await cp.get_agent(p, r.match_info["name"], _int(r, "revision") or None)).to_json()


async def _delete_agent(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    await cp.delete_agent(p, r.match_info["name"], expected_revision=_int(r, "expectedRevision"))
    return {"deleted": r.match_info["name"]}


async def _history(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    records = await cp.history(p, r.match_info["name"])
    return [{k: v for k, v in rec.to_json().items() if k != "spec"} for rec in records]


async def _diff(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    a = _int(r, "from", required=True)
    b = _int(r, "to", required=True)
    assert a is not None and b is not None
    return [c.to_json() for c in await cp.diff(p, r.match_info["name"], a, b)]


async def _rollback(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    body = _object(await _json(r))
    revision = _opt_int(body, "revision")
    if not revision:
        raise BadRequestError("revision: required (a positive integer)")
    result = await cp.rollback(
        p, r.match_info["name"], revision, expected_revision=_opt_int(body, "expectedRevision")
    )
    return result.to_json()


async def _get_release(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    release = await cp.get_release(p, r.match_info["name"])
    return {"release": release.model_dump(mode="json") if release else None}


async def _set_release(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    spec = _validate(ReleaseSpec, await _json(r))
    return (await cp.set_release(p, r.match_info["name"], spec)).model_dump(mode="json")


async def _promote(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return (await cp.promote(p, r.match_info["name"])).model_dump(mode="json")


async def _abort(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return (await cp.abort(p, r.match_info["name"])).model_dump(mode="json")


async def _preview_release(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    spec = _validate(ReleaseSpec, await _json(r))
    return await cp.preview_release(p, r.match_info["name"], spec)


async def _list_prompts(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return await cp.list_prompts(p)


async def _get_prompt(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    versions, release = await cp.get_prompt(p, r.match_info["name"])
    return {
        "promptKey": r.match_info["name"],
        "versions": [v.model_dump(mode="json") for v in versions],
        "release": release.model_dump(mode="json") if release else None,
    }


async def _set_prompt_release(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    release = _validate(PromptRelease, await _json(r))
    await cp.set_prompt_release(p, r.match_info["name"], release)
    return release.model_dump(mode="json")


async def _prompt_stats(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    limit = min(_int(r, "limit") or 200, 1000)
    return await cp.prompt_stats(p, r.match_info["name"], since=_since(r), limit=limit)


async def _list_mcp(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return {n: s.model_dump(mode="json") for n, s in (await cp.list_mcp_servers(p)).items()}


async def _mcp_tools(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return await cp.list_mcp_tools(p, r.match_info["name"])


async def _mcp_tool_listings(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return await cp.mcp_tool_listings(p)


async def _agent_card(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return await cp.get_agent_card(p, r.match_info["name"])


async def _invoke_token(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return (await cp.invoke_token(p, r.match_info["name"])).to_json()


async def _instances(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return await cp.list_instances(p, r.query.get("agent") or None)


async def _collect_garbage(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    body = _object(await _json(r) or {})
    grace = body.get("graceSeconds", 3600)
    if not isinstance(grace, int | float) or isinstance(grace, bool) or not 60 <= grace <= 10**7:
        # at least a minute: an apply between its Vault write and its etcd transaction keeps
        # its new version
        raise BadRequestError("graceSeconds: must be a number of seconds, 60 to 10000000")
    return await cp.collect_garbage(p, grace_seconds=float(grace))


async def _list_grants(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return await cp.list_grants(p, r.query.get("agent") or None)


async def _share_secret(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    body = _object(await _json(r))
    if not isinstance(body.get("secret"), str) or not body["secret"]:
        raise BadRequestError("secret: required (vault://<mount>/<path>)")
    return await cp.share_secret(p, r.match_info["name"], body["secret"])


async def _unshare_secret(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    secret = r.query.get("secret")
    if not secret:
        raise BadRequestError("secret: required (vault://<mount>/<path>)")
    await cp.unshare_secret(p, r.match_info["name"], secret)
    return {"agent": r.match_info["name"], "unshared": secret}


async def _list_credentials(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    prefix = r.query.get("prefix", "specmesh")
    return [c.to_json() for c in await cp.list_credentials(p, prefix=prefix)]


async def _put_credential(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    body = _object(await _json(r))
    for key in ("path", "field", "value"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise BadRequestError(f"{key}: required (a non-empty string)")
    mount = body.get("mount")
    if mount is not None and not isinstance(mount, str):
        raise BadRequestError("mount: must be a string")
    info = await cp.put_credential(
        p, path=body["path"], field=body["field"], value=body["value"], mount=mount
    )
    return info.to_json()


async def _audit(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    limit = _int(r, "limit") or 100
    entries = await cp.audit(
        p, name=r.query.get("name") or None, kind=r.query.get("kind") or None, limit=limit
    )
    return [e.to_json() for e in entries]


async def _mesh(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return await cp.render_mesh(p)


async def _create_token(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    secret, record = await cp.create_token(p, _validate(TokenRequest, await _json(r)))
    return {"token": secret, **record.to_json(cp.tokens.now())}


async def _list_tokens(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    now = cp.tokens.now()
    return [t.to_json(now) for t in await cp.list_tokens(p)]


async def _revoke_token(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return (await cp.revoke_token(p, r.match_info["id"])).to_json(cp.tokens.now())


def _since(request: web.Request) -> datetime | None:
    raw = request.query.get("since")
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequestError(f"since: must be an ISO 8601 date-time (got {raw!r})") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _list_traces(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    traces = await cp.list_traces(
        p,
        agent=r.query.get("agent") or None,
        context_id=r.query.get("contextId") or None,
        since=_since(r),
        limit=_int(r, "limit") or 50,
    )
    return [t.to_json() for t in traces]


async def _get_trace(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    return [s.to_json() for s in await cp.get_trace(p, r.match_info["traceId"])]


async def _token_usage(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    raw = r.query.get("groupBy")
    group_by = GROUP_KEYS if raw is None else tuple(k.strip() for k in raw.split(",") if k.strip())
    return [row.to_json() for row in await cp.token_usage(p, group_by=group_by, since=_since(r))]


async def _whoami(cp: ControlPlane, p: Principal, r: web.Request) -> Any:
    from control_plane.auth import PERMISSIONS

    return {
        "name": p.name,
        "roles": sorted(str(x) for x in p.roles),
        "can": sorted(a for a in PERMISSIONS if p.can(a)),
    }


_SINCE = {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}}
_REV = {"name": "revision", "in": "query", "schema": {"type": "integer", "minimum": 0}}
_EXPECTED = {"name": "expectedRevision", "in": "query", "schema": {"type": "integer", "minimum": 0}}
_ROLE = {"type": "string", "enum": [str(r) for r in Role]}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_TOKEN: dict[str, Any] = {
    "type": "object",
    "required": ["id", "name", "roles", "source", "createdAt", "createdBy", "expiresAt",
                 "revokedAt", "revokedBy", "state"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        "name": {"type": "string"},
        "roles": {"type": "array", "items": _ROLE},
        "source": {"enum": ["api", "file"]},
        "createdAt": _TIME_OR_NULL, "createdBy": {"type": ["string", "null"]},
        "expiresAt": _TIME_OR_NULL,
        "revokedAt": _TIME_OR_NULL, "revokedBy": {"type": ["string", "null"]},
        "state": {"enum": ["active", "expired", "revoked"]}},
}  # fmt: skip
_TOKEN_REQUEST = {
    "type": "object", "required": ["name", "roles"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100,
                 "pattern": r"^[^\x00-\x1f\x7f]+$"},
        "roles": {"type": "array", "minItems": 1, "maxItems": len(Role), "items": _ROLE},
        "ttlSeconds": {"type": "integer", "minimum": 1, "maximum": MAX_TTL_SECONDS,
                       "description": "seconds until the token expires (default 30 days)"}},
}  # fmt: skip

ROUTES: list[Route] = [
    Route("GET", "/api/v1/whoami", _whoami, "The caller, its roles and what it may do"),
    Route("POST", "/api/v1/apply", _apply, "Apply one manifest (Agent, Prompt, McpServer, Release)",
          body={"type": "object", "required": ["manifest"], "properties": {
              "manifest": {"$ref": "#/components/schemas/Manifest"},
              "expectedRevision": {"type": "integer", "minimum": 0},
              "dryRun": {"type": "boolean"}}}),
    Route("GET", "/api/v1/agents", _list_agents, "List agents", response=_ARR),
    Route("GET", "/api/v1/agents/{name}", _get_agent, "An agent (current or given revision)",
          params=[_NAME, _REV]),
    Route("DELETE", "/api/v1/agents/{name}", _delete_agent, "Delete an agent",
          params=[_NAME, _EXPECTED]),
    Route("GET", "/api/v1/agents/{name}/status", _agent_status,
          "What runs of the agent: desired/ready per track, instances, phase, last error",
          params=[_NAME]),
    Route("POST", "/api/v1/agents/{name}/scale", _scale,
          "Set a track's replicas (a new revision of the deployment part)", params=[_NAME],
          body={"type": "object", "required": ["replicas"], "properties": {
              "replicas": {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS},
              "track": {"type": "string", "enum": ["stable", "canary"]},
              "expectedRevision": {"type": "integer"}}}),
    Route("GET", "/api/v1/agents/{name}/revisions", _history, "Revisions of an agent",
          params=[_NAME], response=_ARR),
    Route("GET", "/api/v1/agents/{name}/diff", _diff, "Differences between two revisions",
          params=[_NAME,
                  {"name": "from", "in": "query", "required": True,
                   "schema": {"type": "integer", "minimum": 0}},
                  {"name": "to", "in": "query", "required": True,
                   "schema": {"type": "integer", "minimum": 0}}],
          response=_ARR),
    Route("POST", "/api/v1/agents/{name}/rollback", _rollback,
          "A new revision equal to an old one", params=[_NAME],
          body={"type": "object", "required": ["revision"], "properties": {
              "revision": {"type": "integer", "minimum": 1},
              "expectedRevision": {"type": "integer", "minimum": 0}}}),
    Route("GET", "/api/v1/agents/{name}/release", _get_release, "The agent's release policy",
          params=[_NAME]),
    Route("PUT", "/api/v1/agents/{name}/release", _set_release,
          "Set the release policy (canary revision, weight, header match)", params=[_NAME],
          body={"$ref": "#/components/schemas/ReleaseSpec"}),
    Route("POST", "/api/v1/agents/{name}/release/promote", _promote,
          "Make the canary stable and end the split", params=[_NAME]),
    Route("POST", "/api/v1/agents/{name}/release/abort", _abort, "End the split",
          params=[_NAME]),
    Route("POST", "/api/v1/agents/{name}/release/preview", _preview_release,
          "The Istio objects of the agent now and those a release policy would publish "
          "(validated; nothing is written)", params=[_NAME],
          body={"$ref": "#/components/schemas/ReleaseSpec"}),
    Route("GET", "/api/v1/prompts", _list_prompts, "Prompt keys and their versions"),
    Route("GET", "/api/v1/prompts/{name}", _get_prompt, "Every version of a prompt",
          params=[_NAME]),
    Route("PUT", "/api/v1/prompts/{name}/release", _set_prompt_release,
          "Labels and A/B weights of a prompt", params=[_NAME],
          body={"$ref": "#/components/schemas/PromptRelease"}),
    Route("GET", "/api/v1/prompts/{name}/stats", _prompt_stats,
          "Per prompt version: requests, errors, tokens, latency of the turns it served",
          params=[_NAME, _SINCE,
                  {"name": "limit", "in": "query",
                   "schema": {"type": "integer", "minimum": 0, "maximum": 1000}}],
          response=_ARR),
    Route("GET", "/api/v1/mcp-servers", _list_mcp, "The MCP Registry"),
    Route("GET", "/api/v1/mcp-servers/{name}/tools", _mcp_tools,
          "The tools an MCP server really offers", params=[_NAME], response=_ARR),
    Route("GET", "/api/v1/mcp-tools", _mcp_tool_listings,
          "Each MCP server's tools as last listed (on a schedule and on change), with the "
          "time and the last error"),
    Route("GET", "/api/v1/agents/{name}/card", _agent_card,
          "The A2A agent card a live instance serves (published in the Agent Registry)",
          params=[_NAME]),
    Route("POST", "/api/v1/agents/{name}/invoke-token", _invoke_token,
          "A short-lived JWT (ES256, audience the agent) to call the agent through its public "
          "entry as this principal (agents.invoke: operator, admin, invoker); public keys at "
          "/.well-known/jwks.json", params=[_NAME],
          response={"type": "object",
                    "required": ["token", "expiresAt", "issuer", "subject", "audience"],
                    "properties": {"token": {"type": "string"},
                                   "expiresAt": {"type": "string", "format": "date-time"},
                                   "issuer": {"type": "string"}, "subject": {"type": "string"},
                                   "audience": {"type": "string"}}}),
    Route("GET", "/api/v1/instances", _instances, "Live agent instances",
          params=[{"name": "agent", "in": "query", "schema": {"type": "string"}}],
          response=_ARR),
    Route("POST", "/api/v1/secrets/gc", _collect_garbage,
          "Destroy secret versions no revision references, older than graceSeconds "
          "(secrets-admin)",
          body={"type": "object", "properties": {
              "graceSeconds": {"type": "number", "minimum": 60, "maximum": 10000000}}},
          response={"type": "object", "properties": {
              "destroyed": {"type": "array", "items": {"type": "string"}},
              "kept": {"type": "integer"}}}),
    Route("GET", "/api/v1/grants", _list_grants,
          "Secrets shared with agents (outside their own Vault trees)",
          params=[{"name": "agent", "in": "query", "schema": {"type": "string"}}],
          response=_ARR),
    Route("PUT", "/api/v1/agents/{name}/grants", _share_secret,
          "Share a secret with an agent (secrets-admin; the agent's policy then reads it)",
          params=[_NAME],
          body={"type": "object", "required": ["secret"], "properties": {
              "secret": {"type": "string", "minLength": 1, "maxLength": 1024}}}),
    Route("DELETE", "/api/v1/agents/{name}/grants", _unshare_secret,
          "Stop sharing a secret with an agent (secrets-admin)",
          params=[_NAME, {"name": "secret", "in": "query", "required": True,
                          "schema": {"type": "string", "minLength": 1}}]),
    Route("GET", "/api/v1/credentials", _list_credentials,
          "Secret references with masked values",
          params=[{"name": "prefix", "in": "query", "schema": {"type": "string"}}],
          response=_ARR),
    Route("PUT", "/api/v1/credentials", _put_credential,
          "Write a value into Vault (write-only)",
          body={"type": "object", "required": ["path", "field", "value"], "properties": {
              "mount": {"type": "string"}, "path": {"type": "string"},
              "field": {"type": "string"}, "value": {"type": "string"}}}),
    Route("GET", "/api/v1/audit", _audit, "Who changed what",
          params=[{"name": "name", "in": "query", "schema": {"type": "string"}},
                  {"name": "kind", "in": "query", "schema": {"type": "string"}},
                  {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}}],
          response=_ARR),
    Route("GET", "/api/v1/mesh", _mesh, "The Istio objects the current state publishes",
          response=_ARR),
    Route("GET", "/api/v1/traces", _list_traces, "Traces, newest first",
          params=[{"name": "agent", "in": "query", "schema": {"type": "string"}},
                  {"name": "contextId", "in": "query", "schema": {"type": "string"}},
                  _SINCE,
                  {"name": "limit", "in": "query",
                   "schema": {"type": "integer", "minimum": 0, "maximum": 1000}}],
          response=_ARR),
    Route("GET", "/api/v1/traces/{traceId}", _get_trace,
          "Every span of a trace, ordered by start, with parent ids",
          params=[{"name": "traceId", "in": "path", "required": True,
                   "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"}}],
          response=_ARR),
    Route("GET", "/api/v1/token-usage", _token_usage,
          "Tokens and cost (USD) of model calls, by agent, model and UTC day",
          params=[{"name": "groupBy", "in": "query", "schema": {"type": "string"},
                   "description": "comma-separated subset of agent,model,day (default: all)"},
                  _SINCE],
          response=_ARR),
    Route("POST", "/api/v1/tokens", _create_token,
          "Mint an API token (secrets-admin; its roles may not allow more than the caller's); "
          "the secret is in this answer only", body=_TOKEN_REQUEST,
          response={**_TOKEN, "required": ["token", *_TOKEN["required"]],
                    "properties": {"token": {"type": "string"}, **_TOKEN["properties"]}},
          status=201),
    Route("GET", "/api/v1/tokens", _list_tokens,
          "API and token-file tokens with their state (secrets-admin; never a secret)",
          response={"type": "array", "items": _TOKEN}),
    Route("DELETE", "/api/v1/tokens/{id}", _revoke_token,
          "Revoke a token, API or token-file (secrets-admin; refused within seconds)",
          params=[{"name": "id", "in": "path", "required": True,
                   "schema": {"type": "string", "pattern": "^[0-9a-f]{12}$"}}],
          response=_TOKEN),
]  # fmt: skip


# ---------------------------------------------------------------- OpenAPI


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 document of :data:`ROUTES`."""
    manifest_schema = TypeAdapter(Manifest).json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = dict(manifest_schema.pop("$defs", {}))
    schemas["Manifest"] = manifest_schema
    for model in (ReleaseSpec, PromptRelease):
        s = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[model.__name__] = s
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"},
            "issues": {"type": "array", "items": {"type": "object"}}}}},
    }  # fmt: skip
    error = {"description": "error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}  # fmt: skip
    paths: dict[str, Any] = {}
    for route in ROUTES:
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__.strip("_"),
            "parameters": route.params,
            "security": [{"bearer": []}],
            "responses": {
                str(route.status): {
                    "description": "ok",
                    "content": {"application/json": {"schema": route.response}},
                },
                "default": error,
            },
        }
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": route.body}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "specmesh control plane", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# ---------------------------------------------------------------- app


def build_app(control_plane: ControlPlane, authenticator: Authenticator) -> web.Application:
    """The aiohttp application of the REST API."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    document = openapi_document()

    def wrap(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                principal = authenticator.authenticate(request.headers.get("Authorization"))
                result = await route.handler(control_plane, principal, request)
                return web.json_response(result, status=route.status)
            except Exception as e:
                http, _, reason = status_for(e)
                if reason == "internal":
                    logger.exception("%s %s failed", request.method, request.path)
                return web.json_response(error_body(e), status=http)

        return handle

    for route in ROUTES:
        app.router.add_route(route.method, route.path, wrap(route))

    async def openapi(_: web.Request) -> web.StreamResponse:
        return web.json_response(document)

    async def healthz(_: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def jwks(request: web.Request) -> web.StreamResponse:
        """The invoke-token signing keys (public; sidecars fetch them without a token)."""
        try:
            keys = await control_plane.issuer.jwks()
        except Exception as e:
            http, _, reason = status_for(e)
            if reason == "internal":
                logger.exception("%s %s failed", request.method, request.path)
            return web.json_response(error_body(e), status=http)
        return web.json_response(keys, headers={"Cache-Control": "public, max-age=300"})

    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/.well-known/jwks.json", jwks)
    add_studio_routes(app)
    return app
