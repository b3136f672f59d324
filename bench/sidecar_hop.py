"""Sidecar benchmark, side by side in one run.

* Latency a pair of sidecars adds (caller's egress -> mTLS -> callee's inbound, with the
  partner credential injected from Vault) against a direct call to the same 1 KB upstream,
  p50/p90/p99 at 100 and 1,000 requests per second (open loop, load from its own process).
  Per hop = the pair's added latency / 2 (each request crosses two sidecars, as in Dapr's
  published "pair of sidecars" figure).
* The sidecars' CPU per 1,000 rps and resident memory.
* Reload: time from an etcd write (the spec change applied) to the new snapshot arriving
  on a WatchSnapshots stream of sidecar A, and to a real engine beside sidecar A serving
  it -- its agent card's ``version`` (the spec revision) showing the new revision, polled
  in a tight loop (p50/p99 over repeated writes, both from the same writes). The etcd
  write happens inside the apply call (after validation and the Vault write of the
  partner header), so both are given from the call's start and from its return: the
  time from the write itself lies between the two.

Real etcd and OpenBao (KV + PKI) from ``specmesh.services``; two real ``specmesh sidecar``
processes and one real ``specmesh engine`` beside sidecar A, with the environment
``specmesh.fleet`` gives engines (no Vault address, token or secret). Run:
``uv run python bench/sidecar_hop.py [--seconds 10] [--reloads 30]`` (``--smoke``: 0.5 s per
rate, 3 reloads -- proves the bench runs, no figures).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
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
_ENGINE_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV")


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


_PROMPT = {
    "apiVersion": "specmesh.io/v1",
    "kind": "Prompt",
    "metadata": {"name": "bench"},
    "spec": {"version": "1.0.0", "template": "You are a benchmark agent."},
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


def _engine(home: Path, ports: dict[str, int]) -> subprocess.Popen:
    """A real engine beside sidecar A, with the environment specmesh.fleet gives engines."""
    env = {k: v for k, v in os.environ.items() if k in _ENGINE_ENV_KEEP}
    env.update(
        AGENT_NAME="bench-a",
        HOME=str(home),
        SPECMESH_SYNC_ADDR=f"127.0.0.1:{ports['sync']}",
        SPECMESH_EGRESS_URL=f"http://127.0.0.1:{ports['egress']}",
        SPECMESH_ENGINE_HTTP=f"127.0.0.1:{ports['engine']}",
        SPECMESH_ENGINE_GRPC=f"127.0.0.1:{free_port()}",
        SPECMESH_LOG_LEVEL="WARNING",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    log = (home / "engine-bench-a.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "specmesh.cli", "engine"],
        env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
        stdout=log,
        stderr=log,
    )


def _stand_in_engine(sync_port: int, agent: str) -> None:
    """What the upstream behind sidecar B lacks to be routed to: an engine reporting
    SERVING. Holds a WatchSnapshots stream open on B's sync server (the sidecar's sign
    that its engine is alive) and reports each snapshot as served, so B's registry entry
    says ``serving`` and A's egress picks it."""
    from specmesh.v1 import common_pb2

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sync_port}") as channel:
            stub = sidecar_pb2_grpc.SpecSyncServiceStub(channel)
            stream = stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name=agent))
            async for response in stream:
                await stub.ReportStatus(
                    sidecar_pb2.ReportStatusRequest(
                        agent_name=agent,
                        state=common_pb2.ENGINE_STATE_SERVING,
                        serving_revision=response.snapshot.revision,
                        serving_etcd_revision=response.snapshot.etcd_revision,
                    )
                )

    while True:  # until terminated; the sidecar may not listen yet
        try:
            asyncio.run(main())
        except grpc.RpcError:
            time.sleep(0.2)


def _start_stand_in_engine(sync_port: int, agent: str) -> mp.process.BaseProcess:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_stand_in_engine, args=(sync_port, agent), daemon=True)
    proc.start()
    return proc


def _wait_get(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered 200")


def _wait_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = requests.post(url, data=b"{}", timeout=2)
        except requests.RequestException as e:
            last = repr(e)
        else:
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:300]}"
        time.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200 (last: {last})")


async def _card_revision(session: aiohttp.ClientSession, card_url: str) -> int:
    """The spec revision the engine serves: its agent card's version (0 while 503)."""
    async with session.get(card_url) as r:
        if r.status != 200:
            return 0
        return int((await r.json())["version"])


