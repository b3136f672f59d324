"""Shared pieces of the benchmarks: open-loop HTTP and gRPC load generators run in their own
process, 1 KB HTTP and gRPC upstreams, process CPU/RSS readings, closed-loop load with
``wrk``, and percentile maths."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
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
    cpu_s: list[float] | None = None
    """CPU seconds each of the ``cpu_pids`` given used during the load (measured by the
    load process right before and after it)."""
    error_kinds: dict[str, int] | None = None
    """Errors by kind (HTTP status, exception or gRPC status code)."""


async def _open_loop(
    attempt: Callable[[], Awaitable[str | None]],
    *,
    rps: int,
    seconds: float,
    warmup: int,
    cpu_pids: Sequence[int],
) -> dict[str, Any]:
    """Start ``attempt`` every 1/rps s for ``seconds`` (open loop: a slow answer does not
    delay the next start), after ``warmup`` attempts at once (opening connections). An
    attempt returns ``None`` when it succeeded, else the kind of error; only successes are
    timed. CPU seconds of ``cpu_pids`` are read right before and after."""
    latencies: list[float] = []
    kinds: dict[str, int] = {}

    async def one(timed: bool) -> None:
        start = time.perf_counter()
        kind = await attempt()
        if not timed:
            return
        if kind is None:
            latencies.append((time.perf_counter() - start) * 1000)
        else:
            kinds[kind] = kinds.get(kind, 0) + 1

    await asyncio.gather(*(one(False) for _ in range(warmup)))
    tasks = []
    cpu0 = [cpu_seconds(pid) for pid in cpu_pids]
    t0 = time.perf_counter()
    interval = 1.0 / rps
    n = int(rps * seconds)
    for i in range(n):
        delay = t0 + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(True)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    cpu = [cpu_seconds(pid) - c for pid, c in zip(cpu_pids, cpu0, strict=True)]
    return {
        "sent": n,
        "latencies": latencies,
        "errors": sum(kinds.values()),
        "elapsed": elapsed,
        "cpu": cpu,
        "kinds": kinds,
    }


async def _run_load(
    url: str,
    rps: int,
    seconds: float,
    headers: dict[str, str],
    connections: int,
    cpu_pids: Sequence[int] = (),
) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def attempt() -> str | None:
            try:
                async with session.post(url, data=PAYLOAD, headers=headers) as r:
                    await r.read()
                    return None if r.status == 200 else str(r.status)
            except aiohttp.ClientError as e:
                return type(e).__name__

        return await _open_loop(
            attempt, rps=rps, seconds=seconds, warmup=min(connections, 20), cpu_pids=cpu_pids
        )


@dataclass(frozen=True)
class LoadPlan:
    """One open-loop load: HTTP POSTs of 1 KB to ``url``, or (``grpc_method`` set: a full
    ``/service/Method`` path) raw 1 KB gRPC calls to the ``url`` target ``host:port``."""

    url: str
    rps: int
    seconds: float
    headers: tuple[tuple[str, str], ...] = ()
    """HTTP headers, or gRPC metadata."""
    connections: int = 32
    cpu_pids: tuple[int, ...] = ()
    """Processes whose CPU seconds during the load go into :attr:`LoadResult.cpu_s`."""
    grpc_method: str | None = None
    streaming: bool = False


def _run_plan(plan: LoadPlan) -> dict[str, Any]:
    if plan.grpc_method is not None:
        return asyncio.run(
            _run_grpc_load(
                plan.url,
                plan.grpc_method,
                plan.streaming,
                plan.rps,
                plan.seconds,
                list(plan.headers),
                plan.cpu_pids,
            )
        )
    return asyncio.run(
        _run_load(
            plan.url, plan.rps, plan.seconds, dict(plan.headers), plan.connections, plan.cpu_pids
        )
    )


def _loads_proc(plans: list[LoadPlan], out: Any) -> None:
    out.send([_run_plan(plan) for plan in plans])


def run_loads(plans: Sequence[LoadPlan]) -> list[LoadResult]:
    """The loads one after the other from ONE separate process (one start-up for all)."""
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_loads_proc, args=(list(plans), child))
    proc.start()
    data = parent.recv()
    proc.join()
    return [_result(plan.rps, d) for plan, d in zip(plans, data, strict=True)]


def run_load(
    url: str,
    *,
    rps: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    connections: int = 32,
    cpu_pids: Sequence[int] = (),
) -> LoadResult:
    """Open-loop HTTP load at a fixed rate from a separate process; the CPU seconds of
    ``cpu_pids`` during it in ``cpu_s``."""
    plan = LoadPlan(
        url=url,
        rps=rps,
        seconds=seconds,
        headers=tuple((headers or {}).items()),
        connections=connections,
        cpu_pids=tuple(cpu_pids),
    )
    return run_loads([plan])[0]


def _result(rps: int, data: dict[str, Any]) -> LoadResult:
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
        cpu_s=[round(c, 3) for c in data["cpu"]] if data.get("cpu") else None,
        error_kinds=data.get("kinds") or None,
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


def _model_proc(port: int, script: dict[str, Any], ready: Any) -> None:
    """The project's scripted model server, its app mounted at /llm (the path an engine
    calls on its egress)."""
    from localfleet.modelserver import ScriptedModelServer

    async def main() -> None:
        server = ScriptedModelServer(script=script)
        root = web.Application()
        root.add_subapp("/llm", server.app)
        runner = web.AppRunner(root, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def start_model_server(port: int, script: dict[str, Any]) -> mp.process.BaseProcess:
    """The scripted model server in its own process, serving ``script`` at
    ``http://127.0.0.1:{port}/llm``; returns once it listens."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_model_proc, args=(port, script, ready), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError("the scripted model server did not start")
    return proc


