"""Agent Studio in a real browser (Debian's Chromium, headless, driven by Playwright)
against the whole local fleet: sign in, create and deploy an agent through the form and
watch it come up (its workload, refreshed while the page is open) and answer, scale it from
its page, edit and deploy agents, watch the engine pick the change up, roll back, move a
canary, open a trace across two agents, and check what a viewer may not see or do. Every
page is saved as a screenshot at 1280x800 and 1920x1080 (in the test's temporary folder;
also into ``docs/studio/`` when ``SPECMESH_STUDIO_DOCS=1``, a few of them).

One fleet is started for the module. Each test sets up the state it checks: an agent it
creates, scales, edits or rolls back is its own (a name no other test uses, deleted when the
test ends), and what it reads of the example agents it brings about itself (the calls behind
a trace or a prompt's figures); so any one test passes alone and in any order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from localfleet.fleet import Fleet, FleetOptions
from specmeshctl.a2aclient import card_from_json, invoke
from tests.polling import eventually_sync

from ..conftest import REPO
from .test_fleet import _invoke_token

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SIZES = ((1280, 800), (1920, 1080))
DOCS = REPO / "docs" / "studio"
DOCS_PAGES = {"agents", "agent-new-invalid", "agent-workload", "agent-history", "release-preview",
              "trace", "tokens", "registries-agents", "prompts"}  # fmt: skip
SEED_SECRETS = ["sk-51668897d94****", "51668897d9410********", "8897d941******c7465cff2"]
TIMEOUT_MS = 20_000
POLL_EVERY = 0.2
"""Seconds between two polls of the control plane (each one an HTTP call or a few)."""
COME_UP_MS = 60_000
"""How long a new or scaled agent's instances may take to be ready (processes start, the
engine loads its spec, the sidecar registers)."""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("fleet")
    f = Fleet(FleetOptions(home=home))  # the control plane's own Istio CRD schemas
    state = f.up()
    state["_home"] = home
    yield state
    f.down()


@pytest.fixture(scope="module")
def browser(fleet: dict[str, Any]) -> Iterator[Browser]:
    """Started after the fleet: Playwright's sync API keeps an event loop running in this
    thread, so whatever calls ``asyncio.run`` must run before it or in another thread."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studio-screenshots")


def _token(fleet: dict[str, Any], role: str = "admin") -> str:
    name = "admin-token" if role == "admin" else f"tokens-{role}"
    return (fleet["_home"] / name).read_text().strip()


def _request(
    fleet: dict[str, Any], method: str, path: str, role: str = "admin", **kwargs: Any
) -> requests.Response:
    return requests.request(
        method,
        f"{fleet['endpoints']['controlPlane']}{path}",
        headers={"Authorization": f"Bearer {_token(fleet, role)}"},
        timeout=30,
        **kwargs,
    )


def _api(fleet: dict[str, Any], method: str, path: str, **kwargs: Any) -> Any:
    r = _request(fleet, method, path, **kwargs)
    r.raise_for_status()
    return r.json()


def _ask(url: str, text: str, *, token: str) -> Any:
    """An A2A call with the official client through an agent's entry (its card is read
    there) with an invoke token, off this thread (Playwright's loop runs here)."""
    with ThreadPoolExecutor(1) as pool:
        call = asyncio.wait_for(invoke(url, text, token=token), 60)
        return pool.submit(asyncio.run, call).result()


def _ask_engine(url: str, text: str) -> Any:
    """An A2A call to one engine's own listener: its card names the public entry, so the
    card's interfaces are pointed back at the engine (which checks no token: loopback)."""
    card = requests.get(f"{url}/.well-known/agent-card.json", timeout=10).json()
    for interface in card["supportedInterfaces"]:
        if interface["protocolBinding"] == "JSONRPC":
            interface["url"] = f"{url}/"
        elif interface["protocolBinding"] == "HTTP+JSON":
            interface["url"] = f"{url}/v1"
    with ThreadPoolExecutor(1) as pool:
        call = asyncio.wait_for(invoke(card_from_json(card), text), 60)
        return pool.submit(asyncio.run, call).result()


