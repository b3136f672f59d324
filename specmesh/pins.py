"""Conversation pins: contextId -> what served its first turn, for a bounded time.

:class:`PinTable` is the one table both the engine (contextId -> the runtime context of
its first turn) and the entry sidecar (contextId -> the release track it was routed to)
keep. A pin lives from the first turn until the maximum age (measured from that turn,
not from the last one), until it is removed (a deleted conversation), or until the table
is full and it is the least recently used. Whoever owns the table learns of every pin
that leaves it through ``on_drop`` (the engine releases a context no pin holds any more).

Pure and clock-injected: :meth:`get` and :meth:`pin` expire what is due; :meth:`expire`
sweeps without a lookup (the engine calls it on a timer so that an idle conversation does
not hold an old context past its age).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["MAX_PINNED_ID", "PinTable"]

MAX_PINNED_ID = 256
"""Longest contextId pinned (characters): a longer one is served unpinned, so a caller
cannot fill a table with large keys."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Pin(Generic[V]):
    value: V
    since: float


class PinTable(Generic[K, V]):
    """At most ``max_entries`` pins, each at most ``max_age`` seconds old.

    ``max_age`` 0 disables pinning: :meth:`pin` keeps nothing and :meth:`get` finds nothing.
    """

    def __init__(
        self,
        *,
        max_age: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[K, V], None] | None = None,
    ) -> None:
        if max_age < 0:
            raise ValueError(f"max_age: must be >= 0 seconds (got {max_age!r})")
        if max_entries < 1:
            raise ValueError(f"max_entries: must be >= 1 (got {max_entries!r})")
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        self._on_drop = on_drop
        self._recent: OrderedDict[K, _Pin[V]] = OrderedDict()
        """Least recently used first (LRU eviction)."""
        self._by_age: dict[K, None] = {}
        """Oldest pin first (insertion order = pin order: the clock only moves forward)."""

    @property
    def enabled(self) -> bool:
        return self.max_age > 0

    def __len__(self) -> int:
        return len(self._recent)

    def __contains__(self, key: object) -> bool:
        return key in self._recent

    def values(self) -> Iterator[V]:
        """The pinned values (a value pinned by several keys comes once per key)."""
        return (p.value for p in self._recent.values())

    def get(self, key: K) -> V | None:
        """The value ``key`` is pinned to, or None (never pinned, expired, dropped)."""
        self.expire()
        pin = self._recent.get(key)
        if pin is None:
            return None
        self._recent.move_to_end(key)
        return pin.value

    def pin(self, key: K, value: V) -> None:
        """Pin ``key`` to ``value`` from now on (replacing a pin it had)."""
        if not self.enabled:
            return
        self.expire()
        self.remove(key)
        self._recent[key] = _Pin(value, self._clock())
        self._by_age[key] = None
        while len(self._recent) > self.max_entries:
            oldest = next(iter(self._recent))
            self.remove(oldest)

    def remove(self, key: K) -> V | None:
        """Drop ``key``'s pin; the value it had, or None."""
        pin = self._recent.pop(key, None)
        if pin is None:
            return None
        del self._by_age[key]
        if self._on_drop is not None:
            self._on_drop(key, pin.value)
        return pin.value

    def remove_value(self, value: V) -> int:
        """Drop every pin to ``value`` (compared by identity); how many."""
        keys = [k for k, p in self._recent.items() if p.value is value]
        for key in keys:
            self.remove(key)
        return len(keys)

    def expire(self) -> int:
        """Drop the pins older than ``max_age``; how many."""
        if not self._by_age:
            return 0
        cutoff = self._clock() - self.max_age
        due: list[K] = []
        for key in self._by_age:
            if self._recent[key].since > cutoff:
                break
            due.append(key)
        for key in due:
            self.remove(key)
        return len(due)

    def clear(self) -> None:
        """Drop every pin."""
        for key in list(self._recent):
            self.remove(key)
