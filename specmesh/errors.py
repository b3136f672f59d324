"""Errors of the shared core.

Every error specmesh raises derives from :class:`SpecmeshError` and carries fields,
not just a string, so callers (CLI, control plane, sidecar) can map it to an exit
code, an HTTP status or a gRPC status in one table::

    SpecmeshError
    +-- SpecError                  a spec or manifest is invalid (``issues``: list of SpecIssue)
    |   +-- ManifestParseError     a file is not valid JSON/YAML (``source``, ``line``, ``column``)
    |   +-- InvalidNameError       a logical name breaks the naming rules (also a ValueError)
    +-- NameCollisionError         two logical names map to the same resource name
    +-- StoreError                 etcd could not do what was asked
    |   +-- StoreUnavailableError  etcd cannot be reached (connection refused, timeout)
    |   |   +-- WatchStalledError  a watch got no message within its read deadline
    |   +-- ConflictError          the expected revision is stale (``expected``, ``actual``)
    |   +-- NotFoundError          no such agent / revision / prompt (``kind``, ``name``)
    |   +-- CompactedError         a watch asked for a revision etcd already compacted
    +-- SecretError                Vault could not do what was asked
    |   +-- SecretUnavailableError Vault cannot be reached
    |   +-- SecretAccessDeniedError the identity's policy does not allow the path
    |   +-- SecretNotFoundError    no such secret or field
    |   +-- SecretReferenceError   a ``vault://`` reference is malformed
    +-- ServiceError               a local service (etcd, OpenBao) failed to install or start

Errors of the libraries underneath (aiohttp for etcd, hvac and requests for Vault) are
translated into these at one boundary (``specmesh.etcd``, ``specmesh.vault``) with
``raise ... from e``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CompactedError",
    "ConflictError",
    "InvalidNameError",
    "ManifestParseError",
    "NameCollisionError",
    "NotFoundError",
    "SecretAccessDeniedError",
    "SecretError",
    "SecretNotFoundError",
    "SecretReferenceError",
    "SecretUnavailableError",
    "ServiceError",
    "SpecError",
    "SpecIssue",
    "SpecmeshError",
    "StoreError",
    "StoreUnavailableError",
    "WatchStalledError",
]


class SpecmeshError(Exception):
    """Base of every specmesh error."""


@dataclass(frozen=True)
class SpecIssue:
    """One problem found in a spec: where, which rule, and what a person should read.

    ``path`` is the dotted/indexed path in the document as written
    (``model.temperature``, ``mcpServers[1].headers.key``); ``rule`` a stable
    machine name (``le``, ``extra_forbidden``, ``duplicate``); ``severity``
    ``error`` or ``warning``.
    """

    path: str
    rule: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = f"{self.path}: " if self.path else ""
        return f"{prefix}{self.message}"


class SpecError(SpecmeshError):
    """A spec or manifest is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[SpecIssue], *, source: str | None = None) -> None:
        self.issues = list(issues)
        self.source = source
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  {i}" for i in self.issues)
        n = len(self.issues)
        super().__init__(f"{head}{n} problem{'s' if n != 1 else ''} in spec:\n{lines}")


class ManifestParseError(SpecError):
    """A manifest file is not valid JSON or YAML."""

    def __init__(self, *, source: str, line: int | None, column: int | None, reason: str) -> None:
        self.line = line
        self.column = column
        self.reason = reason
        where = source
        if line is not None:
            where += f":{line}"
            if column is not None:
                where += f":{column}"
        super().__init__([SpecIssue(path="", rule="parse", message=f"{where}: {reason}")])
        self.source = source


class InvalidNameError(SpecError, ValueError):
    """A logical name breaks the naming rules (see :mod:`specmesh.names`)."""

    def __init__(self, *, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__([SpecIssue("name", "name", f"invalid name {name!r}: {reason}")])


class NameCollisionError(SpecmeshError):
    """Two different logical names map to the same Kubernetes/etcd resource name."""

    def __init__(self, *, name: str, existing: str, resource_name: str) -> None:
        self.name = name
        self.existing = existing
        self.resource_name = resource_name
        super().__init__(
            f"agent name {name!r} maps to resource name {resource_name!r}, "
            f"which agent {existing!r} already uses; choose another name"
        )


class StoreError(SpecmeshError):
    """etcd could not do what was asked."""


class StoreUnavailableError(StoreError):
    """etcd cannot be reached."""

    def __init__(self, *, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"etcd at {endpoint} is unavailable: {reason}")


class WatchStalledError(StoreUnavailableError):
    """A watch got no message, not even a progress notification, within its read deadline:
    the connection is half-open or etcd is frozen."""

    def __init__(self, *, endpoint: str, key: str, timeout: float) -> None:
        self.key = key
        self.timeout = timeout
        super().__init__(
            endpoint=endpoint,
            reason=f"the watch on {key} got no message for {timeout:g} s (its read deadline)",
        )


class ConflictError(StoreError):
    """The expected revision is stale: somebody else changed the object first."""

    def __init__(
        self,
        *,
        kind: str,
        name: str,
        expected: int | None,
        actual: int | None,
        counter: str = "revision",
    ) -> None:
        self.kind = kind
        self.name = name
        self.expected = expected
        self.actual = actual
        self.counter = counter
        """What ``expected`` and ``actual`` count: an agent's ``revision``, a release's
        ``version``."""
        exp = "none (create)" if not expected else str(expected)
        act = "none (does not exist)" if not actual else str(actual)
        super().__init__(
            f"conflict on {kind} {name!r}: expected {counter} {exp}, current {counter} is "
            f"{act}; re-read it and apply again"
        )


class NotFoundError(StoreError):
    """No such object."""

    def __init__(self, *, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(f"{kind} {name!r} not found")


class CompactedError(StoreError):
    """A watch asked for a revision that etcd has already compacted."""

    def __init__(self, *, requested: int, compact_revision: int) -> None:
        self.requested = requested
        self.compact_revision = compact_revision
        super().__init__(
            f"etcd revision {requested} is compacted (oldest kept: {compact_revision})"
        )


class SecretError(SpecmeshError):
    """Vault could not do what was asked. Messages never hold a secret value."""


class SecretUnavailableError(SecretError):
    """Vault cannot be reached."""

    def __init__(self, *, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"Vault at {address} is unavailable: {reason}")


class SecretAccessDeniedError(SecretError):
    """The caller's Vault policy does not allow this path."""

    def __init__(self, *, path: str) -> None:
        self.path = path
        super().__init__(f"permission denied reading {path!r} from Vault")


class SecretNotFoundError(SecretError):
    """No such secret, or no such field in it."""

    def __init__(self, *, reference: str) -> None:
        self.reference = reference
        super().__init__(f"secret {reference!r} not found in Vault")


class SecretReferenceError(SecretError):
    """A ``vault://`` reference is malformed."""

    def __init__(self, *, reference: str, reason: str) -> None:
        self.reference = reference
        self.reason = reason
        super().__init__(f"bad secret reference {reference!r}: {reason}")


class ServiceError(SpecmeshError):
    """A local service failed to install or start."""

    def __init__(self, *, service: str, reason: str) -> None:
        self.service = service
        self.reason = reason
        super().__init__(f"{service}: {reason}")
