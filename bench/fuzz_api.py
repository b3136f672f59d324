"""Fuzz the control plane's REST API against its own OpenAPI document with schemathesis.

Starts etcd and OpenBao (``localfleet.installer``) and a real ``specmesh control-plane`` process,
then runs ``st run`` on ``/api/v1/openapi.json`` for ``--minutes`` with the checks
``not_a_server_error``, ``status_code_conformance``, ``content_type_conformance`` and
``response_schema_conformance``, and prints the figures::

    cases=<test cases sent> server_errors=<5xx answers> mismatches=<failed checks>

Exit status 0 only with 0 server errors and 0 mismatches. Run it as ``scripts/fuzz-api
--minutes 3``; the test suite runs the same function for a few seconds
(tests/integration/test_control_plane_schemathesis.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

__all__ = ["CHECKS", "FuzzResult", "control_plane_process", "fuzz", "main"]

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


@dataclass
class FuzzResult:
    """What a schemathesis run found."""

    cases: int = 0
    """Test cases sent (each one HTTP request)."""
    server_errors: int = 0
    """Answers with a 5xx status."""
    mismatches: int = 0
    """Failed checks other than 5xx: a status or body the document does not allow."""
    failures: list[str] = field(default_factory=list)
    """One line per distinct failure: operation, check, message."""
    output: str = ""

    def figures(self) -> str:
        return f"cases={self.cases} server_errors={self.server_errors} mismatches={self.mismatches}"


def fuzz(
    url: str,
    token: str,
    *,
    seconds: float | None = None,
    max_examples: int | None = None,
    workdir: Path,
    seed: int | None = None,
    phases: str = "examples,coverage,fuzzing",
) -> FuzzResult:
    """Run schemathesis against ``url`` (the control plane's base URL) as ``token``."""
    report = workdir / "schemathesis.ndjson"
    cmd = [
        str(Path(sys.executable).parent / "st"), "run", f"{url}/api/v1/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", ",".join(CHECKS),
        "--phases", phases,
        "--request-timeout", "20",
        "--report", "ndjson", "--report-ndjson-path", str(report),
        "--continue-on-failure",
        "--suppress-health-check", "all",
        "--no-color",
    ]  # fmt: skip
    if seconds is not None:
        cmd += ["--max-time", str(int(seconds))]
    if max_examples is not None:
        cmd += ["--max-examples", str(max_examples)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=workdir)
    result = FuzzResult(output=proc.stdout[-20000:] + proc.stderr[-4000:])
    seen: set[str] = set()
    for line in report.read_text().splitlines() if report.exists() else ():
        _count(json.loads(line), result, seen)
    if proc.returncode not in (0, 1):  # 1: failures found; anything else: it did not run
        result.failures.append(f"schemathesis exited {proc.returncode}")
    return result


def _count(event: dict[str, object], result: FuzzResult, seen: set[str]) -> None:
    """Add one ndjson event of the report to ``result``: every check of every response."""
    for key, value in event.items():
        if key != "ScenarioFinished" or not isinstance(value, dict):
            continue
        recorder = value.get("recorder") or {}
        assert isinstance(recorder, dict)
        label = str(recorder.get("label", ""))
        interactions = recorder.get("interactions") or {}
        assert isinstance(interactions, dict)
        for interaction in interactions.values():
            result.cases += 1
            response = (interaction or {}).get("response") or {}
            if int(response.get("status_code") or 0) >= 500:
                result.server_errors += 1
        checks = recorder.get("checks") or {}
        assert isinstance(checks, dict)
        for case_checks in checks.values():
            for check in case_checks or ():
                if str(check.get("status")).lower() != "failure":
                    continue
                name = str(check.get("name"))
                failure = check.get("failure_info") or {}
                detail = failure.get("failure") or {}
                message = f"{detail.get('title', '')} {detail.get('message', '')}".strip()
                message = " ".join(message.split())[:300]
                line = f"{label}: {name}: {message}"
                if name != "not_a_server_error":
                    result.mismatches += 1
                if line not in seen:
                    seen.add(line)
                    result.failures.append(line)


@contextmanager
def control_plane_process(home: Path) -> Iterator[tuple[str, str]]:
    """etcd, OpenBao and a control plane whose token may do everything; (URL, token)."""
    from control_plane.auth import Role, StaticTokenAuthenticator
    from localfleet.installer import LocalServices
    from specmesh.ports import free_port

    services = LocalServices(home=home / "services")
    state = services.start()
    token = f"tok-fuzz-{uuid.uuid4().hex}"
    tokens_file = home / "tokens.json"
    StaticTokenAuthenticator.write_file(
        tokens_file, {token: ("fuzz", [Role.ADMIN, Role.SECRETS_ADMIN])}
    )
    port = free_port()
    env = {
        **os.environ,
        "SPECMESH_ETCD_ENDPOINT": state["etcdEndpoint"],
        "SPECMESH_ETCD_PREFIX": f"/fuzz-{uuid.uuid4().hex[:8]}",
        "SPECMESH_VAULT_ADDR": state["baoAddress"],
        "SPECMESH_VAULT_TOKEN": state["baoToken"],
        "SPECMESH_TOKENS_FILE": str(tokens_file),
        "SPECMESH_OTLP_LISTEN": "",
        "SPECMESH_TRACES_DB": str(home / "traces.db"),
        "SPECMESH_GRPC_LISTEN": f"127.0.0.1:{free_port()}",
    }
    log = (home / "control-plane.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "specmeshctl", "control-plane", "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the control plane did not start:\n{tail}")
            try:
                if requests.get(f"{url}/healthz", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.05)  # polling a condition with a deadline
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        services.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz-api", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-api-") as tmp:
        home = Path(tmp)
        with control_plane_process(home) as (url, token):
            result = fuzz(url, token, seconds=args.minutes * 60, workdir=home, seed=args.seed)
    for line in result.failures:
        print(line)
    print(result.figures())
    return 0 if result.cases and not result.server_errors and not result.mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
