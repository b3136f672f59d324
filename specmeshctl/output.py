"""How the CLI prints: JSON/YAML documents, aligned tables, manifests ``apply -f`` takes
back."""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

from specmesh.spec.models import API_VERSION

__all__ = ["manifest", "print_data", "print_manifests", "table", "write"]


def write(text: str) -> None:
    """One line (or more) on standard output."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def print_data(data: Any, output: str) -> None:
    """``data`` as YAML (``output == "yaml"``) or indented JSON."""
    if output == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def table(rows: list[list[str]], header: list[str], *, indent: str = "") -> None:
    """Rows under a header, each column as wide as its widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        sys.stdout.write(indent + "  ".join(cells).rstrip() + "\n")


def manifest(kind: str, name: str, spec: Any, status: dict[str, Any] | None = None) -> Any:
    """An object as ``get -o yaml|json`` prints it: a manifest ``apply -f`` takes back
    unchanged (``status`` is read-only and ignored by apply, as in kubectl)."""
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }
    if status:
        doc["status"] = status
    return doc


def print_manifests(docs: list[Any], output: str) -> None:
    """One manifest as a JSON object, several as a list; YAML as documents."""
    if output == "json":
        print_data(docs[0] if len(docs) == 1 else docs, "json")
    else:
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True))
