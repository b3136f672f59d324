"""The evaluation gate on the local fleet (`specmesh up`): before the first step raises the
canary's weight, the control plane sends the release's prompts to the canary through the
agent's public entry (a stable instance's, routed by its own token's track claim) and checks
the answers. A canary whose scripted model answers wrongly is aborted by itself before any
traffic reaches it; a correct canary passes and its first step starts. Used in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.polling import eventually_sync

from . import test_controller
from .test_release_analysis import _agent, _apply, _audit, _release_now, scripted_fleet
from .test_release_analysis import _release as analysed_release

pytestmark = pytest.mark.e2e

_cli_env = test_controller._cli_env

AGENT = "canaried"  # the helpers of test_release_analysis name this agent
SCRIPT = """\
rules:
  - match: {system: "wrong"}
    reply: {type: text, text: "[wrong] 2+2 is 5"}
  - match: {system: "right"}
    reply: {type: text, text: "[right] 2+2 is 4"}
  - match: {system: "steady"}
    reply: {type: text, text: "[stable] {{last_user}}"}
"""
PROMPTS = {"steady": "You are steady.", "wrong": "You are wrong.", "right": "You are right."}


EVALUATION = """\
    evaluation:
      cases:
        - {name: sum, prompt: "What is 2+2?", contains: ["4"], matches: "^\\\\[\\\\w+\\\\]"}
        - {prompt: "Add two and two", notContains: ["5"], timeoutSeconds: 20}
"""


def _release(canary: int | None) -> str:
    """test_release_analysis's release (steps 10 % -> 50 %, error-rate gate) with
    :data:`EVALUATION`."""
    return analysed_release(canary) + (EVALUATION if canary is not None else "")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from scripted_fleet(
        tmp_path_factory.mktemp("evaluation-fleet"),
        prompts=PROMPTS,
        script=SCRIPT,
        release=_release(None),
    )


def _phase(fleet: dict[str, Any], canary: int) -> str | None:
    analysis = _release_now(fleet).get("analysis") or {}
    if analysis.get("canaryRevision") != canary:
        return None
    return str(analysis.get("phase"))


def test_a_canary_answering_wrongly_is_aborted_before_its_first_weight(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    _apply(tmp_path, _agent("wrong") + "---\n" + _release(2))

    eventually_sync(
        lambda: _phase(fleet, 2) == "aborted", what="the evaluation's abort", timeout=180
    )

    release = _release_now(fleet)
    assert (int(release["stableRevision"]), release.get("canaryRevision")) == (1, None), release
    [entry] = release["analysis"]["timeline"]
    assert (entry["step"], entry["weight"], entry["decision"]) == (0, 10, "fail")
    evaluation = entry["evaluation"]
    assert (evaluation["passed"], evaluation["failures"]) == (False, 2)
    # the answers came from the canary (its prompt), through the public entry
    assert [(c["name"], c["failed"], c["excerpt"]) for c in evaluation["cases"]] == [
        ("sum", "contains '4'", "[wrong] 2+2 is 5"),
        ("case 1", "notContains '5'", "[wrong] 2+2 is 5"),
    ]
    audit = _audit(fleet)
    [aborted] = [e for e in audit if e["action"] == "release.auto-abort"]
    assert aborted["details"]["evaluation"]["failures"] == 2
    assert aborted["details"]["weight"] == 10
    # its weight was never raised: no release.set by the analysis
    assert not [
        e for e in audit if e["action"] == "release.set" and e["actor"] == "specmesh-analysis"
    ]


def test_a_correct_canary_passes_and_its_first_step_starts(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    _apply(tmp_path, _agent("right") + "---\n" + _release(3))

    eventually_sync(lambda: _phase(fleet, 3) == "running", what="the first step", timeout=180)

    release = _release_now(fleet)
    assert (int(release["canaryRevision"]), release.get("canaryWeight")) == (3, 10), release
    [entry] = release["analysis"]["timeline"]
    assert (entry["weight"], entry["decision"]) == (10, "hold")
    evaluation = entry["evaluation"]
    assert (evaluation["passed"], evaluation["failures"]) == (True, 0)
    assert {c["excerpt"] for c in evaluation["cases"]} == {"[right] 2+2 is 4"}
