"""The image ships the CLI without the dev tooling (``localfleet``): the fleet commands then
say so instead of failing with an import trace."""

from __future__ import annotations

import sys

import pytest

from specmeshctl.errors import UsageError
from specmeshctl.fleet import _dev_tooling


def test_a_missing_localfleet_is_a_usage_error_naming_the_source_checkout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m == "localfleet" or m.startswith("localfleet.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "localfleet", None)  # as if the package were absent

    with pytest.raises(UsageError, match="source checkout"):
        _dev_tooling("fleet")


def test_the_tooling_loads_from_a_source_checkout() -> None:
    assert _dev_tooling("installer").LocalServices.__name__ == "LocalServices"
