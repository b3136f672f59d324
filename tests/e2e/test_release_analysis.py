"""Analysis-gated progressive delivery on the local fleet (`specmesh up`): the control plane
aborts a canary that fails 30 % of its turns by itself before it reaches 50 %, stable
unaffected, audited with the figures; a healthy canary is promoted by itself; the Studio's
release view shows the analysis timeline. Used in order.

The scripted model fails 3 of every 10 calls whose system prompt says "flaky" (a rule's
``cycle``): the bad canary's prompt. Stable and the healthy canary have other prompts, so
the same script answers them. Traffic is a bounded loop of calls from the test to the
agent's entries; the analysis judges errors and latency on what the sidecars counted of the
turns they relayed to their engines (every instance's ``/metrics``: a failed A2A task is a
failed turn), and the cost per turn on the control plane's trace store.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from playwright.sync_api import Browser, expect

from localfleet.fleet import Fleet, FleetOptions
from specmeshctl.a2aclient import InvokeResult, invoke
from specmeshctl.main import main as cli
from tests.polling import eventually_sync

from . import test_controller, test_studio
from .test_controller import _ready_urls
from .test_fleet import _api, _invoke_token
from .test_studio import Studio

pytestmark = pytest.mark.e2e

# fixtures of other e2e modules, over this module's fleet: the CLI's environment (autouse),
# the Studio's browser and screenshots
_cli_env = test_controller._cli_env
browser = test_studio.browser
shots = test_studio.shots

AGENT = "canaried"
SCRIPT = """\
rules:
  - name: flaky-fails
    match: {system: "flaky"}
    cycle: {every: 10, first: 3}
    reply: {type: error, status: 500, message: "scripted failure"}
  - match: {system: "flaky"}
    reply: {type: text, text: "[flaky] {{last_user}}"}
  - match: {system: "calm"}
    reply: {type: text, text: "[calm] {{last_user}}"}
  - match: {system: "steady"}
    reply: {type: text, text: "[stable] {{last_user}}"}
"""
PROMPTS = {"steady": "You are steady.", "flaky": "You are flaky.", "calm": "You are calm."}


def _agent(prompt: str) -> str:
    return f"""\
apiVersion: specmesh.io/v1
kind: Agent
metadata: {{name: {AGENT}}}
spec:
  base: {{description: An agent released with analysis, promptKey: {prompt},
         callers: {{principals: ["specmesh/*"]}}}}
  model: {{model: scripted, maxRetries: 0}}
"""


def _release(canary: int | None) -> str:
    if canary is None:
        return f"""\
apiVersion: specmesh.io/v1
kind: Release
metadata: {{name: {AGENT}}}
spec: {{stableRevision: 1}}
"""
    return f"""\
apiVersion: specmesh.io/v1
kind: Release
metadata: {{name: {AGENT}}}
spec:
  stableRevision: 1
  canaryRevision: {canary}
  analysis:
    steps:
      - {{weight: 10, minCanaryRequests: 20}}
      - {{weight: 50, minCanaryRequests: 20}}
    gates: {{maxErrorRateIncrease: 0.05}}
    minSamplePerTrack: 20
