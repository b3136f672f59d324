"""Agent specs: ``validate``, ``apply``, ``get``, ``describe``, ``history``, ``diff``,
``rollback``, ``scale``, ``delete``. Everything but ``validate`` goes through the control
plane."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import yaml

from specmesh.errors import SpecError
from specmesh.protojson import message_json, to_struct
from specmesh.spec.diff import Change
from specmesh.spec.manifest import LoadedManifest, load_path
from specmesh.spec.models import AgentSpec
from specmesh.spec.validation import prompt_issues, reference_warnings
from specmesh.v1 import common_pb2
from specmesh.v1 import control_plane_pb2 as pb
from specmeshctl import mcp, prompts, releases, secrets
from specmeshctl.client import ControlPlaneClient, as_json, pages
from specmeshctl.context import Context
from specmeshctl.errors import EXIT_OK, ControlPlaneError, UsageError
from specmeshctl.output import manifest, print_data, print_manifests, table, write
from specmeshctl.parsing import Registrar

__all__ = ["register"]

_CHANGE_OPS = {
    common_pb2.CHANGE_OP_ADD: "add",
    common_pb2.CHANGE_OP_REMOVE: "remove",
    common_pb2.CHANGE_OP_REPLACE: "replace",
}


# ---------------------------------------------------------------- messages as JSON


def agent_json(agent: Any) -> dict[str, Any]:
    """An Agent message as ``-o json`` prints it: name, revision and who, spec, status."""
    info = agent.revision_info
    out: dict[str, Any] = {
        "name": agent.name,
        "revision": info.revision,
        "createdAt": as_json(info).get("createdAt", ""),
        "author": info.author,
        "message": info.message,
        "spec": message_json(agent.spec),
    }
    if info.HasField("resolved"):
        out["resolved"] = message_json(info.resolved)
    if agent.HasField("status"):
        out["status"] = as_json(agent.status)
    return out


def change_json(change: Any) -> dict[str, Any]:
    """A Change as :class:`specmesh.spec.diff.Change` prints it (``old``/``new`` absent
    for an add/remove)."""
    out: dict[str, Any] = {"path": change.path, "op": _CHANGE_OPS.get(change.op, "?")}
    if change.HasField("old_value"):
        out["old"] = message_json(change.old_value)
    if change.HasField("new_value"):
        out["new"] = message_json(change.new_value)
    return out


def revision_json(info: Any) -> dict[str, Any]:
    out = {
        "revision": info.revision,
        "createdAt": as_json(info).get("createdAt", ""),
        "author": info.author,
        "message": info.message,
    }
    if info.HasField("resolved"):
        out["resolved"] = message_json(info.resolved)
    return out


def prompt_text(resolved: dict[str, Any] | None) -> str:
    """The prompt a revision recorded, in short: ``1.0.0``, ``1.0.0 90% 1.1.0 10%``, or
    ``-`` (not recorded, or no version)."""
    prompt = (resolved or {}).get("prompt") or {}
    weights = prompt.get("weights") or {}
    if weights:
        return " ".join(f"{v} {w}%" for v, w in weights.items())
    return ", ".join(prompt.get("versions") or []) or "-"


# ---------------------------------------------------------------- validate, apply


def _load_all(paths: Sequence[str]) -> list[LoadedManifest]:
    loaded: list[LoadedManifest] = []
    for p in paths:
        loaded.extend(load_path(p))
    return loaded


def _local_warnings(loaded: list[LoadedManifest]) -> dict[int, list[str]]:
    """Per agent manifest (by index): its prompt, partners and MCP servers that none of the
    manifests given defines. Only warnings: they may be stored already."""
    prompt_versions: dict[str, list[str]] = {}
    labels: dict[str, list[str]] = {}
    for m in loaded:
        if m.kind == "Prompt":
            prompt_versions.setdefault(m.name, []).append(m.manifest.spec.version)
            if m.manifest.spec.release is not None:
                labels.setdefault(m.name, []).extend(m.manifest.spec.release.labels)
    agents = [m.name for m in loaded if m.kind == "Agent"]
    servers = [m.name for m in loaded if m.kind == "McpServer"]
    out: dict[int, list[str]] = {}
    for i, m in enumerate(loaded):
        if m.kind != "Agent":
            continue
        spec = m.manifest.spec
        errors, warnings = prompt_issues(
            spec, prompt_versions, labels.get(spec.base.prompt_key, [])
        )
        others = [a for a in agents if a.lower() != m.name.lower()]
        warnings += reference_warnings(spec, agents=others, mcp_servers=servers)
        found = [f"spec.{w.path}: {w.message}" for w in (*errors, *warnings)]
        if found:
            out[i] = found
    return out


async def cmd_validate(args: argparse.Namespace, ctx: Context) -> int:
    loaded = _load_all(args.filename)
    warnings = _local_warnings(loaded)
    if args.output == "json":
        rows: list[dict[str, Any]] = [
            {"kind": m.kind, "name": m.name, "source": m.source, "warnings": warnings.get(i, [])}
            for i, m in enumerate(loaded)
        ]
        print_data(rows, "json")
        return EXIT_OK
    for i, m in enumerate(loaded):
        write(f"valid: {m.kind}/{m.name} ({m.source})")
        for w in warnings.get(i, []):
            write(f"  warning: {w} (not among the manifests given)")
    return EXIT_OK


async def _apply_one(
    cp: ControlPlaneClient, m: LoadedManifest, args: argparse.Namespace
) -> dict[str, Any]:
    """One manifest of any kind (ApplyManifest): ``{kind, name, changed, revision,
    changes, warnings, secretsMoved}``."""
    request = pb.ApplyManifestRequest(
        manifest=to_struct(m.manifest.model_dump(mode="json", by_alias=True)), dry_run=args.dry_run
    )
    if args.expected_revision is not None and m.kind == "Agent":
        request.expected_revision = args.expected_revision
    try:
        reply = await cp.call(cp.manifests.ApplyManifest, request)
    except ControlPlaneError as e:
        raise _with_source(e, m.source) from e
    return {
        "kind": reply.kind,
        "name": reply.name,
        "changed": reply.changed,
        "revision": reply.revision or None,
        "changes": [change_json(c) for c in reply.changes],
        "warnings": list(reply.warnings),
        "secretsMoved": list(reply.secrets_moved),
    }


def _with_source(error: ControlPlaneError, source: str) -> ControlPlaneError:
    """An invalid manifest's error, naming the file it came from."""
    if error.code != grpc.StatusCode.INVALID_ARGUMENT:
        return error
    return ControlPlaneError(
        server=error.server,
        code=error.code,
        message=f"{source}: {error.message}",
        reason=error.reason,
    )


