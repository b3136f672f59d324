"""The ``specmesh`` command.

Exit codes a script can rely on::

    0  done
    1  the spec or request is invalid (every problem is printed, with its path)
    2  bad usage (arguments; a control-plane-only command without a control plane)
    3  conflict: the expected revision is stale, or a name collides
    4  not found
    5  etcd, Vault or the control plane is unavailable
    6  any other specmesh error
    7  not allowed: no or unknown token (401), or the token's roles may not (403)

Where writes go: when a control plane is configured (``SPECMESH_SERVER`` / ``--server``
with ``SPECMESH_TOKEN`` / ``SPECMESH_TOKEN_FILE`` / ``--token``, or the local fleet of
``specmesh up``), ``apply``, ``get``, ``describe``, ``history``, ``diff``, ``rollback``,
``delete``, ``release``, ``mesh render`` and ``audit`` go through its REST API
(:mod:`specmesh.apiclient`). Without one, ``apply``, ``get``, ``history``, ``diff``,
``rollback``, ``delete`` and ``audit`` write etcd and Vault directly through
:class:`specmesh.specservice.SpecService`; ``describe``, ``release``, ``mesh render``,
``token`` and ``get instances`` need the control plane and exit 2.

``invoke`` and ``chat`` go through the agent's public entry, as any A2A client does: they
get the agent's card (``GET /api/v1/agents/{name}/card``: the entry's URLs) and an invoke
token (``POST /api/v1/agents/{name}/invoke-token``, the caller's API token; role operator,
admin or invoker) from the control plane, and call with the official a2a-sdk client built
from that card. The agent's ``callers.principals`` must admit ``specmesh/<token name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from specmesh.apiclient import ApiClient, ControlPlaneUnavailableError, NotAllowedError
from specmesh.errors import (
    ConflictError,
    NameCollisionError,
    NotFoundError,
    SecretUnavailableError,
    SpecError,
    SpecmeshError,
    StoreUnavailableError,
)
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.names import resource_name
from specmesh.settings import Settings
from specmesh.spec.diff import Change
from specmesh.spec.manifest import LoadedManifest, load_path
from specmesh.spec.models import API_VERSION, AgentSpec
from specmesh.spec.validation import prompt_issues, reference_warnings
from specmesh.specservice import SpecService
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

__all__ = ["main"]

logger = logging.getLogger(__name__)

(
    EXIT_OK,
    EXIT_INVALID,
    EXIT_USAGE,
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_OTHER,
    EXIT_NOT_ALLOWED,
) = range(8)
EXIT_BROKEN_PIPE = 141
"""The reader of standard output went away (``specmesh ... | head``), as a shell's SIGPIPE."""


class UsageError(SpecmeshError):
    """The command cannot run as asked (exit 2), e.g. it needs a control plane."""


def _needs_server(command: str) -> UsageError:
    return UsageError(
        f"`specmesh {command}` talks to the control plane, and none is configured: set "
        "SPECMESH_SERVER (with SPECMESH_TOKEN or SPECMESH_TOKEN_FILE), pass --server/--token, "
        "or start the local fleet with `specmesh up`"
    )


def _exit_code(error: SpecmeshError) -> int:
    table: list[tuple[type[SpecmeshError], int]] = [
        (SpecError, EXIT_INVALID),
        (UsageError, EXIT_USAGE),
        (ConflictError, EXIT_CONFLICT),
        (NameCollisionError, EXIT_CONFLICT),
        (NotFoundError, EXIT_NOT_FOUND),
        (StoreUnavailableError, EXIT_UNAVAILABLE),
        (SecretUnavailableError, EXIT_UNAVAILABLE),
        (ControlPlaneUnavailableError, EXIT_UNAVAILABLE),
        (NotAllowedError, EXIT_NOT_ALLOWED),
        (AgentCallRefusedError, EXIT_NOT_ALLOWED),
        (FleetNotRunningError, EXIT_UNAVAILABLE),
        (InvokeTimeoutError, EXIT_UNAVAILABLE),
    ]
    for kind, code in table:
        if isinstance(error, kind):
            return code
    return EXIT_OTHER


def _print(data: Any, output: str) -> None:
    if output == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _table(rows: list[list[str]], header: list[str], *, indent: str = "") -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        sys.stdout.write(indent + "  ".join(cells).rstrip() + "\n")


class _Context:
    """The clients a command needs, opened lazily and closed at the end."""

    def __init__(self, settings: Settings, stack: AsyncExitStack) -> None:
        self.settings = settings
        self._stack = stack
        self._store: SpecStore | None = None
        self._service: SpecService | None = None
        self._api: ApiClient | None = None

    @property
    def remote(self) -> bool:
        """Whether commands go through the control plane's API (an empty SPECMESH_SERVER
        turns the local fleet's default off: direct etcd/Vault)."""
        return bool(self.settings.server)

    @property
    def api(self) -> ApiClient:
        if self._api is None:
            server = self.settings.server or ""
            if not server.startswith(("http://", "https://")):
                raise UsageError(f"control-plane URL {server!r} must start with http(s)://")
            self._api = ApiClient(server=server, token=self._token())
            self._stack.push_async_callback(self._api.close)
        return self._api

    def _token(self) -> str | None:
        if self.settings.token is not None:
            return self.settings.token.get_secret_value().strip() or None
        path = self.settings.token_file
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as e:
            raise UsageError(f"cannot read the token file {path}: {e.strerror}") from e

    @property
    def store(self) -> SpecStore:
        if self._store is None:
            assert self.settings.etcd_endpoint is not None
            etcd = EtcdClient.from_endpoint(self.settings.etcd_endpoint)
            self._stack.push_async_callback(etcd.close)
            self._store = SpecStore(etcd=etcd, keys=Keys(prefix=self.settings.etcd_prefix))
        return self._store

    @property
    def service(self) -> SpecService:
        if self._service is None:
            if not self.settings.vault_addr or not self.settings.vault_token:
                raise SecretUnavailableError(
                    address=self.settings.vault_addr or "(unset)",
                    reason="no Vault address/token: set SPECMESH_VAULT_ADDR and "
                    "SPECMESH_VAULT_TOKEN, or run `specmesh services up`",
                )
            vault = VaultClient(address=self.settings.vault_addr, token=self.settings.vault_token)
            self._stack.push_async_callback(vault.close)
            self._service = SpecService(
                store=self.store, vault=vault, kv_mount=self.settings.vault_kv_mount
            )
        return self._service


# ---------------------------------------------------------------- commands


def _load_all(paths: Sequence[str]) -> list[LoadedManifest]:
    loaded: list[LoadedManifest] = []
    for p in paths:
        loaded.extend(load_path(p))
    return loaded


def _local_warnings(loaded: list[LoadedManifest]) -> dict[int, list[str]]:
    """Per agent manifest (by index): its prompt, partners and MCP servers that none of the
    manifests given defines. Only warnings: they may be stored already (`apply` checks)."""
    prompts: dict[str, list[str]] = {}
    labels: dict[str, list[str]] = {}
    for m in loaded:
        if m.kind == "Prompt":
            prompts.setdefault(m.name, []).append(m.manifest.spec.version)
            if m.manifest.spec.release is not None:
                labels.setdefault(m.name, []).extend(m.manifest.spec.release.labels)
    agents = [m.name for m in loaded if m.kind == "Agent"]
    servers = [m.name for m in loaded if m.kind == "McpServer"]
    out: dict[int, list[str]] = {}
    for i, m in enumerate(loaded):
        if m.kind != "Agent":
            continue
        spec = m.manifest.spec
        errors, warnings = prompt_issues(spec, prompts, labels.get(spec.base.prompt_key, []))
        others = [a for a in agents if a.lower() != m.name.lower()]
        warnings += reference_warnings(spec, agents=others, mcp_servers=servers)
        found = [f"spec.{w.path}: {w.message}" for w in (*errors, *warnings)]
        if found:
            out[i] = found
    return out


