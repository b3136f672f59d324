"""Free TCP ports on loopback for listeners that bind them later (the supervisor's
instances, the local services, tests): picked below the kernel's ephemeral range so that no
outgoing connection takes one in between."""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path

__all__ = ["free_port", "listen_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now, for a listener that binds it soon: picked
    like :func:`listen_port` (below the ephemeral range, none this process handed out
    before), so that no outgoing connection takes it in between."""
    port = listen_port(host, avoid=_HANDED_OUT)
    _HANDED_OUT.add(port)
    return port


_HANDED_OUT: set[int] = set()
"""Ports :func:`free_port` handed out in this process (a listener may not have bound one
yet; none is handed out twice)."""


def _kernel_port(host: str) -> int:
    """A port the kernel picks (in the ephemeral range): the fallback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_LISTEN_LOW = 20000
"""Lowest port :func:`listen_port` picks."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listen_port(host: str = "127.0.0.1", *, avoid: Collection[int] = ()) -> int:
    """A TCP port free on ``host`` now, for a listener that binds it later and keeps it
    across restarts. It is picked below the kernel's ephemeral range, so that no outgoing
    connection can take it in between (a port the kernel picks with ``bind(0)`` can go to
    any connect() of the machine before the listener binds it), and outside ``avoid``
    (ports already handed out but maybe not bound yet)."""
    high = _ephemeral_low() - 1
    if high <= _LISTEN_LOW:
        return _kernel_port(host)
    for _ in range(256):
        port = random.randint(_LISTEN_LOW, high)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    return _kernel_port(host)
