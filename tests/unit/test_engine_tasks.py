"""The engine's task stores without Redis: listing (filters, order, paging), the bounded
in-process store, owners from the sidecar's headers, and the settings that choose a store."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import ListTasksRequest, Task, TaskState, TaskStatus
from a2a.utils.errors import InvalidParamsError
from a2a.utils.task import encode_page_token
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import ValidationError

from engine.callers import CallerUser, resolve_owner
from engine.main import ServeSettings
from engine.tasks import MemoryTaskStore, check_task_store, page_tasks
from sidecar.settings import SidecarSettings


def _task(
    task_id: str,
    *,
    seconds: int | None,
    context: str = "c1",
    state: TaskState.ValueType = TaskState.TASK_STATE_COMPLETED,
) -> Task:
    status = TaskStatus(state=state)
    if seconds is not None:
        status.timestamp.CopyFrom(Timestamp(seconds=seconds))
    return Task(id=task_id, context_id=context, status=status)


def _as(principal: str | None = None, caller: str | None = None) -> ServerCallContext:
    return ServerCallContext(user=CallerUser(caller=caller, principal=principal))


TASKS = [
    _task("a", seconds=100),
    _task("b", seconds=300, context="c2"),
    _task("c", seconds=200, state=TaskState.TASK_STATE_WORKING),
    _task("d", seconds=None),
    _task("e", seconds=300),
]


def test_tasks_are_listed_newest_first_ids_breaking_ties_untimed_last() -> None:
    page = page_tasks(TASKS, ListTasksRequest())
    assert [t.id for t in page.tasks] == ["e", "b", "c", "a", "d"]
    assert page.total_size == 5 and not page.next_page_token


def test_filters_select_by_context_state_and_status_time() -> None:
    by_context = page_tasks(TASKS, ListTasksRequest(context_id="c2"))
    by_state = page_tasks(TASKS, ListTasksRequest(status=TaskState.TASK_STATE_WORKING))
    after = ListTasksRequest()
    after.status_timestamp_after.CopyFrom(Timestamp(seconds=200))
    by_time = page_tasks(TASKS, after)
    assert [t.id for t in by_context.tasks] == ["b"]
    assert [t.id for t in by_state.tasks] == ["c"]
    assert [t.id for t in by_time.tasks] == ["e", "b", "c"]
    assert by_time.total_size == 3


def test_pages_follow_the_cursor_to_the_end() -> None:
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = page_tasks(TASKS, ListTasksRequest(page_size=2, page_token=token))
        seen += [t.id for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["e", "b", "c", "a", "d"]


def test_a_legacy_page_token_names_the_first_task_and_an_unknown_one_is_refused() -> None:
    page = page_tasks(TASKS, ListTasksRequest(page_size=2, page_token=encode_page_token("c")))
    assert [t.id for t in page.tasks] == ["c", "a"]
    with pytest.raises(InvalidParamsError):
        page_tasks(TASKS, ListTasksRequest(page_token=encode_page_token("nope")))


async def test_the_memory_store_is_owner_scoped() -> None:
    store = MemoryTaskStore()
    await store.save(_task("t1", seconds=1), _as(principal="specmesh/alice"))
    assert await store.get("t1", _as(principal="specmesh/alice")) is not None
    assert await store.get("t1", _as(principal="specmesh/bob")) is None
    assert await store.get("t1", _as(caller="specmesh-alice")) is None
    bob = await store.list(ListTasksRequest(), _as(principal="specmesh/bob"))
    assert list(bob.tasks) == []


async def test_the_memory_store_keeps_at_most_max_tasks_dropping_the_oldest_write() -> None:
    store = MemoryTaskStore(max_tasks=3)
    alice = _as(principal="specmesh/alice")
    for i in range(5):
        await store.save(_task(f"t{i}", seconds=i), alice)
    await store.save(_task("t2", seconds=9), alice)  # written again: now the newest
    await store.save(_task("t5", seconds=10), alice)
    assert len(store) == 3
    listed = await store.list(ListTasksRequest(), alice)
    assert sorted(t.id for t in listed.tasks) == ["t2", "t4", "t5"]


async def test_one_owner_cannot_push_another_owners_tasks_out_of_the_memory_store() -> None:
    store = MemoryTaskStore(max_tasks=10, max_tasks_per_owner=3)
    alice, mallory = _as(principal="specmesh/alice"), _as(principal="specmesh/mallory")
    await store.save(_task("a1", seconds=1), alice)
    await store.save(_task("a2", seconds=2), alice)
    for i in range(50):
        await store.save(_task(f"m{i}", seconds=10 + i), mallory)
    await store.save(_task("m47", seconds=99), mallory)  # written again: now its newest

    theirs = await store.list(ListTasksRequest(), mallory)
    mine = await store.list(ListTasksRequest(), alice)
    assert sorted(t.id for t in mine.tasks) == ["a1", "a2"]
    assert sorted(t.id for t in theirs.tasks) == ["m47", "m48", "m49"]
    assert len(store) == 5


async def test_the_memory_store_keeps_its_global_bound_over_many_owners() -> None:
    store = MemoryTaskStore(max_tasks=4, max_tasks_per_owner=3)
    for i in range(6):
        await store.save(_task(f"t{i}", seconds=i), _as(principal=f"specmesh/p{i}"))
    assert len(store) == 4
    assert await store.get("t1", _as(principal="specmesh/p1")) is None
    assert await store.get("t2", _as(principal="specmesh/p2")) is not None
    await store.delete("t5", _as(principal="specmesh/p5"))
    assert len(store) == 3


def test_the_memory_store_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tasks_per_owner"):
        MemoryTaskStore(max_tasks_per_owner=0)


async def test_the_memory_store_forgets_a_task_after_the_retention() -> None:
    store = MemoryTaskStore(retention_seconds=1e-9)
    alice = _as(principal="specmesh/alice")
    await store.save(_task("t", seconds=1), alice)
    assert await store.get("t", alice) is None
    assert len(store) == 0


def test_the_owner_comes_from_the_principal_then_the_caller() -> None:
    assert resolve_owner(_as(principal="specmesh/alice", caller="x")) == "principal:specmesh/alice"
    assert resolve_owner(_as(caller="front")) == "agent:front"
    assert resolve_owner(_as()) == "anonymous"
    assert resolve_owner(ServerCallContext()) == "anonymous"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("memory", None),
        ("redis://127.0.0.1:7106/0", None),
        ("redis://127.0.0.1:7106", None),
        ("redis://:pw@127.0.0.1:7106/0", "password"),
        ("postgres://db/tasks", "must be 'memory' or a redis://"),
        ("redis://127.0.0.1:7106/tasks", "database number"),
        ("redis:///0", "SPECMESH_TASK_STORE: the host is missing"),
        ("redis://127.0.0.1:99999/0", "SPECMESH_TASK_STORE: port must be a number"),
        ("Memory", "must be 'memory'"),
    ],
)
def test_the_task_store_setting_is_checked(value: str, problem: str | None) -> None:
    found = check_task_store(value)
    assert (found is None) if problem is None else (found is not None and problem in found)


def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("SPECMESH_", "VAULT_")) or name == "AGENT_NAME":
            monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_a_bad_engine_task_store_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean_env(monkeypatch, tmp_path, SPECMESH_TASK_STORE="mysql://x")
    with pytest.raises(ValidationError, match="SPECMESH_TASK_STORE"):
        ServeSettings()
    _clean_env(monkeypatch, tmp_path, SPECMESH_TASK_RETENTION_SECONDS="0")
    with pytest.raises(ValidationError, match="task_retention_seconds"):
        ServeSettings()
    _clean_env(
        monkeypatch,
        tmp_path,
        SPECMESH_TASK_STORE="redis://127.0.0.1:7106/0",
        SPECMESH_TASK_RETENTION_SECONDS="60",
    )
    settings = ServeSettings()
    assert (settings.task_store, settings.task_retention_seconds) == (
        "redis://127.0.0.1:7106/0",
        60,
    )


def test_the_sidecar_task_store_proxy_settings_are_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    agent = f"a{uuid.uuid4().hex[:6]}"
    refused: list[tuple[dict[str, str], str]] = [
        ({}, "SPECMESH_TASK_STORE_UPSTREAM is not"),
        (
            {"SPECMESH_TASK_STORE_UPSTREAM": "redis://:pw@redis:6379/1"},
            "must not carry a password",
        ),
        (
            {
                "SPECMESH_TASK_STORE_UPSTREAM": "redis://redis:6379/1",
                "SPECMESH_TASK_STORE_PASSWORD": "plain-password",
            },
            "SPECMESH_TASK_STORE_PASSWORD",
        ),
    ]
    for env, match in refused:
        _clean_env(
            monkeypatch,
            tmp_path,
            AGENT_NAME=agent,
            SPECMESH_TASK_STORE_PROXY="127.0.0.1:7106",
            **env,
        )
        with pytest.raises(ValidationError, match=match):
            SidecarSettings()
    _clean_env(
        monkeypatch,
        tmp_path,
        AGENT_NAME=agent,
        SPECMESH_TASK_STORE_PROXY="unix:/run/specmesh/tasks.sock",
        SPECMESH_TASK_STORE_UPSTREAM="redis://redis:6379/1",
        SPECMESH_TASK_STORE_PASSWORD="vault://secret/specmesh/infra/task-store#password",
    )
    settings = SidecarSettings()
    assert settings.task_store_proxy == "unix:/run/specmesh/tasks.sock"
