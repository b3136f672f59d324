"""How command groups add their commands to the parser: one :class:`Registrar` per parser,
so every command that talks to the control plane takes ``--server``/``--token`` after its
name too (kubectl-style), and every ``-o`` flag looks the same."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Registrar", "control_plane_flags"]


def control_plane_flags(p: argparse.ArgumentParser, default: Any) -> None:
    """``--server`` and ``--token``: which control plane, as whom."""
    p.add_argument(
        "--server",
        default=default,
        help="the control plane's gRPC address, host:port or grpcs://host:port "
        "(default: SPECMESH_SERVER, else the running local fleet's)",
    )
    p.add_argument(
        "--token",
        default=default,
        help="bearer token (default: SPECMESH_TOKEN, SPECMESH_TOKEN_FILE, or the fleet's)",
    )


class Registrar:
    """Adds commands to one subparsers action."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    def local(self, name: str, helptext: str, run: Callable[..., Any] | None = None) -> Any:
        """A command that needs no control plane."""
        p = self._sub.add_parser(name, help=helptext)
        if run is not None:
            p.set_defaults(run=run)
        return p

    def api(self, name: str, helptext: str, run: Callable[..., Any] | None = None) -> Any:
        """A command that talks to the control plane."""
        p = self.local(name, helptext, run)
        control_plane_flags(p, argparse.SUPPRESS)
        return p

    def group(self, name: str, helptext: str, *, api: bool = True) -> Registrar:
        """A command with actions (``release set``...): a Registrar for the actions."""
        p = self.api(name, helptext) if api else self.local(name, helptext)
        return Registrar(p.add_subparsers(dest="action", required=True))

    def parser(self, name: str) -> Any:
        """The parser of a command added before."""
        return self._sub.choices[name]

    @staticmethod
    def output(p: argparse.ArgumentParser, default: str, choices: Sequence[str]) -> None:
        p.add_argument("-o", "--output", default=default, choices=list(choices))