class Studio:
    """One signed-in browser tab; records the page's script errors."""

    def __init__(self, browser: Browser, fleet: dict[str, Any], shots: Path, role: str) -> None:
        self.base = fleet["endpoints"]["controlPlane"]
        self.shots = shots
        self.role = role
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(f"{self.base}/")
        expect(self.page.get_by_test_id("signin")).to_be_visible()
        self.page.fill("#token", _token(fleet, role))
        self.page.click("button[type=submit]")
        expect(self.page.locator(".sidebar")).to_be_visible()

    def go(self, route: str, ready: str) -> Page:
        self.page.goto(f"{self.base}/studio/#/{route}")
        expect(self.page.locator(ready).first).to_be_visible()
        return self.page

    def snap(self, name: str) -> None:
        for width, height in SIZES:
            self.page.set_viewport_size({"width": width, "height": height})
            self.page.wait_for_timeout(100)  # one layout pass after the resize
            path = self.shots / f"{name}-{width}x{height}.png"
            self.page.screenshot(path=str(path))
            if name in DOCS_PAGES and os.environ.get("SPECMESH_STUDIO_DOCS") == "1":
                DOCS.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, DOCS / path.name)
        self.page.set_viewport_size({"width": 1280, "height": 800})

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors


@pytest.fixture
def admin(browser: Browser, fleet: dict[str, Any], shots: Path) -> Iterator[Studio]:
    studio = Studio(browser, fleet, shots, "admin")
    yield studio
    studio.close()


def _agent_manifest(name: str, *, temperature: float = 0.3, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "specmesh.io/v1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "base": {"description": "Made by a Studio test", "promptKey": "mse-gateway-assistant"},
            "model": {"model": "qwen-plus-latest", "temperature": temperature},
            "deployment": {"tracks": {"stable": {"replicas": replicas}}},
        },
    }


def _apply(fleet: dict[str, Any], manifest: dict[str, Any]) -> Any:
    return _api(fleet, "POST", "/api/v1/apply", json={"manifest": manifest})


def _status(fleet: dict[str, Any], agent: str) -> Any:
    return _api(fleet, "GET", f"/api/v1/agents/{agent}/status")["status"]


def _agent(fleet: dict[str, Any], agent: str) -> Any:
    return _api(fleet, "GET", f"/api/v1/agents/{agent}")["agent"]


def _revision(record: dict[str, Any]) -> int:
    """An Agent's revision (an int64: a string in the proto's JSON)."""
    return int(record["revisionInfo"]["revision"])


def _ready(status: dict[str, Any]) -> str:
    return f"{status['readyReplicas']}/{status['desiredReplicas']}"


def _engine_versions(fleet: dict[str, Any], agent: str) -> set[str]:
    """The revision each of ``agent``'s engines publishes (its card's version), read on the
    engines' own listeners."""
    versions = set()
    for instance in _status(fleet, agent)["instances"]:
        url = instance["endpoints"]["a2a"]
        card = requests.get(f"{url}/.well-known/agent-card.json", timeout=10).json()
        versions.add(str(card["version"]))
    return versions


@pytest.fixture
def own_agents(fleet: dict[str, Any]) -> Iterator[Callable[..., str]]:
    """``own_agents(name, **manifest_options)`` applies an agent of the test's own (or, with
    ``apply=False``, only claims a name the test creates itself) and waits until all its
    replicas are ready; every agent claimed is deleted when the test ends."""
    names: list[str] = []

    def own(name: str, *, apply: bool = True, **options: Any) -> str:
        names.append(name)
        if apply:
            _apply(fleet, _agent_manifest(name, **options))
            want = options.get("replicas", 1)
            eventually_sync(
                lambda: _ready(_status(fleet, name)) == f"{want}/{want}",
                what=f"{name}'s {want} replica(s) to be ready",
                timeout=COME_UP_MS / 1000,
                every=POLL_EVERY,
            )
        return name

    yield own
    for name in names:
        r = _request(fleet, "DELETE", f"/api/v1/agents/{name}")
        assert r.status_code in (200, 404), r.text


