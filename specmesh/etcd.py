"""The asyncio etcd client: etcd's v3 JSON gateway (etcd >= 3.4, ``/v3/...``) over aiohttp.

One :class:`EtcdClient` holds one ``aiohttp.ClientSession`` (opened on first use, in the
running loop; close it with :meth:`EtcdClient.close`). No thread and no blocking call: a
request waits on the event loop, with a timeout. The wire format (base64 keys and values,
int64 as strings, newline-delimited watch messages) is encoded and decoded here only, and
every error of aiohttp or of the gateway is translated here only, into
:mod:`specmesh.errors`::

    connection refused / reset, request timeout, HTTP 408/503/504  -> StoreUnavailableError
    a watch got no message within its read deadline                -> WatchStalledError
    a watch's start revision was compacted                         -> CompactedError
    any other refusal (HTTP 4xx/5xx, canceled watch, bad JSON)     -> StoreError

Why not etcd3gw's own API (it speaks the same gateway), call by call:

- every call is synchronous (``requests``): under asyncio each one needs a thread, and
  the one ``requests.Session`` an etcd3gw client keeps would be shared by those threads;
- ``get`` / ``get_prefix`` drop the response header, i.e. the store revision the read was
  made at, which "read everything, then watch from the next revision" needs;
- ``put`` returns ``True``, not the revision it created; ``delete`` returns whether
  something was deleted, not how many;
- ``transaction`` takes and returns the gateway's raw JSON: the encoding stays ours, and
  it adds only the blocking POST;
- there is no compaction call;
- ``watch`` / ``watch_prefix`` have no read deadline, hand the callback events only (no
  header revision, no progress notification, no compaction), raise a failed create inside
  their own thread pool, and cancel by reaching into urllib3's private objects
  (``response.raw._fp``) to shut the socket;
- ``lease`` / ``Lease.refresh`` / ``Lease.revoke`` would do the job, but keeping etcd3gw
  for them alone means a second transport (threads, ``requests``, its own errors) beside
  this one.

The watch (:meth:`EtcdClient.watch`) asks for progress notifications (etcd sends one every
``--experimental-watch-progress-notify-interval`` to a watch that had no event, at most
about 2.2 intervals apart) and has a read deadline, ``watch_timeout``: a stream that stays
silent longer is half-open or its server frozen, and the watch raises
:class:`~specmesh.errors.WatchStalledError`. Resuming is :mod:`specmesh.watch`'s job.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from specmesh.addresses import parse_endpoint
from specmesh.errors import CompactedError, StoreError, StoreUnavailableError, WatchStalledError

__all__ = [
    "KV",
    "Compare",
    "EtcdClient",
    "Op",
    "RangeResult",
    "TxnResult",
    "WatchEvent",
    "WatchResponse",
    "prefix_end",
]

# what etcd3gw mapped to "unavailable" too: the gateway's own answers when etcd is not ready
_UNAVAILABLE_STATUS = frozenset({408, 503, 504})


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def prefix_end(prefix: str) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


@dataclass(frozen=True)
class KV:
    """One key-value pair with etcd's metadata."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> KV:
        return cls(
            key=_unb64(item["key"]).decode(),
            value=_unb64(item.get("value", "")),
            create_revision=int(item.get("create_revision", 0)),
            mod_revision=int(item.get("mod_revision", 0)),
            version=int(item.get("version", 0)),
            lease=int(item.get("lease", 0)),
        )


@dataclass(frozen=True)
class RangeResult:
    """Keys read at one store revision."""

    kvs: list[KV]
    revision: int


@dataclass(frozen=True)
class Compare:
    """A transaction guard: ``target`` of ``key`` compared with ``value``."""

    key: str
    target: Literal["VERSION", "CREATE", "MOD", "VALUE"]
    result: Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"]
    value: int | str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": _b64(self.key), "target": self.target, "result": self.result}
        name = {
            "VERSION": "version",
            "CREATE": "create_revision",
            "MOD": "mod_revision",
            "VALUE": "value",
        }[self.target]
        out[name] = _b64(str(self.value)) if self.target == "VALUE" else str(self.value)
        return out


@dataclass(frozen=True)
class Op:
    """A transaction operation: put, delete (key or prefix) or range."""

    kind: Literal["put", "delete", "range"]
    key: str
    value: bytes = b""
    prefix: bool = False
    lease: int = 0

    @classmethod
    def put(cls, key: str, value: bytes | str, *, lease: int = 0) -> Op:
        return cls("put", key, value.encode() if isinstance(value, str) else value, lease=lease)

    @classmethod
    def delete(cls, key: str, *, prefix: bool = False) -> Op:
        return cls("delete", key, prefix=prefix)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "put":
            body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
            if self.lease:
                body["lease"] = str(self.lease)
            return {"request_put": body}
        body = {"key": _b64(self.key)}
        if self.prefix:
            body["range_end"] = _b64(prefix_end(self.key))
        return {"request_delete_range" if self.kind == "delete" else "request_range": body}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class WatchEvent:
    """One change of one key."""

    type: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> WatchEvent:
        kv = raw["kv"]
        return cls(
            type="delete" if raw.get("type") == "DELETE" else "put",
            key=_unb64(kv["key"]).decode(),
            value=_unb64(kv.get("value", "")),
            mod_revision=int(kv.get("mod_revision", 0)),
        )


