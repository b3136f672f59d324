"""The REST API's OpenAPI 3.1 document, generated from the proto's descriptors.

Each HTTP binding of an RPC (:func:`control_plane.transcoding.http_bindings`) is an operation
(``operationId`` = the RPC's name; ``summary``/``description`` = its proto comment, read from
the descriptor set with source info that ``scripts/gen-proto`` writes beside the generated
code). Parameters are the path and query fields the transcoder reads; the request body and
the response are schemas of the messages in proto3's JSON mapping, as ``json_format`` reads
and writes it:

==========================  ==============================================================
proto                        JSON Schema
==========================  ==============================================================
string, bool, float/double   string, boolean, number
int32, uint32                integer (bounded)
int64, uint64 (and fixed)    integer or decimal string (json_format writes a string)
bytes                        base64 string
enum                         string, one of the value names
message                      ``$ref`` to ``#/components/schemas/<Name>``
map<K, V>                    object with ``additionalProperties`` V
repeated T                   array of T
Timestamp / Duration         date-time string / ``"1.5s"``
wrappers                     the wrapped scalar
Struct                       ``$ref`` to the JSON schema its field option ``json_schema``
                             names (a pydantic model of :mod:`specmesh`); a Struct without
                             it is a bare object, which the tests refuse
==========================  ==============================================================

Errors are the ``Error`` schema, under every status the error table
(:mod:`control_plane.errors`) produces.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from importlib.resources import files
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)

from control_plane.errors import ERROR_TABLE
from control_plane.schemas import REF_TEMPLATE, json_schema
from control_plane.transcoding import HttpBinding, QueryField, http_bindings, query_fields

__all__ = ["DESCRIPTOR_SET", "comments", "message_schemas", "openapi_document"]

logger = logging.getLogger(__name__)

DESCRIPTOR_SET = "descriptors.binpb"
"""The descriptor set with source info (comments) in ``specmesh/v1``, by gen-proto."""

_REF = REF_TEMPLATE
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}
_UNSIGNED = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}
_WRAPPERS = {
    "google.protobuf.DoubleValue": FieldDescriptor.TYPE_DOUBLE,
    "google.protobuf.FloatValue": FieldDescriptor.TYPE_FLOAT,
    "google.protobuf.Int64Value": FieldDescriptor.TYPE_INT64,
    "google.protobuf.UInt64Value": FieldDescriptor.TYPE_UINT64,
    "google.protobuf.Int32Value": FieldDescriptor.TYPE_INT32,
    "google.protobuf.UInt32Value": FieldDescriptor.TYPE_UINT32,
    "google.protobuf.BoolValue": FieldDescriptor.TYPE_BOOL,
    "google.protobuf.StringValue": FieldDescriptor.TYPE_STRING,
    "google.protobuf.BytesValue": FieldDescriptor.TYPE_BYTES,
}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "description": "the error table's reason"},
                "message": {"type": "string"},
                "issues": {
                    "type": "array",
                    "description": "every problem of an invalid spec (code invalid_spec)",
                    "items": {
                        "type": "object",
                        "required": ["path", "rule", "message", "severity"],
                        "additionalProperties": False,
                        "properties": {
                            "path": {"type": "string"},
                            "rule": {"type": "string"},
                            "message": {"type": "string"},
                            "severity": {"type": "string"},
                        },
                    },
                },
            },
        }
    },
}


# ---------------------------------------------------------------- comments


@functools.cache
def comments(package: str = "specmesh.v1") -> dict[str, str]:
    """Full name (``specmesh.v1.AgentService.GetAgent``, a message, a field) -> its leading
    proto comment, from the descriptor set gen-proto writes; empty when it is missing."""
    try:
        raw = (files(package) / DESCRIPTOR_SET).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        logger.warning(
            "%s/%s missing: the OpenAPI document has no descriptions", package, DESCRIPTOR_SET
        )
        return {}
    found: dict[str, str] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(raw).file:
        names = _names_by_path(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            if name is not None and location.leading_comments.strip():
                found[name] = _clean(location.leading_comments)
    return found


def _clean(comment: str) -> str:
    return "\n".join(line.strip() for line in comment.strip().splitlines()).strip()


def _names_by_path(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """SourceCodeInfo path -> full name, for services, methods, messages, fields, enums."""
    out: dict[tuple[int, ...], str] = {}
    prefix = file.package

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        name = f"{scope}.{m.name}"
        out[path] = name
        for i, f in enumerate(m.field):
            out[(*path, 2, i)] = f"{name}.{f.name}"
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, 3, i), name)
        for i, e in enumerate(m.enum_type):
            enum(e, (*path, 4, i), name)

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        out[path] = f"{scope}.{e.name}"
        for i, v in enumerate(e.value):
            out[(*path, 2, i)] = f"{scope}.{v.name}"  # enum values live in the enum's scope

    for i, m in enumerate(file.message_type):
        message(m, (4, i), prefix)
    for i, e in enumerate(file.enum_type):
        enum(e, (5, i), prefix)
    for i, s in enumerate(file.service):
        out[(6, i)] = f"{prefix}.{s.name}"
        for j, method in enumerate(s.method):
            out[(6, i, 2, j)] = f"{prefix}.{s.name}.{method.name}"
    return out


# ---------------------------------------------------------------- schemas


def _json_schema_option(f: FieldDescriptor) -> str | None:
    """The ``json_schema`` field option (our custom option on Struct fields), if set."""
    for option, value in f.GetOptions().ListFields():
        if option.is_extension and option.name == "json_schema":
            return str(value)
    return None


class _Schemas:
    """Component schemas of messages, built on demand."""

    def __init__(self, notes: dict[str, str], package: str = "specmesh.v1") -> None:
        self._package = package
        self.components: dict[str, Any] = {}
        self._notes = notes

    def name(self, message: Descriptor) -> str:
        package = message.file.package
        return message.full_name.removeprefix(package + ".").replace(".", "_")

    def message(self, message: Descriptor, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """A ``$ref`` to ``message``'s component (an inline schema when ``exclude`` drops
        some of its top-level fields, as a body ``*`` does for the path's)."""
        skipped = set(exclude)
        if skipped:
            return self._object(message, skipped)
        name = self.name(message)
        if name not in self.components:
            self.components[name] = {}  # a recursive message refers to itself
            self.components[name] = self._object(message, set())
        return {"$ref": _REF.format(model=name)}

    def _object(self, message: Descriptor, skipped: set[str]) -> dict[str, Any]:
        properties = {f.json_name: self.field(f) for f in message.fields if f.name not in skipped}
        schema: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            # our messages: json_format refuses an unknown field; others' (a2a's AgentCard)
            # may carry fields of a newer or older version
            "additionalProperties": message.file.package != self._package,
        }
        note = self._notes.get(message.full_name)
        if note:
            schema["description"] = note
        exclusive = []
        for oneof in message.oneofs:
            members = [f.json_name for f in oneof.fields if f.json_name in properties]
            if len(members) > 1:
                exclusive += [
                    {"required": [a, b]} for i, a in enumerate(members) for b in members[i + 1 :]
                ]
        if exclusive:
            schema["not"] = {"anyOf": exclusive}
        return schema

    def field(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = f.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.single(value)}
        elif f.is_repeated:
            schema = {"type": "array", "items": self.single(f)}
        else:
            schema = self.single(f)
        note = self._notes.get(f.full_name)
        if note and "$ref" not in schema:
            schema = {**schema, "description": note}
        elif note:
            schema = {"allOf": [schema], "description": note}
        return schema

    def single(self, f: FieldDescriptor) -> dict[str, Any]:
        """The schema of one value of ``f`` (an item of a repeated field)."""
        if f.message_type is not None:
            return self._message_value(f)
        if f.enum_type is not None:
            return _enum(f.enum_type)
        return _scalar(f.type)

    def _message_value(self, f: FieldDescriptor) -> dict[str, Any]:
        assert f.message_type is not None
        name = f.message_type.full_name
        if name == "google.protobuf.Struct":
            schema_name = _json_schema_option(f)
            owner = f.containing_type
            if schema_name is None and owner is not None and owner.file.package != self._package:
                return {"type": "object", "additionalProperties": True}  # a2a's, any object
            if schema_name is None:
                # a bare object: test_openapi fails on it, so every Struct of ours says what
                # it holds
                return {"type": "object"}
            schema, defs = json_schema(schema_name)
            for key, value in defs.items():
                self.components.setdefault(key, value)
            self.components.setdefault(schema_name, schema)
            return {"$ref": _REF.format(model=schema_name)}
        if name == "google.protobuf.Timestamp":
            return {"type": "string", "format": "date-time"}
        if name == "google.protobuf.Duration":
            return {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"}
        if name == "google.protobuf.FieldMask":
            return {"type": "string"}
        if name in _WRAPPERS:
            return _scalar(_WRAPPERS[name])
        if name == "google.protobuf.Value":
            return {"description": "any JSON value"}
        if name == "google.protobuf.ListValue":
            return {"type": "array", "items": {"description": "any JSON value"}}
        if name == "google.protobuf.Empty":
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.message(f.message_type)


def _enum(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [v.name for v in enum.values]}


def _scalar(kind: int) -> dict[str, Any]:
    if kind == FieldDescriptor.TYPE_STRING:
        return {"type": "string"}
    if kind == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    if kind == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return {"type": "number"}
    if kind in _INT64:
        low, high = (0, 2**64 - 1) if kind in _UNSIGNED else (-(2**63), 2**63 - 1)
        return {
            "type": ["integer", "string"],
            "minimum": low,
            "maximum": high,
            "pattern": r"^-?[0-9]{1,19}$" if low else r"^[0-9]{1,20}$",
            "description": "a 64-bit integer: a number or a decimal string (responses)",
        }
    if kind in _UNSIGNED:
        return {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
    return {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}


# ---------------------------------------------------------------- operations


def _parameter(schemas: _Schemas, q: QueryField) -> dict[str, Any]:
    param: dict[str, Any] = {"name": q.name, "in": "query", "schema": schemas.field(q.descriptor)}
    if q.descriptor.message_type is not None and q.descriptor.message_type.GetOptions().map_entry:
        param["style"] = "deepObject"
        param["explode"] = True
    elif q.descriptor.is_repeated:
        param["style"] = "form"
        param["explode"] = True
    return param


def _path_parameter(schemas: _Schemas, binding: HttpBinding, path: str) -> dict[str, Any]:
    descriptor: Descriptor | None = binding.method.input_type
    f: FieldDescriptor | None = None
    for part in path.split("."):
        assert descriptor is not None
        f = descriptor.fields_by_name[part]
        descriptor = f.message_type
    assert f is not None
    schema = schemas.field(f)
    if schema.get("type") == "string" and "pattern" not in schema:
        schema = {**schema, "minLength": 1, "pattern": r"^[^/]+$"}
    return {"name": path, "in": "path", "required": True, "schema": schema}


def _operation(schemas: _Schemas, binding: HttpBinding, notes: dict[str, str]) -> dict[str, Any]:
    method = binding.method
    note = notes.get(method.full_name, "")
    op: dict[str, Any] = {
        "operationId": method.name if not binding.additional else f"{method.name}_{binding.verb}",
        "tags": [binding.service.name],
        "summary": note.split("\n\n")[0].split(". ")[0].replace("\n", " ").rstrip(".")
        or method.name,
        "security": [{"bearer": []}],
        "parameters": [
            *(_path_parameter(schemas, binding, p) for p in binding.path_fields),
            *(_parameter(schemas, q) for q in query_fields(binding)),
        ],
    }
    if note:
        op["description"] = note
    if binding.body == "*":
        body = schemas.message(method.input_type, exclude=binding.path_fields)
    elif binding.body:
        body = schemas.field(method.input_type.fields_by_name[binding.body])
    if binding.body:
        # an empty body is the empty message (every field of a proto3 message is optional)
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    if binding.response_body:
        response = schemas.field(method.output_type.fields_by_name[binding.response_body])
    else:
        response = schemas.message(method.output_type)
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": response}}}
    }
    for status, reasons in _error_statuses().items():
        if status == 413 and not binding.body:
            continue
        responses[str(status)] = {
            "description": ", ".join(reasons),
            "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
        }
    op["responses"] = responses
    return op


def _error_statuses() -> dict[int, list[str]]:
    """Every HTTP status of the error table (500 aside) with its reasons."""
    out: dict[int, list[str]] = {}
    for mapping in ERROR_TABLE:
        out.setdefault(mapping.http_status, []).append(mapping.reason)
    return dict(sorted(out.items()))


def message_schemas(
    message: Descriptor, *, strict: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema of ``message`` in proto3 JSON, the component schemas it refers to), for a
    message outside our services (a2a's AgentCard); ``strict``: no unknown field allowed."""
    schemas = _Schemas({}, package=message.file.package if strict else "")
    schemas.message(message)
    name = schemas.name(message)
    components = dict(schemas.components)
    return components.pop(name), components


def openapi_document(
    services: Sequence[ServiceDescriptor] | None = None,
    *,
    title: str = "specmesh control plane",
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every HTTP binding of ``services`` (default: the control
    plane's)."""
    if services is None:
        from specmesh.v1 import control_plane_pb2

        services = list(control_plane_pb2.DESCRIPTOR.services_by_name.values())
    notes = comments(_package_of(services[0].file) if services else "specmesh.v1")
    schemas = _Schemas(notes, package=services[0].file.package if services else "")
    paths: dict[str, Any] = {}
    for binding in http_bindings(services):
        op = _operation(schemas, binding, notes)
        paths.setdefault(binding.openapi_path, {})[binding.verb.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "tags": [{"name": s.name, "description": notes.get(s.full_name, "")} for s in services],
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR, **dict(sorted(schemas.components.items()))},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _package_of(file: FileDescriptor) -> str:
    """The Python package of a proto file's generated code (``specmesh/v1/x.proto`` ->
    ``specmesh.v1``)."""
    return file.name.rpartition("/")[0].replace("/", ".")