# ---------------------------------------------------------------- tests


def test_sign_in_shows_the_agents_with_their_health(admin: Studio, browser: Browser) -> None:
    page = admin.go("agents", "[data-agent=schedulex-assistant]")

    expect(page.get_by_test_id("me")).to_have_text("local-admin")
    row = page.locator("tr", has=page.locator("[data-agent=schedulex-assistant]"))
    expect(row.locator("[data-track=stable]")).to_be_visible()
    expect(row.locator("[data-track=canary]")).to_be_visible()
    expect(row).to_contain_text("Healthy")
    # READY and phase as the controller reports them: a stable and a canary instance
    expect(page.locator("[data-ready=schedulex-assistant]")).to_have_text("2/2")
    expect(page.locator("[data-agent-phase=schedulex-assistant]")).to_have_text("Running")
    for agent in ("mse-nacos-helper", "mse-gateway-assistant"):
        expect(page.locator(f"[data-ready={agent}]")).to_have_text("1/1")
        expect(page.locator(f"[data-agent-phase={agent}]")).to_have_text("Running")
    admin.snap("agents")

    signed_out = browser.new_page()
    signed_out.goto(f"{admin.base}/studio/")
    signed_out.fill("#token", "smt_not-a-token")
    signed_out.click("button[type=submit]")
    expect(signed_out.locator(".alert-error")).to_contain_text("not known")
    signed_out.set_viewport_size({"width": 1280, "height": 800})
    signed_out.screenshot(path=str(admin.shots / "signin-1280x800.png"))
    signed_out.close()


def test_a_new_agent_is_created_through_the_form(
    admin: Studio, fleet: dict[str, Any], own_agents: Callable[..., str]
) -> None:
    name = own_agents("studio-demo", apply=False)
    page = admin.go("agents/new", "[data-testid=editor]")
    page.fill("[data-control='metadata.name']", name)
    page.fill("[data-control='spec.base.description']", "Made in the Studio")
    page.fill("[data-control='spec.base.promptKey']", "mse-gateway-assistant")
    page.click("[data-tab=model]")
    page.fill("[data-control='spec.model.model']", "qwen-plus-latest")
    page.fill("[data-control='spec.model.temperature']", "7")

    error = page.locator(".field-error[data-error-for='spec.model.temperature']")
    expect(error).to_contain_text("must be <= 2 (got 7)")
    expect(page.get_by_test_id("deploy")).to_be_disabled()
    expect(page.locator("[data-tab=model] .tab-badge")).to_have_text("1")
    admin.snap("agent-new-invalid")

    page.fill("[data-control='spec.model.temperature']", "0.4")
    expect(page.get_by_test_id("validation")).to_contain_text("Valid")
    page.get_by_test_id("deploy").click()

    expect(page.get_by_test_id("current-revision")).to_have_text("rev 1")
    assert page.url.endswith(f"#/agents/{name}")
    stored = _agent(fleet, name)
    assert stored["spec"]["model"]["temperature"] == 0.4
    assert stored["revisionInfo"]["author"] == "local-admin"

    # the page it lands on shows the agent coming up, without a reload
    expect(page.get_by_test_id("workload-ready")).to_have_text("1/1", timeout=COME_UP_MS)
    expect(page.get_by_test_id("workload-phase")).to_have_text("Running")
    expect(page.locator("[data-track-ready=stable]")).to_have_text("1/1")
    instance = page.locator("[data-testid=workload] tr[data-instance]")
    expect(instance).to_have_count(1)
    expect(instance.locator("[data-phase]")).to_have_text("Running")
    expect(instance).to_contain_text("rev 1")
    expect(page.get_by_test_id("registry-health")).to_have_text("Healthy")
    admin.snap("agent-workload")

    status = _status(fleet, name)
    assert _ready(status) == "1/1"
    # made in the form without `callers`: its entry admits no external caller, so that the
    # new agent answers is checked on its engine's own listener (the card pointed there)
    answer = _ask_engine(status["instances"][0]["endpoints"]["a2a"], "Which gateway routes exist?")
    assert answer.state == "completed" and answer.text


