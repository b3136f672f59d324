"""JSON documents in protobuf messages: ``google.protobuf.Struct``/``Value`` fields (specs,
manifests, Istio objects) and whole messages as the proto3 JSON mapping.

A Struct holds every number as a double; whole numbers come back as ints here (specs count
replicas and revisions), so what goes in as ``2`` comes out as ``2``, not ``2.0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

__all__ = ["from_struct", "message_json", "to_struct"]


def to_struct(data: Mapping[str, Any]) -> Struct:
    """A JSON object as a ``Struct``."""
    return json_format.ParseDict(dict(data), Struct())


def from_struct(struct: Struct) -> dict[str, Any]:
    """A ``Struct`` as a JSON object (whole numbers as ints)."""
    data: dict[str, Any] = message_json(struct)
    return data


def message_json(message: Message) -> Any:
    """Any message as its proto3 JSON (camelCase names; a ``Value`` as the JSON it
    carries), whole numbers as ints."""
    return _whole_numbers(json_format.MessageToDict(message))


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value
