"""Model prices from litellm's price map, read without importing litellm.

The one price computation: the engine's ``specmesh.agent.cost`` metric
(``engine/telemetry.py``) and the control plane's token-usage costs
(``control_plane/traces.py``) both come from here, so they cannot disagree.

litellm ships its price map as a JSON file inside its package
(``model_prices_and_context_window_backup.json``); importing litellm to read it costs
seconds and ~160 MB, reading the file ~40 ms once. :class:`PriceMap` keeps only what a
turn's cost needs -- the price of an input and an output token, and the tiers above a
prompt size (``input_cost_per_token_above_200k_tokens``...) -- and drops the rest.

A model is looked up by its name, then by its name without a provider prefix
(``openai/gpt-4o`` -> ``gpt-4o``). A price the model part sets (``model.price``, each
fallback's ``price``: USD per 1M input / output tokens, :meth:`ModelPrice.per_million`)
overrides the map. A model priced nowhere is *unpriced*: :meth:`PriceMap.charge` answers
None, and whoever shows a cost flags it (``unpriced``) -- never a silent 0. (The older
:meth:`PriceMap.cost` keeps answering 0.0 for it, for the metric counter.)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specmesh.spec.models import ModelPriceSpec

__all__ = [
    "PRICE_FILE",
    "ModelPrice",
    "PriceMap",
    "default_price_map",
    "litellm_price_file",
    "spec_price",
]

logger = logging.getLogger(__name__)

PRICE_FILE = "model_prices_and_context_window_backup.json"
"""The price map's file name inside the litellm package."""

_TIER = re.compile(r"^(input|output)_cost_per_token_above_(\d+)k_tokens$")


@dataclass(frozen=True)
class ModelPrice:
    """USD per token, and the prices that apply once the prompt passes a size."""

    input: float
    output: float
    tiers: tuple[tuple[int, float, float], ...] = ()
    """(prompt tokens above which it applies, input, output), largest threshold first
    (litellm's ``*_above_<n>k_tokens`` keys and ``tiered_pricing`` ranges)."""

    @classmethod
    def per_million(cls, input_usd: float, output_usd: float) -> ModelPrice:
        """A price given in USD per 1M input and output tokens (the model part's form)."""
        return cls(input=input_usd / 1_000_000, output=output_usd / 1_000_000)

    def worst_case(self, *, prompt_tokens: int, max_completion_tokens: int) -> float:
        """The most a call may cost: ``prompt_tokens`` in and ``max_completion_tokens`` out
        at the prices of that prompt size (the sidecar's budget check)."""
        return self.cost(prompt_tokens=prompt_tokens, completion_tokens=max_completion_tokens)

    def cost(self, *, prompt_tokens: int, completion_tokens: int) -> float:
        price_in, price_out = self.input, self.output
        for above, tier_in, tier_out in self.tiers:
            if prompt_tokens > above:
                price_in, price_out = tier_in, tier_out
                break
        return prompt_tokens * price_in + completion_tokens * price_out


def spec_price(price: ModelPriceSpec | None) -> ModelPrice | None:
    """The model part's ``price`` (USD per 1M tokens) as a :class:`ModelPrice`."""
    if price is None:
        return None
    return ModelPrice.per_million(price.input_per_million, price.output_per_million)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _price(entry: Any) -> ModelPrice | None:
    if not isinstance(entry, dict):
        return None
    base_in = _number(entry.get("input_cost_per_token"))
    base_out = _number(entry.get("output_cost_per_token"))
    tiers: dict[int, list[float | None]] = {}
    for key, value in entry.items():
        match = _TIER.match(key)
        if match is not None and _number(value) is not None:
            slot = tiers.setdefault(int(match.group(2)) * 1000, [None, None])
            slot[0 if match.group(1) == "input" else 1] = _number(value)
    # litellm's other form: [{"range": [from, to], "input_cost_per_token": ...}, ...]
    for tier in entry.get("tiered_pricing") or ():
        if not isinstance(tier, dict) or not isinstance(tier.get("range"), list):
            continue
        start = _number(tier["range"][0]) if tier["range"] else None
        tier_in = _number(tier.get("input_cost_per_token"))
        tier_out = _number(tier.get("output_cost_per_token"))
        if start is None:
            continue
        if start <= 0:
            base_in = base_in if base_in is not None else tier_in
            base_out = base_out if base_out is not None else tier_out
        else:  # from `start` tokens on: "above start - 1"
            tiers[int(start) - 1] = [tier_in, tier_out]
    if base_in is None and base_out is None:
        return None
    price_in, price_out = base_in or 0.0, base_out or 0.0
    ordered = tuple(
        sorted(
            (
                (above, price_in if t_in is None else t_in, price_out if t_out is None else t_out)
                for above, (t_in, t_out) in tiers.items()
            ),
            reverse=True,
        )
    )
    return ModelPrice(input=price_in, output=price_out, tiers=ordered)


def litellm_price_file() -> Path | None:
    """Where litellm's price map is, found without importing litellm; None if absent."""
    spec = importlib.util.find_spec("litellm")
    for folder in (spec.submodule_search_locations or ()) if spec else ():
        path = Path(folder) / PRICE_FILE
        if path.is_file():
            return path
    return None


class PriceMap:
    """Prices by model name, read once from a litellm-format price file."""

    def __init__(self, *, path: Path | None = None) -> None:
        """``path``: the price file (default: the one in the installed litellm)."""
        self._path = path
        self._prices: dict[str, ModelPrice] | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the file was read (a lookup no longer touches the disk)."""
        return self._prices is not None

    def load(self) -> int:
        """Read the file now (idempotent; thread-safe); returns how many models it prices."""
        with self._lock:
            if self._prices is None:
                self._prices = self._read()
            return len(self._prices)

    def _read(self) -> dict[str, ModelPrice]:
        path = self._path or litellm_price_file()
        if path is None:
            logger.warning("litellm's price map was not found; model costs are 0")
            return {}
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            logger.warning("cannot read the price map %s (%s); model costs are 0", path, e)
            return {}
        prices: dict[str, ModelPrice] = {}
        for name, entry in data.items() if isinstance(data, dict) else ():
            price = _price(entry)
            if price is not None:
                prices[name] = price
        return prices

    def price(self, model: str, *, override: ModelPrice | None = None) -> ModelPrice | None:
        """``override`` (the spec's price) if set, else the map's price of ``model`` (or of
        its name without a provider prefix); None when it is priced nowhere."""
        if override is not None:
            return override
        if self._prices is None:
            self.load()
        assert self._prices is not None
        found = self._prices.get(model)
        if found is None and "/" in model:
            found = self._prices.get(model.split("/", 1)[1])
        return found

    def charge(
        self,
        model: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        override: ModelPrice | None = None,
    ) -> float | None:
        """USD for one call's tokens; None when ``model`` is unpriced (no ``override``,
        not in the map)."""
        price = self.price(model, override=override)
        if price is None:
            return None
        return price.cost(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def cost(
        self,
        model: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        override: ModelPrice | None = None,
    ) -> float:
        """USD for one call's tokens; 0.0 for an unpriced model (see :meth:`charge`)."""
        usd = self.charge(
            model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            override=override,
        )
        return usd or 0.0


_DEFAULT = PriceMap()


def default_price_map() -> PriceMap:
    """The process's price map over litellm's file (read on first use)."""
    return _DEFAULT
