"""REST from the proto: HTTP/JSON transcoding of the control plane's gRPC services.

Every method with a ``google.api.http`` rule (and its ``additional_bindings``) becomes an
aiohttp route; nothing here knows an RPC by name. A call is mapped as Google's HTTP rules
say (https://google.aip.dev/127):

- path variables ``{field}``, ``{a.b}`` (a nested field), ``{x=*}`` and ``{x=**}`` (several
  segments) set those fields;
- ``body: "*"`` reads every other field from the JSON body, ``body: "field"`` that one field,
  no body none; the fields left (not in the path, not in the body) come from the query
  string by their JSON (camelCase) or proto name: ``?pageSize=10``, a repeated field
  repeated, a nested field as ``a.b=``, a map as ``m[key]=value``;
- the request is built with ``json_format.ParseDict``; an unknown or ill-typed field is a
  400 naming the field and where it was (``path``, ``query`` or ``body``);
- the caller is authenticated by the same Authenticator as gRPC's, then the SAME servicer
  method the gRPC server calls runs (``servicer.invoke(method, principal, request)``, see
  :func:`control_plane.grpc_api.build_servicers`); what it raises is answered with the
  HTTP status of the one error table (:mod:`control_plane.errors`);
- the response is ``json_format.MessageToDict`` (camelCase, fields without presence always
  present), or its ``response_body`` field.

Errors keep the body ``{"error": {"code": <reason>, "message", "issues"?}}``. Bodies are at
most :data:`MAX_BODY_BYTES` (413) and :data:`MAX_BODY_DEPTH` deep (400).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message

from control_plane.auth import Authenticator, Principal
from control_plane.errors import BadRequestError, BodyTooLargeError, error_body, error_mapping
from specmesh import jsonbounds
from specmesh.spec.manifest import MAX_NESTING_DEPTH

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_BODY_DEPTH",
    "HttpBinding",
    "QueryField",
    "Servicer",
    "add_transcoded_routes",
    "http_bindings",
    "query_fields",
]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 2 * 1024 * 1024
"""Largest request body (413 past it); a manifest is at most 1 MiB."""
MAX_BODY_DEPTH = MAX_NESTING_DEPTH + 1
"""Most lists/objects nested in a body (400 past it): a manifest's bound, plus the request
object around it (``{"manifest": ...}``)."""


_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")
_WELL_KNOWN_SCALARS = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}
"""Messages whose JSON form is one scalar: they travel in a path or query like one."""
_MAX_QUERY_NESTING = 4


# ---------------------------------------------------------------- bindings


@dataclass(frozen=True)
class HttpBinding:
    """One HTTP rule of one RPC."""

    service: ServiceDescriptor
    method: MethodDescriptor
    verb: str
    """``GET``, ``POST``, ``PUT``, ``PATCH``, ``DELETE`` (or a custom rule's kind)."""
    template: str
    """The rule's path template as written, e.g. ``/api/v1/agents/{agent_name}``."""
    route: str
    """The template as an aiohttp route (variables renamed, patterns for ``*``/``**``)."""
    openapi_path: str
    """The template as an OpenAPI path (``{agent_name}``, ``{a.b}``)."""
    variables: dict[str, str]
    """aiohttp variable name -> field path (``agent_name``, ``a.b``)."""
    body: str
    """``"*"``, a field name, or empty (no body)."""
    response_body: str
    """A field of the response sent alone, or empty (the whole response)."""
    additional: bool = False
    """Whether this is one of the rule's ``additional_bindings``."""

    @property
    def path_fields(self) -> tuple[str, ...]:
        return tuple(self.variables.values())


def _compile_template(template: str) -> tuple[str, str, dict[str, str]]:
    """(aiohttp route, OpenAPI path, aiohttp variable -> field path) of a path template."""
    variables: dict[str, str] = {}
    route: list[str] = []
    openapi: list[str] = []
    last = 0
    for match in _VAR.finditer(template):
        literal = template[last : match.start()]
        route.append(literal)
        openapi.append(literal)
        path, pattern = match.group(1), match.group(2) or "*"
        name = path.replace(".", "__")
        variables[name] = path
        regex = "/".join(
            ".+" if seg == "**" else "[^/]+" if seg == "*" else re.escape(seg)
            for seg in pattern.split("/")
        )
        route.append(f"{{{name}:{regex}}}")
        openapi.append(f"{{{path}}}")
        last = match.end()
    route.append(template[last:])
    openapi.append(template[last:])
    return "".join(route), "".join(openapi), variables


def _rules(rule: http_pb2.HttpRule) -> Iterator[tuple[http_pb2.HttpRule, bool]]:
    yield rule, False
    for extra in rule.additional_bindings:
        yield extra, True


def http_bindings(services: Iterable[ServiceDescriptor]) -> list[HttpBinding]:
    """Every HTTP rule of every method of ``services``, in declaration order."""
    out: list[HttpBinding] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            for rule, additional in _rules(options.Extensions[annotations_pb2.http]):
                kind = rule.WhichOneof("pattern")
                if kind is None:
                    raise ValueError(f"{method.full_name}: google.api.http rule without a path")
                if kind == "custom":
                    verb, template = rule.custom.kind.upper(), rule.custom.path
                else:
                    verb, template = kind.upper(), getattr(rule, kind)
                route, openapi_path, variables = _compile_template(template)
                for path in variables.values():
                    _field_at(method.input_type, path)  # fails early on a typo
                if rule.body not in ("", "*"):
                    _field_at(method.input_type, rule.body)
                if rule.response_body:
                    _field_at(method.output_type, rule.response_body)
                out.append(
                    HttpBinding(
                        service=service,
                        method=method,
                        verb=verb,
                        template=template,
                        route=route,
                        openapi_path=openapi_path,
                        variables=variables,
                        body=rule.body,
                        response_body=rule.response_body,
                        additional=additional,
                    )
                )
    return out


def _field_at(message: Descriptor, path: str) -> FieldDescriptor:
    """The field at a dotted proto path (``a.b``) of ``message``."""
    descriptor: Descriptor | None = message
    found: FieldDescriptor | None = None
    for part in path.split("."):
        if descriptor is None or part not in descriptor.fields_by_name:
            raise ValueError(f"{message.full_name}: no field {path!r}")
        found = descriptor.fields_by_name[part]
        descriptor = found.message_type
    assert found is not None
    return found


@dataclass(frozen=True)
class QueryField:
    """A field a binding reads from the query string."""

    name: str
    """Its query name: JSON names joined by dots (``pageSize``, ``since``, ``a.b``)."""
    proto_name: str
    """Its proto path (``page_size``, ``a.b``)."""
    descriptor: FieldDescriptor
    json_path: tuple[str, ...]
    """Its JSON names from the request message down."""


def _is_map(f: FieldDescriptor) -> bool:
    return bool(f.message_type is not None and f.message_type.GetOptions().map_entry)


def _is_repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def query_fields(binding: HttpBinding) -> list[QueryField]:
    """The fields ``binding`` reads from the query string: every leaf not in its path and
    not in its body (with ``body: "*"``, none)."""
    if binding.body == "*":
        return []
    bound = set(binding.path_fields)
    if binding.body:
        bound.add(binding.body)
    out: list[QueryField] = []

    def walk(message: Descriptor, proto: tuple[str, ...], js: tuple[str, ...]) -> None:
        for f in message.fields:
            proto_path, json_path = (*proto, f.name), (*js, f.json_name)
            dotted = ".".join(proto_path)
            if dotted in bound:
                continue
            nested = f.message_type
            if nested is None or nested.full_name in _WELL_KNOWN_SCALARS:
                out.append(QueryField(".".join(json_path), dotted, f, json_path))
            elif _is_map(f):
                if nested.fields_by_name["value"].message_type is None:
                    out.append(QueryField(".".join(json_path), dotted, f, json_path))
            elif any(b.startswith(dotted + ".") for b in bound) or (
                not _is_repeated(f)
                and not nested.full_name.startswith("google.protobuf.")
                and len(proto_path) < _MAX_QUERY_NESTING
            ):
                walk(nested, proto_path, json_path)
            # else: a repeated message, Struct, Value, Any: no query form

    walk(binding.method.input_type, (), ())
    return out


# ---------------------------------------------------------------- the call


class Servicer(Protocol):
    """What the transcoder calls: the gRPC servicer's own implementation of a method, given
    the authenticated caller (:func:`control_plane.grpc_api.build_servicers`)."""

    async def invoke(self, method: str, principal: Principal, request: Message) -> Message: ...


# ---------------------------------------------------------------- request mapping


async def _read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLargeError(limit=MAX_BODY_BYTES) from None
    if not raw.strip():
        return None
    try:
        return jsonbounds.loads(raw, max_depth=MAX_BODY_DEPTH)
    except jsonbounds.JsonTooDeepError as e:
        raise BadRequestError(f"body: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequestError(f"body: invalid JSON ({e})") from None


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _scalar(f: FieldDescriptor, raw: str, where: str, name: str) -> Any:
    """A path or query string as the JSON value ``json_format`` expects for ``f``."""
    if f.type == FieldDescriptor.TYPE_BOOL or (
        f.message_type is not None and f.message_type.full_name == "google.protobuf.BoolValue"
    ):
        if raw in ("true", "false"):
            return raw == "true"
        raise BadRequestError(f"{where}: {name}: must be true or false (got {raw!r})")
    return raw  # json_format parses numbers, enums, timestamps... from their strings


def _json_path(message: Descriptor, proto_path: str) -> list[str]:
    names: list[str] = []
    descriptor: Descriptor | None = message
    for part in proto_path.split("."):
        assert descriptor is not None
        f = descriptor.fields_by_name[part]
        names.append(f.json_name)
        descriptor = f.message_type
    return names


def _parse(data: dict[str, Any], message: Message, where: str) -> None:
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as e:
        first = str(e).splitlines()[0]
        raise BadRequestError(f"{where}: {first}") from None
    except RecursionError:
        raise BadRequestError(f"{where}: nested too deeply") from None


class _Route:
    """The handler of one binding."""

    def __init__(
        self, binding: HttpBinding, servicer: Servicer, authenticator: Authenticator
    ) -> None:
        self.binding = binding
        self._servicer = servicer
        self._authenticator = authenticator
        self._request_class = message_factory.GetMessageClass(binding.method.input_type)
        self._query = {q.name: q for q in query_fields(binding)}
        for q in list(self._query.values()):
            self._query.setdefault(q.proto_name, q)  # agent_name as well as agentName

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            principal = self._authenticator.authenticate(request.headers.get("Authorization"))
            message = await self._message(request)
            response = await self._servicer.invoke(self.binding.method.name, principal, message)
        except Exception as e:
            mapping = error_mapping(e)
            if mapping.reason == "internal":
                logger.exception("%s %s failed", request.method, request.path)
            return web.json_response(error_body(e), status=mapping.http_status)
        return web.json_response(self._response(response))

    async def _message(self, request: web.Request) -> Message:
        binding = self.binding
        message = self._request_class()
        if binding.body:
            body = await _read_json(request)
            if binding.body == "*":
                if body is None:
                    body = {}
                if not isinstance(body, dict):
                    raise BadRequestError("body: must be a JSON object")
                for bound in binding.path_fields:  # the path names them; the body may not
                    head = _json_path(binding.method.input_type, bound)[0]
                    if head in body and "." not in bound:
                        raise BadRequestError(f"body: {head}: set by the path, not the body")
                _parse(body, message, "body")
            elif body is not None:
                json_name = binding.method.input_type.fields_by_name[binding.body].json_name
                _parse({json_name: body}, message, "body")
        elif await request.read():
            raise BadRequestError(f"body: {binding.verb} {binding.template} takes no body")
        _parse(self._query_tree(request), message, "query")
        path: dict[str, Any] = {}
        for var, proto_path in binding.variables.items():
            f = _field_at(binding.method.input_type, proto_path)
            value = _scalar(f, request.match_info[var], "path", proto_path)
            _set(path, _json_path(binding.method.input_type, proto_path), value)
        _parse(path, message, "path")
        return message

    def _query_tree(self, request: web.Request) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        given: dict[tuple[str, ...], tuple[QueryField, list[str]]] = {}
        for key in dict.fromkeys(request.query):  # each name once, its values together
            name, _, rest = key.partition("[")
            q = self._query.get(name)
            if q is None:
                known = ", ".join(sorted({q.name for q in self._query.values()})) or "none"
                raise BadRequestError(f"query: unknown parameter {key!r} (known: {known})")
            values = request.query.getall(key)
            if _is_map(q.descriptor):
                if not rest.endswith("]") or not rest[:-1]:
                    raise BadRequestError(f"query: {name}: a map, set as {name}[key]=value")
                if len(values) > 1:
                    raise BadRequestError(f"query: {key}: given more than once")
                entry_type = q.descriptor.message_type
                assert entry_type is not None
                entry = entry_type.fields_by_name["value"]
                _set(tree, (*q.json_path, rest[:-1]), _scalar(entry, values[0], "query", key))
                continue
            if rest:
                raise BadRequestError(f"query: {key}: {name} is not a map")
            given.setdefault(q.json_path, (q, []))[1].extend(values)  # agentName, agent_name
        for path, (q, values) in given.items():
            if _is_repeated(q.descriptor):
                value: Any = [_scalar(q.descriptor, v, "query", q.name) for v in values]
            elif len(values) > 1:
                raise BadRequestError(f"query: {q.name}: given more than once (not repeated)")
            else:
                value = _scalar(q.descriptor, values[0], "query", q.name)
            _set(tree, path, value)
        return tree

    def _response(self, response: Message) -> Any:
        data = json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
        if self.binding.response_body:
            json_name = self.binding.method.output_type.fields_by_name[
                self.binding.response_body
            ].json_name
            return data.get(json_name)
        return data


def _specificity(binding: HttpBinding) -> tuple[int, int]:
    """Sort key: literal routes before those with variables, longer literals first."""
    literal = _VAR.sub("", binding.template)
    return -len(literal), len(binding.variables)


def add_transcoded_routes(
    app: web.Application,
    bindings: Sequence[HttpBinding],
    servicers: Mapping[str, Servicer],
    authenticator: Authenticator,
) -> None:
    """Add a route per binding, calling the servicer of its service (by full name)."""
    for binding in sorted(bindings, key=_specificity):
        servicer = servicers.get(binding.service.full_name)
        if servicer is None:
            raise ValueError(f"no servicer for {binding.service.full_name}")
        app.router.add_route(
            binding.verb, binding.route, _Route(binding, servicer, authenticator).handle
        )
