"""Where the engine keeps its A2A tasks: in process, or in Redis shared by every replica.

::

    SPECMESH_TASK_STORE=memory          MemoryTaskStore (SDK TaskStore)
                                        one process; bounded: expires by retention, keeps
                                        at most ``max_tasks_per_owner`` per caller and
                                        ``max_tasks`` in all (oldest write dropped)

    SPECMESH_TASK_STORE=redis://h:p/db  RedisTaskStore (SDK VersionedTaskStore)
                                      + RedisTaskEventStream (SDK TaskEventStream)
                                        every replica answers GetTask, ListTasks,
                                        CancelTask and SubscribeToTask

Redis keys (``<rn>`` the agent's resource name, ``<owner>`` the percent-encoded
:func:`specmesh.callers.owner` key of the caller)::

    specmesh:a2a:<rn>:task:<owner>:<task id>   hash  task (Task bytes), version, terminal
    specmesh:a2a:<rn>:index:<owner>            zset  task id -> expiry (unix seconds)
    specmesh:a2a:<rn>:events:<task id>         stream of {version, event (StreamResponse)}

Every write refreshes the TTL of what it touches to the retention
(``SPECMESH_TASK_RETENTION_SECONDS``), so a task not written for that long is gone; the
index drops members whose expiry passed before it is read. A save is one Lua script:
the version compare-and-swap of the SDK's cluster mode (``ConcurrentTaskModificationError``
on a stale version; a cancel overwrites a running task), the hash, the index. Events go
to a Redis stream per task, capped at :data:`EVENTS_MAX_LEN` entries; a subscriber
reads it from the start and skips versions it already has (the SDK passes the version
of the snapshot it served), so nothing published between the snapshot and the first
read is lost.

Tasks are owner-scoped: a caller only gets, lists, cancels and subscribes to what it
created (another owner's task is the SDK's ``TaskNotFoundError``). Event streams are
keyed by task id alone -- the SDK's interface has no owner there -- which is safe
because the handler reads the task with the caller's owner first, and task ids are
server-made UUIDs (a message naming an unknown task id is refused).

When Redis (or the sidecar's proxy in front of it) fails, the store logs the detail --
address, error -- as a :class:`engine.errors.TaskStoreError` and raises the SDK's
``InternalError`` with the generic :data:`TASK_STORE_UNAVAILABLE` message, that error as
its cause: the client learns nothing of the infrastructure (the SDK would otherwise send
``str(e)``, the proxy's ``specmesh: task store <host:port> unreachable``). Every binding
maps it as an internal error (JSON-RPC -32603, HTTP 500); the engine's gRPC handler answers
``UNAVAILABLE`` for it, so gRPC clients may retry.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import redis.asyncio as aioredis
from a2a.server.cluster import (
    ConcurrentTaskModificationError,
    StoredTask,
    TaskEventStream,
    TaskVersion,
    VersionedEvent,
    VersionedTaskStore,
)
from a2a.server.context import ServerCallContext
from a2a.server.events import Event
from a2a.server.owner_resolver import OwnerResolver
from a2a.server.tasks import TaskStore
from a2a.types import a2a_pb2
from a2a.types.a2a_pb2 import ListTasksRequest, ListTasksResponse, StreamResponse, Task, TaskState
from a2a.utils.constants import DEFAULT_LIST_TASKS_PAGE_SIZE
from a2a.utils.errors import InternalError, InvalidParamsError
from a2a.utils.proto_utils import to_stream_response
from a2a.utils.task import (
    ListTasksCursor,
    decode_list_tasks_cursor,
    decode_page_token,
    encode_list_tasks_cursor,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from engine.callers import resolve_owner
from engine.errors import TaskStoreError
from specmesh.addresses import AddressError, parse_redis_url
from specmesh.names import resource_name

__all__ = [
    "DEFAULT_RETENTION_SECONDS",
    "EVENTS_MAX_LEN",
    "KEY_PREFIX",
    "MEMORY",
    "TASK_STORE_UNAVAILABLE",
    "MemoryTaskStore",
    "RedisTaskEventStream",
    "RedisTaskStore",
    "check_task_store",
    "page_tasks",
]

logger = logging.getLogger(__name__)

MEMORY = "memory"
"""``SPECMESH_TASK_STORE`` value of the in-process store."""
KEY_PREFIX = "specmesh:a2a"
"""Prefix of every task-store key in Redis."""
DEFAULT_RETENTION_SECONDS = 86400
TASK_STORE_UNAVAILABLE = "the task store is unavailable; try again"
"""What an A2A client hears when the task store fails (the detail stays in the log)."""
EVENTS_MAX_LEN = 1000
"""Events kept per task stream (approximately: Redis trims whole nodes)."""
DEFAULT_MAX_MEMORY_TASKS = 10000
"""Tasks the in-process store keeps at most, over all owners."""
DEFAULT_MAX_MEMORY_TASKS_PER_OWNER = 1000
"""Tasks the in-process store keeps at most for one owner (one caller cannot push every
other caller's tasks out of :data:`DEFAULT_MAX_MEMORY_TASKS`)."""
_DESTROYED_STREAM_SECONDS = 60
"""How long a finished task's event stream stays for subscribers still reading it."""
_BLOCK_MS = 1000

_TERMINAL = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_REJECTED,
    }
)


