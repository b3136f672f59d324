"""Engine benchmark, side by side in one run.

* Overhead per turn: a turn through the real engine against a bare model call to the
  same scripted model server (it answers at once): the call ``engine.openai_chat`` makes
  for a caller that waits for the whole answer -- one non-streamed
  ``POST /chat/completions`` with the same messages, model, temperature and max_tokens,
  over a kept-alive aiohttp connection. p50/p90/p99 of each, taking turns, and the
  difference. Three engine paths:

  - ``http``: ``POST /v1/invoke`` on a real ``specmesh engine --spec-dir`` process
    (EngineRuntime + its HTTP server), from this process over a kept-alive connection,
    with ``GET /healthz`` on the same connection as the HTTP floor;
  - ``a2a``: A2A 1.0 JSON-RPC ``SendMessage`` on the same process (a new contextId per
    turn; the a2a-sdk request handler, task store and event queue on top of the turn);
  - ``in_process``: ``EngineRuntime.run()`` in this process (the loop, prompt, memory,
    spans and ModelClient; no HTTP), against the bare call made from the same process.

  Beside them, ``litellm_alone``: the same call through ``litellm.acompletion``, streamed
  and whole (CPU per call) -- what the engine paid per call before its own client.

  The engine calls ``{egress}/llm/v1/...``. Here the model server's app is mounted at
  ``/llm`` and the egress URL points at its root, so the engine and the bare call reach
  the very same server at the very same URL with no hop in between; the sidecar hop is
  measured on its own by ``bench/sidecar_hop.py``.
* Turns per second at 1, 10 and 100 concurrent conversations (closed loop, each turn a
  new contextId so the prompt size stays the same), over ``/v1/invoke`` and A2A
  ``SendMessage``, with the engine's CPU per turn, beside the bare calls per second at
  the same concurrency.
* Start-up: spawn ``python -m specmeshctl engine --spec-dir DIR`` until ``/readyz`` is
  200, 3 runs; how long the engine's imports alone take, which heavy packages they pull
  in (litellm, chromadb, mcp, openai: none for this OpenAI-compatible agent) and what
  importing litellm would add.
* Resident memory (VmRSS) of that process at rest after ready, after the first 20 turns,
  after the overhead turns and at the end.
* A cProfile of 500 A2A ``SendMessage`` turns inside an engine (runtime + servers in one
  child process, as ``specmesh engine`` runs them): the top 10 functions by cumulative
  time (and inside the HTTP stack, which wraps the whole turn), by own time, and own time
  by package. cProfile counts each resumption of a coroutine as a call.

The engine runs on uvloop (its default); ``--no-uvloop`` runs it on asyncio's loop
(``SPECMESH_ENGINE_UVLOOP=false``) for an A/B.

Goals (engine issue): overhead under 2 ms per turn, ready under 3 s, under 150 MB at rest;
issue 15: ready under 2.5 s (the comparison with ADK is ``bench/agent_a2a.py``'s).
Run: ``uv run python bench/engine_turn.py [--seconds 6] [--turns 1000] [--no-uvloop]``;
``--smoke`` runs every part with tiny sizes (a few seconds of work beyond the imports) to
prove the bench still works -- its figures mean nothing.
"""

from __future__ import annotations

import os

# litellm fetches its price map on import unless told not to (offline: seconds of retries)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import cpu_seconds, dump, percentile, rss_mb, start_model_server
from specmesh.ports import free_port

REPO = Path(__file__).resolve().parent.parent

AGENT = "bench-agent"
ANSWER = "The scripted model answers at once, with a short answer of a few words."
TEMPLATE = (
    "You are {{name}}, the benchmark agent. Answer the user's question briefly and "
    "precisely. If you do not know, say so. Never invent facts, and keep a friendly tone. "
    "Today you help with questions about configuration, gateways and scheduled jobs."
)
MODEL_PART = {"model": "scripted", "temperature": 0.2, "maxTokens": 512}
QUESTION = "How do I roll back a configuration change made an hour ago?"
_ENGINE_ENV: dict[str, str] = {}
"""Settings every spawned engine gets on top (``--no-uvloop``)."""
_ENGINE_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV")


