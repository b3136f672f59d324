"""An agent server over A2A against its peers, side by side in one run, on one scripted model.

Three servers, each its own process, each reached on its A2A 1.0 JSON-RPC endpoint (the URL
its agent card gives) with ``SendMessage`` (blocking: the whole answer), a new contextId
per turn, over plain aiohttp; every answer is checked for the expected text, so a failed
turn is counted as an error, never timed:

* ``adk``: the reference -- Google ADK (``google-adk`` pinned below), an ``LlmAgent`` with
  ``LiteLlm`` pointed at the scripted model server, served by ADK's ``to_a2a`` under
  uvicorn (``bench/_adk_agent.py``). ADK is never a project dependency: it runs in a
  throwaway venv this bench makes with ``uv`` (``--adk-venv``, default under
  ``~/.cache/specmesh-bench``), with the project's litellm, a2a-sdk and mcp versions;
* ``floor``: a bare a2a-sdk server (the project's a2a-sdk), an ``AgentExecutor`` answering
  a fixed text with no model (``bench/_a2a_peers.py``) -- what A2A serving alone costs;
* ``specmesh``: the engine, ``specmesh engine --spec-dir DIR`` as ``bench/engine_turn.py``
  spawns it (its egress pointed straight at the model server: no sidecar on this path).

Workload ``plain`` (a text answer, one model call), per server: 200 sequential turns
(p50/p90/p99); then 10 conversations in a closed loop for 8 s (turns/s); the server
process's CPU per turn in each phase; its RSS after the run; spawn to card (process start
until ``GET /.well-known/agent-card.json`` answers 200).

Workload ``tools``: a turn with one MCP tool call and one partner call (the model asks for
both in one step, then answers), same sizes. The MCP server (``mcp`` package, streamable
HTTP) and the partner (the bare a2a-sdk server) are their own processes, shared by both
sides. ADK: ``McpToolset`` on the MCP server and an ``AgentTool`` around a
``RemoteA2aAgent`` on the partner, direct. specmesh: the engine reaches MCP servers,
partners and the model only through its sidecar's egress, so it runs as in the fleet:
real etcd and OpenBao, its spec applied, a real ``specmesh sidecar`` beside it and one
beside the partner (mTLS between them, as ``bench/sidecar_hop.py`` sets them up) -- its
figures include those hops (``specmesh_includes_sidecar_hops``). A turn passes only when
the partner's answer reached the model (the script answers the expected text only then);
the MCP and partner calls are counted at their servers (expected 1.0 per turn each).

Every figure has its ratio to ADK's in the same run (``ratios_to_adk``; > 1 for latency,
RSS and spawn means slower/bigger than ADK, for turns/s faster). Figures are noisy on a
shared machine. Run: ``uv run python bench/agent_a2a.py [--turns 200] [--seconds 8]``;
``--smoke`` runs tiny sizes (a few seconds beyond start-up; ADK only if its venv is
already there, the ``tools`` workload skipped) -- every key present, null where skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import cpu_seconds, dump, percentile, rss_mb, start_model_server
from bench.engine_turn import (
    ANSWER,
    QUESTION,
    TEMPLATE,
    _engine_env,
    _write_spec,
    engine_argv,
)
from specmesh.ports import free_port

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

#: What the throwaway ADK venv holds: ADK pinned, beside the project's own litellm, a2a-sdk
#: and mcp versions (so the comparison is of the frameworks, not of their libraries).
ADK_PINS = (
    "google-adk[a2a,mcp]==2.13.0",
    "litellm==1.106.2",
    "a2a-sdk==1.3.0",
    "mcp==2.3.0",
)
_PIN_TAG = hashlib.sha256("\n".join(ADK_PINS).encode()).hexdigest()[:10]
DEFAULT_ADK_VENV = Path.home() / ".cache" / "specmesh-bench" / f"adk-venv-{_PIN_TAG}"

INSTRUCTION = TEMPLATE.replace("{{name}}", "Bench")
TOOL_QUESTION = "Look alpha up and ask the partner about it."
TOOL_ANSWER = "Both answered: the lookup and the partner agree on alpha."
SERVERS = ("adk", "floor", "specmesh")

# engine tool names: <mcp server>__<tool> and ask_<partner>; ADK's: the MCP tool's own name
# and the AgentTool's agent name (argument ``request``)
_SCRIPT: dict[str, Any] = {
    "rules": [
        {
            "name": "specmesh-tools",
            "match": {"lastMessageIsTool": False, "toolOffered": "kb__lookup"},
            "reply": {
                "type": "toolCalls",
                "toolCalls": [
                    {"name": "kb__lookup", "arguments": {"key": "alpha"}},
                    {"name": "ask_partner", "arguments": {"message": "What is alpha?"}},
                ],
            },
        },
        {
            "name": "adk-tools",
            "match": {"lastMessageIsTool": False, "toolOffered": "lookup"},
            "reply": {
                "type": "toolCalls",
                "toolCalls": [
                    {"name": "lookup", "arguments": {"key": "alpha"}},
                    {"name": "partner", "arguments": {"request": "What is alpha?"}},
                ],
            },
        },
        # the tool results come in the order of the calls: the partner's answer is the
        # last message when its call worked (the MCP calls are counted at the MCP server)
        {
            "name": "after-tools",
            "match": {"toolResult": "a short answer of a few words"},
            "reply": {"type": "text", "text": TOOL_ANSWER},
        },
        {
            "name": "a-tool-failed",
            "match": {"lastMessageIsTool": True},
            "reply": {"type": "text", "text": "A tool failed: {{last_tool_result}}"},
        },
    ],
    "fallback": {"type": "text", "text": ANSWER},
}


# ---------------------------------------------------------------- processes


def _start_model(port: int) -> mp.process.BaseProcess:
    return start_model_server(port, _SCRIPT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    base: str
    jsonrpc: str = ""
    spawn_to_card_s: float = float("nan")

    @property
    def pid(self) -> int:
        return self.proc.pid


def _wait_card(server: Server, t0: float, log: Path, timeout: float = 90) -> None:
    """Poll the agent card until 200; record spawn-to-card and the JSON-RPC URL."""
    card_url = f"{server.base}/.well-known/agent-card.json"
    deadline = t0 + timeout
    with requests.Session() as http:
        while time.perf_counter() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited ({server.proc.returncode}); see {log}")
            try:
                r = http.get(card_url, timeout=1)
            except requests.RequestException:
                r = None
            if r is not None and r.status_code == 200:
                server.spawn_to_card_s = time.perf_counter() - t0
                card = r.json()
                urls = [
                    i["url"]
                    for i in card.get("supportedInterfaces", [])
                    if i.get("protocolBinding") == "JSONRPC"
                ] or [card.get("url", "")]
                server.jsonrpc = urls[0]
                return
            time.sleep(0.005)
    raise RuntimeError(f"{server.name}: no agent card within {timeout} s; see {log}")


def _spawn(
    name: str, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Server:
    with log.open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT)
    server = Server(name=name, proc=proc, base=f"http://127.0.0.1:{port}")
    try:
        _wait_card(server, t0, log)
    except BaseException:
        _stop(proc)
        raise
    return server


def _adk_argv(venv: Path, port: int, model_root: str, *extra: str) -> list[str]:
    return [
        str(venv / "bin" / "python"),
        str(BENCH / "_adk_agent.py"),
        "--port",
        str(port),
        "--name",
        "bench_agent",
        "--model-base",
        f"{model_root}/llm/v1",
        "--instruction",
        INSTRUCTION,
        *extra,
    ]


def _floor_argv(port: int, name: str = "floor") -> list[str]:
    return [
        sys.executable,
        str(BENCH / "_a2a_peers.py"),
        "floor",
        "--port",
        str(port),
        "--name",
        name,
    ]


@contextmanager
def _serving(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        _stop(server.proc)


# ---------------------------------------------------------------- ADK venv


def _adk_ready(venv: Path) -> bool:
    return (venv / ".complete").exists() and (venv / "bin" / "python").exists()


def ensure_adk_venv(venv: Path) -> float:
    """Make the throwaway ADK venv unless it is complete; the seconds it took (0 if there)."""
    if _adk_ready(venv):
        return 0.0
    uv = shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is needed to make the ADK venv")
    t0 = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([uv, "venv", "-q", "-p", "3.11", str(venv)], check=True)
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), *ADK_PINS],
        check=True,
    )
    (venv / ".complete").write_text("\n".join(ADK_PINS) + "\n")
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the client


def _texts(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "text" and isinstance(v, str):
                yield v
            else:
                yield from _texts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _texts(v)


_FAILED_STATES = ("TASK_STATE_FAILED", "TASK_STATE_REJECTED", "TASK_STATE_CANCELED")


class TurnError(RuntimeError):
    pass


def _turn(
    session: aiohttp.ClientSession, url: str, question: str, expected: str
) -> Callable[[], Awaitable[None]]:
    """One ``SendMessage`` (blocking) with a new contextId; raises TurnError unless the
    answer holds ``expected``."""

    async def turn() -> None:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "SendMessage",
            "params": {
                "message": {
                    "messageId": uuid.uuid4().hex,
                    "contextId": uuid.uuid4().hex,
                    "role": "ROLE_USER",
                    "parts": [{"text": question}],
                }
            },
        }
        async with session.post(url, json=body, headers={"A2A-Version": "1.0"}) as r:
            raw = await r.read()
        if r.status != 200:
            raise TurnError(f"HTTP {r.status}: {raw[:300]!r}")
        doc = json.loads(raw)
        if "error" in doc:
            raise TurnError(f"JSON-RPC error: {doc['error']}")
        result = doc.get("result", {})
        state = result.get("task", {}).get("status", {}).get("state")
        if state in _FAILED_STATES:
            raise TurnError(f"task {state}: {raw[:300]!r}")
        if expected not in "".join(_texts(result)):
            raise TurnError(f"unexpected answer: {raw[:300]!r}")

    return turn


_TURN_ERRORS = (TurnError, aiohttp.ClientError, TimeoutError, ValueError)


def _ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    return {f"p{p}_ms": round(percentile(values, p), 2) for p in (50, 90, 99)}


def _cpu_split(cpu0: list[float], pids: list[int], turns: int) -> dict[str, float]:
    """CPU-ms per turn of the server (``pids[0]``) and of the sidecars (the rest)."""
    used = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
    out = {"server_cpu_ms_per_turn": round(used[0] * 1000 / max(turns, 1), 2)}
    if len(pids) > 1:
        out["sidecars_cpu_ms_per_turn"] = round(sum(used[1:]) * 1000 / max(turns, 1), 2)
    return out


async def _sequential(
    url: str, pids: list[int], turns: int, warmup: int, question: str, expected: str
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        turn = _turn(session, url, question, expected)
        errors: list[str] = []
        for _ in range(warmup):
            try:
                await turn()
            except _TURN_ERRORS as e:
                errors.append(str(e))
        if errors and len(errors) == warmup:
            raise RuntimeError(f"every warm-up turn failed, e.g. {errors[0]}")
        errors.clear()
        ms: list[float] = []
        cpu0 = [cpu_seconds(p) for p in pids]
        for _ in range(turns):
            t0 = time.perf_counter()
            try:
                await turn()
            except _TURN_ERRORS as e:
                errors.append(str(e))
            else:
                ms.append((time.perf_counter() - t0) * 1000)
        cpu = _cpu_split(cpu0, pids, turns)
    return {
        "turns": len(ms),
        "errors": len(errors),
        "first_error": errors[0][:300] if errors else None,
        **_ms(ms),
        **cpu,
    }


async def _concurrent(
    url: str,
    pids: list[int],
    peers: dict[str, int],
    concurrency: int,
    seconds: float,
    question: str,
    expected: str,
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        turn = _turn(session, url, question, expected)
        ms: list[float] = []
        errors: list[str] = []
        stop_at = 0.0

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await turn()
                except _TURN_ERRORS as e:
                    errors.append(str(e))
                else:
                    ms.append((time.perf_counter() - t0) * 1000)

        stop_at = time.perf_counter() + min(0.5, seconds)  # warm-up: opens the connections
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        warmup_turns = len(ms) + len(errors)
        ms.clear()
        errors.clear()
        cpu0 = [cpu_seconds(p) for p in pids]
        peers0 = {name: cpu_seconds(pid) for name, pid in peers.items()}
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        server_cpu = cpu_seconds(pids[0]) - cpu0[0]
        cpu = _cpu_split(cpu0, pids, len(ms) + len(errors))
        peer_cores = {
            name: round((cpu_seconds(pid) - peers0[name]) / elapsed, 2)
            for name, pid in peers.items()
        }
    return {
        "concurrency": concurrency,
        "warmup_turns": warmup_turns,
        "turns": len(ms),
        "errors": len(errors),
        "first_error": errors[0][:300] if errors else None,
        "turns_per_s": round(len(ms) / elapsed, 1),
        **_ms(ms),
        **cpu,
        "server_cpu_cores": round(server_cpu / elapsed, 2),
        # is a peer (the scripted model, the MCP server, the partner) the bottleneck?
        "peer_cpu_cores": peer_cores,
    }


@dataclass
class Sizes:
    turns: int
    warmup: int
    seconds: float
    concurrency: int


def _measure(
    server: Server,
    sizes: Sizes,
    question: str,
    expected: str,
    *,
    peers: dict[str, int],
    sidecars: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Both phases against ``server``; CPU read from it and, apart, from its ``sidecars``
    and the ``peers`` it calls."""
    pids = [server.pid, *sidecars]
    seq = asyncio.run(
        _sequential(server.jsonrpc, pids, sizes.turns, sizes.warmup, question, expected)
    )
    conc = asyncio.run(
        _concurrent(
            server.jsonrpc, pids, peers, sizes.concurrency, sizes.seconds, question, expected
        )
    )
    return {
        "spawn_to_card_s": round(server.spawn_to_card_s, 3),
        "sequential": seq,
        "concurrent": conc,
        "rss_mb_after_run": round(rss_mb(server.pid), 1),
    }