async def cmd_validate(args: argparse.Namespace, ctx: _Context) -> int:
    loaded = _load_all(args.filename)
    warnings = _local_warnings(loaded)
    if args.output == "json":
        rows: list[dict[str, Any]] = [
            {"kind": m.kind, "name": m.name, "source": m.source} for m in loaded
        ]
        for i, row in enumerate(rows):
            row["warnings"] = warnings.get(i, [])
        _print(rows, "json")
        return EXIT_OK
    for i, m in enumerate(loaded):
        sys.stdout.write(f"valid: {m.kind}/{m.name} ({m.source})\n")
        for w in warnings.get(i, []):
            sys.stdout.write(f"  warning: {w} (not among the manifests given)\n")
    return EXIT_OK


async def _apply_one(ctx: _Context, m: LoadedManifest, args: argparse.Namespace) -> dict[str, Any]:
    if ctx.remote:
        return await ctx.api.apply(
            m.manifest.model_dump(mode="json", by_alias=True),
            expected_revision=args.expected_revision,
            dry_run=args.dry_run,
            source=m.source,
        )
    outcome = await ctx.service.apply(
        m,
        actor=ctx.settings.actor,
        expected_revision=args.expected_revision,
        dry_run=args.dry_run,
    )
    return outcome.to_json()


async def cmd_apply(args: argparse.Namespace, ctx: _Context) -> int:
    loaded = _load_all(args.filename)  # every file is validated before anything is written
    order = {"McpServer": 0, "Prompt": 1, "Agent": 2, "Release": 3}
    loaded.sort(key=lambda m: order[m.kind])
    if args.expected_revision is not None and sum(m.kind == "Agent" for m in loaded) != 1:
        raise SpecError([], source="--expected-revision needs exactly one agent manifest")
    outcomes = []
    for m in loaded:
        outcome = await _apply_one(ctx, m, args)
        outcomes.append(outcome)
        if args.output == "text":
            verb = "unchanged" if not outcome["changed"] else "configured"
            if args.dry_run:
                verb = "valid (dry run)"
            rev = f" (revision {outcome['revision']})" if outcome.get("revision") else ""
            sys.stdout.write(f"{outcome['kind'].lower()}/{outcome['name']} {verb}{rev}\n")
            for w in outcome.get("warnings", []):
                sys.stdout.write(f"  warning: {w}\n")
            for s in outcome.get("secretsMoved", []):
                sys.stdout.write(f"  secret moved to Vault: {s}\n")
    if args.output != "text":
        _print(outcomes, args.output)
    return EXIT_OK


def _instances_table(instances: list[dict[str, Any]], *, indent: str = "") -> None:
    _table(
        [
            [
                str(i.get("instance", "")),
                str(i.get("agent", "")),
                str(i.get("track", "")),
                str(i.get("revision", "")),
                str(i.get("state", "")),
                str(i.get("endpoint", "")),
            ]
            for i in instances
        ],
        ["INSTANCE", "AGENT", "TRACK", "REVISION", "STATE", "ENDPOINT"],
        indent=indent,
    )


def _manifest(kind: str, name: str, spec: Any, status: dict[str, Any] | None = None) -> Any:
    """An object as ``get -o yaml|json`` prints it: a manifest ``apply -f`` takes back
    unchanged (``status`` is read-only and ignored by apply, as in kubectl)."""
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }
    if status:
        doc["status"] = status
    return doc


def _print_manifests(docs: list[Any], output: str) -> None:
    if output == "json":
        _print(docs[0] if len(docs) == 1 else docs, "json")
    else:
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True))


async def _agent_workload(ctx: _Context, name: str) -> dict[str, Any] | None:
    """The agent's observed workload (None when no controller reported on it)."""
    if ctx.remote:
        status = await ctx.api.agent_status(name)
        return None if status.get("phase") == "NotRunning" else status
    return await ctx.store.get_status(name)


async def _agent_record(ctx: _Context, name: str, revision: int | None) -> dict[str, Any]:
    if ctx.remote:
        return await ctx.api.get_agent(name, revision)
    return (await ctx.store.get_agent(name, revision)).to_json()


def _agent_manifest(record: dict[str, Any], workload: dict[str, Any] | None = None) -> Any:
    status = {k: record[k] for k in ("revision", "createdAt", "author", "action", "message")}
    if record.get("rolledBackFrom") is not None:
        status["rolledBackFrom"] = record["rolledBackFrom"]
    if workload is not None:
        status["workload"] = {
            k: workload.get(k) for k in ("phase", "ready", "tracks", "instances", "lastError")
        }
    return _manifest("Agent", record["agent"], record["spec"], status)


def _workload_table(status: dict[str, Any], *, indent: str = "") -> None:
    """The instances of an agent's workload, as the controller observed them."""
    _table(
        [
            [
                str(i.get("instance", "")),
                str(i.get("track", "")),
                str(i.get("phase", "")),
                "yes" if i.get("ready") else "no",
                str(i.get("revision") or "-"),
                str(i.get("restarts", 0)),
                str(i.get("lastError") or ""),
            ]
            for i in status.get("instances", [])
        ],
        ["INSTANCE", "TRACK", "PHASE", "READY", "REVISION", "RESTARTS", "LAST ERROR"],
        indent=indent,
    )


async def _prompt(ctx: _Context, key: str) -> dict[str, Any]:
    """``{promptKey, versions, release}`` of one prompt (NotFoundError without versions)."""
    if ctx.remote:
        return await ctx.api.get_prompt(key)
    versions = await ctx.store.list_prompt_versions(key)
    if not versions:
        raise NotFoundError(kind="prompt", name=key)
    release = await ctx.store.get_prompt_release(key)
    return {
        "promptKey": key,
        "versions": [v.model_dump(mode="json") for v in versions],
        "release": release.model_dump(mode="json") if release else None,
    }


def _prompt_manifests(prompt: dict[str, Any], version: str | None) -> list[Any]:
    versions = prompt["versions"]
    if version is not None:
        versions = [v for v in versions if v["version"] == version]
        if not versions:
            raise NotFoundError(kind="prompt version", name=f"{prompt['promptKey']}@{version}")
    docs = []
    for v in versions:
        spec = {k: v[k] for k in ("version", "template", "variables", "description")}
        docs.append(_manifest("Prompt", prompt["promptKey"], spec))
    if prompt.get("release") and version is None:
        docs[-1]["spec"]["release"] = prompt["release"]  # applied once, with the last version
    return docs


def _prompt_table(prompt: dict[str, Any]) -> None:
    release = prompt.get("release") or {}
    labels: dict[str, list[str]] = {}
    for label, v in (release.get("labels") or {}).items():
        labels.setdefault(v, []).append(label)
    weights = release.get("weights") or {}
    _table(
        [
            [
                v["version"],
                ", ".join(sorted(labels.get(v["version"], []))) or "-",
                f"{weights[v['version']]}%" if v["version"] in weights else "-",
                str(v.get("description", "")),
            ]
            for v in prompt["versions"]
        ],
        ["VERSION", "LABELS", "WEIGHT", "DESCRIPTION"],
    )


