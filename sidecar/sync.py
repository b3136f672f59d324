"""Spec sync: etcd watches -> validated, resolved snapshots in the :class:`SnapshotHolder`.

:class:`SpecSync` runs one :class:`~specmesh.watch.PrefixWatcher` per prefix of
:func:`~specmesh.snapshot.watched_prefixes` (the agent's keys, the MCP Registry, and the
prompt its spec names: when ``promptKey`` changes the old prompt's watch stops and the new
one starts). It keeps the union of the watched keys and, after each batch of updates,
resolves them with :func:`~specmesh.snapshot.resolve_snapshot`:

* the agent does not exist (yet): nothing is served, readiness says so;
* the keys do not resolve (bad JSON, a spec or release that does not validate, a missing
  revision): logged, counted, and the last good snapshot stays -- an invalid snapshot is
  never pushed;
* otherwise the snapshot is pushed into the holder when it differs from the current one
  (canonical JSON), and written to ``<state dir>/snapshot.json`` (temp file + rename).

Nothing is resolved until every active watch delivered its first read, so a prompt switch
never shows the engine a snapshot without its prompt. When etcd cannot be reached at
start-up, the snapshot on disk is served (source ``disk_cache``) until etcd answers; the
watches resume from their last revision (``PrefixWatcher`` does it), so no change is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from sidecar.errors import InvalidSnapshotError, SnapshotCacheError
from sidecar.ops import SidecarMetrics
from sidecar.state import SnapshotHolder
from specmesh.backoff import BackoffPolicy, Reconnect
from specmesh.errors import NotFoundError, SpecError, StoreUnavailableError
from specmesh.etcd import EtcdClient
from specmesh.keys import Keys
from specmesh.names import resource_name
from specmesh.snapshot import ResolvedSnapshot, Track, resolve_snapshot, watched_prefixes
from specmesh.watch import PrefixWatcher, WatchUpdate

__all__ = ["SnapshotCache", "SpecSync", "SyncedSnapshot"]

logger = logging.getLogger(__name__)

Source = Literal["etcd", "disk_cache"]


@dataclass(frozen=True)
class SyncedSnapshot:
    """A valid snapshot with where and when it was produced."""

    snapshot: ResolvedSnapshot
    etcd_revision: int
    source: Source
    produced_at: datetime


def _canonical(snapshot: ResolvedSnapshot) -> str:
    return json.dumps(snapshot.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class SnapshotCache:
    """The last good snapshot on disk (JSON, written atomically: temp file + rename)."""

    def __init__(self, *, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[ResolvedSnapshot, int] | None:
        """``(snapshot, etcd revision)``, or ``None`` when there is no file."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SnapshotCacheError(path=self.path, reason=str(e)) from e
        try:
            data = json.loads(raw)
            snapshot = ResolvedSnapshot.model_validate(data["snapshot"])
            return snapshot, int(data["etcdRevision"])
        except (ValueError, KeyError, TypeError) as e:  # ValidationError is a ValueError
            raise SnapshotCacheError(path=self.path, reason=f"unreadable: {_reason(e)}") from e

    def save(self, snapshot: ResolvedSnapshot, etcd_revision: int) -> None:
        body = json.dumps(
            {"etcdRevision": etcd_revision, "snapshot": snapshot.model_dump(mode="json")},
            separators=(",", ":"),
        ).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".snapshot-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            raise SnapshotCacheError(path=self.path, reason=str(e)) from e


@dataclass
class _Watch:
    """One prefix watch and the keys it has delivered."""

    prefix: str
    watcher: PrefixWatcher
    kvs: dict[str, bytes] = field(default_factory=dict)
    revision: int = 0
    primed: bool = False
    task: asyncio.Task[None] | None = None


