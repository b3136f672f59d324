"""``specmesh audit``: who changed what."""

from __future__ import annotations

import argparse

from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import as_json
from specmeshctl.context import Context
from specmeshctl.errors import EXIT_OK
from specmeshctl.output import print_data, table
from specmeshctl.parsing import Registrar

__all__ = ["register"]


async def cmd_audit(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    request = pb.ListAuditEntriesRequest(
        name=args.name or "", kind=args.kind or "", page_size=args.limit
    )
    entries = list((await cp.call(cp.audit.ListAuditEntries, request)).entries)
    if args.output != "table":
        print_data([as_json(e) for e in entries], args.output)
        return EXIT_OK
    table(
        [
            [as_json(e).get("time", "")[:19], e.actor, e.action, e.kind, e.name,
             str(e.revision or "")]
            for e in entries
        ],
        ["TIME", "ACTOR", "ACTION", "KIND", "NAME", "REVISION"],
    )  # fmt: skip
    return EXIT_OK


def register(r: Registrar) -> None:
    p = r.api("audit", "who changed what (newest first)", cmd_audit)
    p.add_argument("--name", default=None)
    p.add_argument("--kind", default=None, help="agent, prompt, mcpserver, release...")
    p.add_argument("--limit", type=int, default=50)
    r.output(p, "table", ("table", "json", "yaml"))