async def _mcp_servers(ctx: _Context) -> dict[str, dict[str, Any]]:
    if ctx.remote:
        return await ctx.api.list_mcp_servers()
    return {n: s.model_dump(mode="json") for n, s in (await ctx.store.list_mcp_servers()).items()}


async def _mcp_tool_status(ctx: _Context) -> dict[str, dict[str, Any]]:
    """``{name: {tools: [names], refreshedAt, error, credentialsFrom}}`` as the control plane
    last listed them (nothing without a control plane: only it connects to the servers)."""
    if not ctx.remote:
        return {}
    return {
        name: {
            "tools": [t["name"] for t in listing.get("tools") or []],
            **{k: listing.get(k) for k in ("refreshedAt", "error", "credentialsFrom")},
        }
        for name, listing in (await ctx.api.mcp_tool_listings()).items()
    }


def _tools_cell(status: dict[str, Any] | None) -> str:
    if status is None:
        return "-"
    return str(len(status["tools"])) + (" (stale)" if status.get("error") else "")


async def _release(ctx: _Context, agent: str) -> dict[str, Any] | None:
    if ctx.remote:
        return await ctx.api.get_release(agent)
    release = await ctx.store.get_release(agent)
    return release.model_dump(mode="json") if release else None


async def cmd_get(args: argparse.Namespace, ctx: _Context) -> int:
    resource = args.resource.rstrip("s") if args.resource != "instances" else "instance"
    if args.version is not None and resource != "prompt":
        raise UsageError("--version is for `get prompt NAME`")
    if resource == "instance":
        if not ctx.remote:
            raise _needs_server("get instances")
        instances = await ctx.api.list_instances(args.name)
        if args.output == "table":
            _instances_table(instances)
        else:
            _print(instances, args.output)
        return EXIT_OK
    if resource == "agent" and args.name:
        record = await _agent_record(ctx, args.name, args.revision)
        workload = await _agent_workload(ctx, args.name)
        _print_manifests(
            [_agent_manifest(record, workload)], "yaml" if args.output == "table" else args.output
        )
        return EXIT_OK
    if resource == "agent":
        if ctx.remote:
            agents = await ctx.api.list_agents()
        else:
            statuses = await ctx.store.list_statuses()
            agents = []
            for a in await ctx.store.list_agents():
                status = statuses.get(resource_name(a.name))
                summary = {"phase": status["phase"], "ready": status["ready"]} if status else None
                agents.append({**a.to_json(), "status": summary})
        if args.output == "table":
            _table(
                [
                    [
                        a["name"],
                        (a.get("status") or {}).get("ready", "-"),
                        (a.get("status") or {}).get("phase", "-"),
                        str(a["revision"]),
                        a["updatedAt"][:19],
                        a["updatedBy"],
                    ]
                    for a in agents
                ],
                ["NAME", "READY", "STATUS", "REVISION", "UPDATED", "BY"],
            )
        else:
            _print(agents, args.output)
        return EXIT_OK
    if resource == "prompt" and args.name:
        prompt = await _prompt(ctx, args.name)
        if args.output != "table":
            _print_manifests(_prompt_manifests(prompt, args.version), args.output)
        elif args.version is not None:
            (doc,) = _prompt_manifests(prompt, args.version)
            sys.stdout.write(doc["spec"]["template"].rstrip("\n") + "\n")
        else:
            _prompt_table(prompt)
        return EXIT_OK
    if resource == "prompt":
        prompts = await ctx.api.list_prompts() if ctx.remote else await ctx.store.list_prompts()
        if args.output == "table":
            _table([[k, ", ".join(v)] for k, v in sorted(prompts.items())], ["KEY", "VERSIONS"])
        else:
            _print(prompts, args.output)
        return EXIT_OK
    if resource == "release":
        if not args.name:
            raise UsageError("`get release` needs the agent's name: `get release NAME`")
        release = await _release(ctx, args.name)
        if release is None:
            raise NotFoundError(kind="release of agent", name=args.name)
        doc = _manifest("Release", args.name, release)
        if args.output == "table":
            sys.stdout.write(_release_line(args.name, release) + "\n")
        else:
            _print_manifests([doc], args.output)
        return EXIT_OK
    servers = await _mcp_servers(ctx)
    tools = await _mcp_tool_status(ctx)
    if args.name:
        if args.name not in servers:
            raise NotFoundError(kind="MCP server", name=args.name)
        servers = {args.name: servers[args.name]}
        if args.output != "table":
            doc = _manifest("McpServer", args.name, servers[args.name], tools.get(args.name))
            _print_manifests([doc], args.output)
            return EXIT_OK
    if args.output == "table":
        _table(
            [
                [
                    n,
                    str(s.get("transport", "")),
                    str(s.get("url", "")),
                    _tools_cell(tools.get(n)),
                    (tools.get(n) or {}).get("error") or "-",
                ]
                for n, s in sorted(servers.items())
            ],
            ["NAME", "TRANSPORT", "URL", "TOOLS", "LAST ERROR"],
        )
    else:
        _print(
            {n: {**s, **({"status": tools[n]} if n in tools else {})} for n, s in servers.items()},
            args.output,
        )
    return EXIT_OK


async def _history(ctx: _Context, agent: str) -> list[dict[str, Any]]:
    if ctx.remote:
        return await ctx.api.history(agent)
    return [
        {k: v for k, v in r.to_json().items() if k != "spec"}
        for r in await ctx.store.history(agent)
    ]


def _history_table(records: list[dict[str, Any]], *, indent: str = "") -> None:
    _table(
        [
            [
                str(r["revision"]),
                str(r.get("createdAt", ""))[:19],
                str(r.get("author", "")),
                str(r.get("action", "")),
                str(r.get("message", "")),
            ]
            for r in records
        ],
        ["REVISION", "CREATED", "AUTHOR", "ACTION", "MESSAGE"],
        indent=indent,
    )


async def cmd_history(args: argparse.Namespace, ctx: _Context) -> int:
    records = await _history(ctx, args.agent)
    if args.output == "table":
        _history_table(records)
    else:
        _print(records, args.output)
    return EXIT_OK


async def cmd_diff(args: argparse.Namespace, ctx: _Context) -> int:
    if ctx.remote:
        changes = await ctx.api.diff(args.agent, args.from_revision, args.to_revision)
    else:
        found = await ctx.store.diff(args.agent, args.from_revision, args.to_revision)
        changes = [c.to_json() for c in found]
    if args.output == "text":
        for c in changes:
            change = Change(path=c["path"], op=c["op"], old=c.get("old"), new=c.get("new"))
            sys.stdout.write(f"{change}\n")
        if not changes:
            sys.stdout.write("no differences\n")
    else:
        _print(changes, args.output)
    return EXIT_OK


async def cmd_rollback(args: argparse.Namespace, ctx: _Context) -> int:
    if ctx.remote:
        result = await ctx.api.rollback(
            args.agent, args.revision, expected_revision=args.expected_revision
        )
    else:
        done = await ctx.store.rollback(
            args.agent,
            args.revision,
            actor=ctx.settings.actor,
            expected_revision=args.expected_revision,
        )
        result = done.to_json()
    if args.output == "text":
        sys.stdout.write(
            f"agent/{args.agent} rolled back to revision {args.revision} "
            f"as revision {result['revision']}\n"
        )
    else:
        _print(result, args.output)
    return EXIT_OK


