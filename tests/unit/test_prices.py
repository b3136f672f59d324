"""Costs from a litellm-format price map, read without importing litellm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specmesh.prices import PriceMap, litellm_price_file


def _map(tmp_path: Path, entries: dict[str, object]) -> PriceMap:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(entries))
    return PriceMap(path=path)


def test_a_call_costs_its_tokens_at_the_model_price(tmp_path: Path) -> None:
    prices = _map(
        tmp_path,
        {"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6, "mode": "chat"}},
    )

    assert prices.cost("m", prompt_tokens=10, completion_tokens=5) == pytest.approx(2e-5)
    assert prices.cost("openai/m", prompt_tokens=10, completion_tokens=5) == pytest.approx(2e-5)
    assert prices.cost("unknown", prompt_tokens=10, completion_tokens=5) == 0.0


def test_long_prompts_are_priced_at_their_tier(tmp_path: Path) -> None:
    prices = _map(
        tmp_path,
        {
            "above": {
                "input_cost_per_token": 1e-6,
                "output_cost_per_token": 2e-6,
                "input_cost_per_token_above_200k_tokens": 3e-6,
                "output_cost_per_token_above_200k_tokens": 4e-6,
            },
            "ranges": {
                "tiered_pricing": [
                    {"range": [0, 1000], "input_cost_per_token": 1.0, "output_cost_per_token": 2.0},
                    {
                        "range": [1000, 5000],
                        "input_cost_per_token": 3.0,
                        "output_cost_per_token": 4.0,
                    },
                ]
            },
        },
    )

    assert prices.cost("above", prompt_tokens=200_000, completion_tokens=1) == pytest.approx(
        0.200002
    )
    assert prices.cost("above", prompt_tokens=200_001, completion_tokens=1) == pytest.approx(
        0.600007
    )
    assert prices.cost("ranges", prompt_tokens=999, completion_tokens=1) == 1001.0
    assert prices.cost("ranges", prompt_tokens=1000, completion_tokens=1) == 3004.0


def test_a_missing_or_broken_file_prices_everything_at_zero(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")

    assert (
        PriceMap(path=tmp_path / "missing.json").cost("m", prompt_tokens=1, completion_tokens=1)
        == 0.0
    )
    assert (
        PriceMap(path=tmp_path / "broken.json").cost("m", prompt_tokens=1, completion_tokens=1)
        == 0.0
    )


def test_litellm_file_is_found_and_read_without_importing_litellm() -> None:
    probe = (
        "import sys; from specmesh.prices import PriceMap, litellm_price_file;"
        "assert litellm_price_file() is not None;"
        "assert PriceMap().cost('gpt-4o-mini', prompt_tokens=1000, completion_tokens=1000) > 0;"
        "print('litellm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert litellm_price_file() is not None
