"""What the sidecars saw of their engines' turns: per-revision windows for release analysis.

Every sidecar counts the calls it relays to its own engine
(:mod:`sidecar.engine_calls`: ``specmesh_sidecar_engine_requests_total`` by revision, kind
and outcome, and a duration histogram) on its ops listener's ``/metrics``; its Agent
Registry entry names that listener (``opsEndpoint``). The analysis loop reads them:

* :class:`SidecarScraper` reads ``/metrics`` of every registered instance of an agent
  (concurrently, :data:`SCRAPE_TIMEOUT` each; an instance that does not answer is left out
  of this look) and parses it with ``prometheus_client``'s text parser
  (:func:`parse_metrics`: turns only -- ``kind="message"`` --, a caller that left is not
  counted);
* :class:`Window` (pure, JSON in the analysis state in etcd) keeps, per instance, its counts
  at the step's start and its last scrape, and answers the counts since the step began
  (:meth:`Window.totals`) per revision: requests, errors and the latency histogram.

Counter resets and instances that come and go during a step:

* an instance **restarted** (its registry ``startedAt`` changed, or a counter is lower than
  at its previous scrape) counts from 0 again; what it counted before is carried over
  (``carried``) -- only what it counted between its last scrape and its restart is lost;
* an instance that **vanished** keeps its last scrape in the window, so its counts stay;
  what it counted after its last scrape is lost (at most one analysis interval's worth);
* an instance that **appeared** during the step counts from 0 when it started after the
  step began; one that was there but not readable at the step's start (its scrape failed)
  counts from its first scrape (earlier counts are unknown).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from control_plane.analysis import LatencyHistogram
from specmesh.store import SpecStore

__all__ = [
    "ERROR_OUTCOMES",
    "SCRAPE_TIMEOUT",
    "Counts",
    "InstanceScrape",
    "RequestSource",
    "SidecarScraper",
    "Window",
    "parse_metrics",
]

logger = logging.getLogger(__name__)

ERROR_OUTCOMES = frozenset({"http_5xx", "grpc_error", "a2a_error", "timeout", "unreachable"})
"""The sidecar's outcomes that are failed turns (``sidecar.engine_calls.ERROR_OUTCOMES``)."""
_NOT_COUNTED = frozenset({"cancelled"})
SCRAPE_TIMEOUT = 3.0
"""Seconds one instance's ``/metrics`` may take."""

_REQUESTS = "specmesh_sidecar_engine_requests"
_DURATION = "specmesh_sidecar_engine_request_duration_seconds"


