"""`engine.main.main` as a process: JSON logs, both listeners, SIGTERM -> exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

import httpx

from tests.conftest import REPO

_SCRIPT = """
import sys
from engine.main import main
from engine.testing import ScriptedRunner

async def open_runtime(stack, spec_dir):
    return ScriptedRunner()

sys.exit(main(sys.argv[1:], open_runtime=open_runtime))
"""


def start_scripted_engine(env: Mapping[str, str]) -> subprocess.Popen[str]:
    """The engine's ``main`` as a process, with the scripted (echo) runner, on free ports;
    its JSON log lines on stderr (see :func:`_serving_line`)."""
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"],
        cwd=REPO,
        env=dict(env),
        stderr=subprocess.PIPE,
        text=True,
    )


def _serving_line(process: subprocess.Popen[str], deadline: float) -> dict[str, object]:
    assert process.stderr is not None
    for line in process.stderr:
        record = json.loads(line)  # every line is one JSON object
        if record["message"] == "engine serving":
            return dict(record)
        assert time.monotonic() < deadline, "the engine did not start in time"
    raise AssertionError(f"the engine exited with {process.wait()} before serving")


def test_engine_process_serves_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "AGENT_NAME": "scripted-agent", "SPECMESH_ENGINE_DRAIN_SECONDS": "2"}
    process = start_scripted_engine(env)
    try:
        serving = _serving_line(process, time.monotonic() + 30)
        http_url = str(serving["http"])
        assert httpx.get(f"{http_url}/readyz", timeout=10).status_code == 200
        answer = httpx.post(f"{http_url}/v1/invoke", json={"message": "hi"}, timeout=10)
        assert answer.json()["answer"] == "echo: hi"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_card_lists_the_public_entry_and_the_configured_schemes() -> None:
    env = {
        **os.environ,
        "AGENT_NAME": "scripted-agent",
        "SPECMESH_ENGINE_PUBLIC_HTTP_URL": "http://entry.example:8080/",
        "SPECMESH_ENGINE_PUBLIC_GRPC_URL": "entry.example:8081",
        "SPECMESH_CARD_SECURITY": "bearer,mtls",
    }
    process = start_scripted_engine(env)
    try:
        serving = _serving_line(process, time.monotonic() + 30)
        card = httpx.get(f"{serving['http']}/.well-known/agent-card.json", timeout=10).json()

        assert [(i["protocolBinding"], i["url"]) for i in card["supportedInterfaces"]] == [
            ("JSONRPC", "http://entry.example:8080/"),
            ("HTTP+JSON", "http://entry.example:8080/v1"),
            ("GRPC", "entry.example:8081"),
        ]
        bearer = card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]
        assert (bearer["scheme"], bearer["bearerFormat"]) == ("Bearer", "JWT")
        assert "mtlsSecurityScheme" in card["securitySchemes"]["mtls"]
        assert card["securityRequirements"] == [
            {"schemes": {"bearer": {}}},
            {"schemes": {"mtls": {}}},
        ]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_an_unknown_card_scheme_stops_the_engine_with_a_usage_error() -> None:
    env = {**os.environ, "AGENT_NAME": "scripted-agent", "SPECMESH_CARD_SECURITY": "oauth"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip

    assert done.returncode == 2
    assert "unknown scheme oauth" in done.stderr
