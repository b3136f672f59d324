"""The local fleet, dev tooling on this machine: ``up``, ``down``, ``status``, ``logs``,
``services up|down|status`` (only etcd + OpenBao) and ``model-server`` (the scripted
OpenAI-compatible model). These never talk to a control plane: they start and watch local
processes."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from specmesh.errors import NotFoundError
from specmeshctl.errors import EXIT_OK, FleetNotRunningError, UsageError
from specmeshctl.output import print_data, table, write
from specmeshctl.parsing import Registrar
from specmeshctl.settings import Settings

__all__ = ["register", "running_fleet", "up_banner"]


def _dev_tooling(module: str) -> Any:
    """A module of ``localfleet``: the dev tooling of a source checkout, which the image does
    not ship (``up``, ``services`` and ``model-server`` run from a clone)."""
    try:
        return importlib.import_module(f"localfleet.{module}")
    except ModuleNotFoundError as e:
        if e.name not in ("localfleet", f"localfleet.{module}"):
            raise
        raise UsageError(
            "this command runs the local fleet's tooling (localfleet/), which only a source "
            "checkout has: run it from a clone of the repository (./scripts/up)"
        ) from None


def _fleet(settings: Settings, args: argparse.Namespace | None = None) -> Any:
    fleet = _dev_tooling("fleet")

    # No istio_crds: the control plane validates with the Istio CRD schemas it carries.
    options = fleet.FleetOptions(home=settings.home)
    if args is not None and getattr(args, "llm_url", None):
        options.llm_url = args.llm_url
    return fleet.Fleet(options)


def running_fleet(settings: Settings) -> dict[str, Any]:
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
        print_data(state, "json")
    else:
        sys.stdout.write(up_banner(state))
    return EXIT_OK


def up_banner(state: dict[str, Any]) -> str:
    """What ``specmesh up`` prints: where everything is, one aligned row each."""
    ep = state["endpoints"]
    rows = [
        ["control plane API", f"gRPC {ep['controlPlaneGrpc']}  (REST {ep['controlPlane']}/api/v1)"],
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
    write("stopped: " + ", ".join(stopped) if stopped else "nothing was running")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    status = running_fleet(settings)
    if args.output == "json":
        ep = status.get("endpoints", {})
        print_data(
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
    table(
        [
            [p["name"], p["role"], str(p["pid"]), "running" if p["running"] else "stopped"]
            for p in status.get("processes", [])
        ],
        ["NAME", "ROLE", "PID", "STATE"],
    )
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    status = running_fleet(settings)
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
            write(f"[{p['name']}] {line}")
    return EXIT_OK


def cmd_services(args: argparse.Namespace, settings: Settings) -> int:
    services = _dev_tooling("installer").LocalServices(home=settings.home.resolve())
    if args.action == "up":
        state = services.start()
        print_data(
            {
                "etcd": state["etcdEndpoint"],
                "openbao": state["baoAddress"],
                "home": str(settings.home.resolve()),
            },
            "json",
        )
    elif args.action == "down":
        services.stop()
        write("stopped")
    else:
        print_data(services.status(), "json")
    return EXIT_OK


def cmd_model_server(args: argparse.Namespace, settings: Settings) -> int:
    return int(_dev_tooling("modelserver").main(args) or 0)


def register(r: Registrar) -> None:
    p = r.local("up", "start the local fleet (services, control plane, agents)")
    p.set_defaults(local_run=cmd_up)
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
    r.output(p, "text", ("text", "json"))

    p = r.local("down", "stop what `specmesh up` started")
    p.set_defaults(local_run=cmd_down)

    p = r.local("status", "the local fleet's processes and endpoints")
    p.set_defaults(local_run=cmd_status)
    r.output(p, "table", ("table", "json"))

    p = r.local("logs", "the logs of an agent's processes")
    p.set_defaults(local_run=cmd_logs)
    p.add_argument("agent")
    p.add_argument("--tail", type=int, default=50)

    p = r.local("services", "local etcd and OpenBao")
    p.set_defaults(local_run=cmd_services)
    p.add_argument("action", choices=["up", "down", "status"])

    p = r.local("model-server", "the scripted OpenAI-compatible model server")
    p.set_defaults(local_run=cmd_model_server)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--script", default=None, help="YAML/JSON script file")
