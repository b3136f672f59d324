"""Service addresses resolved at run time (:mod:`specmesh.addresses`)."""

from __future__ import annotations

import pytest

from specmesh.addresses import format_table, parse_table, resolve_host_port, resolve_url

TABLE = {"fleet-redis:6379": "127.0.0.1:41234", "nacos-mcp-tools:80": "127.0.0.1:40001"}


@pytest.mark.parametrize(
    ("url", "resolved"),
    [
        ("http://nacos-mcp-tools/mcp", "http://127.0.0.1:40001/mcp"),
        ("http://nacos-mcp-tools:80/mcp?x=1", "http://127.0.0.1:40001/mcp?x=1"),
        ("http://NACOS-MCP-TOOLS/mcp", "http://127.0.0.1:40001/mcp"),
        ("redis://fleet-redis:6379/0", "redis://127.0.0.1:41234/0"),
        ("redis://fleet-redis/0", "redis://127.0.0.1:41234/0"),
        ("redis://user@fleet-redis/0", "redis://user@127.0.0.1:41234/0"),
        # not in the table: unchanged (another port, another host, https)
        ("http://nacos-mcp-tools:8080/mcp", "http://nacos-mcp-tools:8080/mcp"),
        ("https://nacos-mcp-tools/mcp", "https://nacos-mcp-tools/mcp"),
        ("http://other/mcp", "http://other/mcp"),
    ],
)
def test_a_url_is_rewritten_only_when_its_host_and_port_are_in_the_table(
    url: str, resolved: str
) -> None:
    assert resolve_url(url, TABLE) == resolved


def test_host_port_resolution_uses_the_default_port_for_a_key_without_one() -> None:
    table = {"fleet-redis": "127.0.0.1:5000"}
    assert resolve_host_port("fleet-redis", 6379, table, default_port=6379) == ("127.0.0.1", 5000)
    assert resolve_host_port("fleet-redis", 6380, table, default_port=6379) == ("fleet-redis", 6380)


def test_the_table_round_trips_through_its_text_form() -> None:
    assert parse_table(format_table(TABLE)) == TABLE
    assert parse_table("") == {}


@pytest.mark.parametrize("bad", ["no-equals", "=127.0.0.1:1", "a:1=", "a:1=b:2,oops"])
def test_a_bad_table_entry_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match="expected HOST"):
        parse_table(bad)