async def cmd_scale(args: argparse.Namespace, ctx: _Context) -> int:
    if not ctx.remote:
        raise _needs_server("scale")
    result = await ctx.api.scale(
        args.name, args.replicas, track=args.track, expected_revision=args.expected_revision
    )
    if args.output == "text":
        what = "unchanged" if not result.get("changed") else f"revision {result['revision']}"
        sys.stdout.write(
            f"agent/{args.name} scaled: {args.track} {args.replicas} ({what}); "
            f"`specmesh get agents` shows the instances as they come and go\n"
        )
        for w in result.get("warnings", []):
            sys.stderr.write(f"warning: {w}\n")
    else:
        _print(result, args.output)
    return EXIT_OK


async def cmd_delete(args: argparse.Namespace, ctx: _Context) -> int:
    if ctx.remote:
        await ctx.api.delete_agent(args.name, expected_revision=args.expected_revision)
    else:
        await ctx.store.delete_agent(
            args.name, actor=ctx.settings.actor, expected_revision=args.expected_revision
        )
    sys.stdout.write(f"agent/{args.name} deleted\n")
    return EXIT_OK


async def cmd_grant(args: argparse.Namespace, ctx: _Context) -> int:
    if not ctx.remote:
        raise _needs_server(f"grant {args.action}")
    if args.action == "list":
        grants = await ctx.api.list_grants(args.agent)
        if args.output == "table":
            _table(
                [
                    [g["agent"], g["secret"], str(g.get("grantedBy", "")), g["grantedAt"][:19]]
                    for g in grants
                ],
                ["AGENT", "SECRET", "BY", "SINCE"],
            )
        else:
            _print(grants, args.output)
        return EXIT_OK
    if args.action == "create":
        done = await ctx.api.share_secret(args.agent, args.secret)
        sys.stdout.write(f"shared {done['secret']} with agent/{args.agent}\n")
    else:
        await ctx.api.unshare_secret(args.agent, args.secret)
        sys.stdout.write(f"stopped sharing {args.secret} with agent/{args.agent}\n")
    return EXIT_OK


async def cmd_secrets(args: argparse.Namespace, ctx: _Context) -> int:
    if not ctx.remote:
        raise _needs_server("secrets gc")
    report = await ctx.api.collect_garbage(args.grace)
    if args.output != "text":
        _print(report, args.output)
        return EXIT_OK
    for version in report["destroyed"]:
        sys.stdout.write(f"destroyed {version}\n")
    sys.stdout.write(
        f"{len(report['destroyed'])} unreferenced versions destroyed, {report['kept']} kept\n"
    )
    return EXIT_OK


async def cmd_audit(args: argparse.Namespace, ctx: _Context) -> int:
    if ctx.remote:
        entries = await ctx.api.audit(name=args.name, kind=args.kind, limit=args.limit)
    else:
        found = await ctx.store.audit_entries(name=args.name, kind=args.kind, limit=args.limit)
        entries = [e.to_json() for e in found]
    if args.output == "table":
        _table(
            [
                [
                    str(e["time"])[:19],
                    str(e["actor"]),
                    str(e["action"]),
                    str(e["kind"]),
                    str(e["name"]),
                    str(e.get("revision") or ""),
                ]
                for e in entries
            ],
            ["TIME", "ACTOR", "ACTION", "KIND", "NAME", "REVISION"],
        )
    else:
        _print(entries, args.output)
    return EXIT_OK


# ---------------------------------------------------------------- control-plane-only commands


def _release_line(agent: str, release: dict[str, Any] | None) -> str:
    if release is None:
        return f"release/{agent}: none (the latest revision takes every call)"
    stable = release.get("stableRevision") or "latest"
    canary = release.get("canaryRevision")
    if canary is None:
        return f"release/{agent}: stable revision {stable}, no canary"
    line = (
        f"release/{agent}: stable revision {stable}, canary revision {canary} "
        f"at {release.get('canaryWeight', 0)}%"
    )
    headers = [_header_text(h) for h in release.get("headerMatch") or []]
    if headers:
        line += f", and calls with {' and '.join(headers)}"
    return line


def _header_text(h: dict[str, Any]) -> str:
    for op, sign in (("exact", "="), ("prefix", "^="), ("regex", "~=")):
        if h.get(op) is not None:
            return f"{h['name']}{sign}{h[op]}"
    return str(h.get("name", ""))


def _show_release(agent: str, release: dict[str, Any] | None, output: str) -> None:
    if output == "text":
        sys.stdout.write(_release_line(agent, release) + "\n")
    else:
        _print(release, output)


def _parse_header(raw: str) -> dict[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--header {raw!r}: expected NAME=VALUE (an exact match)")
    return {"name": name.strip(), "exact": value}


async def cmd_release(args: argparse.Namespace, ctx: _Context) -> int:
    if not ctx.remote:
        raise _needs_server(f"release {args.action}")
    agent = args.agent
    if args.action == "get":
        _show_release(agent, await ctx.api.get_release(agent), args.output)
        return EXIT_OK
    if args.action == "promote":
        _show_release(agent, await ctx.api.promote(agent), args.output)
        return EXIT_OK
    if args.action == "abort":
        _show_release(agent, await ctx.api.abort(agent), args.output)
        return EXIT_OK
    # set: the split (canary revision, weight, header match) is replaced; the stable
    # revision is kept unless given, and so are timeout, retries, outlier detection and
    # connection pool. (Read-modify-write: the release endpoint has no expected revision.)
    release = dict(await ctx.api.get_release(agent) or {})
    release["canaryRevision"] = args.canary_revision
    release["canaryWeight"] = args.weight
    release["headerMatch"] = [_parse_header(h) for h in args.header]
    if args.stable_revision is not None:
        release["stableRevision"] = args.stable_revision
    _show_release(agent, await ctx.api.set_release(agent, release), args.output)
    return EXIT_OK


async def _describe_warnings(api: ApiClient, record: dict[str, Any]) -> list[str]:
    """What in the agent's spec points at nothing stored (yet): partners, MCP servers,
    its prompt (a prompt deleted since the apply)."""
    spec = AgentSpec.model_validate(record["spec"])
    agents, servers, prompts = await asyncio.gather(
        api.list_agents(), api.list_mcp_servers(), api.list_prompts()
    )
    labels: list[str] = []
    if spec.base.prompt_key in prompts:
        prompt = await api.get_prompt(spec.base.prompt_key)
        labels = list(((prompt.get("release") or {}).get("labels") or {}).keys())
    errors, warnings = prompt_issues(spec, prompts, labels)
    names = [a["name"] for a in agents if a["name"].lower() != record["agent"].lower()]
    warnings += reference_warnings(spec, agents=names, mcp_servers=servers)
    return [f"{i.path}: {i.message}" for i in (*errors, *warnings)]


async def cmd_describe(args: argparse.Namespace, ctx: _Context) -> int:
    if not ctx.remote:
        raise _needs_server("describe")
    api = ctx.api
    record = await api.get_agent(args.name)  # 404 first, before anything else
    history, release, instances, warnings, grants, workload = await asyncio.gather(
        api.history(args.name),
        api.get_release(args.name),
        api.list_instances(args.name),
        _describe_warnings(api, record),
        api.list_grants(args.name),
        api.agent_status(args.name),
    )
    if args.output != "text":
        _print(
            {
                "agent": record,
                "release": release,
                "history": history,
                "workload": workload,
                "instances": instances,
                "warnings": warnings,
                "sharedSecrets": grants,
            },
            args.output,
        )
        return EXIT_OK
    spec: dict[str, Any] = record.get("spec") or {}
    base = spec.get("base") or {}
    model = spec.get("model") or {}
    out = sys.stdout
    out.write(f"Name:         {record['agent']}\n")
    out.write(f"Description:  {base.get('description', '')}\n")
    out.write(
        f"Revision:     {record['revision']} ({record.get('action', '')} by "
        f"{record.get('author', '')} at {str(record.get('createdAt', ''))[:19]})\n"
    )
    out.write(f"Model:        {model.get('model', '')}\n")
    out.write(f"Prompt:       {base.get('promptKey', '')}\n")
    partners = [p.get("agentName", "") for p in spec.get("partnerAgents") or []]
    tools = [m.get("mcpServerName", "") for m in spec.get("mcpServers") or []]
    out.write(f"MCP servers:  {', '.join(tools) or '-'}\n")
    out.write(f"Partners:     {', '.join(partners) or '-'}\n")
    out.write(f"Release:      {_release_line(record['agent'], release).split(': ', 1)[1]}\n")
    shared = [f"{g['secret']} (by {g.get('grantedBy', '?')})" for g in grants]
    out.write(f"Shared:       {', '.join(shared) or '-'}\n")
    if warnings:
        out.write(f"Warnings ({len(warnings)}):\n")
        for w in warnings:
            out.write(f"  {w}\n")
    tracks = ", ".join(
        f"{t} {v.get('ready', 0)}/{v.get('desired', 0)}"
        for t, v in (workload.get("tracks") or {}).items()
    )
    out.write(
        f"Workload:     {workload.get('phase', '-')}, ready {workload.get('ready', '0/0')}"
        + (f" ({tracks})" if tracks else "")
        + (f" on the {workload['runtime']} runtime" if workload.get("runtime") else "")
        + "\n"
    )
    if workload.get("lastError"):
        out.write(f"Last error:   {workload['lastError']}\n")
    if workload.get("instances"):
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


async def cmd_mesh(args: argparse.Namespace, ctx: _Context) -> int:
    if not ctx.remote:
        raise _needs_server("mesh render")
    objects = await ctx.api.mesh()
    if args.output == "json":
        _print(objects, "json")
    else:
        sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, allow_unicode=True))
    return EXIT_OK


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl_seconds(raw: str) -> int:
    """``30d``, ``12h``, ``90m``, ``45s`` or plain seconds."""
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in _TTL_UNITS else (raw, "s")
    if not number.isdigit() or int(number) <= 0:
        raise UsageError(f"--ttl {raw!r}: expected a positive number of s, m, h or d (e.g. 30d)")
    return int(number) * _TTL_UNITS[unit]


