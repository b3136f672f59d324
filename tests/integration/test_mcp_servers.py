"""The fleet's MCP servers as real processes on loopback, called with the official client.

``examples.mcp_servers.nacos_tools`` (the project's own server) and ``specmesh.mcpbridge``
in front of the real third-party ``mcp-server-time`` (stdio only) and of the stdio
``notes`` server of :mod:`tests.integration.mcp_fixture_servers` (a prompt, resources).
Each process is started with ``--port 0`` and found through its ``mcp server serving`` log
line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mcp_types
import pytest
from mcp import Client, MCPError, StdioServerParameters

from tests.conftest import REPO
from tests.integration.mcp_fixture_servers import NOTES_NAME, NOTES_VERSION
from tests.polling import eventually

WAIT = 30.0

_MCP_SERVER_TIME = shutil.which("mcp-server-time", path=str(Path(sys.executable).parent))
_NOTES = (sys.executable, "-m", "tests.integration.mcp_fixture_servers", "notes")

# A stdio server whose tool list grows on request, announcing it on subscriptions/listen.
_GROWING_SERVER = '''
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("growing")

@server.tool()
async def grow(ctx: Context) -> str:
    """Adds the tool 'fresh' and announces the change."""
    server.add_tool(lambda: "fresh!", name="fresh", description="A new tool.")
    await ctx.notify_tools_changed()
    return "grown"

server.run()
'''


class _Process:
    """A server process whose stderr JSON log records are collected by a thread."""

    def __init__(self, args: list[str]) -> None:
        self.popen = subprocess.Popen(
            args, cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.records: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    self._queue.put(record)
        self._queue.put(None)

    def wait_for(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first log record (seen so far or to come) that ``match`` accepts."""
        for record in self.records:
            if match(record):
                return record
        deadline = time.monotonic() + WAIT
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no matching log record in time"
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            assert item is not None, f"the process exited with {self.popen.wait()}"
            self.records.append(item)
            if match(item):
                return item

    def url(self) -> str:
        return str(self.wait_for(lambda r: r.get("message") == "mcp server serving")["url"])

    def terminate(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=WAIT)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(timeout=WAIT)


@contextlib.contextmanager
def _running(args: list[str]) -> Iterator[_Process]:
    process = _Process([sys.executable, *args])
    try:
        yield process
    finally:
        process.close()


def _nacos() -> contextlib.AbstractContextManager[_Process]:
    return _running(["-m", "examples.mcp_servers.nacos_tools", "--port", "0"])


def _bridge(*command: str) -> contextlib.AbstractContextManager[_Process]:
    return _running(["-m", "specmesh.mcpbridge", "--port", "0", "--", *command])


