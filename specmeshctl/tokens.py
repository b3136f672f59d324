"""Who you are to the control plane (``whoami``) and its API tokens (role secrets-admin):
``token create|list|revoke``."""

from __future__ import annotations

import argparse
import sys

from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import as_json, pages
from specmeshctl.context import Context
from specmeshctl.errors import EXIT_OK, UsageError
from specmeshctl.output import print_data, table, write
from specmeshctl.parsing import Registrar

__all__ = ["register"]

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl_seconds(raw: str) -> int:
    """``30d``, ``12h``, ``90m``, ``45s`` or plain seconds."""
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in _TTL_UNITS else (raw, "s")
    if not number.isdigit() or int(number) <= 0:
        raise UsageError(f"--ttl {raw!r}: expected a positive number of s, m, h or d (e.g. 30d)")
    return int(number) * _TTL_UNITS[unit]


async def cmd_token(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    if args.action == "create":
        request = pb.CreateTokenRequest(name=args.name, roles=args.role)
        if args.ttl:
            request.ttl_seconds = _ttl_seconds(args.ttl)
        minted = await cp.call(cp.tokens.CreateToken, request)
        record = as_json(minted.api_token)
        if args.output != "text":
            print_data({**record, "token": minted.token}, args.output)
            return EXIT_OK
        write(
            f"token/{record['id']} created for {record['name']} "
            f"(roles {', '.join(record['roles'])}), expires at {record.get('expiresAt')}\n"
            f"{minted.token}"
        )
        sys.stderr.write(
            f"the token is shown only now: store it; `specmesh token revoke {record['id']}` "
            "ends it\n"
        )
        return EXIT_OK
    if args.action == "list":
        listed = [
            as_json(t)
            for t in await pages(cp, cp.tokens.ListTokens, pb.ListTokensRequest(), "api_tokens")
        ]
        if args.output != "table":
            print_data(listed, args.output)
            return EXIT_OK
        table(
            [
                [t["id"], t["name"], ",".join(t.get("roles", [])),
                 str(t.get("expiresAt") or "never")[:19],
                 t.get("state", "") + (" (file)" if t.get("source") == "file" else "")]
                for t in listed
            ],
            ["ID", "NAME", "ROLES", "EXPIRES", "STATE"],
        )  # fmt: skip
        return EXIT_OK
    revoked = await cp.call(cp.tokens.RevokeToken, pb.RevokeTokenRequest(token_id=args.id))
    write(f"token/{revoked.api_token.id} ({revoked.api_token.name}) revoked")
    return EXIT_OK


async def cmd_whoami(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    me = await cp.call(cp.identity.WhoAmI, pb.WhoAmIRequest())
    if args.output != "text":
        print_data({"name": me.name, "roles": list(me.roles), "can": list(me.can)}, args.output)
        return EXIT_OK
    write(f"{me.name} (roles {', '.join(me.roles) or 'none'}) at {cp.server}")
    write(f"may: {', '.join(me.can) or 'nothing'}")
    return EXIT_OK


def register(r: Registrar) -> None:
    p = r.api("whoami", "the token's name, roles and what they allow", cmd_whoami)
    r.output(p, "text", ("text", "json", "yaml"))
    actions = r.group("token", "API tokens: create, list, revoke (secrets-admin)")
    a = actions.api("create", "mint a token (printed once) with an expiry", cmd_token)
    a.add_argument("name", help="who or what the token is for")
    a.add_argument(
        "--role",
        action="append",
        required=True,
        choices=["viewer", "operator", "admin", "secrets-admin", "invoker"],
        help="repeatable; may not allow more than your own roles",
    )
    a.add_argument("--ttl", default=None, help="lifetime: 30d (default), 12h, 90m, 45s")
    actions.output(a, "text", ("text", "json", "yaml"))
    a = actions.api("list", "every token with its state (never a secret)", cmd_token)
    actions.output(a, "table", ("table", "json", "yaml"))
    a = actions.api("revoke", "refuse a token (API or token file) from now on", cmd_token)
    a.add_argument("id")
