"""The proto is the one contract: every RPC of the control plane has its REST route
(``google.api.http``) and its wire mapping, every document field names its JSON Schema,
and every list call pages the same way."""

from __future__ import annotations

from google.api import annotations_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from control_plane.auth import StaticTokenAuthenticator
from control_plane.grpc_api import build_servicers
from specmesh.v1 import common_pb2, control_plane_pb2, options_pb2

_SERVICES = list(control_plane_pb2.DESCRIPTOR.services_by_name.values())
_METHODS = [m for s in _SERVICES for m in s.methods]


def _messages() -> list[Descriptor]:
    out: list[Descriptor] = []
    pending = [
        *control_plane_pb2.DESCRIPTOR.message_types_by_name.values(),
        *common_pb2.DESCRIPTOR.message_types_by_name.values(),
    ]
    while pending:
        d = pending.pop()
        out.append(d)
        pending.extend(d.nested_types)
    return out


def test_every_rpc_has_an_http_rule_under_api_v1() -> None:
    missing = []
    for method in _METHODS:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        kind = rule.WhichOneof("pattern")
        if kind is None or not getattr(rule, kind).startswith("/api/v1/"):
            missing.append(method.full_name)
    assert missing == []


def test_every_http_route_is_unique() -> None:
    routes = []
    for method in _METHODS:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        kind = rule.WhichOneof("pattern")
        routes.append((kind, getattr(rule, kind)))
    assert len(routes) == len(set(routes))


def test_every_struct_field_names_its_json_schema() -> None:
    bare = [
        f.full_name
        for d in _messages()
        for f in d.fields
        if f.message_type is not None
        and f.message_type.full_name == "google.protobuf.Struct"
        and not f.GetOptions().Extensions[options_pb2.json_schema]
    ]
    assert bare == []


def test_no_field_carries_json_in_a_string() -> None:
    assert [f.full_name for d in _messages() for f in d.fields if f.name.endswith("_json")] == []


def test_every_list_call_pages_the_same_way() -> None:
    for method in _METHODS:
        if not method.name.startswith("List"):
            continue
        request, response = method.input_type.fields_by_name, method.output_type.fields_by_name
        assert request["page_size"].type == FieldDescriptor.TYPE_INT32, method.name
        assert request["page_token"].type == FieldDescriptor.TYPE_STRING, method.name
        assert response["next_page_token"].type == FieldDescriptor.TYPE_STRING, method.name


def test_every_rpc_has_its_wire_mapping() -> None:
    servicers = build_servicers(None, StaticTokenAuthenticator({}))  # type: ignore[arg-type]
    missing = [
        m.full_name
        for s in _SERVICES
        for m in s.methods
        if not hasattr(getattr(type(servicers[s.full_name]), m.name, None), "impl")
    ]
    assert set(servicers) == {s.full_name for s in _SERVICES} and missing == []
