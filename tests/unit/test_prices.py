"""Costs from a litellm-format price map, read without importing litellm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specmesh.prices import ModelPrice, PriceMap, litellm_price_file, spec_price
from specmesh.spec.models import ModelPriceSpec, ModelSpec


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


def test_a_price_set_in_the_model_part_overrides_the_map(tmp_path: Path) -> None:
    prices = _map(tmp_path, {"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}})
    spec = ModelSpec.model_validate(
        {"model": "m", "price": {"inputPerMillion": 3, "outputPerMillion": 15}}
    )

    charged = prices.charge(
        "m", prompt_tokens=1000, completion_tokens=100, override=spec_price(spec.price)
    )

    assert charged == pytest.approx(1000 * 3e-6 + 100 * 15e-6)
    assert prices.charge("m", prompt_tokens=1000, completion_tokens=100) == pytest.approx(
        1000 * 1e-6 + 100 * 2e-6
    )


def test_each_fallback_carries_its_own_price(tmp_path: Path) -> None:
    prices = _map(tmp_path, {})
    spec = ModelSpec.model_validate(
        {
            "model": "primary",
            "price": {"inputPerMillion": 1, "outputPerMillion": 2},
            "fallbacks": [
                {"model": "backup", "price": {"inputPerMillion": 10, "outputPerMillion": 20}},
                {"model": "free-tier"},
            ],
        }
    )

    backup, free_tier = (spec_price(fb.price) for fb in spec.fallbacks)

    assert prices.charge(
        "backup", prompt_tokens=100, completion_tokens=10, override=backup
    ) == pytest.approx(100 * 10e-6 + 10 * 20e-6)
    assert (
        prices.charge("free-tier", prompt_tokens=100, completion_tokens=10, override=free_tier)
        is None
    )


def test_a_model_priced_nowhere_is_unpriced_not_free(tmp_path: Path) -> None:
    prices = _map(tmp_path, {"known": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0}})

    assert prices.charge("unknown", prompt_tokens=10, completion_tokens=5) is None
    assert prices.charge("known", prompt_tokens=10, completion_tokens=5) == 0.0  # really free
    assert prices.cost("unknown", prompt_tokens=10, completion_tokens=5) == 0.0  # the counter's


def test_a_worst_case_counts_every_allowed_completion_token() -> None:
    price = ModelPrice.per_million(2, 8)

    assert price.worst_case(prompt_tokens=500, max_completion_tokens=100) == pytest.approx(
        500 * 2e-6 + 100 * 8e-6
    )


def test_a_negative_price_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="outputPerMillion"):
        ModelPriceSpec.model_validate({"inputPerMillion": 1, "outputPerMillion": -1})