# ---------------------------------------------------------------- spec folder


def _write_spec(folder: Path) -> Path:
    """The six part files, prompts/ and mcp/ that DirSnapshotFeed reads; no tools."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "agent-base.json": {
            "description": "The benchmark agent.",
            "promptKey": "bench-prompt",
            "variables": {"name": "Bench"},
            "skills": [{"id": "qa", "name": "Questions"}],
        },
        "model.json": MODEL_PART,
        "mcp-servers.json": {"mcpServers": []},
        "partner-agents.json": {"agents": []},
        "knowledge.json": {"enabled": False},
        "memory.json": {"storageType": "inMemory"},
    }
    for name, doc in parts.items():
        (folder / name).write_text(json.dumps(doc))
    (folder / "prompts").mkdir(exist_ok=True)
    (folder / "prompts" / "bench.json").write_text(
        json.dumps({"promptKey": "bench-prompt", "version": "1.0.0", "template": TEMPLATE})
    )
    # a registry entry the agent does not reference: the folder has its usual shape, and
    # the turns stay tool-free (MCP is not what this benchmark measures)
    (folder / "mcp").mkdir(exist_ok=True)
    (folder / "mcp" / "servers.yaml").write_text(
        "apiVersion: specmesh.io/v1\nkind: McpServer\nmetadata: {name: unused}\n"
        "spec: {url: 'http://127.0.0.1:9/mcp'}\n"
    )
    return folder


# ---------------------------------------------------------------- model server


def _start_model(port: int) -> mp.process.BaseProcess:
    return start_model_server(port, {"rules": [], "fallback": {"type": "text", "text": ANSWER}})


# ---------------------------------------------------------------- engine process


def _engine_env(egress: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENGINE_ENV_KEEP}
    env.update(
        AGENT_NAME=AGENT,
        HOME=os.environ.get("HOME", "/tmp"),
        SPECMESH_EGRESS_URL=egress,
        SPECMESH_LOG_LEVEL="WARNING",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    env.update(_ENGINE_ENV)
    return env


def engine_argv(folder: Path, http: int, grpc: int) -> list[str]:
    """The engine process serving the spec folder, as the benchmarks start it."""
    return [
        sys.executable,
        "-m",
        "specmeshctl",
        "engine",
        "--spec-dir",
        str(folder),
        "--http",
        f"127.0.0.1:{http}",
        "--grpc",
        f"127.0.0.1:{grpc}",
    ]


def _spawn_engine(
    folder: Path, egress: str, log: Path
) -> tuple[subprocess.Popen[bytes], str, float, float]:
    """Start an engine; return it, its URL, seconds to first HTTP answer and to ready."""
    http, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    with log.open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            engine_argv(folder, http, grpc_port),
            env=_engine_env(egress),
            cwd=str(REPO),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    listening = float("nan")
    deadline = t0 + 60
    with requests.Session() as http_session:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the engine exited ({proc.returncode}); see {log}")
            try:
                status = http_session.get(f"{url}/readyz", timeout=1).status_code
            except requests.RequestException:
                status = 0
            now = time.perf_counter()
            if status and listening != listening:  # first HTTP answer (nan != nan)
                listening = now - t0
            if status == 200:
                return proc, url, listening, now - t0
            time.sleep(0.005)
    proc.kill()
    raise RuntimeError(f"the engine was not ready within 60 s; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_IMPORTS = "engine.main, engine.hot_reload, engine.server, engine.intake, specmeshctl"
_IMPORT_PROBE = f"""
import json, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
t0, r0 = time.perf_counter(), rss()
import {_IMPORTS}
t1, r1 = time.perf_counter(), rss()
import sys
loaded = [m for m in ("litellm", "chromadb", "mcp", "openai") if m in sys.modules]
import litellm
t2, r2 = time.perf_counter(), rss()
print(json.dumps({{"s": [t1 - t0, t2 - t1], "mb": [r0, r1 - r0, r2 - r1], "loaded": loaded}}))
"""


def _imports() -> dict[str, Any]:
    """What the engine's imports cost alone: seconds and resident MB; what litellm would
    add (an agent whose provider is not OpenAI-compatible imports it, in a thread); which
    heavy packages the engine's imports pulled in (none expected); and the heaviest
    top-level packages by ``-X importtime`` (cumulative, nested ones included, so they
    overlap)."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    run = partial(subprocess.run, cwd=str(REPO), env=env, capture_output=True, text=True)
    probe = json.loads(run([sys.executable, "-c", _IMPORT_PROBE], check=True).stdout)
    timed = run([sys.executable, "-X", "importtime", "-c", f"import {_IMPORTS}"], check=True)
    heaviest: dict[str, int] = {}
    for line in timed.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (p.strip() for p in line.split(":", 1)[1].split("|"))
        if "." not in name:
            heaviest[name] = max(heaviest.get(name, 0), int(cumulative))
    top = sorted(heaviest.items(), key=lambda kv: -kv[1])[:6]
    return {
        "engine_s": round(probe["s"][0], 3),
        "litellm_s": round(probe["s"][1], 3),
        "rss_mb": {
            "python_itself": round(probe["mb"][0], 1),
            "engine": round(probe["mb"][1], 1),
            "litellm": round(probe["mb"][2], 1),
        },
        "heavy_packages_loaded_by_the_engine": probe["loaded"],
        "heaviest_packages_s": {k: round(v / 1e6, 3) for k, v in top},
    }


