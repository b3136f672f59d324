"""`specmesh release get`'s analysis timeline shows each step's evaluation: its verdict and,
per case, the property that failed and the start of the answer."""

from __future__ import annotations

from specmeshctl.releases import analysis_lines


def test_the_timeline_shows_the_evaluation_of_a_step() -> None:
    analysis = {
        "canaryRevision": 2,
        "stableRevision": 1,
        "phase": "aborted",
        "step": 0,
        "steps": 2,
        "timeline": [
            {
                "step": 0,
                "weight": 10,
                "decision": "fail",
                "reason": "evaluation: 1 of 2 cases failed (at most 0 may)",
                "figures": None,
                "evaluation": {
                    "passed": False,
                    "failures": 1,
                    "maxFailures": 0,
                    "cases": [
                        {"name": "sum", "passed": True, "failed": None, "excerpt": "It is 4."},
                        {
                            "name": "case 1",
                            "passed": False,
                            "failed": "contains 'Paris'",
                            "excerpt": "Lyon,\n" + "x" * 200,
                        },
                    ],
                },
            }
        ],
    }

    lines = analysis_lines(analysis)

    assert lines[1] == "  step 1 at 10%: fail -- no data yet"
    assert lines[2] == "    evaluation: 1 of 2 cases failed (at most 0 may)"
    assert lines[3] == "    evaluation FAILED: 1 of 2 cases failed (at most 0 may)"
    assert lines[4] == "      sum: ok -- 'It is 4.'"
    assert lines[5] == "      case 1: FAILED contains 'Paris' -- '" + "Lyon, " + "x" * 74 + "...'"
    assert len(lines) == 6


def test_a_step_without_evaluation_shows_none() -> None:
    lines = analysis_lines(
        {"phase": "running", "timeline": [{"step": 0, "weight": 10, "decision": "hold"}]}
    )

    assert not any("evaluation" in line for line in lines)
