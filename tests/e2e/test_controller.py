"""The agent controller on the local fleet (`specmesh up`): an applied spec becomes a
supervised, scaled workload.

One fleet for the module, used in order: a brand-new agent applied from one YAML file
answers with no other command; scaled to 3 its calls spread over three instances; scaled
to 1 the two others drain with no caller error; kill -9 of its engine, then of its sidecar,
under ~2 calls/s: restarted, registry and readiness follow; deleted: its processes stop;
kill -9 of the control plane stops no agent, and a restarted one adopts the running
processes without restarting them.

Bounded polls (a deadline per acceptance item), no timing assertion beyond those.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from localfleet.fleet import REPO, Fleet, FleetOptions
from specmesh.procs import alive
from specmeshctl.a2aclient import invoke
from specmeshctl.main import main as cli
from tests.polling import eventually_sync

from .test_fleet import _api, _invoke_token

pytestmark = pytest.mark.e2e

AGENT = "billing-helper"
MANIFEST = """\
apiVersion: specmesh.io/v1
kind: Prompt
metadata: {name: billing-helper}
spec:
  version: "1.0.0"
  template: You answer billing questions.
---
apiVersion: specmesh.io/v1
kind: Agent
metadata: {name: billing-helper}
spec:
  base: {description: Answers billing questions, promptKey: billing-helper,
         callers: {principals: ["specmesh/*"]}}  # `specmesh invoke` goes through the entry
  model:
    model: qwen-plus-latest
    baseUrl: https://dashscope.aliyuncs.com/compatible-mode
    apiKey: sk-billing-example-0001
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("controller-fleet")
    f = Fleet(FleetOptions(home=home))
    state = f.up()
    state["_home"] = home
    yield state
    f.down()