def _children(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``, from /proc."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _text(result: mcp_types.CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, mcp_types.TextContent))


@pytest.fixture(scope="module")
def nacos_url() -> Iterator[str]:
    with _nacos() as process:
        yield process.url()


@pytest.fixture(scope="module")
def time_bridge() -> Iterator[_Process]:
    assert _MCP_SERVER_TIME is not None, "mcp-server-time is not installed in the venv"
    with _bridge(_MCP_SERVER_TIME) as process:
        process.url()
        yield process


# ---------------------------------------------------------------- nacos-mcp-tools


async def test_nacos_tools_lists_its_four_tools_and_answers_a_call(nacos_url: str) -> None:
    async with Client(nacos_url) as client:
        listed = await client.list_tools()
        result = await client.call_tool("get_service", {"service_name": "order-service"})

    tools = {t.name: t for t in listed.tools}
    assert set(tools) == {"list_services", "get_service", "get_config", "list_configs"}
    assert tools["get_service"].input_schema["required"] == ["service_name"]
    assert tools["get_config"].input_schema["properties"]["group"]["default"] == "DEFAULT_GROUP"
    assert not result.is_error
    assert result.structured_content is not None
    assert result.structured_content["name"] == "order-service"
    assert [i["ip"] for i in result.structured_content["instances"]] == [
        "10.0.1.11",
        "10.0.1.12",
        "10.0.1.13",
    ]


async def test_nacos_tools_get_config_returns_the_namespace_content(nacos_url: str) -> None:
    async with Client(nacos_url) as client:
        result = await client.call_tool(
            "get_config", {"data_id": "order-service.yaml", "namespace": "prod"}
        )

    assert not result.is_error
    assert result.structured_content is not None
    assert result.structured_content["dataId"] == "order-service.yaml"
    assert "timeout-ms: 2000" in result.structured_content["content"]


async def test_nacos_tools_unknown_service_is_a_tool_error(nacos_url: str) -> None:
    async with Client(nacos_url) as client:
        bad = await client.call_tool("get_service", {"service_name": "no-such-service"})
        after = await client.call_tool("list_services", {})

    assert bad.is_error
    assert "'no-such-service' not found" in _text(bad)
    assert "order-service" in _text(bad)  # names what exists
    assert not after.is_error  # the server carries on


async def test_nacos_tools_exits_cleanly_on_sigterm() -> None:
    with _nacos() as process:
        async with Client(process.url()) as client:
            await client.list_tools()

        assert process.terminate() == 0


# ---------------------------------------------------------------- the bridge


async def test_bridge_serves_mcp_server_time(time_bridge: _Process) -> None:
    async with Client(time_bridge.url()) as client:
        listed = await client.list_tools()
        result = await client.call_tool("get_current_time", {"timezone": "UTC"})

    assert {"get_current_time", "convert_time"} <= {t.name for t in listed.tools}
    assert not result.is_error
    assert result.structured_content is not None
    assert result.structured_content["timezone"] == "UTC"


async def test_bridge_forwards_a_tool_error(time_bridge: _Process) -> None:
    async with Client(time_bridge.url()) as client:
        result = await client.call_tool("get_current_time", {"timezone": "Nowhere/Atlantis"})

    assert result.is_error
    assert "Nowhere/Atlantis" in _text(result)


async def test_bridge_restarts_a_killed_child(time_bridge: _Process) -> None:
    bridge_pid = time_bridge.popen.pid
    async with Client(time_bridge.url()) as client:
        (child,) = await eventually(
            lambda: _children(bridge_pid), timeout=WAIT, what="the bridge's child"
        )
        before = await client.call_tool("get_current_time", {"timezone": "UTC"})

        os.kill(child, signal.SIGKILL)
        (restarted,) = await eventually(
            lambda: _children(bridge_pid) - {child}, timeout=WAIT, what="a restarted child"
        )
        after = await client.call_tool("get_current_time", {"timezone": "UTC"})

    assert not before.is_error
    assert restarted != child
    assert not after.is_error
    assert after.structured_content is not None
    assert after.structured_content["timezone"] == "UTC"
    second = await asyncio.to_thread(
        time_bridge.wait_for,
        lambda r: r.get("message") == "MCP server connected" and r.get("connects") == 2,
    )
    assert second["tools"] == 2


async def test_bridge_forwards_tools_list_changed() -> None:
    with _bridge(sys.executable, "-c", _GROWING_SERVER) as bridge:
        async with Client(await asyncio.to_thread(bridge.url)) as client:
            before = {t.name for t in (await client.list_tools()).tools}
            async with client.listen(tools_list_changed=True) as sub:
                await client.call_tool("grow", {})
                async with asyncio.timeout(WAIT):
                    event = await anext(aiter(sub))
            after = {t.name for t in (await client.list_tools()).tools}

    assert before == {"grow"}
    assert type(event).__name__ == "ToolsListChanged"
    assert after == {"grow", "fresh"}


async def test_bridge_exits_cleanly_on_sigterm_with_a_listener_open() -> None:
    assert _MCP_SERVER_TIME is not None
    with _bridge(_MCP_SERVER_TIME) as bridge:
        url = await asyncio.to_thread(bridge.url)
        child = await eventually(
            lambda: _children(bridge.popen.pid), timeout=WAIT, what="the bridge's child"
        )
        async with Client(url) as client, client.listen(tools_list_changed=True) as sub:
            code = await asyncio.to_thread(bridge.terminate)
            async with asyncio.timeout(WAIT):
                async for _event in sub:  # the bridge ends the stream gracefully
                    pass

    assert code == 0
    assert not any(_alive(pid) for pid in child)


async def test_bridge_presents_mcp_server_time_as_it_presents_itself(
    time_bridge: _Process,
) -> None:
    assert _MCP_SERVER_TIME is not None
    async with Client(StdioServerParameters(command=_MCP_SERVER_TIME)) as direct:
        own, own_caps = direct.server_info, direct.server_capabilities
    async with Client(time_bridge.url()) as client:
        info, caps = client.server_info, client.server_capabilities

    assert own is not None and own.version  # mcp-time, 2026.10.19
    assert info is not None
    assert (info.name, info.version) == (own.name, own.version)
    assert (caps.prompts is None, caps.resources is None) == (
        own_caps.prompts is None,
        own_caps.resources is None,
    )


async def test_bridge_keeps_the_servers_own_server_info_and_capabilities() -> None:
    with _bridge(*_NOTES) as bridge:
        async with Client(await asyncio.to_thread(bridge.url)) as client:
            info, caps = client.server_info, client.server_capabilities
            instructions = client.instructions

    assert info is not None
    assert (info.name, info.version) == (NOTES_NAME, NOTES_VERSION)
    assert instructions == "Notes for tests."
    assert caps.tools is not None
    assert caps.prompts is not None
    assert caps.resources is not None


async def test_bridge_forwards_prompts_and_resources() -> None:
    with _bridge(*_NOTES) as bridge:
        async with Client(await asyncio.to_thread(bridge.url)) as client:
            prompts = await client.list_prompts()
            prompt = await client.get_prompt("summarize", {"topic": "deploys"})
            resources = await client.list_resources()
            templates = await client.list_resource_templates()
            everything = await client.read_resource("notes://all")
            one = await client.read_resource("notes://by-id/7")
            with pytest.raises(MCPError) as unknown:
                await client.read_resource("notes://nowhere")

    assert [(p.name, [a.name for a in p.arguments or []]) for p in prompts.prompts] == [
        ("summarize", ["topic"])
    ]
    (message,) = prompt.messages
    assert isinstance(message.content, mcp_types.TextContent)
    assert message.content.text == "Summarize the notes about deploys."
    assert [(r.name, str(r.uri)) for r in resources.resources] == [("all-notes", "notes://all")]
    assert [t.uri_template for t in templates.resource_templates] == ["notes://by-id/{note_id}"]
    (content,) = everything.contents
    assert isinstance(content, mcp_types.TextResourceContents)
    assert content.text == "first note\nsecond note"
    assert [c.text for c in one.contents if isinstance(c, mcp_types.TextResourceContents)] == [
        "note 7"
    ]
    assert unknown.value.error.code == mcp_types.INVALID_PARAMS  # as the server answers it
    assert unknown.value.error.message == "Unknown resource: notes://nowhere"


async def test_bridge_name_option_replaces_only_the_name() -> None:
    with _running(
        ["-m", "specmesh.mcpbridge", "--port", "0", "--name", "notes", "--", *_NOTES]
    ) as bridge:
        async with Client(await asyncio.to_thread(bridge.url)) as client:
            info = client.server_info

    assert info is not None
    assert (info.name, info.version) == ("notes", NOTES_VERSION)