"""


def scripted_fleet(
    home: Path, *, prompts: dict[str, str], script: str, release: str
) -> Iterator[dict[str, Any]]:
    """A fleet whose model follows ``script``, with ``prompts`` and AGENT on prompt
    ``steady`` under ``release``; yields its state, then takes it down."""
    examples = home / "examples"
    examples.mkdir()
    for key, text in prompts.items():
        (examples / f"prompt-{key}.yaml").write_text(
            "apiVersion: specmesh.io/v1\nkind: Prompt\n"
            f"metadata: {{name: {key}}}\nspec: {{version: '1.0.0', template: {text}}}\n"
        )
    (examples / "agent.yaml").write_text(_agent("steady") + "---\n" + release)
    (home / "script.yaml").write_text(script)
    f = Fleet(FleetOptions(home=home, examples=examples, model_script=home / "script.yaml"))
    state = f.up()
    state["_home"] = home
    yield state
    f.down()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from scripted_fleet(
        tmp_path_factory.mktemp("analysis-fleet"),
        prompts=PROMPTS,
        script=SCRIPT,
        release=_release(None),
    )


def _apply(tmp_path: Path, text: str) -> None:
    path = tmp_path / f"m-{random.randrange(10**9)}.yaml"
    path.write_text(text)
    assert cli(["apply", "-f", str(path)]) == 0


def _release_now(fleet: dict[str, Any]) -> dict[str, Any]:
    return dict(_api(fleet, f"/api/v1/agents/{AGENT}/release")["release"])


def _traffic(
    fleet: dict[str, Any], done: Callable[[], bool], *, limit: int, concurrency: int = 4
) -> list[InvokeResult]:
    """Calls to the agent's entries (a ready instance's at random) until ``done()`` holds
    (checked every few calls) or ``limit`` calls were made."""
    results: list[InvokeResult] = []

    async def one(urls: list[str], text: str, token: str) -> InvokeResult:
        url = random.choice(urls)
        try:
            return await asyncio.wait_for(invoke(url, text, token=token), 60)
        except Exception as e:
            # an instance a promote or abort drained between the listing and the call refuses
            # the connection: the call never reached it, and a Service would not have sent it
            # there -- send it to an instance still ready (a call it accepted is never retried)
            now = await asyncio.to_thread(_ready_urls, fleet, AGENT)
            if not _never_reached(e) or url in now or not now:
                raise
            return await asyncio.wait_for(invoke(random.choice(now), text, token=token), 60)

    async def run() -> None:
        token = _invoke_token(fleet, AGENT)
        sent = 0
        while sent < limit:
            urls = _ready_urls(fleet, AGENT)
            batch = [one(urls, f"call {sent + i}", token) for i in range(concurrency)]
            sent += concurrency
            for outcome in await asyncio.gather(*batch, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    results.append(InvokeResult(text=repr(outcome), context_id="", state="error"))
                else:
                    results.append(outcome)
            if sent % (4 * concurrency) == 0:
                if await asyncio.to_thread(done):
                    return
                token = _invoke_token(fleet, AGENT)

    asyncio.run(run())
    return results


def _never_reached(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a refused or failed connection: the call
    never reached the instance."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, httpx.ConnectError | ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _canary_ready(fleet: dict[str, Any]) -> bool:
    status = _api(fleet, f"/api/v1/agents/{AGENT}/status")["status"]
    return bool(status["tracks"].get("canary", {}).get("ready"))


def _audit(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    token = Path(fleet["adminTokenFile"]).read_text().strip()
    r = requests.get(
        f"{fleet['endpoints']['controlPlane']}/api/v1/audit",
        params={"name": AGENT, "kind": "Release", "pageSize": 100},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    r.raise_for_status()
    return list(r.json()["entries"])


def test_a_canary_failing_thirty_percent_is_aborted_by_itself_before_fifty_percent(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    _apply(tmp_path, _agent("flaky") + "---\n" + _release(2))
    eventually_sync(lambda: _canary_ready(fleet), what="the canary track ready", timeout=120)

    results = _traffic(fleet, lambda: _release_now(fleet).get("canaryRevision") is None, limit=1200)

    release = _release_now(fleet)
    assert (int(release["stableRevision"]), release.get("canaryRevision")) == (1, None), release
    assert not release.get("canaryWeight")
    analysis = release["analysis"]
    assert analysis["phase"] == "aborted", analysis
    assert [e["weight"] for e in analysis["timeline"]] == [10]  # never reached 50 %
    failed = [r for r in results if r.state != "completed"]
    assert failed, "the canary's failures reached callers"
    assert all(r.text.startswith(("[stable]", "[flaky]")) for r in results if r not in failed)

    entries = [e for e in _audit(fleet) if e["action"] == "release.auto-abort"]
    assert len(entries) == 1, entries
    details = entries[0]["details"]
    assert details["weight"] == 10
    assert details["stable"]["errors"] == 0 and details["canary"]["errors"] >= 3
    gate = details["gates"][0]
    assert (gate["gate"], gate["failed"]) == ("errorRate", True)

    # stable unaffected: every call now answers, from stable
    after = _traffic(fleet, lambda: False, limit=8)
    assert [r.state for r in after] == ["completed"] * 8
    assert all(r.text.startswith("[stable]") for r in after)


def test_a_healthy_canary_is_promoted_by_itself(fleet: dict[str, Any], tmp_path: Path) -> None:
    _apply(tmp_path, _agent("calm") + "---\n" + _release(3))
    eventually_sync(lambda: _canary_ready(fleet), what="the canary track ready", timeout=120)

    results = _traffic(fleet, lambda: _release_now(fleet).get("canaryRevision") is None, limit=1200)

    release = _release_now(fleet)
    assert release.get("canaryRevision") is None, release
    assert int(release["stableRevision"]) == 3
    analysis = release["analysis"]
    assert analysis["phase"] == "promoted"
    assert [(e["weight"], e["decision"]) for e in analysis["timeline"]] == [
        (10, "pass"),
        (50, "pass"),
    ]
    assert [r.state for r in results] == ["completed"] * len(results)
    actions = [e["action"] for e in _audit(fleet)]
    assert actions[0] == "release.promote" and "release.auto-abort" in actions


def test_the_studio_shows_the_analysis_timeline(
    browser: Browser, fleet: dict[str, Any], shots: Path
) -> None:
    studio = Studio(browser, fleet, shots, "admin")
    page = studio.go(f"releases/{AGENT}", "[data-testid=release-analysis]")

    timeline = page.get_by_test_id("release-analysis")
    expect(timeline).to_contain_text("promoted")
    expect(timeline).to_contain_text("canary revision 3 against stable revision 1")
    rows = timeline.locator("tr[data-step]")
    expect(rows).to_have_count(2)
    for i, weight in enumerate(("10%", "50%")):
        expect(rows.nth(i)).to_contain_text(weight)
        expect(rows.nth(i)).to_contain_text("pass")
        expect(rows.nth(i).locator("[data-gate=errorRate]")).to_contain_text("ok")
    studio.snap("release-analysis")
    studio.close()
