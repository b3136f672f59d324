"""Structured logging."""

from __future__ import annotations

import io
import json
import logging

from specmesh.logs import configure_logging, register_secret


def test_json_lines_with_extra_fields_and_registered_secrets_masked() -> None:
    stream = io.StringIO()
    configure_logging(level="INFO", stream=stream)
    register_secret("sk-canary-4242")
    log = logging.getLogger("specmesh.test")

    log.info("calling %s with %s", "model", "sk-canary-4242", extra={"agent": "a"})

    record = json.loads(stream.getvalue())
    assert record["message"] == "calling model with <redacted>"
    assert (record["level"], record["logger"], record["agent"]) == ("info", "specmesh.test", "a")
    assert "sk-canary-4242" not in stream.getvalue()
    logging.getLogger().handlers.clear()