async def cmd_apply(args: argparse.Namespace, ctx: Context) -> int:
    loaded = _load_all(args.filename)  # every file is validated before anything is written
    order = {"McpServer": 0, "Prompt": 1, "Agent": 2, "Release": 3}
    loaded.sort(key=lambda m: order[m.kind])
    if args.expected_revision is not None and sum(m.kind == "Agent" for m in loaded) != 1:
        raise SpecError([], source="--expected-revision needs exactly one agent manifest")
    outcomes = []
    for m in loaded:
        outcome = await _apply_one(ctx.cp, m, args)
        outcomes.append(outcome)
        if args.output == "text":
            verb = "configured" if outcome["changed"] else "unchanged"
            if args.dry_run:
                verb = "valid (dry run)"
            rev = f" (revision {outcome['revision']})" if outcome.get("revision") else ""
            write(f"{outcome['kind'].lower()}/{outcome['name']} {verb}{rev}")
            for w in outcome["warnings"]:
                write(f"  warning: {w}")
            for moved in outcome["secretsMoved"]:
                write(f"  secret moved to Vault: {moved}")
    if args.output != "text":
        print_data(outcomes, args.output)
    return EXIT_OK


# ---------------------------------------------------------------- get, describe


def _instance_row(i: Any) -> list[str]:
    state = common_pb2.EngineState.Name(i.state).removeprefix("ENGINE_STATE_").lower()
    return [i.instance_id, i.agent_name, i.track, str(i.serving_revision or ""), state, i.endpoint]


def _instances_table(instances: Sequence[Any], *, indent: str = "") -> None:
    table(
        [_instance_row(i) for i in instances],
        ["INSTANCE", "AGENT", "TRACK", "REVISION", "STATE", "ENDPOINT"],
        indent=indent,
    )


async def _instances(cp: ControlPlaneClient, agent: str | None) -> list[Any]:
    request = pb.ListInstancesRequest(agent_name=agent or "")
    return await pages(cp, cp.registry.ListInstances, request, "instances")


async def _workload(cp: ControlPlaneClient, name: str) -> Any:
    reply = await cp.call(cp.agents.GetAgentStatus, pb.GetAgentStatusRequest(agent_name=name))
    return reply.status


def _workload_json(status: Any) -> dict[str, Any]:
    return as_json(status)


