"""Names: what a logical agent name may be, and how it maps to a resource name.

Agent names are *logical* names, as people write them (``scheduleX-assistant``).
Kubernetes object names, Istio hosts, etcd keys and Vault paths need a DNS-1123
label (lower case letters, digits and ``-``, at most 63 characters), so every
place that needs one calls :func:`resource_name` -- the one mapping:

* lower-case every letter;
* replace ``_`` and ``.`` with ``-``.

Because a logical name must start with a letter, end with a letter or digit and
hold only letters, digits, ``-``, ``_`` and ``.`` (at most 63 characters), the
result is always a valid DNS-1123 label. Two logical names that map to the same
resource name (``scheduleX-assistant`` and ``schedulex_assistant``) collide: the
store refuses the second one (:class:`~specmesh.errors.NameCollisionError`).
"""

from __future__ import annotations

import re

from specmesh.errors import InvalidNameError

__all__ = [
    "LOGICAL_NAME_PATTERN",
    "MAX_NAME_LENGTH",
    "check_logical_name",
    "is_dns1123_label",
    "resource_name",
]

MAX_NAME_LENGTH = 63
LOGICAL_NAME_PATTERN = r"^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?$"
_LOGICAL = re.compile(LOGICAL_NAME_PATTERN)
_DNS1123 = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def check_logical_name(name: str) -> str | None:
    """Return why ``name`` is not a valid logical name, or ``None`` if it is."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters (got {len(name)})"
    if not _LOGICAL.fullmatch(name):  # fullmatch: `$` alone lets a trailing newline in
        return (
            "must start with a letter, end with a letter or digit, and hold only "
            f"letters, digits, '-', '_' and '.' (got {name!r})"
        )
    return None


def resource_name(name: str) -> str:
    """Map a logical name to its DNS-1123 resource name (see the module docstring)."""
    reason = check_logical_name(name)
    if reason is not None:
        raise InvalidNameError(name=name, reason=reason)
    return name.lower().replace("_", "-").replace(".", "-")


def is_dns1123_label(value: str) -> bool:
    """Whether ``value`` is a valid DNS-1123 label."""
    return len(value) <= MAX_NAME_LENGTH and bool(_DNS1123.fullmatch(value))
