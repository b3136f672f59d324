"""``specmesh model-server``: run the scripted model server until SIGTERM or SIGINT.

Prints the base URL it listens on (``http://127.0.0.1:PORT/v1``) alone on one line of
standard output once it accepts connections, so a parent process can read it; logs go
to standard error. On SIGTERM/SIGINT it stops accepting, lets in-flight answers finish
and exits 0. Exit codes: 1 the script is invalid, 2 bad arguments, 6 cannot listen.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from specmesh.errors import SpecError, SpecmeshError

from .script import Script, load_script
from .server import ScriptedModelServer

__all__ = ["add_arguments", "main", "run", "serve"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_INVALID, EXIT_OTHER = 0, 1, 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port`` and ``--script`` to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    parser.add_argument("--script", default=None, help="YAML or JSON script file")


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    script: Script | None = None,
    on_ready: Callable[[ScriptedModelServer], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set or the process gets SIGTERM/SIGINT."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or no signals on this platform
        installed.append(sig)
    try:
        async with ScriptedModelServer(script=script, host=host, port=port) as server:
            if on_ready is not None:
                on_ready(server)
            await stop.wait()
            logger.info("stopping: draining in-flight answers")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _announce(server: ScriptedModelServer) -> None:
    sys.stdout.write(server.url + "\n")
    sys.stdout.flush()


def run(*, host: str = "127.0.0.1", port: int = 0, script_path: str | Path | None = None) -> int:
    """Load the script, serve until SIGTERM/SIGINT, return the exit code.

    Raises :class:`~localfleet.modelserver.errors.ScriptError` for an invalid script and
    :class:`~specmesh.errors.ServiceError` when the address cannot be bound.
    """
    script = load_script(script_path) if script_path is not None else None
    asyncio.run(serve(host=host, port=port, script=script, on_ready=_announce))
    return EXIT_OK


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Entry point: ``argv`` as for ``python -m localfleet.modelserver``, or the namespace
    parsed by the ``specmesh`` CLI (``host``, ``port``, ``script``)."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        parser = argparse.ArgumentParser(
            prog="specmesh model-server", description=__doc__.split("\n")[0]
        )
        add_arguments(parser)
        args = parser.parse_args(argv)
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=logging.INFO,
                format="%(levelname)s %(name)s: %(message)s",
                stream=sys.stderr,
            )
    try:
        return run(host=args.host, port=args.port, script_path=args.script)
    except SpecError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_INVALID
    except SpecmeshError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_OTHER
    except KeyboardInterrupt:
        return EXIT_OK