def _agent_manifest(agent: Any, workload: Any | None) -> Any:
    record = agent_json(agent)
    fields = ("revision", "createdAt", "author", "message", "resolved")
    status: dict[str, Any] = {k: record[k] for k in fields if k in record}
    if workload is not None and workload.phase != "NotRunning":
        full = _workload_json(workload)
        status["workload"] = {
            k: full.get(k)
            for k in ("phase", "readyReplicas", "desiredReplicas", "tracks", "instances",
                      "lastError")
            if k in full
        }  # fmt: skip
    return manifest("Agent", agent.name, record["spec"], status)


def _workload_table(status: Any, *, indent: str = "") -> None:
    """The instances of an agent's workload, as the controller observed them."""
    table(
        [
            [i.instance_id, i.track, i.phase, "yes" if i.ready else "no",
             str(i.serving_revision or "-"), str(i.restarts), i.last_error]
            for i in status.instances
        ],
        ["INSTANCE", "TRACK", "PHASE", "READY", "REVISION", "RESTARTS", "LAST ERROR"],
        indent=indent,
    )  # fmt: skip


async def _get_agent(cp: ControlPlaneClient, name: str, revision: int | None = None) -> Any:
    reply = await cp.call(
        cp.agents.GetAgent, pb.GetAgentRequest(agent_name=name, revision=revision or 0)
    )
    return reply.agent


async def _list_agents(cp: ControlPlaneClient) -> list[Any]:
    return await pages(cp, cp.agents.ListAgents, pb.ListAgentsRequest(), "agents")


async def cmd_get(args: argparse.Namespace, ctx: Context) -> int:
    resource = args.resource.rstrip("s") if args.resource != "instances" else "instance"
    if args.version is not None and resource != "prompt":
        raise UsageError("--version is for `get prompt NAME`")
    cp = ctx.cp
    if resource == "instance":
        instances = await _instances(cp, args.name)
        if args.output == "table":
            _instances_table(instances)
        else:
            print_data([as_json(i) for i in instances], args.output)
        return EXIT_OK
    if resource == "agent" and args.name:
        agent, workload = await asyncio.gather(
            _get_agent(cp, args.name, args.revision), _workload(cp, args.name)
        )
        output = "yaml" if args.output == "table" else args.output
        print_manifests([_agent_manifest(agent, workload)], output)
        return EXIT_OK
    if resource == "agent":
        agents = await _list_agents(cp)
        if args.output != "table":
            print_data([agent_json(a) for a in agents], args.output)
            return EXIT_OK
        table(
            [
                [
                    a.name,
                    f"{a.status.ready_replicas}/{a.status.desired_replicas}"
                    if a.HasField("status") else "-",
                    a.status.phase if a.HasField("status") else "-",
                    str(a.revision_info.revision),
                    as_json(a.revision_info).get("createdAt", "")[:19],
                    a.revision_info.author,
                ]
                for a in agents
            ],
            ["NAME", "READY", "STATUS", "REVISION", "UPDATED", "BY"],
        )  # fmt: skip
        return EXIT_OK
    if resource == "prompt":
        return await prompts.get(cp, args.name, args.version, args.output)
    if resource == "release":
        return await releases.get(cp, args.name, args.output)
    return await mcp.get(cp, args.name, args.output)


async def _describe_warnings(cp: ControlPlaneClient, agent: Any) -> list[str]:
    """What in the agent's spec points at nothing stored (yet): partners, MCP servers,
    its prompt (a prompt deleted since the apply)."""
    spec = AgentSpec.model_validate(message_json(agent.spec))
    agents, servers, stored = await asyncio.gather(
        _list_agents(cp), mcp.names(cp), prompts.versions_by_key(cp)
    )
    labels = (
        await prompts.labels(cp, spec.base.prompt_key) if spec.base.prompt_key in stored else []
    )
    errors, warnings = prompt_issues(spec, stored, labels)
    names = [a.name for a in agents if a.name.lower() != agent.name.lower()]
    warnings += reference_warnings(spec, agents=names, mcp_servers=servers)
    return [f"{i.path}: {i.message}" for i in (*errors, *warnings)]


async def _history(cp: ControlPlaneClient, name: str) -> list[dict[str, Any]]:
    """Every revision of an agent, oldest first."""
    found = await pages(
        cp, cp.agents.ListAgentRevisions, pb.ListAgentRevisionsRequest(agent_name=name), "revisions"
    )
    return [revision_json(r) for r in reversed(found)]


