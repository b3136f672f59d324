"""`engine.main.main` as a process: JSON logs, both listeners, SIGTERM -> exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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
    process = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
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
