"""Service addresses resolved at run time (:mod:`specmesh.addresses`)."""

from __future__ import annotations

import pytest

from specmesh.addresses import (
    AddressError,
    RedisAddress,
    format_host_port,
    format_table,
    local_url_host,
    parse_endpoint,
    parse_host_port,
    parse_listen,
    parse_redis_url,
    parse_table,
    resolve_host_port,
    resolve_url,
)

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
    with pytest.raises(AddressError, match=r"^SPECMESH_SERVICE_ADDRESSES: expected HOST"):
        parse_table(bad)


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        ("a:1=b", "SPECMESH_SERVICE_ADDRESSES target: the port is missing"),
        ("a:1=b:99999", "SPECMESH_SERVICE_ADDRESSES target: port must be a number from 1"),
        ("::1:80=b:2", "SPECMESH_SERVICE_ADDRESSES key: an IPv6 host goes in brackets"),
    ],
)
def test_a_table_entry_with_a_bad_address_names_the_side(bad: str, rule: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_table(bad)
    assert str(caught.value).startswith(rule)


@pytest.mark.parametrize(
    ("address", "kwargs", "parsed"),
    [
        ("127.0.0.1:7100", {}, ("127.0.0.1", 7100)),
        ("example.com:1", {}, ("example.com", 1)),
        ("svc:65535", {}, ("svc", 65535)),
        (" svc:80 ", {}, ("svc", 80)),
        ("[::1]:7100", {}, ("::1", 7100)),
        ("[fe80::1%eth0]:443", {}, ("fe80::1%eth0", 443)),
        (":7100", {}, ("127.0.0.1", 7100)),
        (":7100", {"default_host": "0.0.0.0"}, ("0.0.0.0", 7100)),
        ("svc", {"default_port": 6379}, ("svc", 6379)),
        ("[::1]", {"default_port": 80}, ("::1", 80)),
        ("127.0.0.1:0", {"listen": True}, ("127.0.0.1", 0)),
    ],
)
def test_good_host_ports_parse(
    address: str, kwargs: dict[str, object], parsed: tuple[str, int]
) -> None:
    assert parse_host_port(address, setting="X", **kwargs) == parsed  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "kwargs", "rule"),
    [
        ("", {}, "must be host:port"),
        ("svc", {}, "the port is missing: must be host:port"),
        ("svc:", {}, "port must be a number from 1 to 65535"),
        ("svc:0", {}, "port must be a number from 1 to 65535"),
        ("svc:65536", {}, "port must be a number from 1 to 65535"),
        ("svc:-1", {}, "port must be a number from 1 to 65535"),
        ("svc:http", {}, "port must be a number from 1 to 65535"),
        ("svc:\uff18\uff10", {}, "port must be a number from 1 to 65535"),
        ("svc:99999", {"listen": True}, "port must be a number from 0 to 65535"),
        ("::1:80", {}, "an IPv6 host goes in brackets: [::1]:port"),
        ("::1", {}, "an IPv6 host goes in brackets: [::1]:port"),
        ("[::1", {}, "an IPv6 host goes in brackets: [::1]:port"),
        ("[]:80", {}, "an IPv6 host goes in brackets: [::1]:port"),
        ("[host]:80", {}, "an IPv6 host goes in brackets: [::1]:port"),
        ("[::1]80", {}, "expected :port after the bracketed IPv6 host"),
        ("a b:80", {}, "the host is not a host name or IP address"),
        ("user@svc:80", {}, "the host is not a host name or IP address"),
        ("http://svc:80", {}, "must be host:port, not a URL"),
        ("svc/x:80", {}, "the host is not a host name or IP address"),
        (":80", {"default_host": None}, "the host is missing"),
    ],
)
def test_bad_host_ports_name_the_setting_and_the_rule(
    address: str, kwargs: dict[str, object], rule: str
) -> None:
    with pytest.raises(AddressError) as caught:
        parse_host_port(address, setting="SPECMESH_INBOUND", **kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == f"SPECMESH_INBOUND: {rule} (got {address!r})"
    assert caught.value.setting == "SPECMESH_INBOUND"


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("http://127.0.0.1:2379", ("127.0.0.1", 2379)),
        ("http://etcd:2379/", ("etcd", 2379)),
        ("http://etcd", ("etcd", 2379)),
        ("https://[::1]:2379", ("::1", 2379)),
        ("etcd:2380", ("etcd", 2380)),
    ],
)
def test_endpoints_parse(endpoint: str, parsed: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint, setting="SPECMESH_ETCD_ENDPOINT", default_port=2379) == parsed


@pytest.mark.parametrize(
    ("endpoint", "rule"),
    [
        ("http://etcd:2379/v3", "must be scheme://host:port"),
        ("http://etcd:port", "port must be a number from 1 to 65535"),
        ("http://", "must be host:port"),
    ],
)
def test_bad_endpoints_name_the_setting(endpoint: str, rule: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_endpoint(endpoint, setting="SPECMESH_ETCD_ENDPOINT", default_port=2379)
    assert str(caught.value) == f"SPECMESH_ETCD_ENDPOINT: {rule} (got {endpoint!r})"


def test_a_listener_is_tcp_or_unix() -> None:
    assert parse_listen("[::]:0", setting="S") == ("tcp", "::", 0)
    assert parse_listen("unix:///run/a.sock", setting="S") == ("unix", "/run/a.sock", 0)
    with pytest.raises(AddressError, match=r"^S: the port is missing: must be host:port; or unix"):
        parse_listen("localhost", setting="S")


@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 80), ("::1", 7100), ("svc", 1)])
def test_a_formatted_host_port_parses_back(host: str, port: int) -> None:
    assert parse_host_port(format_host_port(host, port), setting="X") == (host, port)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "redis://fleet-redis:6380/2",
            RedisAddress(
                host="fleet-redis", port=6380, db=2, tls=False, username=None, password=None
            ),
        ),
        (
            "rediss://agent%40x@[::1]/",
            RedisAddress(host="::1", port=6379, db=0, tls=True, username="agent@x", password=None),
        ),
        (
            "redis://u:p@h",
            RedisAddress(host="h", port=6379, db=0, tls=False, username="u", password="p"),
        ),
    ],
)
def test_redis_urls_parse(url: str, parsed: RedisAddress) -> None:
    assert parse_redis_url(url, setting="memory.address") == parsed


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://h:6379/0", "must be redis://host:port/db or rediss://..."),
        ("redis:///0", "the host is missing"),
        ("redis://h:0/0", "port must be a number from 1 to 65535"),
        ("redis://h:70000/0", "port must be a number from 1 to 65535"),
        ("redis://h:6379/tasks", "the path must be a database number"),
    ],
)
def test_bad_redis_urls_name_the_setting(url: str, rule: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_redis_url(url, setting="memory.address")
    assert str(caught.value) == f"memory.address: {rule} (got {url!r})"


def test_a_bad_redis_url_never_shows_its_password() -> None:
    with pytest.raises(AddressError) as caught:
        parse_redis_url("redis://agent:s3cret@h:99999/0", setting="SPECMESH_TASK_STORE")
    assert "s3cret" not in str(caught.value)
    assert caught.value.address == "redis://agent:***@h:99999/0"


@pytest.mark.parametrize(
    ("bound", "url_host"),
    [
        ("", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("::", "[::1]"),
        ("::1", "[::1]"),
        ("10.1.2.3", "10.1.2.3"),
        ("localhost", "localhost"),
    ],
)
def test_local_url_host_reaches_a_wildcard_on_loopback_and_brackets_ipv6(
    bound: str, url_host: str
) -> None:
    assert local_url_host(bound) == url_host