@dataclass
class Counts:
    """One revision's turns as counted (cumulative since a process started, or a delta):
    requests, errors, and the latency histogram as ``upper bound -> cumulative count``."""

    requests: int = 0
    errors: int = 0
    buckets: dict[float, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "buckets": [[_bound_text(b), c] for b, c in sorted(self.buckets.items())],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Counts:
        return cls(
            requests=int(data.get("requests", 0)),
            errors=int(data.get("errors", 0)),
            buckets={float(b): int(c) for b, c in data.get("buckets", [])},
        )

    def below(self, other: Counts) -> bool:
        """Whether some counter is lower here than in ``other`` (a reset in between)."""
        return (
            self.requests < other.requests
            or self.errors < other.errors
            or any(self.buckets.get(b, 0) < c for b, c in other.buckets.items())
        )

    def minus(self, other: Counts | None) -> Counts:
        if other is None:
            return Counts(self.requests, self.errors, dict(self.buckets))
        return Counts(
            self.requests - other.requests,
            self.errors - other.errors,
            {b: c - other.buckets.get(b, 0) for b, c in self.buckets.items()},
        )

    def plus(self, other: Counts) -> Counts:
        bounds = set(self.buckets) | set(other.buckets)
        return Counts(
            self.requests + other.requests,
            self.errors + other.errors,
            {b: self.buckets.get(b, 0) + other.buckets.get(b, 0) for b in bounds},
        )

    def histogram(self) -> LatencyHistogram:
        return LatencyHistogram(tuple(sorted(self.buckets.items())))


def _bound_text(bound: float) -> str | float:
    return "+Inf" if math.isinf(bound) else bound


def parse_metrics(text: str) -> dict[int, Counts]:
    """Revision -> its turns' counts, from a sidecar's ``/metrics`` (Prometheus text)."""
    out: dict[int, Counts] = {}

    def of(labels: Mapping[str, str]) -> Counts | None:
        try:
            revision = int(labels.get("revision", ""))
        except ValueError:
            return None
        if revision <= 0 or labels.get("kind") != "message":
            return None
        return out.setdefault(revision, Counts())

    for family in text_string_to_metric_families(text):
        if family.name == _REQUESTS:
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue  # the _created timestamps
                counts = of(sample.labels)
                outcome = sample.labels.get("outcome", "")
                if counts is None or outcome in _NOT_COUNTED:
                    continue
                counts.requests += int(sample.value)
                if outcome in ERROR_OUTCOMES:
                    counts.errors += int(sample.value)
        elif family.name == _DURATION:
            for sample in family.samples:
                if not sample.name.endswith("_bucket"):
                    continue
                counts = of(sample.labels)
                if counts is None:
                    continue
                bound = float(sample.labels["le"])
                counts.buckets[bound] = counts.buckets.get(bound, 0) + int(sample.value)
    return out


@dataclass(frozen=True)
class InstanceScrape:
    """One instance's counts now, and when its sidecar started (its registry entry)."""

    started_at: str
    revisions: dict[int, Counts]


def _revisions_json(revisions: Mapping[int, Counts]) -> dict[str, Any]:
    return {str(r): c.to_json() for r, c in sorted(revisions.items())}


def _revisions_from(data: Mapping[str, Any] | None) -> dict[int, Counts]:
    return {int(r): Counts.from_json(c) for r, c in (data or {}).items()}


def _lower(now: Mapping[int, Counts], before: Mapping[int, Counts]) -> bool:
    return any(now.get(r, Counts()).below(c) for r, c in before.items())


def _minus(now: Mapping[int, Counts], base: Mapping[int, Counts] | None) -> dict[int, Counts]:
    return {r: c.minus((base or {}).get(r)) for r, c in now.items()}


def _plus(a: Mapping[int, Counts], b: Mapping[int, Counts]) -> dict[int, Counts]:
    out = dict(a)
    for r, c in b.items():
        out[r] = out[r].plus(c) if r in out else c
    return out


class Window:
    """The counts of every instance since a step began (see the module docstring); JSON in
    the analysis state (:meth:`to_json` / :meth:`from_json`)."""

    def __init__(self, instances: dict[str, dict[str, Any]] | None = None) -> None:
        self._instances: dict[str, dict[str, Any]] = instances or {}

    @classmethod
    def start(cls, scrapes: Mapping[str, InstanceScrape]) -> Window:
        """A window beginning now: each instance's counts now are its baseline."""
        return cls(
            {
                name: {
                    "startedAt": s.started_at,
                    "base": _revisions_json(s.revisions),
                    "last": _revisions_json(s.revisions),
                    "carried": {},
                }
                for name, s in scrapes.items()
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {"instances": self._instances}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Window:
        return cls(dict((data or {}).get("instances") or {}))

    def update(self, scrapes: Mapping[str, InstanceScrape], *, step_started: datetime) -> None:
        """Take the latest scrapes in (instances not in ``scrapes`` keep their last one)."""
        for name, scrape in scrapes.items():
            record = self._instances.get(name)
            if record is None:
                base = None if _after(scrape.started_at, step_started) else scrape.revisions
                self._instances[name] = {
                    "startedAt": scrape.started_at,
                    "base": None if base is None else _revisions_json(base),
                    "last": _revisions_json(scrape.revisions),
                    "carried": {},
                }
                continue
            last = _revisions_from(record["last"])
            if record["startedAt"] != scrape.started_at or _lower(scrape.revisions, last):
                # restarted: what it counted up to its last scrape is carried, then from 0
                counted = _minus(last, _revisions_from(record["base"]) if record["base"] else None)
                carried = _plus(_revisions_from(record["carried"]), counted)
                record.update(
                    startedAt=scrape.started_at, base=None, carried=_revisions_json(carried)
                )
            record["last"] = _revisions_json(scrape.revisions)

    def totals(self) -> dict[int, Counts]:
        """Revision -> the turns counted since the step began, over every instance."""
        out: dict[int, Counts] = {}
        for record in self._instances.values():
            base = _revisions_from(record["base"]) if record["base"] is not None else None
            counted = _minus(_revisions_from(record["last"]), base)
            out = _plus(out, _plus(counted, _revisions_from(record["carried"])))
        return out


def _after(started_at: str, moment: datetime) -> bool:
    try:
        return datetime.fromisoformat(started_at) >= moment
    except ValueError:
        return False


class RequestSource(Protocol):
    """Where the sidecars' counts come from (:class:`SidecarScraper`)."""

    async def scrape(self, agent: str) -> dict[str, InstanceScrape]: ...


class SidecarScraper:
    """Reads ``/metrics`` of every registered instance of an agent (``opsEndpoint``)."""

    def __init__(self, *, store: SpecStore, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.store = store
        self.timeout = timeout

    async def scrape(self, agent: str) -> dict[str, InstanceScrape]:
        """Instance id -> its counts now; instances without an ops endpoint, or whose
        ``/metrics`` failed, are left out."""
        entries = [e for e in await self.store.list_instances(agent) if e.get("opsEndpoint")]
        if not entries:
            return {}
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as http:
            texts = await asyncio.gather(
                *(self._read(http, str(e["opsEndpoint"])) for e in entries)
            )
        out: dict[str, InstanceScrape] = {}
        for entry, text in zip(entries, texts, strict=True):
            if text is None:
                continue
            try:
                revisions = parse_metrics(text)
            except ValueError as e:
                logger.warning("metrics of instance %s do not parse: %s", entry["instance"], e)
                continue
            out[str(entry["instance"])] = InstanceScrape(
                started_at=str(entry.get("startedAt", "")), revisions=revisions
            )
        return out

    async def _read(self, http: aiohttp.ClientSession, endpoint: str) -> str | None:
        url = endpoint.rstrip("/") + "/metrics"
        try:
            async with http.get(url) as r:
                if r.status != 200:
                    logger.warning("metrics at %s answered %d", url, r.status)
                    return None
                return await r.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            logger.warning("metrics at %s not readable: %s", url, e)
            return None