def test_scaling_from_the_agent_page_brings_up_the_replicas(
    admin: Studio, fleet: dict[str, Any], own_agents: Callable[..., str]
) -> None:
    name = own_agents("studio-scale")  # revision 1, one replica
    page = admin.go(f"agents/{name}", "[data-testid=scale]")
    expect(page.get_by_test_id("workload-ready")).to_have_text("1/1")
    expect(page.get_by_test_id("scale-replicas")).to_have_value("1")

    page.get_by_test_id("scale-replicas").fill("2")
    page.get_by_test_id("scale-apply").click()

    expect(page.get_by_test_id("scale-result")).to_contain_text("Scaled stable to 2 replicas")
    expect(page.get_by_test_id("current-revision")).to_have_text("rev 2")
    expect(page.get_by_test_id("scale-replicas")).to_have_value("2")
    expect(page.get_by_test_id("workload-ready")).to_have_text("2/2", timeout=COME_UP_MS)
    rows = page.locator("[data-testid=workload] tr[data-instance]")
    expect(rows).to_have_count(2)
    expect(rows.locator("[data-phase]")).to_have_text(["Running", "Running"])
    admin.snap("agent-scaled")
    record = _agent(fleet, name)
    assert record["spec"]["deployment"]["tracks"]["stable"]["replicas"] == 2

    # somebody else scales it back meanwhile: a scale from the stale page is refused, and says so
    _api(fleet, "POST", f"/api/v1/agents/{name}/scale", json={"replicas": 1})
    page.get_by_test_id("scale-replicas").fill("3")
    page.get_by_test_id("scale-apply").click()
    expect(page.locator("[data-testid=scale] .alert-error")).to_contain_text(
        "current revision is 3"
    )
    assert _revision(_agent(fleet, name)) == 3


def test_a_model_change_deployed_from_the_form_reaches_the_engine(
    admin: Studio, fleet: dict[str, Any], own_agents: Callable[..., str]
) -> None:
    name = own_agents("studio-edit", temperature=0.3)  # revision 1
    page = admin.go(f"agents/{name}", "[data-testid=editor]")
    page.click("[data-tab=model]")
    page.fill("[data-control='spec.model.temperature']", "0.55")
    expect(page.get_by_test_id("validation")).to_contain_text("1 change")
    expect(page.locator(".change-list")).to_contain_text("model.temperature")
    admin.snap("agent-edit")
    page.get_by_test_id("deploy").click()

    expect(page.get_by_test_id("current-revision")).to_have_text("rev 2")
    eventually_sync(
        lambda: _engine_versions(fleet, name) == {"2"},
        what="the engine's agent card to show the new revision",
        timeout=30,
        every=POLL_EVERY,
    )
    page = admin.go(f"agents/{name}/instances", "[data-instance-revision]")
    expect(page.locator(f"[data-instance-revision='{name}-stable-0']")).to_have_text("rev 2")
    admin.snap("agent-instances")
    page.click("[data-tab=spec]")
    page.click("[data-tab=raw]")
    expect(page.get_by_test_id("raw-yaml")).to_contain_text("temperature: 0.55")
    admin.snap("agent-raw")


