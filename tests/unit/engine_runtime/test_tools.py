"""Tool names and the MCP allow-list."""

from __future__ import annotations

import re

from engine.tools import MAX_TOOL_NAME, ToolDefinition, tool_name

_OPENAI_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def test_names_are_namespaced_by_server() -> None:
    assert tool_name("kb", "lookup") == "kb__lookup"
    assert tool_name("kb", "lookup") != tool_name("kb2", "lookup")


def test_names_are_sanitised_to_the_openai_charset() -> None:
    name = tool_name("nacos.tools", "get config/v2")

    assert name == "nacos_tools__get_config_v2"
    assert _OPENAI_NAME.match(name)


def test_long_names_are_cut_to_64_and_stay_distinct() -> None:
    a = tool_name("s" * 40, "t" * 40 + "a")
    b = tool_name("s" * 40, "t" * 40 + "b")

    assert len(a) == len(b) == MAX_TOOL_NAME
    assert a != b
    assert _OPENAI_NAME.match(a) and _OPENAI_NAME.match(b)


def test_definition_is_an_openai_function() -> None:
    d = ToolDefinition(name="kb__lookup", description="Look up", parameters={"type": "object"})

    assert d.openai() == {
        "type": "function",
        "function": {
            "name": "kb__lookup",
            "description": "Look up",
            "parameters": {"type": "object"},
        },
    }
