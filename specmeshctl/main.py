"""The ``specmesh`` command.

Exit codes a script can rely on::

    0  done
    1  the spec or request is invalid (every problem is printed, with its path)
    2  bad usage (arguments)
    3  conflict: the expected revision is stale, or a name collides
    4  not found
    5  the control plane (or what it needs: etcd, Vault) is unavailable, or none is running
    6  any other specmesh error
    7  not allowed: no or unknown token (UNAUTHENTICATED), or the token's roles may not
       (PERMISSION_DENIED)

Every command on specs, releases, secrets, tokens, the audit and the mesh goes through one
control plane, over its gRPC API: ``--server``/``SPECMESH_SERVER`` (``host:port``, or
``grpcs://host:port`` for TLS) with ``--token``/``SPECMESH_TOKEN``/``SPECMESH_TOKEN_FILE``;
without them, the control plane of the running local fleet (``specmesh up``) and its admin
token.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from specmesh.errors import SpecmeshError
from specmeshctl import (
    agents,
    audit,
    fleet,
    kb,
    mesh,
    prompts,
    releases,
    schema,
    secrets,
    specs,
    tokens,
)
from specmeshctl.context import Command, Context
from specmeshctl.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_UNAVAILABLE,
    START_HINT,
    ControlPlaneError,
    exit_code,
)
from specmeshctl.parsing import Registrar, control_plane_flags
from specmeshctl.settings import Settings

__all__ = ["main"]

_GROUPS = (specs, prompts, releases, audit, mesh, secrets, tokens, agents, kb, fleet, schema)
"""The modules that add commands, in the order ``--help`` lists them."""


def _process_commands() -> dict[str, EntryPoint]:
    """Processes outside the CLI (engine, sidecar, control plane...) plug in as entry
    points, so the CLI never imports them."""
    return {ep.name: ep for ep in entry_points(group="specmesh.commands")}


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="specmesh",
        description=doc.split("\n")[0],
        epilog=doc.split("\n\n", 1)[1].split("\n\nEvery")[0].replace("::", ":"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    control_plane_flags(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    registrar = Registrar(sub)
    for group in _GROUPS:
        group.register(registrar)
    for name in sorted(_process_commands()):
        sub.add_parser(name, help=f"run the {name} (see `specmesh {name} --help`)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with ``--server`` / ``--token`` on top."""
    overrides: dict[str, Any] = {}
    if getattr(args, "server", None):
        overrides["server"] = args.server
    if getattr(args, "token", None):
        overrides["token"] = args.token
    return Settings(**overrides)


async def _run(command: Command, args: argparse.Namespace, settings: Settings) -> int:
    async with AsyncExitStack() as stack:
        return await command(args, Context(settings=settings, stack=stack, command=args.command))


def _hint(error: SpecmeshError, settings: Settings | None) -> str | None:
    """What to do about an unreachable control plane, when it is the local fleet's."""
    if settings is None or not isinstance(error, ControlPlaneError):
        return None
    if error.exit_code == EXIT_UNAVAILABLE and error.server == settings.fleet_control_plane:
        return f"if that is the local fleet's control plane, the fleet is not running: {START_HINT}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    processes = _process_commands()
    if argv and argv[0] in processes:  # its own parser takes every argument that follows
        run_process: Callable[[list[str]], int] = processes[argv[0]].load()
        return run_process(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings: Settings | None = None
    try:
        settings = _settings(args)
        local_run = getattr(args, "local_run", None)
        if local_run is not None:
            return int(local_run(args, settings))
        return asyncio.run(_run(args.run, args, settings))
    except SpecmeshError as e:
        sys.stderr.write(f"error: {e}\n")
        hint = _hint(e, settings)
        if hint:
            sys.stderr.write(f"  {hint}\n")
        return exit_code(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader left (`| head`): no traceback; stdout goes nowhere from now on
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
