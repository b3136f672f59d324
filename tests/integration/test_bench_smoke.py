"""Every benchmark in ``bench/`` still runs: each one's ``--smoke`` mode, as a subprocess from
the repository root, exits 0 and prints its JSON document with every figure's key.

Only that: no timing is asserted here (timing goals live in ``bench/``). The smoke sizes are
tiny, so the figures mean nothing. ``fleet_density`` starts the whole local fleet (~1 min on
2 cores) and is marked ``e2e`` with the other whole-fleet tests. ``agent_a2a`` runs its
Google ADK reference only when the bench's throwaway ADK venv is already there (the smoke
never installs it; its figures are then null) and skips its tools workload.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# benchmark -> the keys its document holds, as paths ("a.b" = key b inside key a)
_ENGINE_TURN = [
    "startup.runs",
    "startup.ready_s_median",
    "startup.imports_alone.litellm_s",
    "startup.imports_alone.rss_mb",
    "overhead_per_turn.prompt",
    *(
        f"overhead_per_turn.{path}.{side}.{stat}"
        for path in ("http", "a2a", "in_process")
        for side in ("engine", "bare_call")
        for stat in ("p50_ms", "p90_ms", "p99_ms")
    ),
    "overhead_per_turn.http.overhead_ms.p50_ms",
    "overhead_per_turn.a2a.overhead_ms.p50_ms",
    "overhead_per_turn.http.http_floor_healthz.p50_ms",
    "overhead_per_turn.in_process.overhead_ms.p99_ms",
    "overhead_per_turn.litellm_alone.streamed.client_cpu_ms_per_call",
    "overhead_per_turn.litellm_alone.whole.client_cpu_ms_per_call",
    *(
        f"throughput.{n}_conversations.{key}"
        for n in (1, 10, 100)
        for key in (
            "http.turns_per_s",
            "http.p50_ms",
            "http.engine_cpu_ms_per_turn",
            "a2a.turns_per_s",
            "a2a.p99_ms",
            "a2a.engine_cpu_ms_per_turn",
            "bare_call.turns_per_s",
        )
    ),
    "rss_mb.at_rest_after_ready",
    "rss_mb.after_first_turns",
    "rss_mb.after_overhead_turns",
    "rss_mb.at_end",
    "profile.top10_cumulative",
    "profile.top10_own_time",
    "profile.own_ms_per_turn_by_package",
    "goals.overhead_under_2ms_p50.http",
    "goals.ready_under_3s",
    "goals.ready_under_2_5s",
    "goals.rss_at_rest_under_150mb",
]
_SIDECAR_HOP = [
    *(
        f"{rps}rps.{key}"
        for rps in (100, 1000)
        for key in (
            "direct.p50_ms",
            "via_sidecar_pair.p99_ms",
            "added_ms_per_hop.p50_ms",
            "added_ms_per_hop.p90_ms",
            "added_ms_per_hop.p99_ms",
            "sidecar_cpu_per_1000rps",
        )
    ),
    *(
        f"1000rps.{key}"
        for key in (
            "nginx_added_ms_per_hop.p50_ms",
            "nginx_cpu_per_1000rps",
            "ratio_to_nginx.p50_ms",
            "ratio_to_nginx.cpu_per_1000rps",
        )
    ),
    *(
        f"closed_loop_8_connections.{key}"
        for key in ("direct", "nginx_pair", "sidecar_pair", "sidecar_to_nginx_ratio")
    ),
    *(
        f"grpc.{kind}.{key}"
        for kind in ("unary", "server_streaming")
        for key in ("added_ms_per_hop.p50_ms", "added_ms_per_hop.p99_ms", "sidecar_cpu_per_1000rps")
    ),
    "rss_mb.sidecar_a",
    "rss_mb.sidecar_b",
    "rss_mb.nginx_a",
    "rss_mb.ratio_sidecar_to_nginx",
    "rss_mb.after_grpc.sidecar_a",
    "goals.per_hop_at_1000rps",
    "goals.capacity_8_connections_4000rps",
    "1000rps.kept_up",
    "grpc.unary.kept_up",
    "reload_ms.from_apply_call_start.to_snapshot_stream.p99",
    "reload_ms.from_apply_call_start.to_engine_serving.p99",
    "reload_ms.from_apply_call_return.to_engine_serving.p99",
    "reload_ms.apply_call.p50",
]
_KNOWLEDGE = [
    f"results.{size}_chunks.{key}"
    for size in (200, 400)
    for key in (
        "chroma_hnsw.p50_ms",
        "chroma_hnsw.p99_ms",
        "chroma_hnsw.recall_at_10",
        "chroma_hnsw.inserts_per_second",
        "numpy_exact_scan.p50_ms",
    )
]
_MEMORY = [
    f"results.{where}.{op}.{key}"
    for where in ("direct", "proxy")
    for op in ("write", "read")
    for key in ("concurrency_1.p50_ms", "concurrency_2.ops_per_s")
] + [
    "results.proxy_adds_concurrency_1.write.p50_ms",
    "results.proxy_adds_concurrency_1.read.p99_ms",
]
_AGENT_A2A = [
    "adk.pins",
    "adk.venv_install_s",
    *(
        f"{workload}.servers.{server}.{key}"
        for workload, servers in (
            ("plain", ("adk", "floor", "specmesh")),
            ("tools", ("adk", "specmesh")),
        )
        for server in servers
        for key in (
            "spawn_to_card_s",
            "sequential.p50_ms",
            "sequential.p90_ms",
            "sequential.p99_ms",
            "sequential.errors",
            "sequential.server_cpu_ms_per_turn",
            "concurrent.turns_per_s",
            "concurrent.errors",
            "concurrent.server_cpu_ms_per_turn",
            "rss_mb_after_run",
        )
    ),
    "tools.servers.specmesh.mcp_calls_per_turn",
    "tools.servers.specmesh.partner_calls_per_turn",
    *(
        f"{workload}.ratios_to_adk.specmesh.{key}"
        for workload in ("plain", "tools")
        for key in ("p50", "p99", "turns_per_s", "cpu_ms_per_turn", "rss_mb", "spawn_to_card")
    ),
    "plain.ratios_to_adk.floor.p50",
]
_FLEET = [
    "baseline.pssMB",
    "baseline.idleCpuPercent",
    "largestN",
    "sizes.0.applyToAllReadySeconds",
    "sizes.0.applyToAllAnsweredSeconds",
    "sizes.0.deleteToAllStoppedSeconds",
    "sizes.0.perPair.pssMB",
    "sizes.0.perPair.engineRssMB",
    "sizes.0.perPair.sidecarRssMB",
    "sizes.0.perPair.idleCpuPercent",
    "sizes.0.wholeFleet.pssMB",
]


def _run_smoke(script: str, timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, f"bench/{script}.py", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"bench/{script}.py --smoke failed:\n{done.stderr[-3000:]}"
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def _missing(document: dict[str, Any], paths: list[str]) -> list[str]:
    missing = []
    for path in paths:
        node: Any = document
        for part in path.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                missing.append(path)
                break
    return missing


@pytest.mark.parametrize(
    ("script", "keys", "timeout"),
    [
        ("engine_turn", _ENGINE_TURN, 180),
        ("sidecar_hop", _SIDECAR_HOP, 150),
        ("knowledge_retrieval", _KNOWLEDGE, 60),
        ("memory_redis", _MEMORY, 90),
        ("agent_a2a", _AGENT_A2A, 120),
        pytest.param("fleet_density", _FLEET, 400, marks=pytest.mark.e2e),
    ],
)
def test_benchmark_smoke_prints_every_figure(script: str, keys: list[str], timeout: float) -> None:
    document = _run_smoke(script, timeout)

    assert document["smoke"] is True
    assert _missing(document, keys) == []