async def cmd_token(args: argparse.Namespace, ctx: _Context) -> int:
    if not ctx.remote:
        raise _needs_server(f"token {args.action}")
    if args.action == "create":
        ttl = _ttl_seconds(args.ttl) if args.ttl else None
        minted = await ctx.api.create_token(args.name, args.role, ttl_seconds=ttl)
        if args.output != "text":
            _print(minted, args.output)
            return EXIT_OK
        sys.stdout.write(
            f"token/{minted['id']} created for {minted['name']} "
            f"(roles {', '.join(minted['roles'])}), expires at {minted['expiresAt']}\n"
            f"{minted['token']}\n"
        )
        sys.stderr.write("the token is shown only now: store it; `specmesh token revoke "
                         f"{minted['id']}` ends it\n")  # fmt: skip
        return EXIT_OK
    if args.action == "list":
        listed = await ctx.api.list_tokens()
        if args.output != "table":
            _print(listed, args.output)
            return EXIT_OK
        _table(
            [
                [t["id"], t["name"], ",".join(t["roles"]), str(t.get("expiresAt") or "never")[:19],
                 t["state"] + (" (file)" if t.get("source") == "file" else "")]
                for t in listed
            ],
            ["ID", "NAME", "ROLES", "EXPIRES", "STATE"],
        )  # fmt: skip
        return EXIT_OK
    revoked = await ctx.api.revoke_token(args.id)
    sys.stdout.write(f"token/{revoked['id']} ({revoked['name']}) revoked\n")
    return EXIT_OK


def cmd_services(args: argparse.Namespace, settings: Settings) -> int:
    from specmesh.services import LocalServices

    services = LocalServices(home=settings.home.resolve())
    if args.action == "up":
        state = services.start()
        _print(
            {
                "etcd": state["etcdEndpoint"],
                "openbao": state["baoAddress"],
                "home": str(settings.home.resolve()),
            },
            "json",
        )
    elif args.action == "down":
        services.stop()
        sys.stdout.write("stopped\n")
    else:
        _print(services.status(), "json")
    return EXIT_OK


def _fleet(settings: Settings, args: argparse.Namespace | None = None) -> Any:
    from specmesh.fleet import Fleet, FleetOptions

    # No istio_crds: the control plane validates with the Istio CRD schemas it carries.
    options = FleetOptions(home=settings.home)
    if args is not None and getattr(args, "llm_url", None):
        options.llm_url = args.llm_url
    return Fleet(options)


_START_HINT = "start it with `./scripts/up` (or `uv run specmesh up`)"


class FleetNotRunningError(SpecmeshError):
    """The local fleet of ``specmesh up`` is not running (exit 5)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        super().__init__(f"the local fleet ({home}) is not running: {_START_HINT}")


def _running_fleet(settings: Settings) -> dict[str, Any]:
    """The status of the local fleet; FleetNotRunningError when none of it runs."""
    status: dict[str, Any] = _fleet(settings).status()
    if not any(p.get("running") for p in status.get("processes", [])):
        raise FleetNotRunningError(settings.home.resolve())
    return status


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    fleet = _fleet(settings, args)
    fleet.options.reset = args.reset
    state = fleet.up()
    if args.output == "json":
        _print(state, "json")
    else:
        sys.stdout.write(_up_banner(state))
    return EXIT_OK


def _up_banner(state: dict[str, Any]) -> str:
    """What ``specmesh up`` prints: where everything is, one aligned row each."""
    ep = state["endpoints"]
    rows = [
        ["control plane API", f"{ep['controlPlane']}/api/v1  (gRPC {ep['controlPlaneGrpc']})"],
        ["Agent Studio", f"{ep['controlPlane']}/studio/"],
        ["OTLP receiver", ep["otlp"]],
        ["etcd", ep["etcd"]],
        ["OpenBao", ep["openbao"]],
        ["Redis (memory)", f"{ep['redis']}  (password in Vault)"],
        ["model", ep["llm"]],
        *[[f"MCP {name}", url] for name, url in ep["mcp"].items()],
        ["supervisor", f"{ep.get('supervisor', '-')}  (runs every applied agent)"],
        *[
            [
                f"agent {agent} [{track}]",
                f"entry {e.get('entry', '-')} (gRPC {e.get('entryGrpc', '-')})  "
                f"inbound {e['inbound']}",
            ]
            for agent, tracks in sorted(state["agents"].items())
            for track, e in tracks.items()
        ],
    ]
    width = max(len(label) for label, _ in rows)
    lines = ["specmesh fleet is up", *(f"  {label:<{width}}  {value}" for label, value in rows)]
    if state.get("seeded"):
        lines.append("applied the examples (the store was empty)")
    else:
        lines.append(
            "kept the specs already stored (`uv run specmesh up --reset` re-applies the examples)"
        )
    if state.get("notReady"):
        lines.append(
            f"not ready yet: {', '.join(state['notReady'])} "
            "(see `uv run specmesh describe agent NAME`)"
        )
    lines.append(f"sign in with the admin token in {state['adminTokenFile']}")
    lines.append(
        'try: uv run specmesh invoke mse-nacos-helper "Which Nacos services are registered?"'
    )
    return "\n".join(lines) + "\n"


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = _fleet(settings).down()
    sys.stdout.write(
        ("stopped: " + ", ".join(stopped) if stopped else "nothing was running") + "\n"
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    status = _running_fleet(settings)
    if args.output == "json":
        ep = status.get("endpoints", {})
        _print(
            {
                "etcd": ep.get("etcd"),
                "openbao": ep.get("openbao"),
                "redis": ep.get("redis"),
                "model": ep.get("llm"),
                "controlPlane": ep.get("controlPlane"),
                "controlPlaneGrpc": ep.get("controlPlaneGrpc"),
                "otlp": ep.get("otlp"),
                "mcp": ep.get("mcp", {}),
                "serviceAddresses": ep.get("serviceAddresses", {}),
                "agents": status.get("agents", {}),
                "processes": [
                    {
                        k: p.get(k)
                        for k in ("name", "pid", "role", "agent", "track", "instance", "running")
                    }
                    for p in status.get("processes", [])
                ],
            },
            "json",
        )
        return EXIT_OK
    _table(
        [
            [p["name"], p["role"], str(p["pid"]), "running" if p["running"] else "stopped"]
            for p in status.get("processes", [])
        ],
        ["NAME", "ROLE", "PID", "STATE"],
    )
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    status = _running_fleet(settings)
    wanted = [
        p
        for p in status.get("processes", [])
        if (p.get("agent") and p["agent"].lower() == args.agent.lower())
        or args.agent in (p["name"], p.get("instance"))
    ]
    if not wanted:
        raise NotFoundError(kind="fleet process", name=args.agent)
    for p in wanted:
        lines = Path(p["log"]).read_text(errors="replace").splitlines()[-args.tail :]
        for line in lines:
            sys.stdout.write(f"[{p['name']}] {line}\n")
    return EXIT_OK


def _agent_url(settings: Settings, agent: str, track: str) -> str:
    """The engine URL of one ready instance of the agent's track, picked at random (for
    ``kb``, which talks to one engine's business REST)."""
    status = _running_fleet(settings)
    ready = [
        i
        for i in status.get("instances", [])
        if resource_name(i["agent"]) == resource_name(agent) and i["track"] == track and i["ready"]
    ]
    if ready:
        return str(random.choice(ready)["endpoints"]["a2a"])
    raise NotFoundError(kind="running agent", name=f"{agent} [{track}]")


