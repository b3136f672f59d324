"""The ``specmesh`` command.

Exit codes a script can rely on::

    0  done
    1  the spec is invalid (every problem is printed, with its path)
    2  bad usage (arguments)
    3  conflict: the expected revision is stale, or a name collides
    4  not found
    5  etcd or Vault is unavailable
    6  any other specmesh error

Writes go through :class:`specmesh.specservice.SpecService` against etcd and Vault
directly for now; the control plane will take over writing behind the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

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
from specmesh.settings import Settings
from specmesh.spec.manifest import LoadedManifest, load_path
from specmesh.specservice import SpecService
from specmesh.store import SpecStore
from specmesh.vault import VaultClient

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_OTHER = (
    range(7)
)


def _exit_code(error: SpecmeshError) -> int:
    table: list[tuple[type[SpecmeshError], int]] = [
        (SpecError, EXIT_INVALID),
        (ConflictError, EXIT_CONFLICT),
        (NameCollisionError, EXIT_CONFLICT),
        (NotFoundError, EXIT_NOT_FOUND),
        (StoreUnavailableError, EXIT_UNAVAILABLE),
        (SecretUnavailableError, EXIT_UNAVAILABLE),
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


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        sys.stdout.write("  ".join(cells).rstrip() + "\n")


class _Context:
    """The clients a command needs, opened lazily and closed at the end."""

    def __init__(self, settings: Settings, stack: AsyncExitStack) -> None:
        self.settings = settings
        self._stack = stack
        self._store: SpecStore | None = None
        self._service: SpecService | None = None

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


async def cmd_validate(args: argparse.Namespace, ctx: _Context) -> int:
    loaded = _load_all(args.filename)
    if args.output == "json":
        _print([{"kind": m.kind, "name": m.name, "source": m.source} for m in loaded], "json")
    else:
        for m in loaded:
            sys.stdout.write(f"valid: {m.kind}/{m.name} ({m.source})\n")
    return EXIT_OK


async def cmd_apply(args: argparse.Namespace, ctx: _Context) -> int:
    loaded = _load_all(args.filename)  # every file is validated before anything is written
    order = {"McpServer": 0, "Prompt": 1, "Agent": 2, "Release": 3}
    loaded.sort(key=lambda m: order[m.kind])
    if args.expected_revision is not None and sum(m.kind == "Agent" for m in loaded) != 1:
        raise SpecError([], source="--expected-revision needs exactly one agent manifest")
    outcomes = []
    for m in loaded:
        outcome = await ctx.service.apply(
            m,
            actor=ctx.settings.actor,
            expected_revision=args.expected_revision,
            dry_run=args.dry_run,
        )
        outcomes.append(outcome)
        if args.output == "text":
            verb = "unchanged" if not outcome.changed else "configured"
            if args.dry_run:
                verb = "valid (dry run)"
            rev = f" (revision {outcome.revision})" if outcome.revision else ""
            sys.stdout.write(f"{outcome.kind.lower()}/{outcome.name} {verb}{rev}\n")
            for w in outcome.warnings:
                sys.stdout.write(f"  warning: {w}\n")
            for s in outcome.secrets_moved:
                sys.stdout.write(f"  secret moved to Vault: {s}\n")
    if args.output != "text":
        _print([o.to_json() for o in outcomes], args.output)
    return EXIT_OK


async def cmd_get(args: argparse.Namespace, ctx: _Context) -> int:
    store = ctx.store
    if args.resource in ("agents", "agent") and args.name:
        record = await store.get_agent(args.name, args.revision)
        _print(record.to_json(), args.output if args.output != "table" else "yaml")
        return EXIT_OK
    if args.resource in ("agents", "agent"):
        agents = await store.list_agents()
        if args.output == "table":
            _table(
                [[a.name, str(a.revision), a.updated_at[:19], a.updated_by] for a in agents],
                ["NAME", "REVISION", "UPDATED", "BY"],
            )
        else:
            _print([a.to_json() for a in agents], args.output)
        return EXIT_OK
    if args.resource in ("prompts", "prompt"):
        prompts = await store.list_prompts()
        if args.output == "table":
            _table([[k, ", ".join(v)] for k, v in sorted(prompts.items())], ["KEY", "VERSIONS"])
        else:
            _print(prompts, args.output)
        return EXIT_OK
    servers = await store.list_mcp_servers()
    if args.output == "table":
        _table(
            [[n, s.transport, s.url] for n, s in sorted(servers.items())],
            ["NAME", "TRANSPORT", "URL"],
        )
    else:
        _print({n: s.model_dump(mode="json") for n, s in servers.items()}, args.output)
    return EXIT_OK


async def cmd_history(args: argparse.Namespace, ctx: _Context) -> int:
    records = await ctx.store.history(args.agent)
    if args.output == "table":
        _table(
            [[str(r.revision), r.created_at[:19], r.author, r.action, r.message] for r in records],
            ["REVISION", "CREATED", "AUTHOR", "ACTION", "MESSAGE"],
        )
    else:
        _print(
            [{k: v for k, v in r.to_json().items() if k != "spec"} for r in records], args.output
        )
    return EXIT_OK


async def cmd_diff(args: argparse.Namespace, ctx: _Context) -> int:
    changes = await ctx.store.diff(args.agent, args.from_revision, args.to_revision)
    if args.output == "text":
        for c in changes:
            sys.stdout.write(f"{c}\n")
        if not changes:
            sys.stdout.write("no differences\n")
    else:
        _print([c.to_json() for c in changes], args.output)
    return EXIT_OK


async def cmd_rollback(args: argparse.Namespace, ctx: _Context) -> int:
    result = await ctx.store.rollback(
        args.agent,
        args.revision,
        actor=ctx.settings.actor,
        expected_revision=args.expected_revision,
    )
    if args.output == "text":
        sys.stdout.write(
            f"agent/{args.agent} rolled back to revision {args.revision} "
            f"as revision {result.revision}\n"
        )
    else:
        _print(result.to_json(), args.output)
    return EXIT_OK


async def cmd_delete(args: argparse.Namespace, ctx: _Context) -> int:
    await ctx.store.delete_agent(
        args.name, actor=ctx.settings.actor, expected_revision=args.expected_revision
    )
    sys.stdout.write(f"agent/{args.name} deleted\n")
    return EXIT_OK


async def cmd_audit(args: argparse.Namespace, ctx: _Context) -> int:
    entries = await ctx.store.audit_entries(name=args.name, limit=args.limit)
    if args.output == "table":
        _table(
            [
                [e.time[:19], e.actor, e.action, e.kind, e.name, str(e.revision or "")]
                for e in entries
            ],
            ["TIME", "ACTOR", "ACTION", "KIND", "NAME", "REVISION"],
        )
    else:
        _print([e.to_json() for e in entries], args.output)
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

    crds = Path(__file__).resolve().parent.parent.parent / "shared" / "istio" / "crd-all.gen.yaml"
    options = FleetOptions(home=settings.home, istio_crds=crds if crds.exists() else None)
    if args is not None and getattr(args, "llm_url", None):
        options.llm_url = args.llm_url
    return Fleet(options)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    state = _fleet(settings, args).up()
    if args.output == "json":
        _print(state, "json")
        return EXIT_OK
    ep = state["endpoints"]
    out = sys.stdout
    out.write("specmesh fleet is up\n")
    out.write(
        f"  control plane API  {ep['controlPlane']}/api/v1  (gRPC {ep['controlPlaneGrpc']})\n"
    )
    out.write(f"  OTLP receiver      {ep['otlp']}\n")
    out.write(f"  etcd               {ep['etcd']}\n  OpenBao            {ep['openbao']}\n")
    out.write(f"  model              {ep['llm']}\n")
    for name, url in ep["mcp"].items():
        out.write(f"  MCP {name:<15}{url}\n")
    for agent, tracks in sorted(state["agents"].items()):
        for track, e in tracks.items():
            out.write(f"  agent {agent} [{track}]  A2A {e['a2a']}  inbound {e['inbound']}\n")
    out.write(f"sign in with the admin token in {state['adminTokenFile']}\n")
    out.write('try: specmesh invoke mse-nacos-helper "Which Nacos services are registered?"\n')
    return EXIT_OK


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = _fleet(settings).down()
    sys.stdout.write(
        ("stopped: " + ", ".join(stopped) if stopped else "nothing was running") + "\n"
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    status = _fleet(settings).status()
    if args.output == "json":
        ep = status.get("endpoints", {})
        _print(
            {
                "etcd": ep.get("etcd"),
                "openbao": ep.get("openbao"),
                "controlPlane": ep.get("controlPlane"),
                "controlPlaneGrpc": ep.get("controlPlaneGrpc"),
                "otlp": ep.get("otlp"),
                "agents": {
                    a: {t: e["a2a"] for t, e in tracks.items()}
                    for a, tracks in status.get("agents", {}).items()
                },
                "processes": [
                    {k: p[k] for k in ("name", "pid", "role", "running")}
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
    status = _fleet(settings).status()
    wanted = [
        p
        for p in status.get("processes", [])
        if (p.get("agent") and p["agent"].lower() == args.agent.lower()) or p["name"] == args.agent
    ]
    if not wanted:
        raise NotFoundError(kind="fleet process", name=args.agent)
    for p in wanted:
        lines = Path(p["log"]).read_text(errors="replace").splitlines()[-args.tail :]
        for line in lines:
            sys.stdout.write(f"[{p['name']}] {line}\n")
    return EXIT_OK


def _agent_url(settings: Settings, agent: str, track: str) -> str:
    status = _fleet(settings).status()
    for name, tracks in status.get("agents", {}).items():
        if name.lower() == agent.lower() and track in tracks:
            return str(tracks[track]["a2a"])
    raise NotFoundError(kind="running agent", name=f"{agent} [{track}]")


async def cmd_invoke(args: argparse.Namespace, ctx: _Context) -> int:
    from specmesh.a2aclient import invoke

    url = args.url or _agent_url(ctx.settings, args.agent, args.track)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = await invoke(url, args.message, context_id=args.context_id, on_text=show)
    sys.stdout.write("\n")
    if args.verbose_result:
        sys.stderr.write(
            f"[state {result.state}; contextId {result.context_id}; "
            f"tools {', '.join(result.tool_calls) or 'none'}]\n"
        )
    return EXIT_OK if result.state == "completed" else EXIT_OTHER


async def cmd_chat(args: argparse.Namespace, ctx: _Context) -> int:
    from specmesh.a2aclient import invoke

    url = args.url or _agent_url(ctx.settings, args.agent, args.track)
    context_id: str | None = None
    sys.stdout.write(f"chatting with {args.agent} (empty line or Ctrl-D to leave)\n")
    while True:
        try:
            line = await asyncio.to_thread(input, "> ")
        except EOFError:
            break
        if not line.strip():
            break

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = await invoke(url, line, context_id=context_id, on_text=show)
        context_id = result.context_id
        sys.stdout.write("\n")
    return EXIT_OK


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmesh", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def out(p: argparse.ArgumentParser, default: str, choices: Sequence[str]) -> None:
        p.add_argument("-o", "--output", default=default, choices=list(choices))

    p = sub.add_parser("validate", help="validate manifests (no service needed)")
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="file or folder (repeatable)"
    )
    out(p, "text", ("text", "json"))
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser("apply", help="validate and store manifests; secrets go to Vault")
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

    p = sub.add_parser("get", help="list or show agents, prompts, mcpservers")
    p.add_argument("resource", choices=["agents", "agent", "prompts", "prompt", "mcpservers"])
    p.add_argument("name", nargs="?")
    p.add_argument("--revision", type=int, default=None)
    out(p, "table", ("table", "json", "yaml"))
    p.set_defaults(run=cmd_get)

    p = sub.add_parser("history", help="revisions of an agent")
    p.add_argument("agent")
    out(p, "table", ("table", "json", "yaml"))
    p.set_defaults(run=cmd_history)

    p = sub.add_parser("diff", help="differences between two revisions of an agent")
    p.add_argument("agent")
    p.add_argument("from_revision", type=int)
    p.add_argument("to_revision", type=int)
    out(p, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_diff)

    p = sub.add_parser("rollback", help="a new revision equal to an old one")
    p.add_argument("agent")
    p.add_argument("revision", type=int)
    p.add_argument("--expected-revision", type=int, default=None)
    out(p, "text", ("text", "json", "yaml"))
    p.set_defaults(run=cmd_rollback)

    p = sub.add_parser("delete", help="delete an agent (its audit stays)")
    p.add_argument("resource", choices=["agent"])
    p.add_argument("name")
    p.add_argument("--expected-revision", type=int, default=None)
    p.set_defaults(run=cmd_delete)

    p = sub.add_parser("audit", help="who changed what")
    p.add_argument("--name", default=None)
    p.add_argument("--limit", type=int, default=50)
    out(p, "table", ("table", "json", "yaml"))
    p.set_defaults(run=cmd_audit)

    p = sub.add_parser("up", help="start the local fleet (services, control plane, agents)")
    p.add_argument(
        "--llm-url",
        default=None,
        help="an OpenAI-compatible provider instead of the scripted model",
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
        p.add_argument("--track", default="stable", choices=["stable", "canary"])
        p.add_argument("--url", default=None, help="the agent's A2A URL (default: from the fleet)")
        p.set_defaults(run=cmd_invoke if name == "invoke" else cmd_chat)

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
    settings = Settings()
    try:
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
        return _exit_code(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