def check_task_store(value: str) -> str | None:
    """What is wrong with a ``SPECMESH_TASK_STORE`` value, or ``None``."""
    if value == MEMORY:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "unix"):
        return f"must be {MEMORY!r} or a redis://host:port/db URL (got {value!r})"
    if parts.scheme == "redis":
        try:
            parse_redis_url(value, setting="SPECMESH_TASK_STORE")
        except AddressError as e:
            return str(e)
    if parts.password:
        return "must not carry a password: the sidecar's task-store proxy adds it"
    return None


# ------------------------------------------------------------------ listing


def _sort_key(task: Task) -> tuple[bool, int, str]:
    """``ListTasks`` order, descending: (has timestamp, timestamp, id), as the SDK's."""
    has = task.HasField("status") and task.status.HasField("timestamp")
    return (has, task.status.timestamp.ToNanoseconds() if has else 0, task.id)


def page_tasks(tasks: Sequence[Task], params: ListTasksRequest) -> ListTasksResponse:
    """One page of ``tasks`` (one owner's) under the SDK's ``ListTasks`` filters
    (context id, state, status timestamp) and paging (its cursor tokens; the legacy
    token naming a task id is still accepted), as ``InMemoryTaskStore`` pages."""
    selected = list(tasks)
    if params.context_id:
        selected = [t for t in selected if t.context_id == params.context_id]
    if params.status:
        selected = [t for t in selected if t.status.state == params.status]
    if params.HasField("status_timestamp_after"):
        after_ns = params.status_timestamp_after.ToNanoseconds()
        selected = [
            t
            for t in selected
            if t.HasField("status")
            and t.status.HasField("timestamp")
            and t.status.timestamp.ToNanoseconds() >= after_ns
        ]
    selected.sort(key=_sort_key, reverse=True)
    total = len(selected)
    start = 0
    if params.page_token:
        cursor = decode_list_tasks_cursor(params.page_token)
        if cursor is None:
            task_id = decode_page_token(params.page_token)
            start = next((i for i, t in enumerate(selected) if t.id == task_id), -1)
            if start < 0:
                raise InvalidParamsError(f"Invalid page token: {params.page_token}")
        else:
            position = cursor.sort_key()
            start = next((i for i, t in enumerate(selected) if _sort_key(t) < position), total)
    page_size = params.page_size or DEFAULT_LIST_TASKS_PAGE_SIZE
    end = start + page_size
    next_token = None
    if end < total:
        has, ts, task_id = _sort_key(selected[end - 1])
        next_token = encode_list_tasks_cursor(
            ListTasksCursor(timestamp_ns=ts if has else None, task_id=task_id)
        )
    return ListTasksResponse(
        next_page_token=next_token,
        tasks=selected[start:end],
        total_size=total,
        page_size=page_size,
    )


def _copy(task: Task) -> Task:
    copy = Task()
    copy.CopyFrom(task)
    return copy


# ------------------------------------------------------------------ memory