def test_rolling_back_from_history_restores_the_old_revision(
    admin: Studio, fleet: dict[str, Any], own_agents: Callable[..., str]
) -> None:
    name = own_agents("studio-rollback", temperature=0.3)  # revision 1
    assert int(_apply(fleet, _agent_manifest(name, temperature=0.55))["revision"]) == 2
    page = admin.go(f"agents/{name}/history", "[data-testid=history-diff]")
    expect(page.get_by_test_id("diff-changes")).to_contain_text("model.temperature")
    expect(page.locator(".diff-mod").first).to_contain_text("temperature")
    admin.snap("agent-history")

    page.click("[data-rollback='1']")
    page.get_by_test_id("confirm").click()

    expect(page.get_by_test_id("current-revision")).to_have_text("rev 3")
    record = _agent(fleet, name)
    assert record["revisionInfo"]["message"] == "rollback to revision 1"
    assert record["spec"]["model"]["temperature"] == 0.3
    eventually_sync(
        lambda: _engine_versions(fleet, name) == {"3"},
        what="the engine to serve the rolled-back revision",
        timeout=30,
        every=POLL_EVERY,
    )


@pytest.fixture
def clean_release(fleet: dict[str, Any]) -> Iterator[str]:
    """schedulex-assistant (the example agent with a canary track) with no release in
    progress before and after the test."""
    agent = "schedulex-assistant"
    _abort_release(fleet, agent)

    def both_tracks_ready() -> bool:  # a release sending calls to an empty track is refused
        status = _api(fleet, "GET", f"/api/v1/agents/{agent}/status")["status"]
        tracks = status.get("tracks", {})
        return all(tracks.get(t, {}).get("ready", 0) >= 1 for t in ("stable", "canary"))

    eventually_sync(both_tracks_ready, what=f"{agent}'s tracks ready", timeout=60, every=POLL_EVERY)
    yield agent
    _abort_release(fleet, agent)


def _abort_release(fleet: dict[str, Any], agent: str) -> None:
    release = _api(fleet, "GET", f"/api/v1/agents/{agent}/release").get("release")
    if release and ("canaryRevision" in release or release["canaryWeight"]):
        _api(fleet, "POST", f"/api/v1/agents/{agent}/release/abort", json={})


def test_moving_the_canary_weight_changes_the_virtualservice_preview(
    admin: Studio, fleet: dict[str, Any], clean_release: str
) -> None:
    page = admin.go(f"releases/{clean_release}", "[data-testid=preview-VirtualService]")
    expect(page.get_by_test_id("preview-status")).to_contain_text("No change")

    page.get_by_test_id("canary-weight").fill("30")

    preview = page.get_by_test_id("preview-VirtualService")
    expect(page.get_by_test_id("preview-status")).to_contain_text("publishes new Istio objects")
    expect(preview.locator(".diff-add, .diff-mod").first).to_be_visible()
    expect(preview.locator("pre.r")).to_contain_text(["weight: 70", "weight: 30"])
    page.get_by_test_id("add-header").click()
    expect(preview.locator("pre.r")).to_contain_text(["canary-by-header"])
    admin.snap("release-preview")

    page.get_by_test_id("apply-release").click()
    expect(page.get_by_test_id("abort")).to_be_visible()
    release = _api(fleet, "GET", f"/api/v1/agents/{clean_release}/release")["release"]
    assert release["canaryWeight"] == 30 and release["headerMatch"][0]["name"] == "x-canary"
    mesh = _api(fleet, "GET", "/api/v1/mesh")["objects"]
    vs = next(o for o in mesh if o["kind"] == "VirtualService"
              and o["metadata"]["name"] == clean_release)  # fmt: skip
    assert [r["weight"] for r in vs["spec"]["http"][-1]["route"]] == [70, 30]
    admin.snap("release-applied")

    page.get_by_test_id("abort").click()
    page.get_by_test_id("confirm").click()
    expect(page.get_by_test_id("abort")).to_have_count(0)
    release = _api(fleet, "GET", f"/api/v1/agents/{clean_release}/release")["release"]
    assert "canaryRevision" not in release and release["canaryWeight"] == 0


