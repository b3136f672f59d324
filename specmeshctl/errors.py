"""Errors of the ``specmesh`` command, each with the exit code a script can rely on::

    SpecmeshError (specmesh.errors: a spec file is invalid -> 1, a file is missing -> 4)
    +-- CliError                         exit_code
        +-- UsageError                   2  the command cannot run as asked
        +-- NoControlPlaneError          5  none configured, and the local fleet is not running
        +-- FleetNotRunningError         5  `status`, `logs`, `kb` without the local fleet
        +-- ControlPlaneError            the control plane answered a gRPC error (``code``,
        |                                ``message``, ``reason``): its code decides the exit
        +-- InvokeTimeoutError           5  an agent did not answer within --timeout
        +-- AgentCallError               6  an A2A call failed
            +-- AgentCallRefusedError    7  the agent's entry refused the caller

Errors of grpc never leave :mod:`specmeshctl.client`: it raises :class:`ControlPlaneError`
``from`` them.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from specmesh.errors import NotFoundError, SpecError, SpecmeshError

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CONFLICT",
    "EXIT_INVALID",
    "EXIT_NOT_ALLOWED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_OTHER",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "START_HINT",
    "AgentCallError",
    "AgentCallRefusedError",
    "CliError",
    "ControlPlaneError",
    "FleetNotRunningError",
    "InvokeTimeoutError",
    "NoControlPlaneError",
    "UsageError",
    "exit_code",
]

(
    EXIT_OK,
    EXIT_INVALID,
    EXIT_USAGE,
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_OTHER,
    EXIT_NOT_ALLOWED,
) = range(8)
EXIT_BROKEN_PIPE = 141
"""The reader of standard output went away (``specmesh ... | head``), as a shell's SIGPIPE."""

START_HINT = "start it with `./scripts/up` (or `uv run specmesh up`)"


class CliError(SpecmeshError):
    """A command failed; ``exit_code`` is what the process exits with."""

    exit_code = EXIT_OTHER


class UsageError(CliError):
    """The command cannot run as asked (exit 2)."""

    exit_code = EXIT_USAGE


class NoControlPlaneError(CliError):
    """No control plane is configured and the local fleet does not run one (exit 5)."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, command: str) -> None:
        super().__init__(
            f"`specmesh {command}` talks to the control plane, and none is configured: "
            f"the local fleet is not running ({START_HINT}), or set SPECMESH_SERVER "
            "(its gRPC host:port) with SPECMESH_TOKEN or SPECMESH_TOKEN_FILE, or pass "
            "--server/--token"
        )


class FleetNotRunningError(CliError):
    """The local fleet of ``specmesh up`` is not running (exit 5)."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, home: Path) -> None:
        self.home = home
        super().__init__(f"the local fleet ({home}) is not running: {START_HINT}")


_EXITS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_INVALID,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_INVALID,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_INVALID,
    grpc.StatusCode.ABORTED: EXIT_CONFLICT,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_CONFLICT,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_NOT_ALLOWED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_NOT_ALLOWED,
}


class ControlPlaneError(CliError):
    """The control plane answered an error: its gRPC ``code``, ``message`` (for an invalid
    spec, every issue on a line of its own) and ``reason`` (the ``specmesh-error-reason``
    trailer: ``invalid_spec``, ``conflict``...; empty when the server sent none)."""

    def __init__(
        self, *, server: str, code: grpc.StatusCode, message: str, reason: str = ""
    ) -> None:
        self.server = server
        self.code = code
        self.message = message
        self.reason = reason
        self.exit_code = _EXITS.get(code, EXIT_OTHER)
        what = f"{code.name}" + (f", {reason}" if reason else "")
        head, _, rest = message.partition("\n")
        text = f"control plane at {server}: {head} ({what})"
        if code == grpc.StatusCode.UNAVAILABLE:
            text = f"control plane at {server} is unavailable: {head}"
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            text += "; set SPECMESH_TOKEN (or SPECMESH_TOKEN_FILE, or --token)"
        if rest:
            text += "\n" + "\n".join(f"  {line}" for line in rest.splitlines())
        super().__init__(text)


class InvokeTimeoutError(CliError):
    """The agent did not finish answering within ``--timeout`` (exit 5)."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, *, agent: str, url: str, seconds: float) -> None:
        self.agent = agent
        super().__init__(
            f"{agent} ({url}) did not finish answering within {seconds:g}s "
            "(raise --timeout, or see `uv run specmesh logs " + agent + "`)"
        )


class AgentCallError(CliError):
    """The A2A call failed: the agent answered with an A2A error, or could not be reached
    (exit 6)."""

    def __init__(self, *, agent: str, url: str, reason: str) -> None:
        self.agent = agent
        super().__init__(f"calling {agent} ({url}) failed: {reason}")


class AgentCallRefusedError(AgentCallError):
    """The agent's entry refused the call: no or a bad token (401), or a principal its
    ``callers`` do not admit (403) (exit 7)."""

    exit_code = EXIT_NOT_ALLOWED

    def __init__(self, *, agent: str, url: str, reason: str) -> None:
        super().__init__(
            agent=agent,
            url=url,
            reason=f"{reason} (the agent's entry refused it: its spec's "
            "base.callers.principals must admit specmesh/<the name of your API token>)",
        )


def exit_code(error: SpecmeshError) -> int:
    """The exit code of any specmesh error a command raised."""
    if isinstance(error, CliError):
        return error.exit_code
    if isinstance(error, SpecError):
        return EXIT_INVALID
    if isinstance(error, NotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_OTHER