class InvokeTimeoutError(SpecmeshError):
    """The agent did not finish answering within ``--timeout`` (exit 5)."""

    def __init__(self, *, agent: str, url: str, seconds: float) -> None:
        self.agent = agent
        super().__init__(
            f"{agent} ({url}) did not finish answering within {seconds:g}s "
            "(raise --timeout, or see `uv run specmesh logs " + agent + "`)"
        )


class AgentCallError(SpecmeshError):
    """The A2A call failed: the agent answered with an A2A error, or could not be reached
    (exit 6)."""

    def __init__(self, *, agent: str, url: str, reason: str) -> None:
        self.agent = agent
        super().__init__(f"calling {agent} ({url}) failed: {reason}")


class AgentCallRefusedError(AgentCallError):
    """The agent's entry refused the call: no or a bad token (401), or a principal its
    ``callers`` do not admit (403) (exit 7)."""

    def __init__(self, *, agent: str, url: str, reason: str) -> None:
        super().__init__(
            agent=agent,
            url=url,
            reason=f"{reason} (the agent's entry refused it: its spec's "
            "base.callers.principals must admit specmesh/<the name of your API token>)",
        )


def _refused(error: BaseException) -> bool:
    """Whether an a2a-sdk error came from a 401/403 answer (HTTP) or an UNAUTHENTICATED /
    PERMISSION_DENIED status (gRPC)."""
    cause = error.__cause__
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if status in (401, 403):
        return True
    code = getattr(cause, "code", None)
    if callable(code):
        try:
            name = getattr(code(), "name", "")
        except TypeError:
            return False
        return name in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    return False


_TOKEN_MARGIN_SECONDS = 30.0
"""An invoke token this close to its expiry is replaced before the next message."""


class _Target:
    """Where ``invoke``/``chat`` send: the agent's card from the control plane (or the
    ``--url`` whose card the SDK fetches), and an invoke token, minted again when it is
    about to expire (a long chat outlives one)."""

    def __init__(self, args: argparse.Namespace, ctx: _Context) -> None:
        self._args = args
        self._ctx = ctx
        self.agent: Any = args.url
        self.where: str = args.url or args.agent
        self._token: str | None = None
        self._expires = 0.0

    async def resolve(self) -> None:
        args, ctx = self._args, self._ctx
        if getattr(args, "track", None):
            raise UsageError(
                "--track: calls go through the agent's public entry and follow its release "
                "(weights, header match) like every external call; to reach one instance, "
                "give --url with its entry (`specmesh status -o json`: instances[].endpoints)"
            )
        if args.url:
            return
        if not ctx.remote and ctx.settings.server is None:
            raise FleetNotRunningError(ctx.settings.home.resolve())
        if not ctx.remote:
            raise UsageError(
                f"{args.command} needs the control plane (the agent's card and an invoke "
                "token): set SPECMESH_SERVER and SPECMESH_TOKEN, start the local fleet "
                "(`uv run specmesh up`), or give --url"
            )
        from specmesh.a2aclient import card_from_json

        card = card_from_json(await ctx.api.agent_card(args.agent))
        self.agent = card
        self.where = card.supported_interfaces[0].url if card.supported_interfaces else args.agent

    async def token(self) -> str | None:
        """A valid invoke token (from the control plane, when one is configured)."""
        loop = asyncio.get_running_loop()
        if self._token is not None and loop.time() < self._expires - _TOKEN_MARGIN_SECONDS:
            return self._token
        if not self._ctx.remote:
            return None  # --url without a control plane: an agent that asks for no token
        minted = await self._ctx.api.invoke_token(self._args.agent)
        left = (datetime.fromisoformat(minted["expiresAt"]) - datetime.now(UTC)).total_seconds()
        self._token, self._expires = str(minted["token"]), loop.time() + left
        return self._token


async def _invoke(
    args: argparse.Namespace, target: _Target, text: str, context_id: str | None
) -> Any:
    from a2a.utils.errors import A2AError

    from specmesh.a2aclient import invoke

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    token = await target.token()
    try:
        async with asyncio.timeout(args.timeout):
            return await invoke(
                target.agent, text, context_id=context_id, on_text=show, token=token
            )
    except TimeoutError:
        raise InvokeTimeoutError(agent=args.agent, url=target.where, seconds=args.timeout) from None
    except A2AError as e:
        refused = AgentCallRefusedError if _refused(e) else AgentCallError
        raise refused(agent=args.agent, url=target.where, reason=str(e) or type(e).__name__) from e


async def cmd_invoke(args: argparse.Namespace, ctx: _Context) -> int:
    target = _Target(args, ctx)
    await target.resolve()
    result = await _invoke(args, target, args.message, args.context_id)
    sys.stdout.write("\n")
    if args.verbose_result:
        sys.stderr.write(
            f"[state {result.state}; contextId {result.context_id}; "
            f"tools {', '.join(result.tool_calls) or 'none'}]\n"
        )
    return EXIT_OK if result.state == "completed" else EXIT_OTHER


async def cmd_chat(args: argparse.Namespace, ctx: _Context) -> int:
    target = _Target(args, ctx)
    await target.resolve()
    context_id: str | None = None
    sys.stdout.write(f"chatting with {args.agent} (empty line or Ctrl-D to leave)\n")
    while True:
        try:
            line = await asyncio.to_thread(input, "> ")
        except EOFError:
            break
        if not line.strip():
            break
        result = await _invoke(args, target, line, context_id)
        context_id = result.context_id
        sys.stdout.write("\n")
    return EXIT_OK