def test_the_trace_of_a_two_agent_conversation_is_a_waterfall(
    admin: Studio, fleet: dict[str, Any]
) -> None:
    url = fleet["agents"]["mse-nacos-helper"]["stable"]["entry"]
    result = _ask(
        url, "Which Nacos services are registered?", token=_invoke_token(fleet, "mse-nacos-helper")
    )
    assert result.state == "completed"

    def two_agent_trace() -> str | None:
        listed = _api(fleet, "GET", "/api/v1/traces?agentName=mse-nacos-helper&pageSize=300")
        for t in listed["traces"]:
            if {"mse-nacos-helper", "mse-gateway-assistant"} <= set(t["agents"]):
                spans = _api(fleet, "GET", f"/api/v1/traces/{t['traceId']}")["spans"]
                # each engine exports in its own batches: wait for the spans shown below
                names = {s["name"] for s in spans}
                gateway = {s["name"] for s in spans if s["agent"] == "mse-gateway-assistant"}
                roots = {"invoke_agent mse-nacos-helper", "invoke_agent mse-gateway-assistant"}
                if "chat qwen-plus-latest" in gateway and roots <= names:
                    return str(t["traceId"])
        return None

    trace_id = eventually_sync(
        two_agent_trace, what="a trace across both agents", timeout=60, every=POLL_EVERY
    )
    page = admin.go("observability/traces", f"[data-trace='{trace_id}']")
    admin.snap("traces")
    page.click(f"[data-trace='{trace_id}']")

    waterfall = page.get_by_test_id("waterfall")
    expect(waterfall.locator("[data-span='invoke_agent mse-nacos-helper']")).to_be_visible()
    expect(waterfall.locator("[data-span='invoke_agent mse-gateway-assistant']")).to_be_visible()
    expect(waterfall.locator("[data-kind=llm]").first).to_be_visible()
    expect(waterfall.locator("[data-kind=tool]").first).to_be_visible()
    a2a = waterfall.locator("[data-kind=a2a]")
    expect(a2a).to_contain_text("ask_mse-gateway-assistant")
    a2a.click()
    expect(page.get_by_test_id("span-detail")).to_contain_text("gen_ai.tool.name")
    # the chain's cost: the examples price their model, so no "unpriced" badge and no $0
    cost = page.get_by_test_id("trace-cost")
    expect(cost).not_to_contain_text("unpriced")
    assert float(cost.locator("[data-cost]").get_attribute("data-cost") or 0) > 0
    helper = page.get_by_test_id("agent-costs").locator("[data-agent='mse-nacos-helper']")
    expect(helper).to_contain_text("including downstream")
    admin.snap("trace")

    page = admin.go("observability/tokens/7d", ".chart")
    expect(page.locator(".kpi").nth(1)).not_to_contain_text("Tokens0")
    admin.snap("tokens")


def test_prompt_center_shows_the_figures_of_each_version(
    admin: Studio, fleet: dict[str, Any]
) -> None:
    url = fleet["agents"]["mse-nacos-helper"]["stable"]["entry"]
    token = _invoke_token(fleet, "mse-nacos-helper")
    assert _ask(url, "Which Nacos configs exist?", token=token).state == "completed"

    def served() -> bool:
        stats = _api(fleet, "GET", "/api/v1/prompts/mse-nacos-helper/stats")["versions"]
        return any(v["version"] == "3.0.11" and v["requests"] > 0 for v in stats)

    eventually_sync(
        served,
        what="the turn's span to count for prompt version 3.0.11",
        timeout=60,
        every=POLL_EVERY,
    )
    page = admin.go("prompts/mse-nacos-helper", "[data-version='3.0.11']")
    row = page.locator("[data-version='3.0.11']")
    expect(row.locator("td").nth(2)).not_to_have_text("0")  # requests served
    expect(page.get_by_test_id("prompt-diff")).to_be_visible()
    admin.snap("prompts")


