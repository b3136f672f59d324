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

It is also the project's one ``host:port`` parser (:func:`parse_host_port`,
:func:`parse_listen`, :func:`parse_endpoint`): an IPv6 host goes in brackets
(``[::1]:7100``), a port is 1-65535 (a listener may ask for 0: any free port), an empty host
is the default host (``:7100``), and a bad address raises :class:`AddressError` naming the
setting it came from and the rule::

    SPECMESH_INBOUND: port must be a number from 1 to 65535 (got '127.0.0.1:http')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = [
    "DEFAULT_PORTS",
    "AddressError",
    "RedisAddress",
    "format_host_port",
    "format_table",
    "local_url_host",
    "parse_endpoint",
    "parse_host_port",
    "parse_listen",
    "parse_redis_url",
    "parse_table",
    "resolve_host_port",
    "resolve_url",
]

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}

_TABLE_SETTING = "SPECMESH_SERVICE_ADDRESSES"


class AddressError(ValueError):
    """An address that is not ``host:port`` (or ``unix:path`` where one is allowed)."""

    def __init__(self, *, setting: str, address: str, rule: str) -> None:
        super().__init__(f"{setting}: {rule} (got {address!r})")
        self.setting = setting
        self.address = address
        self.rule = rule


def parse_host_port(
    address: str,
    *,
    setting: str,
    default_host: str | None = "127.0.0.1",
    default_port: int | None = None,
    listen: bool = False,
) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` -> ``(host, port)``.

    ``setting`` names where the address came from (for the error). An empty host is
    ``default_host`` (None: refused); a missing port is ``default_port`` (None: refused).
    ``listen``: port 0 (any free port) is allowed.
    """

    def bad(rule: str) -> AddressError:
        return AddressError(setting=setting, address=address, rule=rule)

    text = address.strip()
    if not text:
        raise bad("must be host:port")
    if "://" in text:
        raise bad("must be host:port, not a URL")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or ":" not in host:
            raise bad("an IPv6 host goes in brackets: [::1]:port")
        if rest and not rest.startswith(":"):
            raise bad("expected :port after the bracketed IPv6 host")
        port_text: str | None = rest[1:] if rest else None
    else:
        host, sep, after = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        elif ":" in host:
            raise bad("an IPv6 host goes in brackets: [::1]:port")
        else:
            port_text = after
    if any(c.isspace() or c in "/@[]" for c in host):
        raise bad("the host is not a host name or IP address")
    if not host:
        if default_host is None:
            raise bad("the host is missing")
        host = default_host
    lowest = 0 if listen else 1
    if port_text is None:
        if default_port is None:
            raise bad("the port is missing: must be host:port")
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise bad(f"port must be a number from {lowest} to 65535")
    return host, int(port_text)


def parse_listen(address: str, *, setting: str) -> tuple[Literal["tcp", "unix"], str, int]:
    """A listener: ``host:port`` -> ``("tcp", host, port)`` (port 0: any free one);
    ``unix:path`` / ``unix:///path`` -> ``("unix", path, 0)``."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise AddressError(setting=setting, address=address, rule="unix: needs a path")
        return "unix", path, 0
    try:
        host, port = parse_host_port(address, setting=setting, listen=True)
    except AddressError as e:
        raise AddressError(
            setting=setting, address=address, rule=f"{e.rule}; or unix:path"
        ) from None
    return "tcp", host, port


def parse_endpoint(
    endpoint: str, *, setting: str, default_port: int | None = None, listen: bool = False
) -> tuple[str, int]:
    """``http://host:port[/]`` (or a bare ``host:port``) -> ``(host, port)``; a URL without
    a port uses ``default_port``, else its scheme's. ``listen``: as :func:`parse_host_port`."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "", endpoint
    elif "/" in rest.rstrip("/"):
        raise AddressError(setting=setting, address=endpoint, rule="must be scheme://host:port")
    port = default_port if default_port is not None else DEFAULT_PORTS.get(scheme)
    try:
        return parse_host_port(rest.rstrip("/"), setting=setting, default_port=port, listen=listen)
    except AddressError as e:
        raise AddressError(setting=setting, address=endpoint, rule=e.rule) from None


@dataclass(frozen=True, kw_only=True)
class RedisAddress:
    """Where a ``redis://`` / ``rediss://`` URL points."""

    host: str
    port: int
    db: int
    tls: bool
    username: str | None
    password: str | None


def parse_redis_url(url: str, *, setting: str) -> RedisAddress:
    """``redis[s]://[user[:password]@]host[:port][/db]`` (port 6379 when not given)."""

    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    shown = url  # an error never shows a password the URL carries
    if at and ":" in userinfo:
        masked = f"{userinfo.partition(':')[0]}:***@{hostport}"
        shown = urlunsplit((parts.scheme, masked, parts.path, parts.query, parts.fragment))

    def bad(rule: str) -> AddressError:
        return AddressError(setting=setting, address=shown, rule=rule)

    if parts.scheme not in ("redis", "rediss"):
        raise bad("must be redis://host:port/db or rediss://...")
    if not parts.hostname:
        raise bad("the host is missing")
    try:
        port = parts.port
    except ValueError:
        raise bad("port must be a number from 1 to 65535") from None
    if port == 0:
        raise bad("port must be a number from 1 to 65535")
    db = unquote(parts.path).strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise bad("the path must be a database number")
    return RedisAddress(
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        db=int(db or 0),
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def format_host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (the text :func:`parse_host_port` reads)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_url_host(host: str) -> str:
    """The host part of a URL that reaches, from this machine, a listener bound to ``host``:
    a wildcard (``""``, ``0.0.0.0``, ``::``) is reached on loopback, an IPv6 host goes in
    brackets (``::1`` -> ``[::1]``)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def parse_table(text: str, *, setting: str = _TABLE_SETTING) -> dict[str, str]:
    """``a:1=b:2,c:3=d:4`` -> ``{"a:1": "b:2", "c:3": "d:4"}``; :class:`AddressError`
    names a bad entry."""
    table: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        key, sep, target = (p.strip() for p in entry.partition("="))
        if not sep or not key or not target:
            raise AddressError(
                setting=setting, address=entry, rule="expected HOST[:PORT]=HOST:PORT"
            )
        parse_host_port(key, setting=f"{setting} key", default_host=None, default_port=0)
        parse_host_port(target, setting=f"{setting} target", default_host=None)
        table[key] = target
    return table


def format_table(table: Mapping[str, str]) -> str:
    """The text :func:`parse_table` reads."""
    return ",".join(f"{k}={v}" for k, v in table.items())


def _split(address: str, default_port: int | None) -> tuple[str, int | None]:
    host, port = parse_host_port(
        address, setting=_TABLE_SETTING, default_host=None, default_port=default_port or 0
    )
    return host.lower(), port or default_port


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
    shown = format_host_port(host, new_port)
    netloc = f"{userinfo}@{shown}" if userinfo else shown
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
