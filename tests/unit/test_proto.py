"""The gRPC contracts: generated code is current, buf lint passes, messages and streams work."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from specmesh.v1 import common_pb2, sidecar_pb2, sidecar_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
BUF = REPO / "node_modules" / ".bin" / "buf"


def _load_gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _buf(*args: str) -> subprocess.CompletedProcess[str]:
    if not BUF.is_file():
        pytest.fail(f"{BUF.relative_to(REPO)} is missing: run scripts/bootstrap (npm install)")
    return subprocess.run(
        [str(BUF), *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def _snapshot(revision: int) -> sidecar_pb2.Snapshot:
    return sidecar_pb2.Snapshot(
        agent_name="mse-nacos-helper",
        revision=revision,
        etcd_revision=100 + revision,
        track="stable",
        spec_json='{"model": {"apiKey": "vault://secret/agents/mse-nacos-helper#apiKey"}}',
        prompts_json={"nacos-helper": '{"release": {"labels": {"prod": "1.0.0"}}}'},
        mcp_servers_json={"nacos-docs": '{"url": "http://127.0.0.1:9000/mcp"}'},
        produced_at=Timestamp(seconds=1_700_000_000 + revision, nanos=5),
        source=sidecar_pb2.SNAPSHOT_SOURCE_ETCD,
    )


def test_generated_code_is_current(tmp_path: Path) -> None:
    gen_proto = _load_gen_proto()

    gen_proto.generate(tmp_path)

    expected = gen_proto.generated_files(tmp_path / gen_proto.PACKAGE)
    committed = gen_proto.generated_files(REPO / gen_proto.PACKAGE)
    assert expected, "protoc generated nothing"
    stale = sorted(
        name
        for name in expected.keys() | committed.keys()
        if expected.get(name) != committed.get(name)
    )
    assert not stale, f"specmesh/v1 is not current ({', '.join(stale)}): run scripts/gen-proto"


def test_buf_lint_passes() -> None:
    result = _buf("lint")

    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"


def test_protos_are_buf_formatted() -> None:
    result = _buf("format", "--diff", "--exit-code")

    assert result.returncode == 0, f"run `npx buf format -w`:\n{result.stdout}{result.stderr}"


def test_snapshot_round_trips_through_bytes() -> None:
    snapshot = _snapshot(revision=7)

    parsed = sidecar_pb2.Snapshot.FromString(snapshot.SerializeToString())

    assert parsed == snapshot
    assert parsed.agent_name == "mse-nacos-helper"
    assert parsed.revision == 7
    assert parsed.etcd_revision == 107
    assert parsed.track == "stable"
    assert parsed.spec_json.startswith('{"model"')
    assert dict(parsed.prompts_json) == {
        "nacos-helper": '{"release": {"labels": {"prod": "1.0.0"}}}'
    }
    assert dict(parsed.mcp_servers_json) == {"nacos-docs": '{"url": "http://127.0.0.1:9000/mcp"}'}
    assert parsed.produced_at.seconds == 1_700_000_007
    assert parsed.produced_at.nanos == 5
    assert parsed.source == sidecar_pb2.SNAPSHOT_SOURCE_ETCD


def test_report_status_uses_the_shared_engine_state() -> None:
    request = sidecar_pb2.ReportStatusRequest(
        agent_name="mse-nacos-helper",
        state=common_pb2.ENGINE_STATE_DEGRADED,
        serving_revision=6,
        failed_etcd_revision=107,
        error_message="model.baseUrl: connection refused",
    )

    parsed = sidecar_pb2.ReportStatusRequest.FromString(request.SerializeToString())

    assert parsed.state == common_pb2.ENGINE_STATE_DEGRADED
    assert common_pb2.EngineState.Name(parsed.state) == "ENGINE_STATE_DEGRADED"


class _TwoSnapshots(sidecar_pb2_grpc.SpecSyncServiceServicer):
    """Streams the current snapshot, then one change."""

    def __init__(self) -> None:
        self.requests: list[sidecar_pb2.WatchSnapshotsRequest] = []

    async def WatchSnapshots(
        self, request: sidecar_pb2.WatchSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[sidecar_pb2.WatchSnapshotsResponse]:
        self.requests.append(request)
        for revision in (1, 2):
            yield sidecar_pb2.WatchSnapshotsResponse(snapshot=_snapshot(revision))

    async def GetSnapshot(
        self, request: sidecar_pb2.GetSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> sidecar_pb2.GetSnapshotResponse:
        return sidecar_pb2.GetSnapshotResponse(snapshot=_snapshot(2))

    async def ReportStatus(
        self, request: sidecar_pb2.ReportStatusRequest, context: grpc.aio.ServicerContext
    ) -> sidecar_pb2.ReportStatusResponse:
        return sidecar_pb2.ReportStatusResponse()


async def test_watch_snapshots_streams_snapshots_in_order_over_grpc() -> None:
    servicer = _TwoSnapshots()
    server = grpc.aio.server()
    sidecar_pb2_grpc.add_SpecSyncServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sidecar_pb2_grpc.SpecSyncServiceStub(channel)
            call = stub.WatchSnapshots(
                sidecar_pb2.WatchSnapshotsRequest(agent_name="mse-nacos-helper"), timeout=5
            )
            async with asyncio.timeout(5):
                received = [response.snapshot async for response in call]
    finally:
        await server.stop(grace=None)

    assert [s.revision for s in received] == [1, 2]
    assert [s.etcd_revision for s in received] == [101, 102]
    assert received[0] == _snapshot(1)
    assert [r.agent_name for r in servicer.requests] == ["mse-nacos-helper"]