# ---------------------------------------------------------------- kb (knowledge base)

_KB_SUFFIXES = (".md", ".markdown", ".txt")
_KB_BATCH = 50


def _kb_documents(paths: Sequence[str]) -> list[dict[str, str]]:
    """The .md/.txt files under ``paths``; a file's source is its path relative to the
    folder given (or its name, for a file given by itself)."""
    docs: list[dict[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in _KB_SUFFIXES
            )
            docs += [
                {"source": f.relative_to(path).as_posix(), "text": f.read_text(errors="replace")}
                for f in files
            ]
        elif path.is_file():
            docs.append({"source": path.name, "text": path.read_text(errors="replace")})
        else:
            raise NotFoundError(kind="file or folder", name=raw)
    return docs


async def cmd_kb(args: argparse.Namespace, ctx: _Context) -> int:
    import httpx

    url = (args.url or _agent_url(ctx.settings, args.agent, args.track)).rstrip("/")
    endpoint = f"{url}/v1/knowledge/documents"
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        try:
            if args.action == "delete":
                r = await http.delete(endpoint, params={"source": args.source})
                if r.status_code != 200:
                    return _kb_failed(r)
                body = r.json()
                sys.stdout.write(
                    f"deleted {body['deleted']} chunks of {body['source']} "
                    f"from {body['collection']} ({body['chunks']} chunks left)\n"
                )
                return EXIT_OK
            docs = _kb_documents(args.paths)
            if not docs:
                sys.stderr.write("error: no .md or .txt file found\n")
                return EXIT_INVALID
            totals = dict.fromkeys(("added", "unchanged", "replaced", "chunksWritten"), 0)
            body = {}
            for i in range(0, len(docs), _KB_BATCH):
                r = await http.post(endpoint, json={"documents": docs[i : i + _KB_BATCH]})
                if r.status_code != 200:
                    return _kb_failed(r)
                body = r.json()
                for key in totals:
                    totals[key] += int(body.get(key, 0))
        except httpx.HTTPError as e:
            sys.stderr.write(f"error: {endpoint}: {type(e).__name__} {e}\n")
            return EXIT_UNAVAILABLE
    sys.stdout.write(
        f"ingested {len(docs)} documents into {body['collection']}: added {totals['added']}, "
        f"unchanged {totals['unchanged']}, replaced {totals['replaced']} "
        f"({totals['chunksWritten']} chunks written; {body['chunks']} in the collection)\n"
    )
    return EXIT_OK


def _kb_failed(r: Any) -> int:
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:500]
    sys.stderr.write(f"error: HTTP {r.status_code}: {message}\n")
    if r.status_code == 400:
        return EXIT_INVALID
    if r.status_code in (502, 503):
        return EXIT_UNAVAILABLE
    return EXIT_NOT_FOUND if r.status_code == 404 else EXIT_OTHER


def cmd_schema(args: argparse.Namespace) -> int:
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
        sys.stdout.write("schemas are current\n")
        return EXIT_OK
    for path in write_schemas(directory):
        sys.stdout.write(f"wrote {path}\n")
    return EXIT_OK


# ---------------------------------------------------------------- parser


