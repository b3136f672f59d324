"""How many agents fit on this machine: N agents under the local supervisor.

Starts the local fleet (``specmesh up``: etcd, OpenBao, Redis, the scripted model, the
control plane and the supervisor, with the examples), then for each N in ``--sizes``:

1. applies N new agents (``density-<i>``, one Prompt shared) through the control plane's
   API, and times from the first apply to every one of them serving (its status ``N/N``
   ready, then one A2A call answered by each);
2. lets the fleet settle ``--settle`` seconds (the calls' spans exported, connections
   closed), then idle ``--idle`` seconds and reads, per process, the resident set (VmRSS),
   the proportional set (Pss: shared pages split between the processes sharing them) and
   the CPU time used while idle (utime + stime from ``/proc``): per pair (engine and
   sidecar apart), for the N pairs, for the rest of the fleet (``infra``: supervisor,
   control plane, etcd, OpenBao, Redis, model and MCP servers, the examples' agents,
   each by name) and for the whole fleet;
3. compares them with the goal of issue 15 (``goal``: 50 pairs at rest in < 12 GB and
   < 0.25 of a core in total, this machine): measured when N is 50, else projected as
   50 x the per-pair figure + the rest of the fleet;
4. deletes them and waits until their processes are gone.

Before each N it checks that N pairs fit in the memory available (with the previous N's
per-pair Pss, keeping 20 % free); a size that would not fit is reported as skipped, and
then the largest N that does fit by that estimate is run too (``largestThatFits``): the
largest N that ran is reported as ``largestN``.

Prints one JSON document (and a table on stderr). Run:
``uv run python bench/fleet_density.py [--sizes 10,25,50] [--idle 20] [--settle 10]``
(``--smoke``: N = 1, no settling and 1 s of idle -- proves the bench runs, no figures; the
fleet still starts whole, ~1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localfleet.fleet import Fleet, FleetOptions  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024
GOAL_PAIRS = 50
GOAL_MEM_MB = 12_000.0
"""< 12 GB (in MiB, as every figure here: a little stricter than 12 GiB)."""
GOAL_CORES = 0.25


def _kb(path: str, field: str) -> float:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _mem_available_mb() -> float:
    return _kb("/proc/meminfo", "MemAvailable") / 1024


class Api:
    def __init__(self, state: dict[str, Any]) -> None:
        self.base = state["endpoints"]["controlPlane"]
        token = Path(state["adminTokenFile"]).read_text().strip()
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        r = self.session.request(method, f"{self.base}{path}", json=body, timeout=60)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json()


def _manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "base": {
                "description": "density bench agent",
                "promptKey": "density",
                "callers": {"principals": ["specmesh/*"]},
            },
            "model": {
                "model": "qwen-plus-latest",
                "baseUrl": "https://dashscope.aliyuncs.com/compatible-mode",
                "apiKey": f"sk-density-{name}",
            },
        },
    }


def _instances(home: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((home / "supervisor.json").read_text())["instances"])
    except (OSError, ValueError, KeyError):
        return []


def _wait(check: Any, what: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not within {timeout:.0f}s")


def _ask(url: str, token: str, attempts: int = 3) -> None:
    """One call through an instance's public entry (its card is read there). A first turn
    on a loaded machine can leave the SDK's HTTP client (5 s read timeout) waiting longer
    than that between two events: such a call is asked again, up to ``attempts`` times."""
    import asyncio

    from a2a.client.errors import A2AClientTimeoutError

    from specmeshctl.a2aclient import invoke

    for attempt in range(1, attempts + 1):
        try:
            result = asyncio.run(asyncio.wait_for(invoke(url, "ping", token=token), 60))
        except A2AClientTimeoutError:
            if attempt == attempts:
                raise
            print(f"{url}: timed out, asking again", file=sys.stderr)
            continue
        if result.state != "completed":
            raise RuntimeError(f"{url}: {result.state}")
        return


def _fleet_pids(fleet: Fleet, home: Path) -> dict[int, str]:
    """The fleet's own processes (etcd and OpenBao too) and the examples' agents, by pid."""
    pids = {p["pid"]: p["name"] for p in fleet.status()["processes"] if p.get("running")}
    try:
        services = json.loads((home / "services.json").read_text())
    except (OSError, ValueError):
        services = {}
    for key, name in (("etcdPid", "etcd"), ("baoPid", "openbao")):
        if services.get(key):
            pids[int(services[key])] = name
    for inst in _instances(home):
        for p in inst["processes"]:
            pids.setdefault(p["pid"], f"{inst['agent']}-{inst['track']}-{p['role']}")
    return pids


def _goal(n: int, per_pair: dict[str, float], infra: dict[str, Any]) -> dict[str, Any]:
    """50 pairs at rest against the goal: measured at N = 50, else projected from N."""
    mem = GOAL_PAIRS * per_pair["pssMB"] + infra["pssMB"]
    cores = (GOAL_PAIRS * per_pair["idleCpuPercent"] + infra["idleCpuPercent"]) / 100
    return {
        "pairs": GOAL_PAIRS,
        "basis": "measured" if n == GOAL_PAIRS else f"projected from N={n}",
        "pssMB": round(mem, 0),
        "pssGoalMB": GOAL_MEM_MB,
        "memMet": mem < GOAL_MEM_MB,
        "idleCores": round(cores, 3),
        "idleCoresGoal": GOAL_CORES,
        "cpuMet": cores < GOAL_CORES,
    }


def _measure(
    home: Path, names: list[str], idle: float, fleet_pids: dict[int, str]
) -> dict[str, Any]:
    """Memory and idle CPU of the N agents' processes, of the rest and of the whole fleet."""
    instances = [i for i in _instances(home) if i["agent"] in names]
    agent_pids = [p["pid"] for i in instances for p in i["processes"]]
    every = agent_pids + [p for p in fleet_pids if p not in agent_pids]
    before = {pid: _cpu_seconds(pid) for pid in every}
    t0 = time.monotonic()
    time.sleep(idle)
    elapsed = time.monotonic() - t0
    cpu = {pid: (_cpu_seconds(pid) - before[pid]) / elapsed for pid in every}
    rss = {pid: _kb(f"/proc/{pid}/status", "VmRSS") / 1024 for pid in every}
    pss = {pid: _kb(f"/proc/{pid}/smaps_rollup", "Pss") / 1024 for pid in every}
    by_role: dict[str, list[int]] = {"engine": [], "sidecar": []}
    for i in instances:
        for p in i["processes"]:
            by_role[p["role"]].append(p["pid"])
    n = len(instances)

    def per(pids: list[int], table: dict[int, float]) -> float:
        return sum(table[p] for p in pids) / max(1, n)

    rest = [p for p in every if p not in agent_pids]
    per_pair = {
        "rssMB": round(per(agent_pids, rss), 1),
        "pssMB": round(per(agent_pids, pss), 1),
        "engineRssMB": round(per(by_role["engine"], rss), 1),
        "sidecarRssMB": round(per(by_role["sidecar"], rss), 1),
        "enginePssMB": round(per(by_role["engine"], pss), 1),
        "sidecarPssMB": round(per(by_role["sidecar"], pss), 1),
        "idleCpuPercent": round(100 * per(agent_pids, cpu), 3),
        "engineIdleCpuPercent": round(100 * per(by_role["engine"], cpu), 3),
        "sidecarIdleCpuPercent": round(100 * per(by_role["sidecar"], cpu), 3),
    }
    infra = {
        "processes": len(rest),
        "rssMB": round(sum(rss[p] for p in rest), 1),
        "pssMB": round(sum(pss[p] for p in rest), 1),
        "idleCpuPercent": round(100 * sum(cpu[p] for p in rest), 2),
        "byProcess": {
            fleet_pids.get(p, str(p)): {
                "pssMB": round(pss[p], 1),
                "idleCpuPercent": round(100 * cpu[p], 2),
            }
            for p in rest
        },
    }
    return {
        "pairs": n,
        "idleSeconds": round(elapsed, 1),
        "perPair": per_pair,
        "agentsTotal": {
            "rssMB": round(sum(rss[p] for p in agent_pids), 1),
            "pssMB": round(sum(pss[p] for p in agent_pids), 1),
            "idleCpuPercent": round(100 * sum(cpu[p] for p in agent_pids), 2),
        },
        "infra": infra,
        "wholeFleet": {
            "processes": len(every),
            "rssMB": round(sum(rss.values()), 1),
            "pssMB": round(sum(pss.values()), 1),
            "idleCpuPercent": round(100 * sum(cpu.values()), 2),
        },
        "goal": _goal(n, per_pair, infra) if n else None,
        "memAvailableMB": round(_mem_available_mb(), 0),
    }


