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
) -> tuple[dict[str, Any] | None, int, dict[str, Any] | None]:
    """The agent's release policy (None: none), its version (0: none) and the progress of
    its analysis (None: none ran)."""
    reply = await cp.call(cp.releases.GetRelease, pb.GetReleaseRequest(agent_name=agent))
    if not reply.HasField("release"):
        return None, 0, None
    analysis = message_json(reply.release.analysis) if reply.release.HasField("analysis") else None
    return _json(reply.release), reply.release.version, analysis


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
        out.extend(_evaluation_lines(entry.get("evaluation")))
    return out


def _evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    """The evaluation run before a step: its verdict, then a line per case (the property
    that failed and the start of the answer)."""
    if not evaluation:
        return []
    cases = evaluation.get("cases") or []
    out = [
        f"    evaluation {'passed' if evaluation.get('passed') else 'FAILED'}: "
        f"{evaluation.get('failures', 0)} of {len(cases)} cases failed "
        f"(at most {evaluation.get('maxFailures', 0)} may)"
    ]
    for case in cases:
        verdict = "ok" if case.get("passed") else f"FAILED {case.get('failed')}"
        excerpt = " ".join(str(case.get("excerpt") or "").split())
        shown = excerpt if len(excerpt) <= 80 else excerpt[:80] + "..."
        out.append(f"      {case.get('name')}: {verdict} -- {shown!r}")
    return out


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


def _show(agent: str, release: dict[str, Any] | None, output: str) -> None:
    if output == "text":
        write(line(agent, release))
    else:
        print_data(release, output)


async def get(cp: ControlPlaneClient, agent: str | None, output: str) -> int:
    """``get release NAME``."""
    if not agent:
        raise UsageError("`get release` needs the agent's name: `get release NAME`")
    release, _, analysis = await _fetch(cp, agent)
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
        got, version, analysis = await _fetch(cp, agent)
        if args.output == "text":
            heading = line(agent, got) + (f" (version {version})" if got is not None else "")
            write("\n".join([heading, *analysis_lines(analysis)]))
        else:
            print_data(None if got is None else {**got, "version": version}, args.output)
        return EXIT_OK
    if args.action in ("promote", "abort"):
        if args.action == "promote":
            promote = pb.PromoteReleaseRequest(
                agent_name=agent, expected_version=args.expected_version
            )
            reply = await cp.call(cp.releases.PromoteRelease, promote)
        else:
            abort = pb.AbortReleaseRequest(agent_name=agent, expected_version=args.expected_version)
            reply = await cp.call(cp.releases.AbortRelease, abort)
        _show(agent, _json(reply.release), args.output)
        return EXIT_OK
    # set: the split (canary revision, weight, header match) is replaced; the stable
    # revision is kept unless given, and so are timeout, retries, outlier detection and
    # connection pool. The write is guarded by the version read (or --expected-version):
    # a change made in between is a conflict, never overwritten.
    stored, version, _ = await _fetch(cp, agent)
    release = dict(stored or {})
    release["canaryRevision"] = args.canary_revision
    release["canaryWeight"] = args.weight
    release["headerMatch"] = [_parse_header(h) for h in args.header]
    if args.stable_revision is not None:
        release["stableRevision"] = args.stable_revision
    request = pb.SetReleaseRequest(
        agent_name=agent,
        release=to_struct(release),
        allow_empty=args.allow_empty,
        expected_version=version if args.expected_version is None else args.expected_version,
    )
    reply = await cp.call(cp.releases.SetRelease, request)
    _show(agent, _json(reply.release), args.output)
    return EXIT_OK


def register(r: Registrar) -> None:
    actions = r.group("release", "an agent's canary release")
    for action, helptext in (
        ("get", "show the release policy and its version"),
        (
            "set",
            "set the canary revision, its weight and header match; refused when it sends "
            "calls to a track with no ready instance (naming a canary revision starts the "
            "canary track: set it at --weight 0, wait until `get agents` shows it ready, "
            "then raise the weight); a lower weight leaves conversations already on the "
            "canary there until their pin's age (abort takes every call off it)",
        ),
        ("promote", "the canary becomes stable; the split ends"),
        ("abort", "the split ends; stable stays, and takes every conversation with it"),
    ):
        a = actions.api(action, helptext, cmd_release)
        a.add_argument("agent")
        if action != "get":
            a.add_argument(
                "--expected-version",
                type=int,
                default=None,
                metavar="N",
                help="change it only if the policy's version is N (`release get` shows it; "
                "0: no policy yet); a concurrent change is a conflict (exit 3)"
                + ("; default: the version read before the change" if action == "set" else ""),
            )
        if action == "set":
            a.add_argument(
                "--allow-empty",
                action="store_true",
                help="set it even if a track it sends calls to has no ready instance",
            )
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
