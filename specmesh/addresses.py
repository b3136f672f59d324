"""Service addresses resolved at run time, not written into specs.

A spec names the services it uses by a stable address -- ``redis://fleet-redis:6379/0``,
``http://nacos-mcp-tools/mcp`` -- the way a Kubernetes workload names a Service. Where
those names do not resolve by DNS (the local fleet, whose services listen on ports chosen
at each start), the process that connects is given a table of ``host:port`` ->
``host:port`` (``SPECMESH_SERVICE_ADDRESSES``:
``fleet-redis:6379=127.0.0.1:41234,nacos-mcp-tools:80=127.0.0.1:40001``) and rewrites the address
just before it connects. Nothing per-run is ever stored in etcd, so restarting the fleet
adds no revision to any agent.

A key without a port matches the scheme's default port (``http`` 80, ``https`` 443,
``redis`` 6379, ``rediss`` 6379).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

__all__ = ["DEFAULT_PORTS", "format_table", "parse_table", "resolve_host_port", "resolve_url"]

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}


def parse_table(text: str) -> dict[str, str]:
    """``a:1=b:2,c:3=d:4`` -> ``{"a:1": "b:2", "c:3": "d:4"}``; ValueError names a bad entry."""
    table: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        key, sep, target = entry.partition("=")
        if not sep or not key.strip() or not target.strip():
            raise ValueError(f"{entry!r}: expected HOST[:PORT]=HOST:PORT")
        table[key.strip()] = target.strip()
    return table


def format_table(table: Mapping[str, str]) -> str:
    """The text :func:`parse_table` reads."""
    return ",".join(f"{k}={v}" for k, v in table.items())


def _split(address: str, default_port: int | None) -> tuple[str, int | None]:
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and host:
        return host.strip("[]").lower(), int(port)
    return address.strip("[]").lower(), default_port


def resolve_host_port(
    host: str, port: int, table: Mapping[str, str], *, default_port: int | None = None
) -> tuple[str, int]:
    """``(host, port)`` after the table; unchanged when no entry matches."""
    for key, target in table.items():
        k_host, k_port = _split(key, default_port)
        if k_host == host.lower() and (k_port or default_port) == port:
            t_host, t_port = _split(target, port)
            return t_host, t_port or port
    return host, port


def resolve_url(url: str, table: Mapping[str, str]) -> str:
    """``url`` with its host and port replaced by the table's entry for them, if any."""
    if not table:
        return url
    parts = urlsplit(url)
    if not parts.hostname:
        return url
    default = DEFAULT_PORTS.get(parts.scheme)
    port = parts.port or default
    if port is None:
        return url
    host, new_port = resolve_host_port(parts.hostname, port, table, default_port=default)
    if (host, new_port) == (parts.hostname.lower(), port):
        return url
    userinfo = parts.netloc.rpartition("@")[0]
    shown = f"[{host}]" if ":" in host else host
    netloc = f"{userinfo}@{shown}:{new_port}" if userinfo else f"{shown}:{new_port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
