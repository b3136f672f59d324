"""The conversation pin table: expiry from the first turn (an injected clock), the LRU
bound, removal, and the owner told of every pin that leaves."""

from __future__ import annotations

import pytest

from specmesh.pins import PinTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _table(
    clock: Clock, *, max_age: float = 60, max_entries: int = 100
) -> tuple[PinTable[str, str], list[tuple[str, str]]]:
    dropped: list[tuple[str, str]] = []
    table: PinTable[str, str] = PinTable(
        max_age=max_age,
        max_entries=max_entries,
        clock=clock,
        on_drop=lambda k, v: dropped.append((k, v)),
    )
    return table, dropped


def test_a_pin_holds_until_its_maximum_age_from_the_first_turn() -> None:
    clock = Clock()
    table, dropped = _table(clock)
    table.pin("c1", "ctx-1")
    clock.now += 59
    assert table.get("c1") == "ctx-1"  # a later turn does not extend the age

    clock.now += 1
    assert table.get("c1") is None
    assert dropped == [("c1", "ctx-1")]
    assert len(table) == 0


def test_expire_sweeps_without_a_lookup_oldest_first() -> None:
    clock = Clock()
    table, dropped = _table(clock)
    table.pin("old", "a")
    clock.now += 30
    table.pin("young", "b")
    clock.now += 30

    assert table.expire() == 1
    assert dropped == [("old", "a")]
    assert "young" in table and "old" not in table


def test_the_least_recently_used_pin_leaves_when_full() -> None:
    clock = Clock()
    table, dropped = _table(clock, max_entries=2)
    table.pin("c1", "a")
    table.pin("c2", "a")
    assert table.get("c1") == "a"  # c1 used: c2 is now the least recently used
    table.pin("c3", "b")

    assert dropped == [("c2", "a")]
    assert sorted(k for k in ("c1", "c2", "c3") if k in table) == ["c1", "c3"]


def test_a_removed_or_repinned_conversation_tells_the_owner_once() -> None:
    clock = Clock()
    table, dropped = _table(clock)
    table.pin("c1", "a")
    table.pin("c1", "b")  # pinned anew: the old pin leaves
    assert table.remove("c1") == "b"
    assert table.remove("c1") is None
    assert dropped == [("c1", "a"), ("c1", "b")]


def test_remove_value_drops_every_pin_to_it() -> None:
    old, new = object(), object()
    dropped: list[str] = []
    pins: PinTable[str, object] = PinTable(
        max_age=60, max_entries=10, clock=Clock(), on_drop=lambda k, _v: dropped.append(k)
    )
    for key in ("a", "b"):
        pins.pin(key, old)
    pins.pin("c", new)

    assert pins.remove_value(old) == 2
    assert [k for k in ("a", "b", "c") if k in pins] == ["c"]
    assert dropped == ["a", "b"]


def test_max_age_zero_disables_pinning() -> None:
    table, dropped = _table(Clock(), max_age=0)
    table.pin("c1", "a")
    assert not table.enabled
    assert table.get("c1") is None and len(table) == 0 and dropped == []


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"max_age": -1, "max_entries": 1}, "max_age"),
        ({"max_age": 1, "max_entries": 0}, "max_entries"),
    ],
)
def test_bad_bounds_are_refused_naming_them(kwargs: dict[str, float], said: str) -> None:
    with pytest.raises(ValueError, match=said):
        PinTable(**kwargs)  # type: ignore[arg-type]
