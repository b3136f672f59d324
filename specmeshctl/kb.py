"""``specmesh kb ingest|delete``: an agent's knowledge base.

The knowledge base lives in the agent's engine (its Chroma store), not in the control
plane, so these commands talk to one engine's ``/v1/knowledge/documents``: ``--url``, or a
ready instance of the track that the local fleet runs.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from specmesh.errors import NotFoundError
from specmesh.names import resource_name
from specmeshctl.context import Context
from specmeshctl.errors import EXIT_INVALID, EXIT_NOT_FOUND, EXIT_OK, EXIT_OTHER, EXIT_UNAVAILABLE
from specmeshctl.fleet import running_fleet
from specmeshctl.parsing import Registrar

__all__ = ["register"]

_KB_SUFFIXES = (".md", ".markdown", ".txt")
_KB_BATCH = 50


def _agent_url(ctx: Context, agent: str, track: str) -> str:
    """The engine URL of one ready instance of the agent's track in the local fleet."""
    status = running_fleet(ctx.settings)
    ready = [
        i
        for i in status.get("instances", [])
        if resource_name(i["agent"]) == resource_name(agent) and i["track"] == track and i["ready"]
    ]
    if ready:
        return str(random.choice(ready)["endpoints"]["a2a"])
    raise NotFoundError(kind="running agent", name=f"{agent} [{track}]")


def _documents(paths: Sequence[str]) -> list[dict[str, str]]:
    """The .md/.txt files under ``paths``; a file's source is its path relative to the
    folder given (or its name, for a file given by itself)."""
    docs: list[dict[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in _KB_SUFFIXES
            )
            docs += [
                {"source": f.relative_to(path).as_posix(), "text": f.read_text(errors="replace")}
                for f in files
            ]
        elif path.is_file():
            docs.append({"source": path.name, "text": path.read_text(errors="replace")})
        else:
            raise NotFoundError(kind="file or folder", name=raw)
    return docs


async def cmd_kb(args: argparse.Namespace, ctx: Context) -> int:
    url = (args.url or _agent_url(ctx, args.agent, args.track)).rstrip("/")
    endpoint = f"{url}/v1/knowledge/documents"
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        try:
            if args.action == "delete":
                r = await http.delete(endpoint, params={"source": args.source})
                if r.status_code != 200:
                    return _failed(r)
                body = r.json()
                sys.stdout.write(
                    f"deleted {body['deleted']} chunks of {body['source']} "
                    f"from {body['collection']} ({body['chunks']} chunks left)\n"
                )
                return EXIT_OK
            docs = _documents(args.paths)
            if not docs:
                sys.stderr.write("error: no .md or .txt file found\n")
                return EXIT_INVALID
            totals = dict.fromkeys(("added", "unchanged", "replaced", "chunksWritten"), 0)
            body = {}
            for i in range(0, len(docs), _KB_BATCH):
                r = await http.post(endpoint, json={"documents": docs[i : i + _KB_BATCH]})
                if r.status_code != 200:
                    return _failed(r)
                body = r.json()
                for key in totals:
                    totals[key] += int(body.get(key, 0))
        except httpx.HTTPError as e:
            sys.stderr.write(f"error: {endpoint}: {type(e).__name__} {e}\n")
            return EXIT_UNAVAILABLE
    sys.stdout.write(
        f"ingested {len(docs)} documents into {body['collection']}: added {totals['added']}, "
        f"unchanged {totals['unchanged']}, replaced {totals['replaced']} "
        f"({totals['chunksWritten']} chunks written; {body['chunks']} in the collection)\n"
    )
    return EXIT_OK


def _failed(r: Any) -> int:
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:500]
    sys.stderr.write(f"error: HTTP {r.status_code}: {message}\n")
    if r.status_code == 400:
        return EXIT_INVALID
    if r.status_code in (502, 503):
        return EXIT_UNAVAILABLE
    return EXIT_NOT_FOUND if r.status_code == 404 else EXIT_OTHER


def register(r: Registrar) -> None:
    actions = r.group("kb", "an agent's knowledge base (ingest, delete)", api=False)
    a = actions.local("ingest", "chunk, embed and store .md/.txt files", cmd_kb)
    a.add_argument("agent")
    a.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    a = actions.local("delete", "delete the chunks of one source", cmd_kb)
    a.add_argument("agent")
    a.add_argument("--source", required=True, help="the source (as ingest named it)")
    for name in ("ingest", "delete"):
        a = actions.parser(name)
        a.add_argument("--track", default="stable", choices=["stable", "canary"])
        a.add_argument("--url", default=None, help="the engine's URL (default: from the fleet)")
        a.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