# ---------------------------------------------------------------- one turn, three ways


_BARE_HEADERS = {"Authorization": "Bearer sidecar-injected", "Content-Type": "application/json"}


def _bare_request(api_base: str, messages: list[dict[str, Any]]) -> tuple[str, bytes]:
    """The call engine.openai_chat makes for this spec when the caller waits for the
    whole answer (``SendMessage``, ``/v1/invoke``): URL and body."""
    from specmesh.spec.models import ModelSpec

    spec = ModelSpec.model_validate(MODEL_PART)
    body = {
        "model": spec.model,
        "messages": messages,
        "temperature": spec.temperature,
        "max_tokens": spec.max_tokens,
    }
    return f"{api_base}/chat/completions", json.dumps(body).encode()


def _bare_call(
    session: aiohttp.ClientSession, request: tuple[str, bytes]
) -> Callable[[], Awaitable[None]]:
    """The bare model call (aiohttp, kept-alive connection), the engine's reference."""
    url, data = request

    async def call() -> None:
        async with session.post(url, data=data, headers=_BARE_HEADERS) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"the model answered {r.status}: {body[:200]!r}")
            json.loads(body)

    return call


def _litellm_kwargs(api_base: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """What the engine passed to litellm for this spec before its own client (streamed,
    usage included, temperature, timeout, retries)."""
    from engine.llm import SIDECAR_API_KEY
    from specmesh.spec.models import ModelSpec

    spec = ModelSpec.model_validate(MODEL_PART)
    return {
        "model": f"openai/{spec.model}",
        "messages": messages,
        "api_base": api_base,
        "api_key": SIDECAR_API_KEY,
        "temperature": spec.temperature,
        "timeout": spec.timeout_seconds,
        "num_retries": spec.max_retries,
        "max_tokens": spec.max_tokens,
        "stream": spec.stream,
        "stream_options": {"include_usage": True},
    }


async def _litellm_turn(kwargs: dict[str, Any]) -> int:
    """One bare litellm call; returns the number of chunks read (1 when not streamed)."""
    import litellm

    response = await litellm.acompletion(**kwargs)
    if not kwargs.get("stream"):
        return 1
    chunks = 0
    async for _chunk in response:
        chunks += 1
    return chunks


def _http_turn(session: aiohttp.ClientSession, url: str) -> Callable[[str], Awaitable[None]]:
    async def turn(context_id: str) -> None:
        async with session.post(
            f"{url}/v1/invoke", json={"contextId": context_id, "message": QUESTION}
        ) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"/v1/invoke answered {r.status}: {body[:200]!r}")

    return turn