def test_registries_list_real_tools_and_the_partner_graph(admin: Studio) -> None:
    page = admin.go("registries/mcp", "[data-tools='nacos-mcp-tools'] [data-tool]")
    for tool in ("list_services", "get_service", "get_config", "list_configs"):
        expect(page.locator(f"[data-tools='nacos-mcp-tools'] [data-tool='{tool}']")).to_be_visible()
    expect(page.locator("[data-tools='time'] [data-tool='get_current_time']")).to_be_visible()
    admin.snap("registries-mcp")

    page = admin.go("registries/agents", "[data-testid=partner-graph]")
    graph = page.get_by_test_id("partner-graph")
    expect(graph.locator("[data-node='mse-nacos-helper']")).to_be_visible()
    expect(graph.locator("[data-node='mse-gateway-assistant']")).to_be_visible()
    expect(graph.locator(".edge-a2a")).to_have_count(2)
    admin.snap("registries-agents")


def test_a_secrets_admin_writes_a_value_it_can_never_read_back(
    browser: Browser, fleet: dict[str, Any], shots: Path
) -> None:
    studio = Studio(browser, fleet, shots, "secrets-admin")
    try:
        page = studio.go("credentials", "[data-testid=masked]")
        expect(page.locator("[data-nav]")).to_have_count(1)  # credentials only
        page.fill("[data-testid=cred-path]", "specmesh/shared/studio-test")
        page.fill("[data-testid=cred-value]", "studio-secret-value-123")
        page.get_by_test_id("cred-save").click()
        expect(page.locator(".alert-ok")).to_contain_text(
            "vault://secret/specmesh/shared/studio-test#value"
        )
        expect(page.get_by_test_id("cred-value")).to_have_value("")
        studio.snap("credentials")
        page.reload()
        expect(page.locator("[data-testid=masked]").first).to_be_visible()
        assert "studio-secret-value-123" not in page.content()
    finally:
        studio.close()


def test_a_viewer_sees_no_credential_values_and_no_deploy_button(
    browser: Browser, fleet: dict[str, Any], shots: Path
) -> None:
    studio = Studio(browser, fleet, shots, "viewer")
    try:
        page = studio.go("agents/mse-nacos-helper", "[data-testid=editor]")
        expect(page.locator("[data-nav=credentials]")).to_have_count(0)
        expect(page.get_by_test_id("new-agent")).to_have_count(0)
        expect(page.get_by_test_id("deploy")).to_have_count(0)
        expect(page.get_by_test_id("read-only")).to_be_visible()
        expect(page.locator("[data-control='spec.base.description']")).to_have_attribute(
            "readonly", ""
        )
        studio.snap("viewer-agent")

        expect(page.get_by_test_id("workload-ready")).to_have_text("1/1")
        expect(page.get_by_test_id("scale-apply")).to_have_count(0)
        expect(page.get_by_test_id("scale-read-only")).to_be_visible()
        revision = _revision(_agent(fleet, "mse-nacos-helper"))
        refused = _request(
            fleet, "POST", "/api/v1/agents/mse-nacos-helper/scale", "viewer", json={"replicas": 2}
        )
        assert refused.status_code == 403
        assert _revision(_agent(fleet, "mse-nacos-helper")) == revision

        page = studio.go("agents/mse-nacos-helper/history", "[data-testid=history-diff]")
        expect(page.locator("[data-rollback]")).to_have_count(0)
        page = studio.go("releases/schedulex-assistant", "[data-testid=preview-VirtualService]")
        expect(page.get_by_test_id("apply-release")).to_have_count(0)
        page = studio.go("credentials", "[data-testid=forbidden]")
        studio.snap("viewer-credentials")

        for route in ("agents/mse-nacos-helper/history", "registries/agents", "credentials"):
            studio.go(route, ".page")
            html = page.content()
            assert not [s for s in SEED_SECRETS if s in html], route
        r = requests.get(
            f"{studio.base}/api/v1/credentials",
            headers={"Authorization": f"Bearer {_token(fleet, 'viewer')}"},
            timeout=10,
        )
        assert r.status_code == 403
    finally:
        studio.close()
