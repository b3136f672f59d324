"""``specmesh mesh render``: the Istio objects the control plane publishes."""

from __future__ import annotations

import argparse
import sys

import yaml

from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import as_json
from specmeshctl.context import Context
from specmeshctl.errors import EXIT_OK
from specmeshctl.output import print_data
from specmeshctl.parsing import Registrar

__all__ = ["register"]


async def cmd_mesh_render(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    reply = await cp.call(cp.mesh.RenderMesh, pb.RenderMeshRequest())
    objects = [as_json(o) for o in reply.objects]
    if args.output == "json":
        print_data(objects, "json")
    else:
        sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, allow_unicode=True))
    return EXIT_OK


def register(r: Registrar) -> None:
    actions = r.group("mesh", "the Istio objects the control plane publishes")
    a = actions.api("render", "print them (YAML documents by default)", cmd_mesh_render)
    actions.output(a, "yaml", ("yaml", "json"))
