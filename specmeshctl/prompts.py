"""Prompts: ``get prompts`` and ``get prompt KEY [--version V]`` (a version is published
with ``apply -f``)."""

from __future__ import annotations

import sys
from typing import Any

from specmesh.errors import NotFoundError
from specmesh.protojson import message_json
from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import ControlPlaneClient, pages
from specmeshctl.errors import EXIT_OK
from specmeshctl.output import manifest, print_data, print_manifests, table

__all__ = ["get", "labels", "versions_by_key"]


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
    release = {"labels": dict(reply.prompt.release.labels),
               "weights": dict(reply.prompt.release.weights)}  # fmt: skip
    if output != "table":
        docs = [
            manifest("Prompt", key, {"version": v.version, **_entry(v)}) for v in reply.versions
        ]
        if version is None and (release["labels"] or release["weights"]):
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
