"""``specmesh schema --write|--check``: the JSON Schemas of the manifests in ``schemas/``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specmeshctl.errors import EXIT_INVALID, EXIT_OK
from specmeshctl.output import write
from specmeshctl.parsing import Registrar
from specmeshctl.settings import Settings

__all__ = ["register"]


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from specmesh.spec.schema import check_schemas, write_schemas

    directory = Path(args.dir)
    if args.check:
        stale = check_schemas(directory)
        if stale:
            sys.stderr.write(
                f"stale JSON Schemas in {directory}: {', '.join(stale)}; "
                "run `specmesh schema --write`\n"
            )
            return EXIT_INVALID
        write("schemas are current")
        return EXIT_OK
    for path in write_schemas(directory):
        write(f"wrote {path}")
    return EXIT_OK


def register(r: Registrar) -> None:
    p = r.local("schema", "write or check the JSON Schemas")
    p.set_defaults(local_run=cmd_schema)
    p.add_argument("--dir", default="schemas")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