def _a2a_turn(session: aiohttp.ClientSession, url: str) -> Callable[[str], Awaitable[None]]:
    """A2A 1.0 JSON-RPC ``SendMessage`` (the caller waits for the whole answer)."""

    async def turn(context_id: str) -> None:
        request = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "SendMessage",
            "params": {
                "message": {
                    "role": "ROLE_USER",
                    "messageId": uuid.uuid4().hex,
                    "contextId": context_id,
                    "parts": [{"text": QUESTION}],
                }
            },
        }
        async with session.post(f"{url}/", json=request, headers=_A2A_HEADERS) as r:
            body = await r.read()
        state = json.loads(body).get("result", {}).get("task", {}).get("status", {}).get("state")
        if r.status != 200 or state != "TASK_STATE_COMPLETED":
            raise RuntimeError(f"SendMessage answered {r.status}: {body[:200]!r}")

    return turn


_A2A_HEADERS = {"A2A-Version": "1.0"}
_TURNS = {"http": _http_turn, "a2a": _a2a_turn}
"""Engine paths by name: ``POST /v1/invoke`` and A2A JSON-RPC ``SendMessage``."""


async def _timed(fn: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return (time.perf_counter() - t0) * 1000


def _stats(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def _side_by_side(engine: list[float], bare: list[float]) -> dict[str, Any]:
    e, b = _stats(engine), _stats(bare)
    return {
        "engine": e,
        "bare_call": b,
        "overhead_ms": {k: round(e[k] - b[k], 3) for k in ("p50_ms", "p90_ms", "p99_ms")},
    }


async def _recorded_messages(model_root: str) -> list[dict[str, Any]]:
    """The messages of the engine's last model call, as the model server received them."""
    async with aiohttp.ClientSession() as s, s.get(f"{model_root}/llm/_scripted/requests") as r:
        data = await r.json()
    records = data if isinstance(data, list) else data.get("requests", [])
    return list(records[-1]["messages"])


async def _overhead_http(
    url: str, model_root: str, turns: int, warmup: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``POST /v1/invoke`` and A2A ``SendMessage`` against the bare call, taking turns
    (the order rotates); plus the HTTP floor (a trivial route of the same server on the
    same kept-alive connection). Returns {"http": ..., "a2a": ...} and the messages."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as bare_session,
    ):
        engine_turns = {name: make(session, url) for name, make in _TURNS.items()}
        for i in range(warmup):
            for turn in engine_turns.values():
                await turn(f"warm-{i}")
        messages = await _recorded_messages(model_root)
        bare = _bare_call(bare_session, _bare_request(f"{model_root}/llm/v1", messages))
        for _ in range(warmup):
            await bare()

        async def healthz() -> None:
            async with session.get(f"{url}/healthz") as r:
                await r.read()

        timings: dict[str, list[float]] = {name: [] for name in (*engine_turns, "bare")}
        floor: list[float] = []
        for i in range(turns):
            calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                *(
                    (name, lambda turn=turn, i=i: turn(f"overhead-{i}"))
                    for name, turn in engine_turns.items()
                ),
                ("bare", bare),
            ]
            shift = i % len(calls)
            for name, fn in calls[shift:] + calls[:shift]:
                timings[name].append(await _timed(fn))
            if i % 4 == 0:
                floor.append(await _timed(healthz))
    result = {name: _side_by_side(timings[name], timings["bare"]) for name in engine_turns}
    result["http"]["http_floor_healthz"] = _stats(floor)
    return result, messages


async def _overhead_in_process(
    folder: Path, model_root: str, messages: list[dict[str, Any]], turns: int, warmup: int
) -> dict[str, Any]:
    """``EngineRuntime.run()`` in this process against the bare call from this process."""
    from engine.hot_reload import EngineRuntime
    from engine.intake import DirSnapshotFeed
    from engine.settings import EngineSettings
    from engine.turn_protocol import TurnCompleted, TurnRequest

    settings = EngineSettings(agent_name=AGENT, egress_url=model_root)
    feed = DirSnapshotFeed(folder, agent_name=AGENT, poll_interval=0.5)
    async with (
        EngineRuntime(feed=feed, settings=settings) as runtime,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as bare_session,
    ):
        await runtime.wait_ready(timeout=30)
        bare = _bare_call(bare_session, _bare_request(f"{model_root}/llm/v1", messages))

        async def engine_turn(context_id: str) -> None:
            last = None
            request = TurnRequest(context_id=context_id, text=QUESTION, stream=False)
            async for event in runtime.run(request):
                last = event
            if not isinstance(last, TurnCompleted):
                raise RuntimeError(f"the turn did not complete: {last!r}")

        for i in range(warmup):
            await engine_turn(f"warm-{i}")
            await bare()
        engine_ms: list[float] = []
        bare_ms: list[float] = []
        for i in range(turns):
            pair = [
                (engine_ms, lambda i=i: engine_turn(f"inproc-{i}")),
                (bare_ms, bare),
            ]
            for out, fn in pair if i % 2 else reversed(pair):
                out.append(await _timed(fn))
    return _side_by_side(engine_ms, bare_ms)


async def _litellm_cost(kwargs: dict[str, Any], calls: int, warmup: int) -> dict[str, Any]:
    """The same call through litellm (what the engine used before its own client),
    streamed and whole: wall and CPU per call in this process."""
    whole = {k: v for k, v in kwargs.items() if k not in ("stream", "stream_options")}
    out: dict[str, Any] = {"chunks_per_streamed_answer": await _litellm_turn(kwargs)}
    for name, kw in (("streamed", kwargs), ("whole", whole)):
        for _ in range(warmup):
            await _litellm_turn(kw)
        ms = []
        cpu0 = time.process_time()
        for _ in range(calls):
            ms.append(await _timed(lambda kw=kw: _litellm_turn(kw)))
        cpu = time.process_time() - cpu0
        out[name] = {
            "p50_ms": round(percentile(ms, 50), 3),
            "client_cpu_ms_per_call": round(cpu * 1000 / calls, 3),
        }
    return out


# ---------------------------------------------------------------- throughput


async def _closed_loop(
    turn: Callable[[str], Awaitable[object]],
    concurrency: int,
    seconds: float,
    tag: str,
    cpu: Callable[[], tuple[float, ...]] = tuple,
) -> dict[str, Any]:
    """``concurrency`` conversations, each turning back to back for ``seconds``, every
    turn a new contextId; ``cpu()`` (CPU-seconds of the processes served) is read around
    the measured part. ``_cpu`` and ``_all`` (turns including the warm-up) are for the
    caller."""
    latencies: list[float] = []
    errors = 0
    done = 0
    stop_at = 0.0

    async def worker(w: int) -> None:
        nonlocal errors, done
        k = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await turn(f"{tag}-{concurrency}-{w}-{k}")
            except (TimeoutError, aiohttp.ClientError, RuntimeError):
                errors += 1
            else:
                latencies.append((time.perf_counter() - t0) * 1000)
            done += 1
            k += 1

    stop_at = time.perf_counter() + min(0.5, seconds)  # warm-up: opens the connections
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    latencies.clear()
    errors = 0
    cpu0 = cpu()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "turns": len(latencies),
        "errors": errors,
        "turns_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "elapsed_s": round(elapsed, 2),
        "_cpu": [b - a for a, b in zip(cpu0, cpu(), strict=True)],
        "_all": done,
    }


