"""Async access to etcd through its v3 JSON gateway (etcd3gw underneath).

etcd3gw is synchronous, so every call runs on a small thread pool owned by the
client and the event loop never blocks. Errors of etcd3gw and requests are
translated here, and only here, into :mod:`specmesh.errors`.

Range reads and transactions go through etcd3gw's ``post`` so that the response
header (the store revision) is kept: a consistent "read everything, then watch from
the next revision" needs it. Watches are streamed by :mod:`specmesh.watch`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_exc

from specmesh.addresses import parse_endpoint
from specmesh.errors import StoreError, StoreUnavailableError

__all__ = [
    "KV",
    "Compare",
    "EtcdClient",
    "Op",
    "RangeResult",
    "TxnResult",
    "prefix_end",
]

T = TypeVar("T")


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


class EtcdClient:
    """An asyncio client for one etcd endpoint. Close it with :meth:`close`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 2379,
        timeout: float = 5.0,
        max_workers: int = 8,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._client = etcd3gw.client(host=host, port=port, timeout=timeout, api_path="/v3/")
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="etcd")

    @classmethod
    def from_endpoint(cls, endpoint: str, **kwargs: Any) -> EtcdClient:
        """``http://host:port`` -> client."""
        host, port = parse_endpoint(endpoint, setting="SPECMESH_ETCD_ENDPOINT", default_port=2379)
        return cls(host=host, port=port, **kwargs)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def raw(self) -> Any:
        """The underlying etcd3gw client (for :mod:`specmesh.watch`)."""
        return self._client

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._client.session.close)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(self._translate, fn, *args, **kwargs)
        return await loop.run_in_executor(self._pool, call)

    def _translate(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as e:
            raise StoreUnavailableError(endpoint=self.endpoint, reason=_short(e)) from e
        except requests.RequestException as e:
            raise StoreUnavailableError(endpoint=self.endpoint, reason=_short(e)) from e
        except etcd_exc.Etcd3Exception as e:
            raise StoreError(f"etcd at {self.endpoint} refused the request: {_short(e)}") from e

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._client.post(self._client.get_url(path), json=payload)
        return result

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
        result = await self._run(self._post, "/kv/range", payload)
        kvs = [KV.from_json(item) for item in result.get("kvs", [])]
        return RangeResult(kvs=kvs, revision=int(result["header"]["revision"]))

    async def get(self, key: str) -> KV | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def revision(self) -> int:
        """The store's current revision."""
        result = await self._run(self._post, "/kv/range", {"key": _b64("\0"), "limit": "1"})
        return int(result["header"]["revision"])

    # -------------------------------------------------------------- writes

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        op = Op.put(key, value, lease=lease).to_json()["request_put"]
        result = await self._run(self._post, "/kv/put", op)
        return int(result["header"]["revision"])

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        op = Op.delete(key, prefix=prefix).to_json()["request_delete_range"]
        result = await self._run(self._post, "/kv/deleterange", op)
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
        result = await self._run(self._post, "/kv/txn", payload)
        return TxnResult(
            succeeded=bool(result.get("succeeded", False)),
            revision=int(result["header"]["revision"]),
            responses=list(result.get("responses", [])),
        )

    async def compact(self, revision: int) -> None:
        await self._run(self._post, "/kv/compaction", {"revision": str(revision), "physical": True})

    # -------------------------------------------------------------- leases

    async def lease_grant(self, ttl: int) -> int:
        result = await self._run(self._post, "/lease/grant", {"TTL": str(ttl)})
        return int(result["ID"])

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease; return its remaining TTL (0 when it has expired)."""
        result = await self._run(self._post, "/lease/keepalive", {"ID": str(lease_id)})
        return int(result.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease_id: int) -> None:
        await self._run(self._post, "/kv/lease/revoke", {"ID": str(lease_id)})


def _short(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
