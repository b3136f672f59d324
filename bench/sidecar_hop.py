"""Sidecar benchmark, side by side in one run.

* Latency a pair of sidecars adds (caller's egress -> mTLS -> callee's inbound, with the
  partner credential injected from Vault) against a direct call to the same 1 KB upstream,
  p50/p90/p99 at 100 and 1,000 requests per second (open loop, load from its own process).
  Per hop = the pair's added latency / 2 (each request crosses two sidecars, as in Dapr's
  published "pair of sidecars" figure).
* The sidecars' CPU per 1,000 rps and resident memory.
* Reload: time from an etcd write to the new snapshot arriving on the engine's
  WatchSnapshots stream (p50/p99 over repeated writes).

Real etcd and OpenBao (KV + PKI) from ``specmesh.services``; two real ``specmesh sidecar``
processes. Run: ``uv run python bench/sidecar_hop.py [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import cpu_seconds, dump, percentile, rss_mb, run_load, start_upstream
from sidecar.mtls import setup_pki
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.services import LocalServices, free_port
from specmesh.spec.manifest import LoadedManifest, parse_manifest
from specmesh.specservice import SpecService
from specmesh.store import SpecStore
from specmesh.v1 import sidecar_pb2, sidecar_pb2_grpc
from specmesh.vault import VaultClient

PREFIX = "/bench"


def _agent(name: str, partners: list[dict[str, object]], temperature: float = 0.5) -> dict:
    return {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "base": {"description": f"bench agent {name}", "promptKey": "bench"},
            "model": {"model": "m", "temperature": temperature},
            "partnerAgents": partners,
        },
    }


async def _apply(svc: SpecService, doc: dict) -> None:
    await svc.apply(LoadedManifest("bench", parse_manifest(doc, source="bench")), actor="bench")


def _sidecar(agent: str, home: Path, state: dict, **ports: int) -> tuple[subprocess.Popen, dict]:
    env = {
        **os.environ,
        "AGENT_NAME": agent,
        "SPECMESH_HOME": str(home),
        "SPECMESH_ETCD_ENDPOINT": state["etcdEndpoint"],
        "SPECMESH_ETCD_PREFIX": PREFIX,
        "SPECMESH_VAULT_ADDR": state["baoAddress"],
        "SPECMESH_VAULT_TOKEN": state["baoToken"],
        "SPECMESH_SYNC_ADDR": f"127.0.0.1:{ports['sync']}",
        "SPECMESH_EGRESS_URL": f"http://127.0.0.1:{ports['egress']}",
        "SPECMESH_INBOUND": f"127.0.0.1:{ports['inbound']}",
        "SPECMESH_OPS": f"127.0.0.1:{ports['ops']}",
        "SPECMESH_ENGINE_HTTP": f"127.0.0.1:{ports['engine']}",
        "SPECMESH_MTLS": "true",
        "SPECMESH_LOG_LEVEL": "WARNING",
    }
    log = (home / f"sidecar-{agent}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "specmesh.cli", "sidecar"], env=env, stdout=log, stderr=log
    )
    return proc, ports


def _wait_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.post(url, data=b"{}", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200")


async def _reload_times(svc: SpecService, sync_port: int, n: int) -> list[float]:
    """etcd write -> snapshot on the WatchSnapshots stream, n times."""
    out = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sync_port}") as channel:
        stub = sidecar_pb2_grpc.SpecSyncServiceStub(channel)
        stream = stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name="bench-a"))
        first = await stream.read()
        revision = first.snapshot.revision
        for i in range(n):
            start = time.perf_counter()
            await _apply(
                svc,
                _agent(
                    "bench-a",
                    [{"agentName": "bench-b", "headers": {"x-partner-key": "pk-bench-secret"}}],
                    temperature=round(0.01 * (i + 1), 2),
                ),
            )
            while True:
                msg = await stream.read()
                if msg.snapshot.revision > revision:
                    revision = msg.snapshot.revision
                    break
            out.append((time.perf_counter() - start) * 1000)
        stream.cancel()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reloads", type=int, default=30)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="specmesh-bench-"))
    services = LocalServices(home=home / "services")
    state = services.start()
    procs: list[subprocess.Popen] = []
    try:
        asyncio.run(setup_pki(address=state["baoAddress"], token=state["baoToken"]))
        etcd = EtcdClient.from_endpoint(state["etcdEndpoint"])
        vault = VaultClient(address=state["baoAddress"], token=state["baoToken"])
        svc = SpecService(store=SpecStore(etcd=etcd, keys=Keys(prefix=PREFIX)), vault=vault)
        asyncio.run(_apply(svc, _agent("bench-b", [])))
        asyncio.run(
            _apply(
                svc,
                _agent(
                    "bench-a",
                    [{"agentName": "bench-b", "headers": {"x-partner-key": "pk-bench-secret"}}],
                ),
            )
        )
        upstream_port = free_port()
        procs.append(start_upstream(upstream_port))  # type: ignore[arg-type]
        b, _ = _sidecar(
            "bench-b",
            home,
            state,
            sync=free_port(),
            egress=free_port(),
            inbound=free_port(),
            ops=free_port(),
            engine=upstream_port,
        )
        a, a_ports = _sidecar(
            "bench-a",
            home,
            state,
            sync=free_port(),
            egress=free_port(),
            inbound=free_port(),
            ops=free_port(),
            engine=free_port(),
        )
        procs += [a, b]
        via = f"http://127.0.0.1:{a_ports['egress']}/a2a/bench-b/echo"
        direct = f"http://127.0.0.1:{upstream_port}/echo"
        _wait_ok(via)
        results: dict[str, object] = {}
        for rps in (100, 1000):
            d = run_load(direct, rps=rps, seconds=args.seconds)
            cpu0 = cpu_seconds(a.pid) + cpu_seconds(b.pid)
            v = run_load(via, rps=rps, seconds=args.seconds)
            cpu = cpu_seconds(a.pid) + cpu_seconds(b.pid) - cpu0
            results[f"{rps}rps"] = {
                "direct": d.__dict__,
                "via_sidecar_pair": v.__dict__,
                "added_ms_pair": {
                    k: round(getattr(v, k) - getattr(d, k), 3)
                    for k in ("p50_ms", "p90_ms", "p99_ms")
                },
                "added_ms_per_hop": {
                    k: round((getattr(v, k) - getattr(d, k)) / 2, 3)
                    for k in ("p50_ms", "p90_ms", "p99_ms")
                },
                # CPU-seconds per sidecar per 1,000 requests = cores busy per 1,000 rps
                "sidecar_cpu_per_1000rps": round(
                    cpu / 2 * 1000 / (v.achieved_rps * args.seconds), 3
                ),
            }
        results["rss_mb"] = {
            "sidecar_a": round(rss_mb(a.pid), 1),
            "sidecar_b": round(rss_mb(b.pid), 1),
        }
        reloads = asyncio.run(_reload_times(svc, a_ports["sync"], args.reloads))
        results["reload_ms"] = {
            "n": len(reloads),
            "p50": round(percentile(reloads, 50), 2),
            "p99": round(percentile(reloads, 99), 2),
        }
        dump("sidecar_hop", results)
        return 0
    finally:
        for p in procs:
            p.terminate()
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