_NULL_SERVER: dict[str, Any] = {
    "spawn_to_card_s": None,
    "sequential": {
        k: None
        for k in (
            "turns",
            "errors",
            "first_error",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "server_cpu_ms_per_turn",
        )
    },
    "concurrent": {
        k: None
        for k in (
            "concurrency",
            "warmup_turns",
            "turns",
            "errors",
            "first_error",
            "turns_per_s",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "server_cpu_ms_per_turn",
            "server_cpu_cores",
            "peer_cpu_cores",
        )
    },
    "rss_mb_after_run": None,
}

_RATIO_KEYS = {
    "p50": ("sequential", "p50_ms"),
    "p99": ("sequential", "p99_ms"),
    "turns_per_s": ("concurrent", "turns_per_s"),
    "cpu_ms_per_turn": ("concurrent", "server_cpu_ms_per_turn"),
    "rss_mb": ("rss_mb_after_run",),
    "spawn_to_card": ("spawn_to_card_s",),
}


def _get(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each server's figure / ADK's (null when either is missing)."""
    adk = results.get("adk", _NULL_SERVER)
    out: dict[str, dict[str, float | None]] = {}
    for name, doc in results.items():
        if name == "adk":
            continue
        row: dict[str, float | None] = {}
        for key, path in _RATIO_KEYS.items():
            mine, ref = _get(doc, path), _get(adk, path)
            row[key] = round(mine / ref, 2) if mine is not None and ref else None
        out[name] = row
    return out


# ---------------------------------------------------------------- workload: plain


def plain_workload(
    home: Path, model_root: str, model_pid: int, adk_venv: Path | None, sizes: Sizes
) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    folder = _write_spec(home / "plain-spec")
    for name in SERVERS:
        if name == "adk" and adk_venv is None:
            results[name] = _NULL_SERVER
            continue
        port = free_port()
        log = home / f"plain-{name}.log"
        if name == "adk":
            assert adk_venv is not None
            server = _spawn(name, _adk_argv(adk_venv, port, model_root), port, log)
        elif name == "floor":
            server = _spawn(name, _floor_argv(port), port, log)
        else:
            server = _spawn(
                name, engine_argv(folder, port, free_port()), port, log, env=_engine_env(model_root)
            )
        with _serving(server):
            results[name] = _measure(
                server, sizes, QUESTION, ANSWER, peers={"model_server": model_pid}
            )
    return {"servers": results, "ratios_to_adk": _ratios(results)}


# ---------------------------------------------------------------- workload: tools


_NULL_TOOLS_SERVER = {
    **_NULL_SERVER,
    "mcp_calls_per_turn": None,
    "partner_calls_per_turn": None,
}


def _counts(mcp_base: str, partner_base: str) -> tuple[int, int]:
    mcp = requests.get(f"{mcp_base}/_count", timeout=5).json()["calls"]
    partner = requests.get(f"{partner_base}/_count", timeout=5).json()["turns"]
    return int(mcp), int(partner)


def _per_turn(before: tuple[int, int], after: tuple[int, int], turns: int) -> dict[str, Any]:
    return {
        "mcp_calls_per_turn": round((after[0] - before[0]) / max(turns, 1), 3),
        "partner_calls_per_turn": round((after[1] - before[1]) / max(turns, 1), 3),
    }


def _all_turns(doc: dict[str, Any], sizes: Sizes) -> int:
    """Every turn sent (warm-ups included) -- the denominator of the per-turn counts."""
    seq, conc = doc["sequential"], doc["concurrent"]
    sent = seq["turns"] + seq["errors"] + conc["warmup_turns"] + conc["turns"] + conc["errors"]
    return int(sizes.warmup + sent)


def tools_workload(
    home: Path, model_root: str, model_pid: int, adk_venv: Path | None, sizes: Sizes
) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        mcp_port, partner_port = free_port(), free_port()
        mcp = _spawn_mcp(mcp_port, home / "tools-mcp.log")
        stack.callback(_stop, mcp)
        partner = _spawn(
            "partner",
            _floor_argv(partner_port, "partner"),
            partner_port,
            home / "tools-partner.log",
        )
        stack.enter_context(_serving(partner))
        mcp_base = f"http://127.0.0.1:{mcp_port}"
        peers = {"model_server": model_pid, "mcp_server": mcp.pid, "partner": partner.pid}
        if adk_venv is None:
            results["adk"] = _NULL_TOOLS_SERVER
        else:
            port = free_port()
            argv = _adk_argv(
                adk_venv,
                port,
                model_root,
                "--mcp",
                f"{mcp_base}/mcp",
                "--partner",
                f"{partner.base}/.well-known/agent-card.json",
            )
            before = _counts(mcp_base, partner.base)
            with _serving(_spawn("adk", argv, port, home / "tools-adk.log")) as adk:
                doc = _measure(adk, sizes, TOOL_QUESTION, TOOL_ANSWER, peers=peers)
            doc.update(_per_turn(before, _counts(mcp_base, partner.base), _all_turns(doc, sizes)))
            results["adk"] = doc
        before = _counts(mcp_base, partner.base)
        with _specmesh_with_sidecars(
            home=home, model_root=model_root, mcp_url=f"{mcp_base}/mcp", partner_port=partner_port
        ) as (engine, sidecars):
            doc = _measure(
                engine, sizes, TOOL_QUESTION, TOOL_ANSWER, peers=peers, sidecars=sidecars
            )
            doc["rss_mb_sidecars"] = [round(rss_mb(p), 1) for p in sidecars]
        doc.update(_per_turn(before, _counts(mcp_base, partner.base), _all_turns(doc, sizes)))
        doc["specmesh_includes_sidecar_hops"] = True
        results["specmesh"] = doc
    return {"servers": results, "ratios_to_adk": _ratios(results)}


TOOLS_AGENT = "tools-agent"
PARTNER = "partner"  # the engine's tool: ask_partner


def _manifests(model_root: str, mcp_url: str) -> list[dict[str, Any]]:
    """The specs applied for the tools workload: the prompt, the MCP Registry entry, the
    partner (served by the bare a2a-sdk server behind its own sidecar) and the agent."""

    def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "specmesh.io/v1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }

    model = {"model": "scripted", "baseUrl": f"{model_root}/llm/v1"}
    return [
        doc("Prompt", "bench-prompt", {"version": "1.0.0", "template": TEMPLATE}),
        doc("McpServer", "kb", {"url": mcp_url}),
        doc(
            "Agent",
            PARTNER,
            {"base": {"description": "The partner.", "promptKey": "bench-prompt"}, "model": model},
        ),
        doc(
            "Agent",
            TOOLS_AGENT,
            {
                "base": {
                    "description": "The benchmark agent.",
                    "promptKey": "bench-prompt",
                    "variables": {"name": "Bench"},
                    "skills": [{"id": "qa", "name": "Questions"}],
                },
                "model": {**model, "temperature": 0.2, "maxTokens": 512},
                "mcpServers": [{"mcpServerName": "kb"}],
                "partnerAgents": [{"agentName": PARTNER}],
            },
        ),
    ]


@contextmanager
def _specmesh_with_sidecars(
    *, home: Path, model_root: str, mcp_url: str, partner_port: int
) -> Iterator[tuple[Server, tuple[int, int]]]:
    """The engine as in the fleet: real etcd and OpenBao (``localfleet.installer``), the specs
    applied, a real sidecar beside it (its egress: model, MCP, partner) and one beside the
    partner (mTLS between the two, the partner's upstream the bare a2a-sdk server, a
    stand-in engine reporting it SERVING), set up as ``bench/sidecar_hop.py`` does. The
    engine gets the environment ``localfleet.fleet`` gives engines (no Vault address or
    token) and its snapshots from its sidecar. Yields the engine and the two sidecar pids."""
    from bench.sidecar_hop import PREFIX, _apply, _sidecar, _start_stand_in_engine, _wait_get
    from localfleet.installer import LocalServices
    from sidecar.mtls import setup_pki
    from specmesh.etcd import EtcdClient
    from specmesh.keys import Keys
    from specmesh.spec_apply import SpecService
    from specmesh.store import SpecStore
    from specmesh.vault import VaultClient

    services = LocalServices(home=home / "services")
    state = services.start()
    procs: list[subprocess.Popen[bytes] | mp.process.BaseProcess] = []
    try:
        asyncio.run(setup_pki(address=state["baoAddress"], token=state["baoToken"]))
        svc = SpecService(
            store=SpecStore(
                etcd=EtcdClient.from_endpoint(state["etcdEndpoint"]), keys=Keys(prefix=PREFIX)
            ),
            vault=VaultClient(address=state["baoAddress"], token=state["baoToken"]),
            pki_mount="specmesh-pki",
        )
        for manifest in _manifests(model_root, mcp_url):
            asyncio.run(_apply(svc, manifest))

        def ports(engine: int) -> dict[str, int]:
            names = ("sync", "egress", "inbound", "ops")
            return {**{n: free_port() for n in names}, "engine": engine}

        b, b_ports = _sidecar(PARTNER, home, state, **ports(partner_port))
        procs += [b, _start_stand_in_engine(b_ports["sync"], PARTNER)]
        engine_port = free_port()
        a, a_ports = _sidecar(TOOLS_AGENT, home, state, **ports(engine_port))
        procs.append(a)
        egress = f"http://127.0.0.1:{a_ports['egress']}"
        # the partner is routable from A's egress once B reports its upstream serving
        _wait_get(f"{egress}/a2a/{PARTNER}/.well-known/agent-card.json")
        env = _engine_env(egress)
        env.update(
            AGENT_NAME=TOOLS_AGENT,
            HOME=str(home),
            SPECMESH_SYNC_ADDR=f"127.0.0.1:{a_ports['sync']}",
            SPECMESH_ENGINE_HTTP=f"127.0.0.1:{engine_port}",
            SPECMESH_ENGINE_GRPC=f"127.0.0.1:{free_port()}",
        )
        argv = [sys.executable, "-m", "specmeshctl", "engine"]
        engine = _spawn("specmesh", argv, engine_port, home / "tools-engine.log", env=env)
        procs.append(engine.proc)
        _wait_get(f"http://127.0.0.1:{a_ports['ops']}/readyz")  # the engine reported SERVING
        yield engine, (a.pid, b.pid)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            if isinstance(p, subprocess.Popen):
                _stop(p)
        services.stop()


def _spawn_mcp(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "_a2a_peers.py"), "mcp", "--port", str(port)],
            cwd=str(REPO),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the MCP server exited; see {log}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/_count", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.02)
    _stop(proc)
    raise RuntimeError(f"the MCP server did not start; see {log}")


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=200, help="sequential turns")
    parser.add_argument("--seconds", type=float, default=8.0, help="closed-loop seconds")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--adk-venv", type=Path, default=DEFAULT_ADK_VENV)
    parser.add_argument("--no-adk", action="store_true", help="leave the ADK reference out")
    parser.add_argument("--no-tools", action="store_true", help="skip the tools workload")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: proves the bench runs, no figures"
    )
    args = parser.parse_args()
    sizes = Sizes(turns=args.turns, warmup=10, seconds=args.seconds, concurrency=args.concurrency)
    if args.smoke:
        sizes = Sizes(turns=5, warmup=2, seconds=0.5, concurrency=2)
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "smoke": args.smoke,
        "sizes": sizes.__dict__,
        "adk": {"pins": list(ADK_PINS), "venv": str(args.adk_venv), "venv_install_s": None},
    }
    adk_venv: Path | None = args.adk_venv
    if args.no_adk or (args.smoke and not _adk_ready(args.adk_venv)):
        adk_venv = None  # smoke never installs ADK
        results["adk"]["skipped"] = "--no-adk" if args.no_adk else "smoke: no ADK venv yet"
    else:
        results["adk"]["venv_install_s"] = round(ensure_adk_venv(args.adk_venv), 1)
    home = Path(tempfile.mkdtemp(prefix="specmesh-bench-a2a-"))
    results["logs"] = str(home)
    model_port = free_port()
    model_root = f"http://127.0.0.1:{model_port}"
    model = _start_model(model_port)
    try:
        results["plain"] = plain_workload(home, model_root, model.pid or 0, adk_venv, sizes)
        if args.no_tools or args.smoke:
            results["tools"] = {
                "skipped": "--no-tools" if args.no_tools else "smoke",
                "servers": {n: _NULL_TOOLS_SERVER for n in ("adk", "specmesh")},
                "ratios_to_adk": {"specmesh": dict.fromkeys(_RATIO_KEYS)},
            }
        else:
            results["tools"] = tools_workload(home, model_root, model.pid or 0, adk_venv, sizes)
        dump("agent_a2a", results)
        return 0
    finally:
        model.terminate()


if __name__ == "__main__":
    sys.exit(main())
