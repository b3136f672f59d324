"""The sidecar's current snapshot, shared by its parts (sync, egress, router, inbound)."""

from __future__ import annotations

import asyncio

from specmesh.snapshot import ResolvedSnapshot

__all__ = ["SnapshotHolder"]


class SnapshotHolder:
    """Holds the last valid snapshot; waiters wake on every change."""

    def __init__(self) -> None:
        self._current: ResolvedSnapshot | None = None
        self._etcd_revision = 0
        self._changed = asyncio.Condition()
        self._version = 0

    @property
    def current(self) -> ResolvedSnapshot | None:
        return self._current

    @property
    def etcd_revision(self) -> int:
        return self._etcd_revision

    @property
    def version(self) -> int:
        """Increments on every change (for waiters that must not miss one)."""
        return self._version

    async def set(self, snapshot: ResolvedSnapshot, *, etcd_revision: int) -> None:
        async with self._changed:
            self._current = snapshot
            self._etcd_revision = etcd_revision
            self._version += 1
            self._changed.notify_all()

    async def wait_newer(self, version: int) -> int:
        """Wait until :attr:`version` is greater than ``version``; return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._version > version)
            return self._version
