"""Finding and replacing the secret-bearing values of a spec.

Fields typed :data:`specmesh.spec.models.Secret` are found by their
:class:`~specmesh.spec.models.SecretMarker`, at any depth (inside lists and dict
values), so a new secret field needs no change here.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from .models import SecretMarker

__all__ = ["iter_secrets", "replace_values"]

Path = tuple[str | int, ...]


def iter_secrets(model: BaseModel) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, value)`` of every secret-bearing value; paths use wire names."""
    yield from _walk_model(model, ())


def _walk_model(model: BaseModel, path: Path) -> Iterator[tuple[Path, str]]:
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        secret = any(isinstance(m, SecretMarker) for m in info.metadata)
        yield from _walk(value, info.annotation, (*path, info.alias or name), secret)


def _walk(value: Any, tp: Any, path: Path, secret: bool) -> Iterator[tuple[Path, str]]:
    if value is None:
        return
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            args = typing.get_args(tp)
            secret = secret or any(isinstance(a, SecretMarker) for a in args[1:])
            tp = args[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = next((m for m in members if _accepts(m, value)), members[0])
            if len(members) > 1 and isinstance(value, BaseModel):
                tp = type(value)
        else:
            break
    if isinstance(value, BaseModel):
        yield from _walk_model(value, path)
    elif isinstance(value, list):
        (inner,) = typing.get_args(tp) or (Any,)
        for i, item in enumerate(value):
            yield from _walk(item, inner, (*path, i), secret)
    elif isinstance(value, dict):
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        for key, item in value.items():
            yield from _walk(item, inner, (*path, key), secret)
    elif secret and isinstance(value, str):
        yield path, value


def _accepts(tp: Any, value: Any) -> bool:
    base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
    base = typing.get_origin(base) or base
    return isinstance(base, type) and isinstance(value, base)


def replace_values(data: Any, replacements: dict[Path, str]) -> Any:
    """A copy of JSON ``data`` with the value at each path replaced."""
    if not replacements:
        return data
    return _replace(data, (), replacements)


def _replace(data: Any, path: Path, replacements: dict[Path, str]) -> Any:
    if path in replacements:
        return replacements[path]
    if isinstance(data, dict):
        return {k: _replace(v, (*path, k), replacements) for k, v in data.items()}
    if isinstance(data, list):
        return [_replace(v, (*path, i), replacements) for i, v in enumerate(data)]
    return data