def run_size(
    api: Api, home: Path, n: int, idle: float, settle: float, fleet_pids: dict[int, str]
) -> dict[str, Any]:
    names = [f"density-{n}-{i}" for i in range(n)]
    start = time.monotonic()
    for name in names:
        api.call("POST", "/api/v1/apply", {"manifest": _manifest(name)})
    applied = time.monotonic() - start

    def all_ready() -> bool:
        agents = api.call("GET", "/api/v1/agents?pageSize=1000")["agents"]
        # (ready, desired) replicas of each agent the controller reported on
        counts = {
            a["name"]: (s.get("readyReplicas"), s.get("desiredReplicas"))
            for a in agents
            if (s := a.get("status"))
        }
        return all(counts.get(n) == (1, 1) for n in names)

    _wait(all_ready, f"{n} agents ready", timeout=120 + 12 * n)
    ready = time.monotonic() - start
    for inst in [i for i in _instances(home) if i["agent"] in names]:
        token = api.call("POST", f"/api/v1/agents/{inst['agent']}/invoke-token")["token"]
        _ask(inst["endpoints"]["entry"], token)
    answered = time.monotonic() - start
    time.sleep(settle)
    figures = _measure(home, names, idle, fleet_pids)
    pids = [p["pid"] for i in _instances(home) if i["agent"] in names for p in i["processes"]]
    stop = time.monotonic()
    for name in names:
        api.call("DELETE", f"/api/v1/agents/{name}")
    _wait(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids),
        f"{n} agents' processes to stop",
        timeout=60 + 2 * n,
    )
    return {
        "n": n,
        "applySeconds": round(applied, 2),
        "applyToAllReadySeconds": round(ready, 2),
        "applyToAllAnsweredSeconds": round(answered, 2),
        "deleteToAllStoppedSeconds": round(time.monotonic() - stop, 2),
        **figures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,25,50")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle measurement")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds between the calls and the idle"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="N = 1, 1 s idle: proves the bench runs, no figures"
    )
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.idle, args.settle = "1", 1.0, 0.0
    sizes = [int(s) for s in args.sizes.split(",")]
    home = Path(tempfile.mkdtemp(prefix="specmesh-density-"))
    fleet = Fleet(FleetOptions(home=home))
    state = fleet.up()
    results: dict[str, Any] = {
        "smoke": args.smoke,
        "machine": {
            "cpus": os.cpu_count(),
            "memTotalMB": round(_kb("/proc/meminfo", "MemTotal") / 1024),
        },
        "sizes": [],
        "skipped": [],
    }
    try:
        api = Api(state)
        api.call("POST", "/api/v1/apply", {"manifest": {
            "apiVersion": "specmesh.io/v1", "kind": "Prompt", "metadata": {"name": "density"},
            "spec": {"version": "1.0.0", "template": "You answer briefly."}}})  # fmt: skip
        fleet_pids = _fleet_pids(fleet, home)
        baseline = _measure(home, [], min(args.idle, 10.0), fleet_pids)
        results["baseline"] = baseline["wholeFleet"]  # the fleet with the examples, idle
        per_pair_mb = 250.0
        for n in sizes:
            need = n * per_pair_mb
            available = _mem_available_mb()
            if need > 0.8 * available:
                results["skipped"].append({"n": n, "needMB": need, "availableMB": available})
                continue
            figures = run_size(api, home, n, args.idle, args.settle, fleet_pids)
            results["sizes"].append(figures)
            per_pair_mb = max(figures["perPair"]["pssMB"], 1.0)
            print(json.dumps(figures), file=sys.stderr)
        ran = [s["n"] for s in results["sizes"]]
        if results["skipped"] and ran:
            # the largest N the memory left allows, by the last per-pair Pss: run it too
            fit = int(0.8 * _mem_available_mb() / per_pair_mb)
            if fit > max(ran):
                figures = run_size(api, home, fit, args.idle, args.settle, fleet_pids)
                figures["largestThatFits"] = True
                results["sizes"].append(figures)
                print(json.dumps(figures), file=sys.stderr)
                ran.append(fit)
        results["largestN"] = max(ran) if ran else 0
    finally:
        fleet.down()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
