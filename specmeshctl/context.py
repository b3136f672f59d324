"""What a command runs with: the settings, and the control-plane client opened on first
use and closed when the command ends."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from specmeshctl.client import ControlPlaneClient
from specmeshctl.errors import NoControlPlaneError, UsageError
from specmeshctl.settings import Settings

__all__ = ["Command", "Context"]


class Context:
    """The clients a command needs, opened lazily and closed at the end."""

    def __init__(self, *, settings: Settings, stack: AsyncExitStack, command: str) -> None:
        self.settings = settings
        self._stack = stack
        self._command = command
        self._cp: ControlPlaneClient | None = None

    @property
    def cp(self) -> ControlPlaneClient:
        """The control plane (NoControlPlaneError when none is configured or running)."""
        if self._cp is None:
            if not self.settings.server:
                raise NoControlPlaneError(self._command)
            self._cp = ControlPlaneClient(
                server=self.settings.server, token=self._token(), ca_file=self.settings.ca_file
            )
            self._stack.push_async_callback(self._cp.aclose)
        return self._cp

    def _token(self) -> str | None:
        if self.settings.token is not None:
            return self.settings.token.get_secret_value().strip() or None
        path = self.settings.token_file
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as e:
            raise UsageError(f"cannot read the token file {path}: {e.strerror}") from e


Command = Callable[[argparse.Namespace, Context], Awaitable[int]]
"""An async command: its parsed arguments and context in, the exit code out."""
