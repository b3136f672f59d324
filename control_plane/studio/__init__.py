"""Agent Studio: the web UI, served by the control plane's REST app.

Plain HTML, CSS and JavaScript modules under ``static/`` (no build step). The Studio
talks to the REST API with the bearer token its user signs in with; nothing it serves
is secret, so its files need no token. Routes::

    GET /                          -> 302 /studio/
    GET /studio                    -> 302 /studio/
    GET /studio/                   index.html
    GET /studio/schemas/{file}     the Agent Spec's JSON Schemas, generated from the models
    GET /studio/{file}             the static files
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path

from aiohttp import web

from specmesh.spec.schema import generate_schemas

__all__ = ["STATIC", "add_studio_routes"]

STATIC = Path(__file__).resolve().parent / "static"

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_studio_routes(app: web.Application) -> None:
    """Add the Studio's routes to the REST app."""
    schemas = {name: json.dumps(schema) for name, schema in generate_schemas().items()}

    async def to_studio(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/studio/")

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("file") or "index.html"
        path = (STATIC / name).resolve()
        if not path.is_relative_to(STATIC) or not path.is_file():
            raise web.HTTPNotFound()
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".js":
            content_type = "text/javascript"
        return web.Response(
            body=path.read_bytes(),
            content_type=content_type,
            charset="utf-8" if content_type.startswith("text/") else None,
            headers=_HEADERS,
        )

    async def schema(request: web.Request) -> web.StreamResponse:
        text = schemas.get(request.match_info["file"])
        if text is None:
            raise web.HTTPNotFound()
        return web.Response(text=text, content_type="application/json", headers=_HEADERS)

    app.router.add_get("/", to_studio)
    app.router.add_get("/studio", to_studio)
    app.router.add_get("/studio/", static)
    app.router.add_get("/studio/schemas/{file}", schema)
    app.router.add_get("/studio/{file:.+}", static)
