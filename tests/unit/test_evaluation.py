"""The evaluation gate's case checks and runner (control_plane/evaluation.py): what passes,
what fails and why, and that a case which cannot run fails."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from control_plane.evaluation import (
    EVALUATION_SUBJECT,
    Evaluator,
    check_answer,
    not_run,
    status_entries,
)
from specmesh.spec.models import EvaluationCase, EvaluationSpec


def _case(**fields: Any) -> EvaluationCase:
    return EvaluationCase.model_validate({"prompt": "What is 2+2?", **fields})


@pytest.mark.parametrize(
    ("fields", "answer", "failed"),
    [
        ({"contains": ["4"]}, "It is 4.", None),
        ({"contains": ["4", "four"]}, "It is 4.", "contains 'four'"),
        ({"notContains": ["5"]}, "It is 4.", None),
        ({"notContains": ["sorry"]}, "sorry, no idea", "notContains 'sorry'"),
        ({"matches": r"\b4\b"}, "It is 4.", None),
        ({"matches": r"(?i)^it IS \d+\.$"}, "It is 4.", None),
        ({"matches": r"^\d+$"}, "It is 4.", "matches '^\\\\d+$'"),
        ({"contains": ["It"], "notContains": ["5"], "matches": "4"}, "It is 5.", "notContains '5'"),
    ],
)
def test_an_answer_passes_only_with_every_property(
    fields: dict[str, Any], answer: str, failed: str | None
) -> None:
    result = check_answer(_case(**fields), answer, name="c")

    assert (result.passed, result.failed) == (failed is None, failed)
    assert result.excerpt == answer and result.name == "c"


def test_a_long_answer_is_kept_as_an_excerpt() -> None:
    result = check_answer(_case(contains=["x"]), "y" * 1000)

    assert not result.passed and len(result.excerpt) == 203 and result.excerpt.endswith("...")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"cases": [{"prompt": "hi"}]}, "set contains, notContains or matches"),
        ({"cases": [{"prompt": "hi", "matches": "(a"}]}, "not a valid RE2 pattern"),
        ({"cases": [{"prompt": "hi", "matches": r"(a)\1"}]}, "not a valid RE2 pattern"),
        ({"cases": []}, "at least 1 item"),
        ({"cases": [{"prompt": "hi", "contains": ["x"]}], "maxFailures": 1}, "maxFailures must"),
        ({"cases": [{"prompt": "hi", "contains": ["x"], "timeoutSeconds": 0}]}, "greater than 0"),
    ],
)
def test_a_bad_evaluation_is_refused_naming_the_rule(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        EvaluationSpec.model_validate(spec)

    assert message in str(refused.value)


@dataclass
class Minted:
    token: str


class Minter:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def mint(
        self, *, subject: str, audience: str, track: Any = None, ttl_seconds: int | None = None
    ) -> Minted:
        self.calls.append(
            {"subject": subject, "audience": audience, "track": track, "ttl": ttl_seconds}
        )
        return Minted(token=f"t{len(self.calls)}")


def _agent_answers(answers: dict[str, Any]) -> httpx.MockTransport:
    """An entry answering JSON-RPC SendMessage: prompt -> text (completed task), or an
    ``int`` HTTP status."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["method"] == "SendMessage"
        assert request.headers["Authorization"].startswith("Bearer t")
        assert request.headers["A2A-Version"] == "1.0"
        prompt = body["params"]["message"]["parts"][0]["text"]
        answer = answers[prompt]
        if isinstance(answer, int):
            return httpx.Response(answer, json={"error": {"code": answer, "message": "no"}})
        task = {
            "id": "t",
            "contextId": "c",
            "status": {"state": "TASK_STATE_COMPLETED"},
            "artifacts": [{"artifactId": "a", "parts": [{"text": answer}]}],
        }
        return httpx.Response(
            200, json={"jsonrpc": "2.0", "id": body["id"], "result": {"task": task}}
        )

    return httpx.MockTransport(handle)


async def _entries(agent: str) -> list[str]:
    return ["http://entry.test"]


async def test_every_case_runs_against_the_canary_and_failures_are_counted() -> None:
    spec = EvaluationSpec.model_validate(
        {
            "cases": [
                {"name": "sum", "prompt": "2+2?", "contains": ["4"]},
                {"prompt": "capital?", "matches": "Paris"},
                {"prompt": "down?", "contains": ["x"]},
            ],
            "maxFailures": 1,
        }
    )
    minter = Minter()
    evaluator = Evaluator(
        tokens=minter,
        entries=_entries,
        transport=_agent_answers({"2+2?": "4", "capital?": "Lyon", "down?": 503}),
    )

    result = await evaluator.run("Support_Bot", spec)

    assert [(c.name, c.passed, c.failed) for c in result.cases] == [
        ("sum", True, None),
        ("case 1", False, "matches 'Paris'"),
        ("case 2", False, "error"),
    ]
    assert result.cases[1].excerpt == "Lyon"
    assert (result.failures, result.passed) == (2, False)
    assert result.reason == "evaluation: 2 of 3 cases failed (at most 1 may)"
    assert {(c["subject"], c["audience"], c["track"]) for c in minter.calls} == {
        (EVALUATION_SUBJECT, "support-bot", "canary")
    }


async def test_no_entry_fails_every_case_never_passes() -> None:
    spec = EvaluationSpec.model_validate({"cases": [{"prompt": "hi", "contains": ["x"]}]})

    async def none(agent: str) -> list[str]:
        return []

    result = await Evaluator(tokens=Minter(), entries=none).run("a", spec)

    assert not result.passed and result.cases[0].failed == "error"
    assert "no public entry" in result.cases[0].excerpt
    assert not not_run(spec, "why").passed


async def test_an_unreachable_entry_fails_the_case() -> None:
    spec = EvaluationSpec.model_validate(
        {"cases": [{"prompt": "hi", "contains": ["x"], "timeoutSeconds": 5}]}
    )

    async def closed(agent: str) -> list[str]:
        return ["http://127.0.0.1:9"]

    result = await Evaluator(tokens=Minter(), entries=closed).run("a", spec)

    assert (result.passed, result.cases[0].failed) == (False, "error")


class Statuses:
    async def get_status(self, agent: str) -> dict[str, Any] | None:
        return {
            "instances": [
                {"track": "canary", "ready": True, "endpoints": {"entry": "http://c"}},
                {"track": "stable", "ready": False, "endpoints": {"entry": "http://s0"}},
                {"track": "stable", "ready": True, "endpoints": {"entry": "http://s1"}},
                {"track": "stable", "ready": True, "endpoints": {"inbound": "10.0.0.1:8080"}},
            ]
        }


async def test_entries_are_the_ready_instances_public_entries_stable_first() -> None:
    assert await status_entries(Statuses())("a") == ["http://s1", "http://c"]
