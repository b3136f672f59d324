"""Secrets (role secrets-admin): ``grant create|delete|list`` shares a Vault secret with an
agent, ``secrets gc`` destroys the key versions no revision references."""

from __future__ import annotations

import argparse
from typing import Any

from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import ControlPlaneClient, as_json, pages
from specmeshctl.context import Context
from specmeshctl.errors import EXIT_OK
from specmeshctl.output import print_data, table, write
from specmeshctl.parsing import Registrar

__all__ = ["grants", "register"]


async def grants(cp: ControlPlaneClient, agent: str | None = None) -> list[dict[str, Any]]:
    """What is shared (with ``agent``, or with every agent)."""
    found = await pages(
        cp, cp.grants.ListGrants, pb.ListGrantsRequest(agent_name=agent or ""), "grants"
    )
    return [as_json(g) for g in found]


async def cmd_grant(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    if args.action == "list":
        listed = await grants(cp, args.agent)
        if args.output != "table":
            print_data(listed, args.output)
            return EXIT_OK
        table(
            [[g["agentName"], g["secret"], g.get("grantedBy", ""), g.get("grantedAt", "")[:19]]
             for g in listed],
            ["AGENT", "SECRET", "BY", "SINCE"],
        )  # fmt: skip
        return EXIT_OK
    if args.action == "create":
        done = await cp.call(
            cp.grants.ShareSecret, pb.ShareSecretRequest(agent_name=args.agent, secret=args.secret)
        )
        write(f"shared {done.secret} with agent/{args.agent}")
    else:
        await cp.call(
            cp.grants.UnshareSecret,
            pb.UnshareSecretRequest(agent_name=args.agent, secret=args.secret),
        )
        write(f"stopped sharing {args.secret} with agent/{args.agent}")
    return EXIT_OK


async def cmd_secrets_gc(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    report = await cp.call(
        cp.credentials.CollectSecretGarbage,
        pb.CollectSecretGarbageRequest(grace_seconds=args.grace),
        timeout=max(60.0, args.timeout),
    )
    if args.output != "text":
        print_data({"destroyed": list(report.destroyed), "kept": report.kept}, args.output)
        return EXIT_OK
    for version in report.destroyed:
        write(f"destroyed {version}")
    write(f"{len(report.destroyed)} unreferenced versions destroyed, {report.kept} kept")
    return EXIT_OK


def register(r: Registrar) -> None:
    actions = r.group("grant", "secrets shared with an agent (secrets-admin)")
    for action, helptext in (
        ("create", "share a Vault secret (outside every agent's own tree) with an agent"),
        ("delete", "stop sharing it"),
        ("list", "what is shared, with whom"),
    ):
        a = actions.api(action, helptext, cmd_grant)
        if action == "list":
            a.add_argument("agent", nargs="?", default=None)
            actions.output(a, "table", ("table", "json", "yaml"))
        else:
            a.add_argument("agent")
            a.add_argument("secret", help="vault://<mount>/<path>")

    actions = r.group("secrets", "agents' secret versions in Vault (secrets-admin)")
    a = actions.api(
        "gc",
        "destroy the versions no revision references (refused or crashed applies)",
        cmd_secrets_gc,
    )
    a.add_argument(
        "--grace",
        type=int,
        default=3600,
        help="keep versions younger than this many seconds (an apply may be in flight)",
    )
    a.add_argument("--timeout", type=float, default=300.0, help="seconds the sweep may take")
    actions.output(a, "text", ("text", "json", "yaml"))