async def _throughput(
    engines: dict[str, tuple[str, int]],
    model_pid: int,
    bare_request: tuple[str, bytes],
    seconds: float,
    served: dict[str, int],
) -> dict[str, Any]:
    """Each engine path (name in :data:`_TURNS` -> URL, pid) and the bare call at 1, 10,
    100 conversations."""
    out: dict[str, Any] = {}
    for concurrency in (1, 10, 100):
        level: dict[str, Any] = {}
        for name, (url, pid) in engines.items():
            conn = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=conn) as session:
                r = await _closed_loop(
                    _TURNS[name](session, url),
                    concurrency,
                    seconds,
                    name,
                    cpu=lambda pid=pid: (cpu_seconds(pid), cpu_seconds(model_pid)),
                )
            cpu, model_cpu = r.pop("_cpu")
            served[url] = served.get(url, 0) + r.pop("_all")
            r["engine_cpu_cores"] = round(cpu / r["elapsed_s"], 2)
            r["engine_cpu_ms_per_turn"] = round(cpu * 1000 / max(r["turns"] + r["errors"], 1), 2)
            r["model_server_cpu_cores"] = round(model_cpu / r["elapsed_s"], 2)
            level[name] = r

        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn) as session:
            call = _bare_call(session, bare_request)
            b = await _closed_loop(lambda _, call=call: call(), concurrency, seconds, "bare")
        level["bare_call"] = {k: b[k] for k in ("turns_per_s", "p50_ms", "p99_ms", "errors")}
        out[f"{concurrency}_conversations"] = level
    return out