def _history_table(records: list[dict[str, Any]], *, indent: str = "") -> None:
    table(
        [
            [
                str(r["revision"]),
                str(r["createdAt"])[:19],
                str(r["author"]),
                prompt_text(r.get("resolved")),
                str(r["message"]),
            ]
            for r in records
        ],
        ["REVISION", "CREATED", "AUTHOR", "PROMPT", "MESSAGE"],
        indent=indent,
    )


async def cmd_describe(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    agent = await _get_agent(cp, args.name)  # 404 first, before anything else
    history, release, instances, warnings, grants, workload = await asyncio.gather(
        _history(cp, args.name),
        releases.fetch(cp, args.name),
        _instances(cp, args.name),
        _describe_warnings(cp, agent),
        secrets.grants(cp, args.name),
        _workload(cp, args.name),
    )
    if args.output != "text":
        print_data(
            {
                "agent": agent_json(agent),
                "release": release,
                "history": history,
                "workload": _workload_json(workload),
                "instances": [as_json(i) for i in instances],
                "warnings": warnings,
                "sharedSecrets": grants,
            },
            args.output,
        )
        return EXIT_OK
    spec: dict[str, Any] = message_json(agent.spec)
    base = spec.get("base") or {}
    model = spec.get("model") or {}
    info = agent.revision_info
    out = sys.stdout
    out.write(f"Name:         {agent.name}\n")
    out.write(f"Description:  {base.get('description', '')}\n")
    created = as_json(info).get("createdAt", "")[:19]
    out.write(f"Revision:     {info.revision} (by {info.author} at {created})\n")
    out.write(f"Model:        {model.get('model', '')}\n")
    out.write(f"Prompt:       {base.get('promptKey', '')}\n")
    partners = [p.get("agentName", "") for p in spec.get("partnerAgents") or []]
    tools = [m.get("mcpServerName", "") for m in spec.get("mcpServers") or []]
    out.write(f"MCP servers:  {', '.join(tools) or '-'}\n")
    out.write(f"Partners:     {', '.join(partners) or '-'}\n")
    out.write(f"Release:      {releases.line(agent.name, release).split(': ', 1)[1]}\n")
    shared = [f"{g['secret']} (by {g.get('grantedBy', '?')})" for g in grants]
    out.write(f"Shared:       {', '.join(shared) or '-'}\n")
    if warnings:
        out.write(f"Warnings ({len(warnings)}):\n")
        for w in warnings:
            out.write(f"  {w}\n")
    tracks = ", ".join(f"{t} {v.ready}/{v.desired}" for t, v in sorted(workload.tracks.items()))
    out.write(
        f"Workload:     {workload.phase or '-'}, ready "
        f"{workload.ready_replicas}/{workload.desired_replicas}"
        + (f" ({tracks})" if tracks else "")
        + (f" on the {workload.runtime} runtime" if workload.runtime else "")
        + "\n"
    )
    if workload.last_error:
        out.write(f"Last error:   {workload.last_error}\n")
    if workload.instances:
        _workload_table(workload, indent="  ")
    out.write(f"Registered instances ({len(instances)}):\n")
    if instances:
        _instances_table(instances, indent="  ")
    out.write(f"History ({len(history)} revisions, newest last):\n")
    _history_table(history[-10:], indent="  ")
    out.write("Spec:\n")
    for line in yaml.safe_dump(spec, sort_keys=False, allow_unicode=True).splitlines():
        out.write(f"  {line}\n")
    return EXIT_OK


# ---------------------------------------------------------------- history, diff, rollback...


async def cmd_history(args: argparse.Namespace, ctx: Context) -> int:
    records = await _history(ctx.cp, args.agent)
    if args.output == "table":
        _history_table(records)
    else:
        print_data(records, args.output)
    return EXIT_OK


async def cmd_diff(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    reply = await cp.call(
        cp.agents.DiffAgentRevisions,
        pb.DiffAgentRevisionsRequest(
            agent_name=args.agent, from_revision=args.from_revision, to_revision=args.to_revision
        ),
    )
    changes = [change_json(c) for c in reply.changes]
    if args.output != "text":
        print_data(changes, args.output)
        return EXIT_OK
    for c in changes:
        write(str(Change(path=c["path"], op=c["op"], old=c.get("old"), new=c.get("new"))))
    if not changes:
        write("no differences")
    return EXIT_OK


async def cmd_rollback(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    request = pb.RollbackAgentRequest(agent_name=args.agent, revision=args.revision)
    if args.expected_revision is not None:
        request.expected_revision = args.expected_revision
    reply = await cp.call(cp.agents.RollbackAgent, request)
    if args.output != "text":
        print_data(
            {**agent_json(reply.agent), "changes": [change_json(c) for c in reply.changes]},
            args.output,
        )
        return EXIT_OK
    write(
        f"agent/{args.agent} rolled back to revision {args.revision} "
        f"as revision {reply.agent.revision_info.revision}"
    )
    return EXIT_OK


async def cmd_scale(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    request = pb.ScaleAgentRequest(agent_name=args.name, replicas=args.replicas, track=args.track)
    if args.expected_revision is not None:
        request.expected_revision = args.expected_revision
    reply = await cp.call(cp.agents.ScaleAgent, request)
    if args.output != "text":
        print_data(
            {
                "agent": args.name,
                "changed": reply.created_revision,
                "revision": reply.agent.revision_info.revision,
                "changes": [change_json(c) for c in reply.changes],
                "warnings": list(reply.warnings),
            },
            args.output,
        )
        return EXIT_OK
    what = (
        f"revision {reply.agent.revision_info.revision}" if reply.created_revision else "unchanged"
    )
    write(
        f"agent/{args.name} scaled: {args.track} {args.replicas} ({what}); "
        "`specmesh get agents` shows the instances as they come and go"
    )
    for w in reply.warnings:
        sys.stderr.write(f"warning: {w}\n")
    return EXIT_OK


async def cmd_delete(args: argparse.Namespace, ctx: Context) -> int:
    cp = ctx.cp
    request = pb.DeleteAgentRequest(agent_name=args.name)
    if args.expected_revision is not None:
        request.expected_revision = args.expected_revision
    await cp.call(cp.agents.DeleteAgent, request)
    write(f"agent/{args.name} deleted")
    return EXIT_OK


# ---------------------------------------------------------------- parser


def register(r: Registrar) -> None:
    p = r.local("validate", "validate manifests (no service needed)", cmd_validate)
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="file or folder (repeatable)"
    )
    r.output(p, "text", ("text", "json"))

    p = r.api("apply", "validate and store manifests; secrets go to Vault", cmd_apply)
    p.add_argument("-f", "--filename", action="append", required=True)
    p.add_argument(
        "--expected-revision",
        type=int,
        default=None,
        help="refuse unless the agent is at this revision (0: must not exist)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate only; write nothing")
    r.output(p, "text", ("text", "json", "yaml"))

    p = r.api(
        "get",
        "list or show agents, prompts, mcpservers, releases, instances "
        "(-o yaml of one object is a manifest `apply -f` takes back)",
        cmd_get,
    )
    p.add_argument(
        "resource",
        choices=["agents", "agent", "prompts", "prompt", "mcpservers", "mcpserver",
                 "releases", "release", "instances", "instance"],
    )  # fmt: skip
    p.add_argument("name", nargs="?", help="one object (an agent, prompt key, MCP server...)")
    p.add_argument("--revision", type=int, default=None, help="an agent's revision")
    p.add_argument("--version", default=None, help="a prompt's version (prints its text)")
    r.output(p, "table", ("table", "json", "yaml"))

    p = r.api("describe", "an agent: spec, release, live instances, history", cmd_describe)
    p.add_argument("resource", choices=["agent"])
    p.add_argument("name")
    r.output(p, "text", ("text", "json", "yaml"))

    p = r.api("history", "revisions of an agent", cmd_history)
    p.add_argument("agent")
    r.output(p, "table", ("table", "json", "yaml"))

    p = r.api("diff", "differences between two revisions of an agent", cmd_diff)
    p.add_argument("agent")
    p.add_argument("from_revision", type=int)
    p.add_argument("to_revision", type=int)
    r.output(p, "text", ("text", "json", "yaml"))

    p = r.api("rollback", "a new revision equal to an old one", cmd_rollback)
    p.add_argument("agent")
    p.add_argument("revision", type=int)
    p.add_argument("--expected-revision", type=int, default=None)
    r.output(p, "text", ("text", "json", "yaml"))

    p = r.api("scale", "set the instances of an agent's track (a new revision)", cmd_scale)
    p.add_argument("resource", choices=["agent"])
    p.add_argument("name")
    p.add_argument("--replicas", type=int, required=True, help="instances, 0 to 100")
    p.add_argument("--track", choices=["stable", "canary"], default="stable")
    p.add_argument("--expected-revision", type=int, default=None)
    r.output(p, "text", ("text", "json", "yaml"))

    p = r.api("delete", "delete an agent (its audit stays)", cmd_delete)
    p.add_argument("resource", choices=["agent"])
    p.add_argument("name")
    p.add_argument("--expected-revision", type=int, default=None)