@dataclass(frozen=True)
class WatchResponse:
    """One message of a watch stream: the watch's creation, events, or a progress
    notification (no event: every change up to ``revision`` has been sent)."""

    revision: int
    """The header's store revision."""
    events: tuple[WatchEvent, ...] = ()
    created: bool = False

    @property
    def progress(self) -> bool:
        return not self.created and not self.events


class EtcdClient:
    """An asyncio client for one etcd endpoint. Close it with :meth:`close`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 2379,
        timeout: float = 5.0,
        watch_timeout: float = 15.0,
        max_connections: int = 64,
    ) -> None:
        """``timeout`` bounds one request; ``watch_timeout`` is a watch's read deadline (keep
        it above 2.2x etcd's progress-notify interval); every open watch holds one of the
        ``max_connections``."""
        self.host = host
        self.port = port
        self.timeout = timeout
        self.watch_timeout = watch_timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @classmethod
    def from_endpoint(cls, endpoint: str, **kwargs: Any) -> EtcdClient:
        """``http://host:port`` -> client."""
        host, port = parse_endpoint(endpoint, setting="SPECMESH_ETCD_ENDPOINT", default_port=2379)
        return cls(host=host, port=port, **kwargs)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"the etcd client of {self.endpoint} is closed")
        loop = asyncio.get_running_loop()
        if self._session is not None and self._session_loop is not loop:
            # a caller that runs one asyncio.run() after another (a script, a benchmark):
            # the old session belongs to a finished loop and cannot be used (or closed) here
            self._session = None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=self.endpoint,
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
            self._session_loop = loop
        return self._session

    def _unavailable(self, error: BaseException, *, what: str) -> StoreUnavailableError:
        if isinstance(error, TimeoutError) and not str(error):
            return StoreUnavailableError(
                endpoint=self.endpoint, reason=f"{what}: no answer within {self.timeout:g} s"
            )
        return StoreUnavailableError(endpoint=self.endpoint, reason=f"{what}: {_short(error)}")

    def _refused(self, status: int, body: bytes, *, what: str) -> StoreError:
        """The error for a gateway answer other than 200."""
        try:
            detail = json.loads(body)
            message = str(detail.get("message") or detail.get("error") or detail)
        except (ValueError, AttributeError):
            message = body.decode(errors="replace").strip() or "(empty body)"
        reason = f"{what} answered HTTP {status}: {_short(message)}"
        if status in _UNAVAILABLE_STATUS:
            return StoreUnavailableError(endpoint=self.endpoint, reason=reason)
        return StoreError(f"etcd at {self.endpoint} refused the request: {reason}")

    def _decode(self, body: bytes, *, what: str) -> dict[str, Any]:
        try:
            result = json.loads(body)
        except ValueError as e:
            raise StoreError(
                f"etcd at {self.endpoint} answered {what} with invalid JSON: {_short(e)}"
            ) from e
        if not isinstance(result, dict):
            raise StoreError(f"etcd at {self.endpoint} answered {what} with {type(result)}")
        return result

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One unary gateway call: POST ``/v3/<path>``."""
        what = f"/v3/{path}"
        try:
            async with self._http().post(what, json=payload) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._unavailable(e, what=what) from e
        if status != 200:
            raise self._refused(status, body, what=what)
        return self._decode(body, what=what)

    # -------------------------------------------------------------- reads

    async def range(
        self, key: str, *, prefix: bool = False, revision: int | None = None
    ) -> RangeResult:
        """Read one key, or every key under ``key`` when ``prefix``, sorted by key."""
        payload: dict[str, Any] = {"key": _b64(key), "sort_order": "ASCEND", "sort_target": "KEY"}
        if prefix:
            payload["range_end"] = _b64(prefix_end(key))
        if revision is not None:
            payload["revision"] = str(revision)
        result = await self._post("kv/range", payload)
        kvs = [KV.from_json(item) for item in result.get("kvs", [])]
        return RangeResult(kvs=kvs, revision=int(result["header"]["revision"]))

    async def get(self, key: str) -> KV | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def revision(self) -> int:
        """The store's current revision."""
        result = await self._post("kv/range", {"key": _b64("\0"), "limit": "1"})
        return int(result["header"]["revision"])

    # -------------------------------------------------------------- writes

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        """Write one key; return the revision it created."""
        op = Op.put(key, value, lease=lease).to_json()["request_put"]
        result = await self._post("kv/put", op)
        return int(result["header"]["revision"])

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete one key (or every key under ``key``); return how many were deleted."""
        op = Op.delete(key, prefix=prefix).to_json()["request_delete_range"]
        result = await self._post("kv/deleterange", op)
        return int(result.get("deleted", 0))

    async def txn(
        self, *, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """One atomic transaction: if every compare holds, ``success`` runs, else ``failure``."""
        payload = {
            "compare": [c.to_json() for c in compare],
            "success": [o.to_json() for o in success],
            "failure": [o.to_json() for o in failure],
        }
        result = await self._post("kv/txn", payload)
        return TxnResult(
            succeeded=bool(result.get("succeeded", False)),
            revision=int(result["header"]["revision"]),
            responses=list(result.get("responses", [])),
        )

    async def compact(self, revision: int) -> None:
        await self._post("kv/compaction", {"revision": str(revision), "physical": True})

    # -------------------------------------------------------------- leases

    async def lease_grant(self, ttl: int) -> int:
        result = await self._post("lease/grant", {"TTL": str(ttl)})
        return int(result["ID"])

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease; return its remaining TTL (0 when it has expired)."""
        # a streaming RPC: the gateway answers the one request we send with one message
        result = await self._post("lease/keepalive", {"ID": str(lease_id)})
        return int(result.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease_id: int) -> None:
        await self._post("kv/lease/revoke", {"ID": str(lease_id)})

    # -------------------------------------------------------------- watch

    async def watch(
        self,
        key: str,
        *,
        prefix: bool = False,
        start_revision: int | None = None,
        read_timeout: float | None = None,
    ) -> AsyncIterator[WatchResponse]:
        """Stream the changes of ``key`` (every key under it when ``prefix``) from
        ``start_revision`` (default: the next one), with progress notifications.

        Ends (returns) when etcd closes the stream. Raises
        :class:`~specmesh.errors.WatchStalledError` when no message arrives within
        ``read_timeout`` (default ``watch_timeout``), :class:`~specmesh.errors.CompactedError`
        when ``start_revision`` is compacted, and :class:`~specmesh.errors.StoreError` (or
        :class:`~specmesh.errors.StoreUnavailableError`) when the stream breaks. Closing the
        iterator (or cancelling its consumer) cancels the watch.
        """
        create: dict[str, Any] = {"key": _b64(key), "progress_notify": True}
        if prefix:
            create["range_end"] = _b64(prefix_end(key))
        if start_revision is not None:
            create["start_revision"] = str(start_revision)
        deadline = self.watch_timeout if read_timeout is None else read_timeout
        # no total: a watch lasts; connect is bounded like a request, every read by the deadline
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=deadline)
        what = f"the watch on {key}"
        try:
            async with self._http().post(
                "/v3/watch", json={"create_request": create}, timeout=timeout
            ) as response:
                if response.status != 200:
                    raise self._refused(response.status, await response.read(), what=what)
                pending = bytearray()
                async for chunk in response.content.iter_any():
                    pending += chunk
                    while (end := pending.find(b"\n")) >= 0:
                        line = bytes(pending[:end])
                        del pending[: end + 1]
                        if line.strip():
                            yield self._watch_message(line, key=key, start_revision=start_revision)
                if pending.strip():
                    yield self._watch_message(
                        bytes(pending), key=key, start_revision=start_revision
                    )
        except aiohttp.ConnectionTimeoutError as e:
            raise self._unavailable(e, what=what) from e
        except aiohttp.ServerTimeoutError as e:  # sock_read: nothing within the deadline
            raise WatchStalledError(endpoint=self.endpoint, key=key, timeout=deadline) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._unavailable(e, what=what) from e

    def _watch_message(self, line: bytes, *, key: str, start_revision: int | None) -> WatchResponse:
        what = f"the watch on {key}"
        message = self._decode(line, what=what)
        if "error" in message:  # the gateway's in-stream error: the stream is over
            error = message["error"]
            status = int(error.get("http_code", 0) or 0) if isinstance(error, dict) else 0
            raise self._refused(status, json.dumps(error).encode(), what=what)
        result = message.get("result", {})
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            raise CompactedError(requested=start_revision or 0, compact_revision=compact)
        if result.get("canceled"):
            reason = result.get("cancel_reason") or "no reason given"
            raise StoreError(f"etcd at {self.endpoint} canceled {what}: {reason}")
        return WatchResponse(
            revision=int(result.get("header", {}).get("revision", 0) or 0),
            events=tuple(WatchEvent.from_json(e) for e in result.get("events", [])),
            created=bool(result.get("created", False)),
        )


def _short(error: object) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