class _WatchCollector(Collector):
    """Reconnects, stalls and resets of the sync's etcd watches, read at scrape time."""

    def __init__(self, sync: SpecSync) -> None:
        self._sync = sync

    def collect(self) -> Iterator[Metric]:
        reconnects, resets, stalls = self._sync.watch_counters()
        c = CounterMetricFamily(
            "specmesh_sidecar_etcd_watch_reconnects",
            "Times an etcd watch stream broke and was resumed",
            value=reconnects,
        )
        yield c
        yield CounterMetricFamily(
            "specmesh_sidecar_etcd_watch_stalls",
            "Times an etcd watch heard nothing within its read deadline (half-open, etcd frozen)",
            value=stalls,
        )
        yield CounterMetricFamily(
            "specmesh_sidecar_etcd_watch_resets",
            "Full re-reads of a watched prefix (start, compaction)",
            value=resets,
        )
        yield GaugeMetricFamily(
            "specmesh_sidecar_etcd_watches", "Active etcd prefix watches", value=self._sync.watches
        )


class SpecSync:
    """Keeps ``holder`` on the newest valid snapshot of ``agent`` for ``track``."""

    def __init__(
        self,
        *,
        etcd: EtcdClient,
        keys: Keys,
        agent: str,
        track: Track,
        holder: SnapshotHolder,
        cache: SnapshotCache | None = None,
        metrics: SidecarMetrics | None = None,
        disk_fallback_after: float = 3.0,
        watch_retry_max: float = 2.0,
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.agent = agent
        self.track = track
        self.holder = holder
        self.cache = cache
        self.metrics = metrics
        self.disk_fallback_after = disk_fallback_after
        self.watch_retry_max = watch_retry_max
        self._current: SyncedSnapshot | None = None
        self._watches: dict[str, _Watch] = {}
        self._queue: asyncio.Queue[tuple[_Watch, WatchUpdate]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._resolved_once = asyncio.Event()
        self._closed_counts = (0, 0, 0)
        self.not_found = False
        """True while etcd answered and the agent does not exist."""
        self.last_error: InvalidSnapshotError | None = None
        """The newest refused resolution (``None`` once a resolution succeeds again)."""
        if metrics is not None:
            metrics.registry.register(_WatchCollector(self))
            metrics.snapshot_source.state("none")

    # ---------------------------------------------------------------- public

    @property
    def current(self) -> SyncedSnapshot | None:
        """The snapshot in the holder, with its source and etcd revision."""
        return self._current

    @property
    def watches(self) -> int:
        return len(self._watches)

    @property
    def watched(self) -> list[str]:
        """The prefixes watched now."""
        return sorted(self._watches)

    def watch_counters(self) -> tuple[int, int, int]:
        """``(reconnects, resets, stalls)`` of every watch this sync ran."""
        reconnects, resets, stalls = self._closed_counts
        for w in self._watches.values():
            reconnects += w.watcher.reconnects
            resets += w.watcher.resets
            stalls += w.watcher.stalls
        return reconnects, resets, stalls

    def status(self) -> str:
        """Why there is (or is not) a snapshot, for readiness and logs."""
        if self._current is not None:
            s = self._current
            text = (
                f"revision {s.snapshot.revision} at etcd revision {s.etcd_revision} from {s.source}"
            )
            if self.last_error is not None:
                text += f"; newer keys refused: {self.last_error.reason}"
            return text
        if self.not_found:
            return f"agent {self.agent!r} does not exist in etcd"
        if self.last_error is not None:
            return f"invalid spec: {self.last_error.reason}"
        return "waiting for etcd"

    async def start(self) -> None:
        """Start the watches (and the disk fallback); returns at once."""
        cached = self._load_cache()
        for prefix in watched_prefixes(self.keys, self.agent, None):
            self._start_watch(prefix)
        self._tasks.append(asyncio.create_task(self._run(), name="spec-sync"))
        if cached is not None:
            self._tasks.append(
                asyncio.create_task(self._disk_fallback(*cached), name="spec-sync-disk")
            )

    async def stop(self) -> None:
        for w in list(self._watches.values()):
            self._stop_watch(w)
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_resolved(self) -> None:
        """Wait for the first conclusive resolution against etcd (served, refused, or
        the agent does not exist)."""
        await self._resolved_once.wait()

    # ---------------------------------------------------------------- watches

    def _start_watch(self, prefix: str) -> None:
        watcher = PrefixWatcher(etcd=self.etcd, prefix=prefix, retry_max=self.watch_retry_max)
        w = _Watch(prefix=prefix, watcher=watcher)
        w.task = asyncio.create_task(self._pump(w), name=f"watch {prefix}")
        self._watches[prefix] = w
        logger.info("watching %s", prefix)

    def _stop_watch(self, w: _Watch) -> None:
        self._watches.pop(w.prefix, None)
        r, s, t = self._closed_counts
        self._closed_counts = (
            r + w.watcher.reconnects,
            s + w.watcher.resets,
            t + w.watcher.stalls,
        )
        w.watcher.close()
        if w.task is not None:
            w.task.cancel()
        logger.info("stopped watching %s", w.prefix)

    async def _pump(self, w: _Watch) -> None:
        reconnect = Reconnect(
            BackoffPolicy(initial=min(0.2, self.watch_retry_max), maximum=self.watch_retry_max)
        )
        while True:
            try:
                async for update in w.watcher.updates():
                    reconnect.reset()
                    await self._queue.put((w, update))
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = reconnect.next_delay()
                logger.exception("watch on %s failed; restarting it in %.1f s", w.prefix, delay)
                await reconnect.wait(delay)
                w.watcher = PrefixWatcher(
                    etcd=self.etcd,
                    prefix=w.prefix,
                    start_revision=(w.revision + 1) if w.revision else None,
                    retry_max=self.watch_retry_max,
                )

    def _apply(self, w: _Watch, update: WatchUpdate) -> None:
        if self._watches.get(w.prefix) is not w:
            return  # a stopped watch's late update
        if update.snapshot is not None:
            w.kvs = {key: kv.value for key, kv in update.snapshot.items()}
        for event in update.events:
            if event.type == "put":
                w.kvs[event.key] = event.value
            else:
                w.kvs.pop(event.key, None)
        w.revision = max(w.revision, update.revision)
        w.primed = True
        if self.metrics is not None:
            self.metrics.etcd_up.set(1)

    async def _run(self) -> None:
        while True:
            w, update = await self._queue.get()
            self._apply(w, update)
            while not self._queue.empty():
                self._apply(*self._queue.get_nowait())
            try:
                await self._resolve()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("spec sync of agent %s failed on an update", self.agent)

    # ---------------------------------------------------------------- resolution

    async def _resolve(self) -> None:
        if not all(w.primed for w in self._watches.values()):
            return  # a watch has not delivered its first read yet
        kvs: dict[str, bytes] = {}
        for w in self._watches.values():
            kvs.update(w.kvs)
        etcd_revision = max(w.revision for w in self._watches.values())
        try:
            snapshot = resolve_snapshot(kvs, keys=self.keys, agent=self.agent, track=self.track)
        except NotFoundError as e:
            if e.kind == "agent":
                self._on_not_found()
            else:
                self._on_invalid(etcd_revision, "not_found", str(e))
            return
        except SpecError as e:
            self._on_invalid(etcd_revision, "spec", str(e))
            return
        except ValidationError as e:
            self._on_invalid(etcd_revision, "validation", _reason(e))
            return
        except (ValueError, KeyError, TypeError) as e:  # bad JSON, missing/odd fields
            self._on_invalid(etcd_revision, "malformed", _reason(e))
            return
        self.not_found = False
        self.last_error = None
        wanted = set(watched_prefixes(self.keys, self.agent, snapshot.spec.base.prompt_key))
        if wanted != set(self._watches):
            for prefix in set(self._watches) - wanted:
                self._stop_watch(self._watches[prefix])
            for prefix in sorted(wanted - set(self._watches)):
                self._start_watch(prefix)
            return  # resolve again once the new watch delivered its first read
        await self._push(snapshot, etcd_revision, "etcd")
        self._resolved_once.set()

    def _on_not_found(self) -> None:
        self.not_found = True
        self._resolved_once.set()
        if self._current is None:
            logger.info("agent %s does not exist in etcd yet; waiting", self.agent)
        else:
            logger.warning(
                "agent %s no longer exists in etcd; keeping revision %d",
                self.agent,
                self._current.snapshot.revision,
            )

    def _on_invalid(self, etcd_revision: int, kind: str, reason: str) -> None:
        error = InvalidSnapshotError(agent=self.agent, etcd_revision=etcd_revision, reason=reason)
        self.last_error = error
        self._resolved_once.set()
        if self.metrics is not None:
            self.metrics.invalid_snapshots.labels(kind=kind).inc()
        kept = self._current.snapshot.revision if self._current else None
        logger.error(
            "refusing agent %s at etcd revision %d (%s); keeping the last good snapshot "
            "(revision %s): %s",
            self.agent,
            etcd_revision,
            kind,
            kept,
            reason,
            extra={"agent": self.agent, "etcd_revision": etcd_revision, "kind": kind},
        )

    async def _push(self, snapshot: ResolvedSnapshot, etcd_revision: int, source: Source) -> None:
        current = self._current
        if (
            current is not None
            and current.source == source
            and _canonical(current.snapshot) == _canonical(snapshot)
        ):
            return
        self._current = SyncedSnapshot(
            snapshot=snapshot,
            etcd_revision=etcd_revision,
            source=source,
            produced_at=datetime.now(UTC),
        )
        await self.holder.set(snapshot, etcd_revision=etcd_revision)
        logger.info(
            "serving agent %s revision %d (etcd revision %d, from %s)",
            self.agent,
            snapshot.revision,
            etcd_revision,
            source,
        )
        if self.metrics is not None:
            self.metrics.snapshot_updates.inc()
            self.metrics.snapshot_revision.set(snapshot.revision)
            self.metrics.snapshot_etcd_revision.set(etcd_revision)
            self.metrics.snapshot_source.state(source)
        if source == "etcd" and self.cache is not None:
            try:
                await asyncio.to_thread(self.cache.save, snapshot, etcd_revision)
            except SnapshotCacheError as e:
                logger.warning("could not keep the snapshot on disk: %s", e)
                if self.metrics is not None:
                    self.metrics.snapshot_cache_errors.inc()

    # ---------------------------------------------------------------- disk cache

    def _load_cache(self) -> tuple[ResolvedSnapshot, int] | None:
        if self.cache is None:
            return None
        try:
            cached = self.cache.load()
        except SnapshotCacheError as e:
            logger.warning("ignoring the snapshot on disk: %s", e)
            if self.metrics is not None:
                self.metrics.snapshot_cache_errors.inc()
            return None
        if cached is None:
            return None
        snapshot, _ = cached
        if (
            resource_name(snapshot.agent_name) != resource_name(self.agent)
            or snapshot.track != self.track
        ):
            logger.warning(
                "ignoring the snapshot on disk: it is agent %s track %s, not %s track %s",
                snapshot.agent_name,
                snapshot.track,
                self.agent,
                self.track,
            )
            return None
        return cached

    async def _disk_fallback(self, snapshot: ResolvedSnapshot, etcd_revision: int) -> None:
        """Serve the disk snapshot if etcd does not answer at start-up."""
        try:
            await self.etcd.revision()
        except StoreUnavailableError as e:
            logger.warning("etcd unreachable at start-up (%s); serving the snapshot on disk", e)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resolved_once.wait(), self.disk_fallback_after)
        # etcd silent, or its keys do not resolve: the disk snapshot is the last good one.
        # (When etcd says the agent does not exist, nothing is served.)
        if self._current is None and not self.not_found:
            await self._push(snapshot, etcd_revision, "disk_cache")


def _reason(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors()[:5]:
            loc = ".".join(str(p) for p in item.get("loc", ()))
            parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
        more = error.error_count() - len(parts)
        return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
    text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
