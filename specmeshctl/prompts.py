"""Prompts: ``get prompts``, ``get prompt KEY [--version V]`` (a version is published
with ``apply -f``), ``prompt rollback KEY VERSION`` and ``prompt history KEY``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from specmesh.errors import NotFoundError
from specmesh.protojson import message_json
from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import ControlPlaneClient, as_json, pages
from specmeshctl.context import Context
from specmeshctl.errors import EXIT_OK
from specmeshctl.output import manifest, print_data, print_manifests, table, write
from specmeshctl.parsing import Registrar

__all__ = ["get", "labels", "register", "versions_by_key"]


def _entry(version: Any) -> dict[str, Any]:
    """A version's template, variables and description."""
    entry: dict[str, Any] = message_json(version.entry)
    return {k: entry[k] for k in ("template", "variables", "description") if k in entry}


async def versions_by_key(cp: ControlPlaneClient) -> dict[str, list[str]]:
    """Every prompt key and its versions."""
    found = await pages(cp, cp.prompts.ListPrompts, pb.ListPromptsRequest(), "prompts")
    return {p.prompt_key: list(p.versions) for p in found}


async def labels(cp: ControlPlaneClient, key: str) -> list[str]:
    """The release labels of a prompt (``stable``, ``canary``...)."""
    reply = await cp.call(cp.prompts.GetPrompt, pb.GetPromptRequest(prompt_key=key))
    return list(reply.prompt.release.labels)


async def get(cp: ControlPlaneClient, key: str | None, version: str | None, output: str) -> int:
    """``get prompts`` (keys and versions) or ``get prompt KEY [--version V]``."""
    if not key:
        prompts = await versions_by_key(cp)
        if output == "table":
            table([[k, ", ".join(v)] for k, v in sorted(prompts.items())], ["KEY", "VERSIONS"])
        else:
            print_data(prompts, output)
        return EXIT_OK
    reply = await cp.call(
        cp.prompts.GetPrompt, pb.GetPromptRequest(prompt_key=key, version=version or "")
    )
    if version is not None and not reply.versions:
        raise NotFoundError(kind="prompt version", name=f"{key}@{version}")
    release: dict[str, Any] = {"labels": dict(reply.prompt.release.labels),
                               "weights": dict(reply.prompt.release.weights)}  # fmt: skip
    if reply.prompt.release.current:
        release["current"] = reply.prompt.release.current  # set by `prompt rollback`
    if output != "table":
        docs = [
            manifest("Prompt", key, {"version": v.version, **_entry(v)}) for v in reply.versions
        ]
        if version is None and any(release.values()):
            docs[-1]["spec"]["release"] = release  # applied once, with the last version
        print_manifests(docs, output)
    elif version is not None:
        sys.stdout.write(str(_entry(reply.versions[0])["template"]).rstrip("\n") + "\n")
    else:
        by_version: dict[str, list[str]] = {}
        for label, v in release["labels"].items():
            by_version.setdefault(v, []).append(label)
        weights = release["weights"]
        table(
            [
                [
                    v.version,
                    ", ".join(sorted(by_version.get(v.version, []))) or "-",
                    f"{weights[v.version]}%" if v.version in weights else "-",
                    str(_entry(v).get("description") or ""),
                ]
                for v in reply.versions
            ],
            ["VERSION", "LABELS", "WEIGHT", "DESCRIPTION"],
        )
    return EXIT_OK


async def cmd_prompt(args: argparse.Namespace, ctx: Context) -> int:
    """``prompt rollback KEY VERSION`` and ``prompt history KEY``."""
    cp = ctx.cp
    if args.action == "rollback":
        request = pb.RollbackPromptRequest(
            prompt_key=args.key, version=args.version, message=args.message
        )
        reply = await cp.call(cp.prompts.RollbackPrompt, request)
        if args.output != "text":
            print_data(as_json(reply.prompt), args.output)
        else:
            write(
                f"prompt/{args.key}: version {args.version} serves again (A/B weights ended; "
                "agents that use it have a new revision)"
            )
        return EXIT_OK
    reply = await cp.call(
        cp.prompts.GetPromptHistory, pb.GetPromptHistoryRequest(prompt_key=args.key)
    )
    versions = [
        {"version": v.version, "author": v.author, "createdAt": as_json(v).get("createdAt", "")}
        for v in reply.versions
    ]
    changes = [as_json(e) for e in reply.release_changes]
    if args.output != "table":
        print_data({"versions": versions, "releaseChanges": changes}, args.output)
        return EXIT_OK
    table(
        [[v["version"], v["createdAt"][:19], v["author"]] for v in versions],
        ["VERSION", "PUBLISHED", "AUTHOR"],
    )
    write("")
    table(
        [
            [
                str(c.get("time", ""))[:19],
                str(c.get("action", "")),
                str(c.get("actor", "")),
                _release_text(c),
                str(c.get("message", "")),
            ]
            for c in changes
        ],
        ["CHANGED", "ACTION", "ACTOR", "RELEASE", "MESSAGE"],
    )
    return EXIT_OK


def _release_text(change: dict[str, Any]) -> str:
    """A release change's paths and new values, e.g. ``current=1.0.0 weights.1.1.0=-``."""
    parts = []
    for c in change.get("changes", []):
        new = c.get("newValue", "-")
        parts.append(f"{c.get('path', '')}={new if not isinstance(new, dict) else '...'}")
    return " ".join(parts) or "-"


def register(r: Registrar) -> None:
    actions = r.group("prompt", "a prompt's rollback and history")
    a = actions.api("rollback", "serve an earlier version of a prompt again", cmd_prompt)
    a.add_argument("key")
    a.add_argument("version")
    a.add_argument("-m", "--message", default="", help="why (kept in the audit log)")
    actions.output(a, "text", ("text", "json", "yaml"))
    a = actions.api("history", "a prompt's versions and release changes", cmd_prompt)
    a.add_argument("key")
    actions.output(a, "table", ("table", "json", "yaml"))