class MemoryTaskStore(TaskStore):
    """Tasks in this process, owner-scoped, bounded: a task not written for
    ``retention_seconds`` is dropped; beyond ``max_tasks_per_owner`` tasks of one owner
    that owner's least recently written task is dropped, and beyond ``max_tasks`` in all
    the least recently written task of anyone. Stores and returns copies (as the SDK's
    stores do)."""

    def __init__(
        self,
        *,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        max_tasks: int = DEFAULT_MAX_MEMORY_TASKS,
        max_tasks_per_owner: int = DEFAULT_MAX_MEMORY_TASKS_PER_OWNER,
        owner_resolver: OwnerResolver = resolve_owner,
    ) -> None:
        if retention_seconds <= 0 or max_tasks <= 0 or max_tasks_per_owner <= 0:
            raise ValueError("retention_seconds, max_tasks and max_tasks_per_owner must be > 0")
        self._retention = retention_seconds
        self._max = max_tasks
        self._max_per_owner = max_tasks_per_owner
        self._owner = owner_resolver
        # (owner, task id) -> (task, expires at); ordered by last write
        self._tasks: OrderedDict[tuple[str, str], tuple[Task, float]] = OrderedDict()
        # owner -> its task ids, ordered by last write
        self._by_owner: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def _drop(self, key: tuple[str, str]) -> None:
        owner, task_id = key
        self._tasks.pop(key, None)
        mine = self._by_owner.get(owner)
        if mine is not None:
            mine.pop(task_id, None)
            if not mine:
                del self._by_owner[owner]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._tasks:
            key, (_, expires) = next(iter(self._tasks.items()))
            if expires > now and len(self._tasks) <= self._max:
                return
            self._drop(key)

    async def save(self, task: Task, context: ServerCallContext) -> None:
        owner = self._owner(context)
        key = (owner, task.id)
        self._drop(key)
        self._tasks[key] = (_copy(task), time.monotonic() + self._retention)
        mine = self._by_owner.setdefault(owner, OrderedDict())
        mine[task.id] = None
        while len(mine) > self._max_per_owner:
            self._drop((owner, next(iter(mine))))
        self._expire()

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        self._expire()
        found = self._tasks.get((self._owner(context), task_id))
        return _copy(found[0]) if found else None

    async def list(
        self, params: a2a_pb2.ListTasksRequest, context: ServerCallContext
    ) -> a2a_pb2.ListTasksResponse:
        self._expire()
        owner = self._owner(context)
        mine = [_copy(self._tasks[owner, i][0]) for i in self._by_owner.get(owner, ())]
        return page_tasks(mine, params)

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        self._drop((self._owner(context), task_id))


# ------------------------------------------------------------------ Redis

# KEYS: task hash, owner index. ARGV: task bytes, prev version (0 = first write),
# "1" if the write cancels, "1" if the task is terminal, ttl, index score, task id.
# Returns the new version, or -1 when the stored version says someone else wrote.
_SAVE = """
local cur = redis.call('HMGET', KEYS[1], 'version', 'terminal')
local version = tonumber(cur[1])
if ARGV[3] == '1' then
  if version == nil or cur[2] == '1' then return -1 end
elseif tonumber(ARGV[2]) == 0 then
  if version ~= nil then return -1 end
elseif version ~= tonumber(ARGV[2]) then
  return -1
end
local new = (version or 0) + 1
redis.call('HSET', KEYS[1], 'task', ARGV[1], 'version', new, 'terminal', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return new
"""


def _version(version: TaskVersion) -> int:
    value = version._value  # the SDK's own stores read it the same way
    if not isinstance(value, int):
        raise TypeError(f"RedisTaskStore needs integer task versions (got {value!r})")
    return value


def connect_redis(url: str, *, timeout: float = 5.0) -> aioredis.Redis:
    """A client of the task store at ``url`` (the sidecar's proxy: no password, no
    ``CLIENT SETINFO`` -- the proxy's first reply is its own)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout + _BLOCK_MS / 1000,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        driver_info=None,
        decode_responses=False,
    )


def _where(client: aioredis.Redis) -> str:
    """The store's address, for the log."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


@contextmanager
def _translated(operation: str, where: str) -> Iterator[None]:
    """Redis errors become a logged :class:`TaskStoreError`, the cause of the generic
    ``InternalError`` the client sees."""
    try:
        yield
    except (RedisError, OSError) as e:
        error = TaskStoreError(operation=operation, where=where, reason=f"{type(e).__name__}: {e}")
        error.__cause__ = e
        logger.warning("%s", error)
        raise InternalError(message=TASK_STORE_UNAVAILABLE) from error


class _Keys:
    def __init__(self, agent_name: str) -> None:
        self.base = f"{KEY_PREFIX}:{resource_name(agent_name)}"

    def task(self, owner: str, task_id: str) -> str:
        return f"{self.base}:task:{quote(owner, safe='')}:{task_id}"

    def index(self, owner: str) -> str:
        return f"{self.base}:index:{quote(owner, safe='')}"

    def events(self, task_id: str) -> str:
        return f"{self.base}:events:{task_id}"