# ---------------------------------------------------------------- engine in a child process


def _engine_child(folder: str, egress: str, conn: Any) -> None:
    """The engine as ``specmesh engine`` assembles it (telemetry, EngineRuntime over the
    spec folder, EngineServer), in a child process the bench controls, to run it under
    cProfile."""
    os.environ.setdefault("OTEL_INSTRUMENTATION_A2A_SDK_ENABLED", "false")
    import cProfile
    import logging
    import pstats

    import engine.server as engine_server
    from engine.hot_reload import EngineRuntime
    from engine.intake import DirSnapshotFeed
    from engine.settings import EngineSettings
    from engine.telemetry import configure_telemetry

    logging.basicConfig(level=logging.WARNING)
    telemetry = configure_telemetry(agent_name=AGENT)

    async def main() -> None:
        settings = EngineSettings(agent_name=AGENT, egress_url=egress)
        feed = DirSnapshotFeed(folder, agent_name=AGENT, poll_interval=0.5)
        config = engine_server.ServerConfig(agent_name=AGENT, http_port=0, grpc_port=0)
        profiler = cProfile.Profile()
        async with (
            EngineRuntime(feed=feed, settings=settings) as runtime,
            engine_server.EngineServer(
                runner=runtime, config=config, metrics=telemetry.metrics
            ) as server,
        ):
            await runtime.wait_ready(timeout=30)
            conn.send(server.http_url)
            while (command := await asyncio.to_thread(conn.recv)) != "stop":
                if command == "profile":
                    profiler.enable()
                else:  # the number of turns profiled
                    profiler.disable()
                    conn.send(_top(pstats.Stats(profiler), int(command)))

    asyncio.run(main())