@pytest.fixture(autouse=True)
def _cli_env(fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SPECMESH_", "VAULT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SPECMESH_HOME", str(fleet["_home"]))


def _instances(fleet: dict[str, Any], agent: str = AGENT) -> list[dict[str, Any]]:
    """The supervisor's instances of ``agent`` (its state file)."""
    state = json.loads((fleet["_home"] / "supervisor.json").read_text())
    return [i for i in state["instances"] if i["agent"] == agent]


def _pid(instance: dict[str, Any], role: str) -> tuple[int, list[str]]:
    p = next(p for p in instance["processes"] if p["role"] == role)
    return int(p["pid"]), list(p["cmd"])


def _registered(fleet: dict[str, Any], agent: str = AGENT) -> dict[str, dict[str, Any]]:
    listed = _api(fleet, f"/api/v1/instances?agentName={agent}")["instances"]
    return {i["instanceId"]: i for i in listed}


def _ready_urls(fleet: dict[str, Any], agent: str = AGENT) -> list[str]:
    """The public entries of the agent's ready instances."""
    return [i["endpoints"]["entry"] for i in _instances(fleet, agent) if i["ready"]]


def _ask(url: str, token: str, text: str = "How much is my invoice?") -> str:
    """Through an entry (``url``: the SDK reads its card there), with an invoke token."""
    result = asyncio.run(asyncio.wait_for(invoke(url, text, token=token), 30))
    assert result.state == "completed", result
    return result.text


def _status_code(url: str) -> int:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return 0


@dataclass
class Caller:
    """Calls the agent ~2 times a second, as `specmesh invoke` does (a ready instance at
    random), and records every outcome with its start time."""

    fleet: dict[str, Any]
    agent: str = AGENT
    results: list[tuple[float, bool, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Caller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                urls = _ready_urls(self.fleet, self.agent)
                if not urls:
                    raise RuntimeError("no ready instance")
                _ask(random.choice(urls), _invoke_token(self.fleet, self.agent))
                self.results.append((started, True, ""))
            except Exception as e:
                self.results.append((started, False, f"{type(e).__name__}: {e}"))
            self._stop.wait(max(0.0, 0.5 - (time.monotonic() - started)))

    def errors_since(self, t: float) -> list[str]:
        return [err for at, ok, err in self.results if at >= t and not ok]

    def successes_since(self, t: float) -> int:
        return sum(1 for at, ok, _ in self.results if at >= t and ok)


def _llm_calls(instance: dict[str, Any]) -> float:
    """LLM calls the instance's sidecar forwarded (its egress counter)."""
    text = requests.get(f"{instance['endpoints']['ops']}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("specmesh_sidecar_egress_requests_total{") and 'kind="llm"' in line
    )


def test_a_new_agent_from_one_yaml_file_answers_with_no_other_command(
    fleet: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "billing-helper.yaml"
    manifest.write_text(MANIFEST)

    assert cli(["apply", "-f", str(manifest)]) == 0
    applied = time.monotonic()

    def answers() -> bool:
        return cli(["invoke", AGENT, "How much is my invoice?", "--timeout", "20"]) == 0

    eventually_sync(answers, what="billing-helper answering `specmesh invoke`", timeout=60)
    assert "scripted: How much is my invoice?" in capsys.readouterr().out
    took = time.monotonic() - applied

    def shows_running() -> bool:
        capsys.readouterr()
        assert cli(["get", "agents"]) == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
        return rows.get(AGENT, [])[1:3] == ["1/1", "Running"]

    eventually_sync(
        shows_running, what="`get agents` to show billing-helper 1/1 Running", timeout=10
    )
    capsys.readouterr()
    assert cli(["logs", AGENT, "--tail", "200"]) == 0  # its engine's and sidecar's logs
    logs = capsys.readouterr().out
    assert "[billing-helper-stable-0-engine]" in logs
    assert "[billing-helper-stable-0-sidecar]" in logs
    status = _api(fleet, f"/api/v1/agents/{AGENT}/status")["status"]
    assert status["tracks"] == {"stable": {"desired": 1, "ready": 1}}
    assert status["instances"][0]["instanceId"] == "billing-helper-stable-0"
    assert status["instances"][0]["servingRevision"] == "1"  # an int64: a string in the JSON
    print(f"apply -> answering: {took:.1f}s")


def test_scaled_to_three_calls_spread_and_scaled_to_one_two_drain_without_errors(
    fleet: dict[str, Any],
) -> None:
    assert cli(["scale", "agent", AGENT, "--replicas", "3"]) == 0

    def three_serving() -> bool:
        registered = _registered(fleet)
        return len(_ready_urls(fleet)) == 3 and sorted(registered) == [
            f"billing-helper-stable-{n}" for n in range(3)
        ] and all(r["state"] == "ENGINE_STATE_SERVING" for r in registered.values())  # fmt: skip

    eventually_sync(three_serving, what="three instances ready and registered", timeout=60)
    instances = _instances(fleet)
    before = {i["instance"]: _llm_calls(i) for i in instances}
    for _ in range(60):  # `specmesh invoke` picks a ready instance for each call
        assert cli(["invoke", AGENT, "How much is my invoice?", "--timeout", "30"]) == 0
    served = {i["instance"]: _llm_calls(i) - before[i["instance"]] for i in instances}
    assert sum(served.values()) >= 60 and all(n > 0 for n in served.values()), served

    doomed = [
        _pid(i, role) for i in instances if i["ordinal"] > 0 for role in ("engine", "sidecar")
    ]
    with Caller(fleet) as caller:
        eventually_sync(lambda: caller.successes_since(0) >= 2, what="calls flowing", timeout=30)
        scaled = time.monotonic()
        assert cli(["scale", "agent", AGENT, "--replicas", "1"]) == 0
        eventually_sync(
            lambda: not any(alive(pid, cmd) for pid, cmd in doomed),
            what="the two extra instances' processes to stop",
            timeout=30,
        )
        eventually_sync(
            lambda: sorted(_registered(fleet)) == ["billing-helper-stable-0"],
            what="the registry to hold one instance",
            timeout=10,
        )
        eventually_sync(
            lambda: [i["instance"] for i in _instances(fleet)] == ["billing-helper-stable-0"],
            what="the supervisor to forget the two stopped instances",
            timeout=10,
        )
        eventually_sync(
            lambda: caller.successes_since(scaled) >= 4, what="calls after the scale", timeout=30
        )
    assert caller.errors_since(0) == []
    assert caller.successes_since(scaled) >= 4


def test_kill_9_of_the_engine_then_the_sidecar_under_load(fleet: dict[str, Any]) -> None:
    (instance,) = _instances(fleet)
    name, ops = instance["instance"], instance["endpoints"]["ops"]
    a2a = instance["endpoints"]["a2a"]
    with Caller(fleet) as caller:
        eventually_sync(lambda: caller.successes_since(0) >= 2, what="calls flowing", timeout=30)
        assert caller.errors_since(0) == []

        # the engine dies: readiness and the registry say so within 5 s
        pid, _ = _pid(instance, "engine")
        os.kill(pid, signal.SIGKILL)
        eventually_sync(
            lambda: (
                _status_code(f"{ops}/readyz") == 503
                and _registered(fleet).get(name, {}).get("state") != "ENGINE_STATE_SERVING"
            ),
            what="the sidecar's readiness and the registry to drop the dead engine",
            timeout=5,
        )
        # restarted within 10 s, serving again
        eventually_sync(
            lambda: (
                (new := _pid(_instances(fleet)[0], "engine"))[0] not in (0, pid)
                and alive(*new)
                and _status_code(f"{ops}/readyz") == 200
                and _registered(fleet).get(name, {}).get("state") == "ENGINE_STATE_SERVING"
                and _ready_urls(fleet) == [instance["endpoints"]["entry"]]
            ),
            what="the engine to be restarted and serving",
            timeout=10,
        )
        engine_back = time.monotonic()
        eventually_sync(
            lambda: caller.successes_since(engine_back) >= 2,
            what="calls after the engine's restart",
            timeout=30,
        )
        assert caller.errors_since(engine_back) == []  # callers see no error after it

        # the sidecar dies: its registry entry goes and the engine is not ready, within 5 s
        instance = _instances(fleet)[0]
        pid, _ = _pid(instance, "sidecar")
        os.kill(pid, signal.SIGKILL)
        eventually_sync(
            lambda: name not in _registered(fleet) and _status_code(f"{a2a}/readyz") == 503,
            what="the registry and the engine's readiness to drop the dead sidecar",
            timeout=5,
        )
        eventually_sync(
            lambda: (
                (new := _pid(_instances(fleet)[0], "sidecar"))[0] not in (0, pid)
                and alive(*new)
                and _status_code(f"{ops}/readyz") == 200
                and _status_code(f"{a2a}/readyz") == 200
                and _registered(fleet).get(name, {}).get("state") == "ENGINE_STATE_SERVING"
                and _ready_urls(fleet) == [instance["endpoints"]["entry"]]
            ),
            what="the sidecar to be restarted, the engine ready and registered",
            timeout=10,
        )
        sidecar_back = time.monotonic()
        eventually_sync(
            lambda: caller.successes_since(sidecar_back) >= 3,
            what="calls after the sidecar's restart",
            timeout=30,
        )
    assert caller.errors_since(sidecar_back) == []
    restarts = _api(fleet, f"/api/v1/agents/{AGENT}/status")["status"]["instances"][0]["restarts"]
    assert restarts >= 2


def test_a_deleted_agents_processes_stop_within_10_seconds(fleet: dict[str, Any]) -> None:
    pids = [_pid(i, role) for i in _instances(fleet) for role in ("engine", "sidecar")]
    assert pids and all(alive(pid, cmd) for pid, cmd in pids)

    assert cli(["delete", "agent", AGENT]) == 0

    eventually_sync(
        lambda: not any(alive(pid, cmd) for pid, cmd in pids),
        what="the deleted agent's processes to stop",
        timeout=10,
    )
    eventually_sync(lambda: not _instances(fleet), what="the supervisor to forget it", timeout=5)
    assert _registered(fleet) == {}


def test_kill_9_of_the_control_plane_stops_no_agent_and_a_new_one_adopts_them(
    fleet: dict[str, Any],
) -> None:
    state = json.loads((fleet["_home"] / "fleet.json").read_text())
    cp = next(p for p in state["processes"] if p["role"] == "control-plane")
    environ = dict(
        e.split("=", 1)
        for e in Path(f"/proc/{cp['pid']}/environ").read_text().split("\0")
        if "=" in e
    )
    before = {i["instance"]: i for i in _instances_all(fleet)}
    pids = {n: [p["pid"] for p in i["processes"]] for n, i in before.items()}

    agents = ("mse-nacos-helper", "mse-gateway-assistant", "schedulex-assistant")
    tokens = {a: _invoke_token(fleet, a) for a in agents}  # minted while it still runs

    os.kill(cp["pid"], signal.SIGKILL)
    eventually_sync(
        lambda: not alive(cp["pid"], cp["cmd"]), what="the control plane to die", timeout=10
    )
    for agent in agents:
        (url,) = [i["endpoints"]["entry"] for i in before.values() if i["agent"] == agent
                  and i["track"] == "stable"]  # fmt: skip
        assert _ask(url, tokens[agent], "Which Nacos services are registered?")

    with open(cp["log"], "ab") as log:
        proc = subprocess.Popen(
            cp["cmd"], env=environ, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    cp_entry = next(p for p in state["processes"] if p["role"] == "control-plane")
    cp_entry["pid"] = proc.pid  # `down` stops the new one
    (fleet["_home"] / "fleet.json").write_text(json.dumps(state, indent=2))
    restarted = time.time()

    def observed_again() -> bool:
        try:
            statuses = {a["name"]: a for a in _api(fleet, "/api/v1/agents")["agents"]}
            details = [_api(fleet, f"/api/v1/agents/{n}/status")["status"] for n in statuses]
        except requests.RequestException:
            return False
        return all(
            d.get("observedAt")
            and datetime.fromisoformat(d["observedAt"]).timestamp() >= restarted - 1
            and d["phase"] == "Running"
            for d in details
        )

    eventually_sync(observed_again, what="the new control plane's controller to report", timeout=60)
    after = {i["instance"]: i for i in _instances_all(fleet)}
    assert {n: [p["pid"] for p in i["processes"]] for n, i in after.items()} == pids
    assert all(i["restarts"] == before[n]["restarts"] for n, i in after.items())


def _instances_all(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    return list(json.loads((fleet["_home"] / "supervisor.json").read_text())["instances"])
