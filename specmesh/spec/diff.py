"""Differences between two JSON documents, as a list of path-level changes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from specmesh.errors import SecretReferenceError
from specmesh.secrets import VaultRef, is_reference

from .validation import format_path

__all__ = ["Change", "diff_json"]

_MISSING = object()


@dataclass(frozen=True)
class Change:
    """One change: ``op`` is ``add``, ``remove`` or ``replace``."""

    path: str
    op: str
    old: Any = None
    new: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "op": self.op}
        if self.op != "add":
            out["old"] = self.old
        if self.op != "remove":
            out["new"] = self.new
        return out

    def __str__(self) -> str:
        if self.op == "add":
            return f"+ {self.path}: {_show(self.new)}"
        if self.op == "remove":
            return f"- {self.path}: {_show(self.old)}"
        versions = _secret_versions(self.old, self.new)
        if versions is not None:
            return f"~ {self.path}: version {versions[0]} -> {versions[1]}"
        return f"~ {self.path}: {_show(self.old)} -> {_show(self.new)}"


def _secret_versions(old: Any, new: Any) -> tuple[str, str] | None:
    """``(old, new)`` versions when both values are references to one secret field that
    differ only in version (a key changed: shown as its versions, never a value)."""
    if not (isinstance(old, str) and isinstance(new, str)):
        return None
    if not (is_reference(old) and is_reference(new)):
        return None
    try:
        a, b = VaultRef.parse(old), VaultRef.parse(new)
    except SecretReferenceError:
        return None
    if a.location != b.location:
        return None
    return (str(a.version or "latest"), str(b.version or "latest"))


def _show(value: Any) -> str:
    """A value as a reader expects it in a diff: JSON (``null`` never, unset is a removal)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def diff_json(old: Any, new: Any) -> list[Change]:
    """Changes that turn ``old`` into ``new`` (objects by key, lists by index)."""
    out: list[Change] = []
    _diff(old, new, [], out)
    return out


def _diff(old: Any, new: Any, path: list[str | int], out: list[Change]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            _diff(old.get(key, _MISSING), new.get(key, _MISSING), [*path, key], out)
        return
    if isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            a = old[i] if i < len(old) else _MISSING
            b = new[i] if i < len(new) else _MISSING
            _diff(a, b, [*path, i], out)
        return
    # an unset field (null) is the same as an absent one: setting it is an add
    old = _MISSING if old is None else old
    new = _MISSING if new is None else new
    if old is _MISSING and new is _MISSING:
        return
    where = format_path(path)
    if old is _MISSING:
        out.append(Change(where, "add", new=new))
    elif new is _MISSING:
        out.append(Change(where, "remove", old=old))
    elif old != new or type(old) is not type(new):
        out.append(Change(where, "replace", old=old, new=new))