def _remote_flags(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument(
        "--server",
        default=default,
        help="control-plane URL (default: SPECMESH_SERVER, else the local fleet's)",
    )
    p.add_argument(
        "--token",
        default=default,
        help="bearer token (default: SPECMESH_TOKEN, SPECMESH_TOKEN_FILE, or the fleet's)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specmesh",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1].split("\n\nWhere")[0].replace("::", ":"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _remote_flags(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)

    def out(p: argparse.ArgumentParser, default: str, choices: Sequence[str]) -> None:
        p.add_argument("-o", "--output", default=default, choices=list(choices))

    def api_command(name: str, helptext: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext)
        _remote_flags(p, argparse.SUPPRESS)  # also after the command, kubectl-style
        return p

    p = sub.add_parser("validate", help="validate manifests (no service needed)")
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="file or folder (repeatable)"
    )
    out(p, "text", ("text", "json"))
    p.set_defaults(run=cmd_validate)

    p = api_command("apply", "validate and store manifests; secrets go to Vault")
    p.add_argument("-f", "--filename", action="append", required=True)
    p.add_argument(
        "--expected-revision",
        type=int,
        default=None,
        help="refuse unless the agent is at this revision (0: must not exist)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate only; write nothing")
    out(p, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_apply)

    p = api_command(
        "get",
        "list or show agents, prompts, mcpservers, releases, instances "
        "(-o yaml of one object is a manifest `apply -f` takes back)",
    )
    p.add_argument(
        "resource",
        choices=[
            "agents",
            "agent",
            "prompts",
            "prompt",
            "mcpservers",
            "mcpserver",
            "releases",
            "release",
            "instances",
            "instance",
        ],
    )
    p.add_argument("name", nargs="?", help="one object (an agent, prompt key, MCP server...)")
    p.add_argument("--revision", type=int, default=None, help="an agent's revision")
    p.add_argument("--version", default=None, help="a prompt's version (prints its text)")
    out(p, "table", ("table", "json", "yaml"))
    p.set_defaults(run=cmd_get)

    p = api_command("describe", "an agent: spec, release, live instances, history")
    p.add_argument("resource", choices=["agent"])
    p.add_argument("name")
    out(p, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_describe)

    p = api_command("history", "revisions of an agent")
    p.add_argument("agent")
    out(p, "table", ("table", "json", "yaml"))
    p.set_defaults(run=cmd_history)

    p = api_command("diff", "differences between two revisions of an agent")
    p.add_argument("agent")
    p.add_argument("from_revision", type=int)
    p.add_argument("to_revision", type=int)
    out(p, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_diff)

    p = api_command("rollback", "a new revision equal to an old one")
    p.add_argument("agent")
    p.add_argument("revision", type=int)
    p.add_argument("--expected-revision", type=int, default=None)
    out(p, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_rollback)

    p = api_command("scale", "set the instances of an agent's track (a new revision)")
    p.add_argument("resource", choices=["agent"])
    p.add_argument("name")
    p.add_argument("--replicas", type=int, required=True, help="instances, 0 to 100")
    p.add_argument("--track", choices=["stable", "canary"], default="stable")
    p.add_argument("--expected-revision", type=int, default=None)
    out(p, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_scale)

    p = api_command("delete", "delete an agent (its audit stays)")
    p.add_argument("resource", choices=["agent"])
    p.add_argument("name")
    p.add_argument("--expected-revision", type=int, default=None)
    p.set_defaults(run=cmd_delete)

    p = api_command("grant", "secrets shared with an agent (secrets-admin)")
    grant_actions = p.add_subparsers(dest="action", required=True)
    for action, helptext in (
        ("create", "share a Vault secret (outside every agent's own tree) with an agent"),
        ("delete", "stop sharing it"),
        ("list", "what is shared, with whom"),
    ):
        a = grant_actions.add_parser(action, help=helptext)
        _remote_flags(a, argparse.SUPPRESS)
        if action == "list":
            a.add_argument("agent", nargs="?", default=None)
            out(a, "table", ("table", "json", "yaml"))
        else:
            a.add_argument("agent")
            a.add_argument("secret", help="vault://<mount>/<path>")
    p.set_defaults(run=cmd_grant)

    p = api_command("secrets", "agents' secret versions in Vault (secrets-admin)")
    secrets_actions = p.add_subparsers(dest="action", required=True)
    a = secrets_actions.add_parser(
        "gc", help="destroy the versions no revision references (refused or crashed applies)"
    )
    _remote_flags(a, argparse.SUPPRESS)
    a.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        help="keep versions younger than this many seconds (an apply may be in flight)",
    )
    out(a, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_secrets)

    p = api_command("audit", "who changed what")
    p.add_argument("--name", default=None)
    p.add_argument("--kind", default=None, help="agent, prompt, mcpserver, release...")
    p.add_argument("--limit", type=int, default=50)
    out(p, "table", ("table", "json", "yaml"))
    p.set_defaults(run=cmd_audit)

    p = api_command("release", "an agent's canary release (control plane)")
    actions = p.add_subparsers(dest="action", required=True)
    for action, helptext in (
        ("get", "show the release policy"),
        ("set", "set the canary revision, its weight and header match"),
        ("promote", "the canary becomes stable; the split ends"),
        ("abort", "the split ends; stable stays"),
    ):
        a = actions.add_parser(action, help=helptext)
        _remote_flags(a, argparse.SUPPRESS)
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
        out(a, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_release)

    p = api_command("mesh", "the Istio objects the control plane publishes")
    mesh_actions = p.add_subparsers(dest="action", required=True)
    a = mesh_actions.add_parser("render", help="print them (YAML documents by default)")
    _remote_flags(a, argparse.SUPPRESS)
    out(a, "yaml", ("yaml", "json"))
    p.set_defaults(run=cmd_mesh)

    p = api_command("token", "API tokens: create, list, revoke (secrets-admin)")
    token_actions = p.add_subparsers(dest="action", required=True)
    a = token_actions.add_parser("create", help="mint a token (printed once) with an expiry")
    a.add_argument("name", help="who or what the token is for")
    a.add_argument(
        "--role",
        action="append",
        required=True,
        choices=["viewer", "operator", "admin", "secrets-admin", "invoker"],
        help="repeatable; may not allow more than your own roles",
    )
    a.add_argument("--ttl", default=None, help="lifetime: 30d (default), 12h, 90m, 45s")
    out(a, "text", ("text", "json", "yaml"))
    a = token_actions.add_parser("list", help="every token with its state (never a secret)")
    out(a, "table", ("table", "json", "yaml"))
    a = token_actions.add_parser("revoke", help="refuse a token (API or token file) from now on")
    a.add_argument("id")
    for a in token_actions.choices.values():
        _remote_flags(a, argparse.SUPPRESS)
    p.set_defaults(run=cmd_token)

    p = sub.add_parser("up", help="start the local fleet (services, control plane, agents)")
    p.add_argument(
        "--llm-url",
        default=None,
        help="an OpenAI-compatible provider instead of the scripted model",
    )
    p.add_argument(
        "--reset",
        action="store_true",
        help="apply the examples even when the store holds specs (by default they are "
        "applied only into an empty store, so what an operator changed is kept)",
    )
    out(p, "text", ("text", "json"))

    sub.add_parser("down", help="stop what `specmesh up` started")

    p = sub.add_parser("status", help="the local fleet's processes and endpoints")
    out(p, "table", ("table", "json"))

    p = sub.add_parser("logs", help="the logs of an agent's processes")
    p.add_argument("agent")
    p.add_argument("--tail", type=int, default=50)

    for name, helptext in (
        ("invoke", "ask an agent one question over A2A"),
        ("chat", "talk to an agent over A2A, interactively"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("agent")
        if name == "invoke":
            p.add_argument("message")
            p.add_argument("--context-id", default=None)
            p.add_argument(
                "--verbose-result",
                action="store_true",
                help="print the task state and tools used to stderr",
            )
        p.add_argument(
            "--track", default=None, help=argparse.SUPPRESS
        )  # gone: calls follow the release (an error names what to do instead)
        p.add_argument(
            "--url",
            default=None,
            help="an A2A base URL whose agent card to use instead of the one the control "
            "plane serves (an invoke token is still sent when a control plane is configured)",
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=300.0,
            help="seconds an answer may take (default 300; exit 5 past it)",
        )
        p.set_defaults(run=cmd_invoke if name == "invoke" else cmd_chat)

    p = sub.add_parser("kb", help="an agent's knowledge base (ingest, delete)")
    kb_actions = p.add_subparsers(dest="action", required=True)
    a = kb_actions.add_parser("ingest", help="chunk, embed and store .md/.txt files")
    a.add_argument("agent")
    a.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    a = kb_actions.add_parser("delete", help="delete the chunks of one source")
    a.add_argument("agent")
    a.add_argument("--source", required=True, help="the source (as ingest named it)")
    for a in kb_actions.choices.values():
        a.add_argument("--track", default="stable", choices=["stable", "canary"])
        a.add_argument("--url", default=None, help="the engine's URL (default: from the fleet)")
        a.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
        a.set_defaults(run=cmd_kb)

    p = sub.add_parser("services", help="local etcd and OpenBao")
    p.add_argument("action", choices=["up", "down", "status"])

    p = sub.add_parser("schema", help="write or check the JSON Schemas")
    p.add_argument("--dir", default="schemas")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")

    # Processes that live outside the shared core (engine, sidecar, control plane) plug in
    # as entry points, so this package never imports them.
    for name in sorted(_process_commands()):
        sub.add_parser(name, help=f"run the {name} (see `specmesh {name} --help`)")

    p = sub.add_parser("model-server", help="the scripted OpenAI-compatible model server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--script", default=None, help="YAML/JSON script file")
    return parser


async def _run(
    command: Callable[[argparse.Namespace, _Context], Awaitable[int]],
    args: argparse.Namespace,
    settings: Settings,
) -> int:
    async with AsyncExitStack() as stack:
        return await command(args, _Context(settings, stack))


def _process_commands() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="specmesh.commands")}


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with ``--server`` / ``--token`` on top."""
    overrides: dict[str, Any] = {}
    if getattr(args, "server", None):
        overrides["server"] = args.server
    if getattr(args, "token", None):
        overrides["token"] = args.token
    return Settings(**overrides)


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
        if args.command == "services":
            return cmd_services(args, settings)
        if args.command in ("up", "down", "status", "logs"):
            fleet_command = {
                "up": cmd_up,
                "down": cmd_down,
                "status": cmd_status,
                "logs": cmd_logs,
            }[args.command]
            return fleet_command(args, settings)
        if args.command == "schema":
            return cmd_schema(args)
        if args.command == "model-server":
            from specmesh.modelserver import main as model_server_main

            return int(model_server_main(args) or 0)
        return asyncio.run(_run(args.run, args, settings))
    except SpecmeshError as e:
        sys.stderr.write(f"error: {e}\n")
        hint = _hint(e, settings)
        if hint:
            sys.stderr.write(f"  {hint}\n")
        return _exit_code(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader left (`| head`): no traceback; stdout goes nowhere from now on
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _hint(error: SpecmeshError, settings: Settings | None) -> str | None:
    """What to do about an unreachable service, when the cause is likely the local fleet."""
    if settings is None:
        return None
    if isinstance(error, ControlPlaneUnavailableError) and (settings.home / "fleet.json").exists():
        return (
            f"if that is the local fleet's control plane, the fleet is not running: {_START_HINT}"
        )
    if isinstance(error, StoreUnavailableError | SecretUnavailableError) and not settings.server:
        return (
            "no control plane is configured (SPECMESH_SERVER) and the local fleet is not "
            f"running: {_START_HINT}, or set SPECMESH_SERVER and SPECMESH_TOKEN"
        )
    return None


if __name__ == "__main__":
    sys.exit(main())