class _ChildEngine:
    """An engine in a child process (:func:`_engine_child`), stopped on exit."""

    def __init__(self, folder: Path, egress: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_engine_child, args=(str(folder), egress, child), daemon=True
        )
        self.url = ""

    @property
    def pid(self) -> int:
        return int(self._proc.pid or 0)

    def __enter__(self) -> _ChildEngine:
        self._proc.start()
        if not self._conn.poll(60):
            self._proc.terminate()
            raise RuntimeError("the child engine did not start")
        self.url = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.is_alive():
            self._conn.send("stop")
            self._proc.join(15)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)

    def profile(self, turns: int, warmup: int) -> dict[str, Any]:
        asyncio.run(_drive(self.url, warmup, "profile-warm"))
        self._conn.send("profile")
        asyncio.run(_drive(self.url, turns, "profile"))
        self._conn.send(turns)
        if not self._conn.poll(60):
            raise RuntimeError("the child engine sent no profile")
        result: dict[str, Any] = self._conn.recv()
        return result


async def _drive(url: str, turns: int, prefix: str) -> None:
    """``turns`` A2A ``SendMessage`` turns, one after the other."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        turn = _a2a_turn(session, url)
        for i in range(turns):
            await turn(f"{prefix}-{i}")


# ---------------------------------------------------------------- profile


_HTTP_STACK = (
    "uvicorn/",
    "starlette/",
    "engine/telemetry.py",
    "engine/rest.py",
    "engine/server.py",
)
_LOOP_PLUMBING = ("asyncio/", "selectors.py", "threading.py", "concurrent/futures")


def _where(key: tuple[str, int, str]) -> str:
    file, line, name = key
    for marker in ("site-packages/", str(REPO) + "/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line}({name})"


def _package(file: str, name: str) -> str:
    """Who a profiled function belongs to: a site-package, a part of this repo, the
    event loop, the rest of the standard library, or a built-in (C) call."""
    if file == "~":
        return "(idle: epoll wait)" if "poll" in name and "epoll" in name else "(built-ins)"
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if file.startswith(str(REPO) + "/"):
        return file[len(str(REPO)) + 1 :].split("/", 1)[0]
    if any(p in file for p in _LOOP_PLUMBING):
        return "(asyncio, selectors, threads)"
    return "(stdlib)"


def _top(stats: Any, turns: int) -> dict[str, Any]:
    """Top 10 by cumulative and by own time, per turn; the event loop's own frames and
    built-ins left out of the first two (the idle ``epoll.poll`` would top them)."""
    rows = [
        (key, nc, tt, ct)
        for key, (_cc, nc, tt, ct, _callers) in stats.stats.items()
        if key[0] != "~" and not any(p in key[0] for p in _LOOP_PLUMBING)
    ]

    def table(index: int, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        kept = [r for r in rows if not any(p in r[0][0] for p in skip)]
        return [
            {
                "function": _where(key),
                "cumulative_ms_per_turn": round(ct * 1000 / turns, 3),
                "own_ms_per_turn": round(tt * 1000 / turns, 3),
                "calls_per_turn": round(nc / turns, 1),
            }
            for key, nc, tt, ct in sorted(kept, key=lambda r: -r[index])[:10]
        ]

    by_package: dict[str, float] = {}
    for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        package = _package(file, name)
        by_package[package] = by_package.get(package, 0.0) + tt
    builtins = sorted(
        ((k[2], v[2]) for k, v in stats.stats.items() if k[0] == "~"), key=lambda kv: -kv[1]
    )[:5]
    return {
        "turns": turns,
        "profiled_ms_per_turn": round(stats.total_tt * 1000 / turns, 3),
        "top10_cumulative": table(3),
        # the ASGI stack wraps the whole turn and tops the list above; what runs inside it
        "top10_cumulative_inside_http_stack": table(3, _HTTP_STACK),
        "top10_own_time": table(2),
        "own_ms_per_turn_by_package": {
            k: round(v * 1000 / turns, 3)
            for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])[:12]
        },
        "top5_builtins_own_time": [
            {"function": name, "own_ms_per_turn": round(tt * 1000 / turns, 3)}
            for name, tt in builtins
        ],
    }


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0, help="per throughput level")
    parser.add_argument("--turns", type=int, default=1000, help="turns for the overhead")
    parser.add_argument("--profile-turns", type=int, default=500)
    parser.add_argument(
        "--no-uvloop", action="store_true", help="the spawned engines on asyncio's own loop"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: proves the bench runs, no figures"
    )
    args = parser.parse_args()
    if args.no_uvloop:
        _ENGINE_ENV["SPECMESH_ENGINE_UVLOOP"] = "false"
    startup_runs, warmup, litellm_calls = 3, 20, 300
    if args.smoke:
        args.seconds, args.turns, args.profile_turns = 0.2, 10, 10
        startup_runs, warmup, litellm_calls = 1, 3, 10
    home = Path(tempfile.mkdtemp(prefix="specmesh-bench-engine-"))
    folder = _write_spec(home / AGENT)
    model_port = free_port()
    model_root = f"http://127.0.0.1:{model_port}"
    model = _start_model(model_port)
    engine: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "smoke": args.smoke,
        "uvloop": not args.no_uvloop,
    }
    try:
        # start-up, 3 runs (1 in smoke mode); the last engine stays for the rest
        runs = []
        for i in range(startup_runs):
            if engine is not None:
                _stop(engine)
            engine, url, listening, ready = _spawn_engine(folder, model_root, home / "engine.log")
            runs.append(
                {"run": i + 1, "http_listening_s": round(listening, 3), "ready_s": round(ready, 3)}
            )
        assert engine is not None
        results["startup"] = {
            "runs": runs,
            "ready_s_median": round(statistics.median(r["ready_s"] for r in runs), 3),
            "imports_alone": _imports(),
        }
        time.sleep(1.0)  # at rest: the folder poll and the readiness watcher have run
        rss: dict[str, Any] = {"at_rest_after_ready": round(rss_mb(engine.pid), 1)}
        asyncio.run(_drive(url, warmup, "first"))
        rss["after_first_turns"] = round(rss_mb(engine.pid), 1)
        rss["first_turns"] = warmup

        shipped, messages = asyncio.run(_overhead_http(url, model_root, args.turns, warmup))
        rss["after_overhead_turns"] = round(rss_mb(engine.pid), 1)
        rss["turns_then"] = 2 * (args.turns + warmup) + warmup
        results["overhead_per_turn"] = {
            "prompt": {
                "messages": len(messages),
                "chars": sum(len(str(m.get("content", ""))) for m in messages),
            },
            **shipped,
            "in_process": asyncio.run(
                _overhead_in_process(folder, model_root, messages, args.turns, warmup)
            ),
            "litellm_alone": asyncio.run(
                _litellm_cost(
                    _litellm_kwargs(f"{model_root}/llm/v1", messages), litellm_calls, warmup
                )
            ),
        }
        served = {url: rss["turns_then"]}
        results["throughput"] = asyncio.run(
            _throughput(
                {name: (url, engine.pid) for name in _TURNS},
                model.pid,
                _bare_request(f"{model_root}/llm/v1", messages),
                args.seconds,
                served,
            )
        )
        rss["at_end"] = round(rss_mb(engine.pid), 1)
        rss["turns_at_end"] = served[url]
        results["rss_mb"] = rss
        with _ChildEngine(folder, model_root) as profiled:
            results["profile"] = profiled.profile(args.profile_turns, warmup)
        overhead = results["overhead_per_turn"]
        results["goals"] = {
            "overhead_under_2ms_p50": {
                name: overhead[name]["overhead_ms"]["p50_ms"] < 2
                for name in (*_TURNS, "in_process")
            },
            "ready_under_3s": results["startup"]["ready_s_median"] < 3,
            "ready_under_2_5s": results["startup"]["ready_s_median"] < 2.5,
            "rss_at_rest_under_150mb": rss["at_rest_after_ready"] < 150,
        }
        dump("engine_turn", results)
        return 0
    finally:
        if engine is not None:
            _stop(engine)
        model.terminate()


if __name__ == "__main__":
    sys.exit(main())