class RedisTaskStore(VersionedTaskStore):
    """The SDK's versioned task store in Redis, shared by every replica of the agent."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        agent_name: str,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        owner_resolver: OwnerResolver = resolve_owner,
    ) -> None:
        if retention_seconds <= 0:
            raise ValueError("retention_seconds must be > 0")
        self._client = client
        self._keys = _Keys(agent_name)
        self._retention = int(retention_seconds)
        self._owner = owner_resolver
        self._save = client.register_script(_SAVE)
        self._where = _where(client)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def save(
        self,
        task: Task,
        *,
        event: Event | None,
        prev: Task | None,
        prev_version: TaskVersion,
        context: ServerCallContext,
    ) -> TaskVersion:
        del event, prev  # events travel on the event stream
        owner = self._owner(context)
        cancels = task.status.state == TaskState.TASK_STATE_CANCELED
        with _translated("save", self._where):
            new = await self._save(
                keys=[self._keys.task(owner, task.id), self._keys.index(owner)],
                args=[
                    task.SerializeToString(),
                    0 if cancels else _version(prev_version),
                    "1" if cancels else "0",
                    "1" if task.status.state in _TERMINAL else "0",
                    self._retention,
                    int(time.time()) + self._retention,
                    task.id,
                ],
            )
        if int(new) < 0:
            raise ConcurrentTaskModificationError(task.id)
        return TaskVersion(int(new))

    async def get(self, task_id: str, context: ServerCallContext) -> StoredTask | None:
        owner = self._owner(context)
        with _translated("get", self._where):
            reply: list[Any] = await self._client.hmget(
                self._keys.task(owner, task_id), ["task", "version"]
            )
        data, version = reply
        if data is None or version is None:
            return None
        return StoredTask(Task.FromString(data), TaskVersion(int(version)))

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        owner = self._owner(context)
        index = self._keys.index(owner)
        with _translated("list", self._where):
            await self._client.zremrangebyscore(index, "-inf", int(time.time()))
            members: list[Any] = await self._client.zrange(index, 0, -1)
            ids = [bytes(i).decode() for i in members]
            tasks: list[Task] = []
            if ids:
                async with self._client.pipeline(transaction=False) as pipe:
                    for task_id in ids:
                        pipe.hget(self._keys.task(owner, task_id), "task")
                    found = await pipe.execute()
                tasks = [Task.FromString(data) for data in found if data is not None]
        return page_tasks(tasks, params)

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        owner = self._owner(context)
        with _translated("delete", self._where):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._keys.task(owner, task_id))
                pipe.zrem(self._keys.index(owner), task_id)
                await pipe.execute()

    async def aclose(self) -> None:
        await self._client.aclose()


def _event_of(response: StreamResponse) -> Event:
    which = response.WhichOneof("payload")
    if which == "task":
        return response.task
    if which == "message":
        return response.message
    if which == "status_update":
        return response.status_update
    if which == "artifact_update":
        return response.artifact_update
    raise ValueError(f"task event without a known payload ({which!r})")


class RedisTaskEventStream(TaskEventStream):
    """Task events across replicas: one Redis stream per task, read from its start by
    every subscriber (blocking reads of :data:`_BLOCK_MS`, so a cancelled subscriber
    returns within that)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        agent_name: str,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        max_len: int = EVENTS_MAX_LEN,
    ) -> None:
        self._client = client
        self._keys = _Keys(agent_name)
        self._retention = int(retention_seconds)
        self._max_len = max_len
        self._where = _where(client)

    async def publish(self, task_id: str, event: VersionedEvent) -> None:
        key = self._keys.events(task_id)
        data = to_stream_response(event.event).SerializeToString()
        with _translated("publish", self._where):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    key,
                    {"version": _version(event.version), "event": data},
                    maxlen=self._max_len,
                    approximate=True,
                )
                pipe.expire(key, self._retention)
                await pipe.execute()

    async def subscribe(
        self, task_id: str, *, after: TaskVersion
    ) -> AsyncGenerator[VersionedEvent, None]:
        key = self._keys.events(task_id)
        cursor: Any = b"0-0"
        while True:
            with _translated("subscribe", self._where):
                reply: Any = await self._client.xread({key: cursor}, block=_BLOCK_MS, count=100)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    cursor = entry_id
                    version = TaskVersion(int(fields[b"version"]))
                    if not version.is_after(after):
                        continue
                    response = StreamResponse.FromString(fields[b"event"])
                    yield VersionedEvent(event=_event_of(response), version=version)

    async def destroy(self, task_id: str) -> None:
        """The task ended: its stream stays a short while for subscribers still reading."""
        with _translated("destroy", self._where):
            await self._client.expire(
                self._keys.events(task_id), min(self._retention, _DESTROYED_STREAM_SECONDS)
            )