def start_upstream(port: int) -> mp.Process:
    """A 1 KB echo server in its own process."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_upstream_proc, args=(port, ready), daemon=True)
    proc.start()
    ready.wait(10)
    return proc


# ---------------------------------------------------------------- gRPC

GRPC_STREAM_MESSAGES = 4
"""Messages of 1 KB the gRPC upstream streams per server-streaming call."""


async def _run_grpc_load(
    target: str,
    method: str,
    streaming: bool,
    rps: int,
    seconds: float,
    metadata: list[tuple[str, str]],
    cpu_pids: Sequence[int],
) -> dict[str, Any]:
    """Open-loop gRPC load (raw 1 KB requests) on one channel (HTTP/2, as the egress keeps
    one per partner instance); a streaming call counts when all its messages came."""
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stream_call = channel.unary_stream(method)
        unary_call = channel.unary_unary(method)

        async def attempt() -> str | None:
            try:
                if not streaming:
                    await unary_call(PAYLOAD, metadata=metadata, timeout=30)
                    return None
                got = 0
                async for _ in stream_call(PAYLOAD, metadata=metadata, timeout=30):
                    got += 1
                return None if got == GRPC_STREAM_MESSAGES else "short_stream"
            except grpc.aio.AioRpcError as e:
                return str(e.code().name)

        # warm-up: the connection
        return await _open_loop(attempt, rps=rps, seconds=seconds, warmup=20, cpu_pids=cpu_pids)


def _grpc_upstream_proc(port: int, service: str, methods: dict[str, bool], ready: Any) -> None:
    import grpc

    async def unary(request: bytes, context: Any) -> bytes:
        return PAYLOAD

    async def stream(request: bytes, context: Any) -> Any:
        for _ in range(GRPC_STREAM_MESSAGES):
            yield PAYLOAD

    async def main() -> None:
        server = grpc.aio.server()
        handlers = {
            name: grpc.unary_stream_rpc_method_handler(stream)
            if streaming
            else grpc.unary_unary_rpc_method_handler(unary)
            for name, streaming in methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def start_grpc_upstream(port: int, service: str, methods: dict[str, bool]) -> mp.Process:
    """A gRPC server in its own process answering every method of ``service`` (name ->
    server-streaming) with raw bytes: 1 KB, or :data:`GRPC_STREAM_MESSAGES` x 1 KB."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(
        target=_grpc_upstream_proc, args=(port, service, methods, ready), daemon=True
    )
    proc.start()
    ready.wait(20)
    return proc


# ---------------------------------------------------------------- closed loop (wrk)

_WRK_POST = """wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def wrk_rps(
    url: str, *, seconds: float, connections: int = 8, threads: int = 1, wrk: str | None = None
) -> dict[str, Any] | None:
    """Closed-loop capacity with ``wrk`` (the same 1 KB POST as the open-loop load):
    requests per second and latency percentiles; ``None`` when ``wrk`` is not installed."""
    wrk = wrk or shutil.which("wrk")
    if wrk is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_POST)
        script = f.name
    try:
        out = subprocess.run(
            [
                wrk,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(script)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)

    def latency(p: str) -> float | None:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            return None
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return round(float(m.group(1)) * scale, 3)

    return {
        "rps": float(rps.group(1)) if rps else None,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1).strip() if socket_errors else None,
    }


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
