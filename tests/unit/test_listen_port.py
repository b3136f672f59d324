"""Ports for listeners that bind later: below the ephemeral range, never one handed out."""

from __future__ import annotations

import socket

import pytest

from specmesh.ports import _ephemeral_low, listen_port


def test_listen_ports_are_below_the_ephemeral_range_free_and_not_handed_out_twice() -> None:
    taken: set[int] = set()
    for _ in range(200):
        port = listen_port(avoid=taken)
        assert 20000 <= port < _ephemeral_low()
        assert port not in taken
        taken.add(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free when handed out


def test_a_port_in_use_or_handed_out_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = listen_port()
    handed = listen_port(avoid={busy})
    free = listen_port(avoid={busy, handed})
    draws = iter([busy, handed, free])
    monkeypatch.setattr("specmesh.ports.random.randint", lambda a, b: next(draws))
    with socket.socket() as held:
        held.bind(("127.0.0.1", busy))
        held.listen()
        assert listen_port(avoid={handed}) == free
