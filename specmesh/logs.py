"""Structured logging, configured once by each entry point.

Each record is one JSON object per line (``time``, ``level``, ``logger``, ``message``,
plus any ``extra`` fields); ``%``-style arguments are rendered first. Known secret values
registered with :func:`register_secret` are replaced before a line is written, as a last
line of defence behind :func:`specmesh.secrets.redact`.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from specmesh.secrets import redact_text

__all__ = ["JsonFormatter", "configure_logging", "register_secret"]

_SECRETS: set[str] = set()
_LOCK = threading.Lock()
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def register_secret(value: str) -> None:
    """Mask ``value`` in every log line from now on."""
    if value:
        with _LOCK:
            _SECRETS.add(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith(("_", "litellm")):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        line = json.dumps(out, default=str, ensure_ascii=False)
        with _LOCK:
            secrets = list(_SECRETS)
        return redact_text(line, secrets) if secrets else line


def configure_logging(
    *, level: str | int = "INFO", json_format: bool = True, stream: TextIO | None = None
) -> None:
    """Set up the root logger once (idempotent: replaces earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