async def _reload_times(
    svc: SpecService, sync_port: int, engine_url: str, n: int
) -> dict[str, list[float]]:
    """Per etcd write (n times): until the snapshot is on a WatchSnapshots stream, and
    until the engine's agent card shows the new revision (polled in a tight loop).

    The card is fetched on a new connection each time, as when this was first measured: the
    engine's listener then answered kept-alive requests ~40 ms late (Nagle against delayed
    ACK). It sets TCP_NODELAY now (:func:`specmesh.serving.bind_tcp`); a new connection
    per poll is kept so the figures compare with the earlier ones.
    """
    out: dict[str, list[float]] = {"apply": [], "stream": [], "engine": []}
    card_url = f"{engine_url}/.well-known/agent-card.json"
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{sync_port}") as channel,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        stub = sidecar_pb2_grpc.SpecSyncServiceStub(channel)
        stream = stub.WatchSnapshots(sidecar_pb2.WatchSnapshotsRequest(agent_name="bench-a"))
        first = await stream.read()
        revision = first.snapshot.revision

        async def on_stream(after: int, start: float) -> tuple[float, int]:
            while True:
                msg = await stream.read()
                if msg.snapshot.revision > after:
                    return (time.perf_counter() - start) * 1000, msg.snapshot.revision

        async def on_engine(after: int, start: float) -> float:
            while await _card_revision(session, card_url) <= after:
                pass
            return (time.perf_counter() - start) * 1000

        async with asyncio.timeout(30):  # the engine serves the stream's first revision
            await on_engine(revision - 1, time.perf_counter())
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
            out["apply"].append((time.perf_counter() - start) * 1000)
            async with asyncio.timeout(30):
                (stream_ms, new), engine_ms = await asyncio.gather(
                    on_stream(revision, start), on_engine(revision, start)
                )
            revision = new
            out["stream"].append(stream_ms)
            out["engine"].append(engine_ms)
        stream.cancel()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reloads", type=int, default=30)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: proves the bench runs, no figures"
    )
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.reloads = 0.5, 3
    home = Path(tempfile.mkdtemp(prefix="specmesh-bench-"))
    services = LocalServices(home=home / "services")
    state = services.start()
    procs: list[subprocess.Popen[bytes] | mp.process.BaseProcess] = []
    try:
        asyncio.run(setup_pki(address=state["baoAddress"], token=state["baoToken"]))
        etcd = EtcdClient.from_endpoint(state["etcdEndpoint"])
        vault = VaultClient(address=state["baoAddress"], token=state["baoToken"])
        svc = SpecService(
            store=SpecStore(etcd=etcd, keys=Keys(prefix=PREFIX)),
            vault=vault,
            pki_mount="specmesh-pki",  # apply keeps each agent's own PKI role, as in the fleet
        )
        asyncio.run(_apply(svc, _PROMPT))  # the engine serves nothing without its prompt
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
        procs.append(start_upstream(upstream_port))
        b, b_ports = _sidecar(
            "bench-b",
            home,
            state,
            sync=free_port(),
            egress=free_port(),
            inbound=free_port(),
            ops=free_port(),
            engine=upstream_port,
        )
        procs.append(_start_stand_in_engine(b_ports["sync"], "bench-b"))
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
        engine = _engine(home, a_ports)
        procs += [engine, a, b]
        via = f"http://127.0.0.1:{a_ports['egress']}/a2a/bench-b/echo"
        direct = f"http://127.0.0.1:{upstream_port}/echo"
        engine_url = f"http://127.0.0.1:{a_ports['engine']}"
        _wait_ok(via)
        _wait_get(f"{engine_url}/readyz")
        _wait_get(f"http://127.0.0.1:{a_ports['ops']}/readyz")  # the engine reported SERVING
        results: dict[str, object] = {"smoke": args.smoke}
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
        reloads = asyncio.run(_reload_times(svc, a_ports["sync"], engine_url, args.reloads))
        # The etcd write happens inside the apply call (after validation and the Vault
        # write of the partner header): "from the write" lies between the two bounds.
        after_apply = {
            key: [t - a for t, a in zip(reloads[key], reloads["apply"], strict=True)]
            for key in ("stream", "engine")
        }

        def p50_p99(values: list[float]) -> dict[str, float]:
            return {
                "p50": round(percentile(values, 50), 2),
                "p99": round(percentile(values, 99), 2),
            }

        results["reload_ms"] = {
            "n": args.reloads,
            "from_apply_call_start": {
                "to_snapshot_stream": p50_p99(reloads["stream"]),
                "to_engine_serving": p50_p99(reloads["engine"]),
            },
            "from_apply_call_return": {
                "to_snapshot_stream": p50_p99(after_apply["stream"]),
                "to_engine_serving": p50_p99(after_apply["engine"]),
            },
            "apply_call": p50_p99(reloads["apply"]),
        }
        dump("sidecar_hop", results)
        return 0
    finally:
        for p in procs:
            p.terminate()
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
