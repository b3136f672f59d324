"""An agent's release: ``release get|set|promote|abort`` and ``get release NAME`` (a
Release manifest is applied with ``apply -f``)."""

from __future__ import annotations

import argparse
from typing import Any

from specmesh.errors import NotFoundError
from specmesh.protojson import message_json, to_struct
from specmesh.spec.models import ReleaseSpec
from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl.client import ControlPlaneClient
from specmeshctl.context import Context
from specmeshctl.errors import EXIT_OK, UsageError
from specmeshctl.output import manifest, print_data, print_manifests, write
from specmeshctl.parsing import Registrar

__all__ = ["analysis_lines", "fetch", "get", "line", "register"]


def _json(release: Any) -> dict[str, Any]:
    """A Release message as its spec (camelCase, every field)."""
    return ReleaseSpec.model_validate(message_json(release.spec)).model_dump(mode="json")


async def fetch(cp: ControlPlaneClient, agent: str) -> dict[str, Any] | None:
    """The agent's release policy; None when it has none (NOT_FOUND: no such agent)."""
    return (await _fetch(cp, agent))[0]


async def _fetch(
    cp: ControlPlaneClient, agent: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The agent's release policy and the progress of its analysis (each None when none)."""
    reply = await cp.call(cp.releases.GetRelease, pb.GetReleaseRequest(agent_name=agent))
    if not reply.HasField("release"):
        return None, None
    analysis = message_json(reply.release.analysis) if reply.release.HasField("analysis") else None
    return _json(reply.release), analysis


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def analysis_lines(analysis: dict[str, Any] | None) -> list[str]:
    """The analysis timeline: a line per step (weight, decision, each track's figures,
    each judged gate), then the reason of the last decision."""
    if not analysis:
        return []
    out = [
        f"analysis of canary revision {analysis.get('canaryRevision')} against stable "
        f"revision {analysis.get('stableRevision')}: {analysis.get('phase')} "
        f"(step {int(analysis.get('step', 0)) + 1} of {analysis.get('steps', '?')})"
    ]
    for entry in analysis.get("timeline") or []:
        figures = entry.get("figures") or {}
        tracks = []
        for track in ("stable", "canary"):
            f = figures.get(track)
            if f:
                p95 = f.get("p95Seconds")
                tracks.append(
                    f"{track} {f.get('requests', 0)} turns, {f.get('errors', 0)} errors "
                    f"({_percent(f.get('errorRate'))}), p95 "
                    + ("-" if p95 is None else f"{p95:.3f}s")
                )
        gates = [
            f"{g['gate']} {'FAILED' if g.get('failed') else 'ok'}"
            + (
                f" (bound {g['bound']:.3g}, max {g['threshold']:g})"
                if g.get("judged")
                else " (not judged)"
            )
            for g in figures.get("gates") or []
        ]
        out.append(
            f"  step {int(entry.get('step', 0)) + 1} at {entry.get('weight')}%: "
            f"{entry.get('decision')} -- " + "; ".join(tracks + gates or ["no data yet"])
        )
        if entry.get("reason"):
            out.append(f"    {entry['reason']}")
    return out


async def _set(cp: ControlPlaneClient, agent: str, spec: dict[str, Any]) -> dict[str, Any]:
    request = pb.SetReleaseRequest(agent_name=agent, release=to_struct(spec))
    reply = await cp.call(cp.releases.SetRelease, request)
    return _json(reply.release)


def line(agent: str, release: dict[str, Any] | None) -> str:
    """The release in one sentence."""
    if release is None:
        return f"release/{agent}: none (the latest revision takes every call)"
    stable = release.get("stableRevision") or "latest"
    canary = release.get("canaryRevision")
    if canary is None:
        return f"release/{agent}: stable revision {stable}, no canary"
    text = (
        f"release/{agent}: stable revision {stable}, canary revision {canary} "
        f"at {release.get('canaryWeight', 0)}%"
    )
    headers = [_header_text(h) for h in release.get("headerMatch") or []]
    if headers:
        text += f", and calls with {' and '.join(headers)}"
    return text


def _header_text(h: dict[str, Any]) -> str:
    for op, sign in (("exact", "="), ("prefix", "^="), ("regex", "~=")):
        if h.get(op) is not None:
            return f"{h['name']}{sign}{h[op]}"
    return str(h.get("name", ""))


def _show(
    agent: str,
    release: dict[str, Any] | None,
    output: str,
    analysis: dict[str, Any] | None = None,
) -> None:
    if output == "text":
        write("\n".join([line(agent, release), *analysis_lines(analysis)]))
    else:
        print_data(release, output)


async def get(cp: ControlPlaneClient, agent: str | None, output: str) -> int:
    """``get release NAME``."""
    if not agent:
        raise UsageError("`get release` needs the agent's name: `get release NAME`")
    release, analysis = await _fetch(cp, agent)
    if release is None:
        raise NotFoundError(kind="release of agent", name=agent)
    if output == "table":
        write("\n".join([line(agent, release), *analysis_lines(analysis)]))
    else:
        status = {"analysis": analysis} if analysis else None
        print_manifests([manifest("Release", agent, release, status)], output)
    return EXIT_OK


def _parse_header(raw: str) -> dict[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--header {raw!r}: expected NAME=VALUE (an exact match)")
    return {"name": name.strip(), "exact": value}


async def cmd_release(args: argparse.Namespace, ctx: Context) -> int:
    cp, agent = ctx.cp, args.agent
    if args.action == "get":
        release, analysis = await _fetch(cp, agent)
        _show(agent, release, args.output, analysis)
        return EXIT_OK
    if args.action in ("promote", "abort"):
        if args.action == "promote":
            reply = await cp.call(
                cp.releases.PromoteRelease, pb.PromoteReleaseRequest(agent_name=agent)
            )
        else:
            reply = await cp.call(
                cp.releases.AbortRelease, pb.AbortReleaseRequest(agent_name=agent)
            )
        _show(agent, _json(reply.release), args.output)
        return EXIT_OK
    # set: the split (canary revision, weight, header match) is replaced; the stable
    # revision is kept unless given, and so are timeout, retries, outlier detection and
    # connection pool. (Read-modify-write: the release has no expected revision.)
    release = dict(await fetch(cp, agent) or {})
    release["canaryRevision"] = args.canary_revision
    release["canaryWeight"] = args.weight
    release["headerMatch"] = [_parse_header(h) for h in args.header]
    if args.stable_revision is not None:
        release["stableRevision"] = args.stable_revision
    _show(agent, await _set(cp, agent, release), args.output)
    return EXIT_OK


def register(r: Registrar) -> None:
    actions = r.group("release", "an agent's canary release")
    for action, helptext in (
        ("get", "show the release policy"),
        ("set", "set the canary revision, its weight and header match"),
        ("promote", "the canary becomes stable; the split ends"),
        ("abort", "the split ends; stable stays"),
    ):
        a = actions.api(action, helptext, cmd_release)
        a.add_argument("agent")
        if action == "set":
            a.add_argument("--canary-revision", type=int, required=True)
            a.add_argument(
                "--weight", type=int, default=0, help="percent of calls to the canary (0-100)"
            )
            a.add_argument(
                "--stable-revision", type=int, default=None, help="default: kept (or latest)"
            )
            a.add_argument(
                "--header",
                action="append",
                default=[],
                metavar="NAME=VALUE",
                help="calls with this header value go to the canary (repeatable: all must match)",
            )
        actions.output(a, "text", ("text", "json", "yaml"))
