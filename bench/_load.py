"""Shared pieces of the benchmarks: an open-loop HTTP load generator run in its own
process, a 1 KB upstream, process CPU/RSS readings, and percentile maths."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

PAYLOAD = b"x" * 1024


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class LoadResult:
    rps_target: int
    sent: int
    ok: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    achieved_rps: float


async def _run_load(
    url: str, rps: int, seconds: float, headers: dict[str, str], connections: int
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    interval = 1.0 / rps
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one() -> None:
            nonlocal errors
            start = time.perf_counter()
            try:
                async with session.post(url, data=PAYLOAD, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append((time.perf_counter() - start) * 1000)

        # warm-up: open the connections
        await asyncio.gather(*(one() for _ in range(min(connections, 20))))
        latencies.clear()
        errors = 0
        tasks = []
        t0 = time.perf_counter()
        n = int(rps * seconds)
        for i in range(n):
            delay = t0 + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    return {"sent": n, "latencies": latencies, "errors": errors, "elapsed": elapsed}


def _load_proc(
    url: str, rps: int, seconds: float, headers: dict[str, str], conns: int, out: Any
) -> None:
    out.send(asyncio.run(_run_load(url, rps, seconds, headers, conns)))


def run_load(
    url: str,
    *,
    rps: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    connections: int = 32,
) -> LoadResult:
    """Open-loop load at a fixed rate from a separate process."""
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=_load_proc, args=(url, rps, seconds, headers or {}, connections, child)
    )
    proc.start()
    data = parent.recv()
    proc.join()
    lat = data["latencies"]
    return LoadResult(
        rps_target=rps,
        sent=data["sent"],
        ok=len(lat),
        errors=data["errors"],
        p50_ms=percentile(lat, 50),
        p90_ms=percentile(lat, 90),
        p99_ms=percentile(lat, 99),
        mean_ms=statistics.fmean(lat) if lat else float("nan"),
        achieved_rps=len(lat) / data["elapsed"],
    )


def _upstream_proc(port: int, ready: Any) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=PAYLOAD, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def start_upstream(port: int) -> mp.Process:
    """A 1 KB echo server in its own process."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_upstream_proc, args=(port, ready), daemon=True)
    proc.start()
    ready.wait(10)
    return proc


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dump(name: str, data: Any) -> None:
    print(json.dumps({"bench": name, **data}, indent=2, default=str))
