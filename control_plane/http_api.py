"""The control plane's HTTP server (aiohttp): the REST API transcoded from the gRPC services,
and the few routes that are not RPCs::

    /api/v1/...               every RPC's google.api.http rule (control_plane.transcoding)
    GET /api/v1/openapi.json  the OpenAPI document of those routes (control_plane.openapi)
    GET /healthz              liveness
    GET /.well-known/jwks.json  the invoke-token signing keys (public: sidecars fetch them)
    /studio/...               the Studio (control_plane.studio)

Every ``/api/v1`` route but the OpenAPI document needs ``Authorization: Bearer``. Errors are
``{"error": {"code", "message", "issues"?}}`` with the status of the error table
(:mod:`control_plane.errors`), an unknown ``/api/`` path or method included.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from control_plane.api import ControlPlane
from control_plane.auth import Authenticator
from control_plane.errors import error_body, error_mapping
from control_plane.openapi import openapi_document
from control_plane.studio import add_studio_routes
from control_plane.transcoding import (
    MAX_BODY_BYTES,
    Servicer,
    add_transcoded_routes,
    http_bindings,
)
from specmesh.v1 import control_plane_pb2

__all__ = ["OPENAPI_PATH", "build_app"]

logger = logging.getLogger(__name__)

OPENAPI_PATH = "/api/v1/openapi.json"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """An unknown path or method under ``/api/`` answers the API's error body, not HTML."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if not request.path.startswith("/api/") or e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "bad_request")
        message = f"{request.method} {request.path}: {e.reason}"
        return web.json_response({"error": {"code": code, "message": message}}, status=e.status)


def build_app(
    control_plane: ControlPlane,
    authenticator: Authenticator,
    servicers: Mapping[str, Servicer],
) -> web.Application:
    """The aiohttp application: ``servicers`` (service full name -> servicer) answer the
    transcoded routes."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
    services = list(control_plane_pb2.DESCRIPTOR.services_by_name.values())
    add_transcoded_routes(app, http_bindings(services), servicers, authenticator)
    document = openapi_document(services)

    async def openapi(_: web.Request) -> web.StreamResponse:
        return web.json_response(document)

    async def healthz(_: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def jwks(request: web.Request) -> web.StreamResponse:
        try:
            keys = await control_plane.issuer.jwks()
        except Exception as e:
            mapping = error_mapping(e)
            if mapping.reason == "internal":
                logger.exception("%s %s failed", request.method, request.path)
            return web.json_response(error_body(e), status=mapping.http_status)
        return web.json_response(keys, headers={"Cache-Control": "public, max-age=300"})

    app.router.add_get(OPENAPI_PATH, openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/.well-known/jwks.json", jwks)
    add_studio_routes(app)
    return app
