"""The OpenAPI document generated from the proto's descriptors (control_plane/openapi.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2

from control_plane.openapi import openapi_document
from control_plane.transcoding import _compile_template, http_bindings, query_fields
from specmesh.v1 import control_plane_pb2

SERVICES = list(control_plane_pb2.DESCRIPTOR.services_by_name.values())
_SCHEMA_KEYS = ("properties", "additionalProperties", "patternProperties", "$ref")


def bare_objects(node: Any, where: str = "#") -> Iterator[str]:
    """Where an object schema says nothing of what it holds (no properties, no
    additionalProperties, no patternProperties)."""
    if isinstance(node, dict):
        kind = node.get("type")
        is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)
        if is_object and not any(k in node for k in _SCHEMA_KEYS):
            yield where
        for key, value in node.items():
            yield from bare_objects(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from bare_objects(value, f"{where}/{i}")


def test_the_document_has_no_bare_object_schema() -> None:
    document = openapi_document()
    assert list(bare_objects(document)) == []


def test_every_rpc_of_the_control_plane_is_an_operation_with_its_comment() -> None:
    document = openapi_document()
    operations = {
        op["operationId"]: op for path in document["paths"].values() for op in path.values()
    }
    rpcs = [m for s in SERVICES for m in s.methods]
    assert len(rpcs) > 40
    for method in rpcs:
        op = operations[method.name]
        assert op["description"].startswith(method.name), method.name  # its proto comment
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{method.output_type.name}"}
        assert {"400", "401", "403", "404", "503"} <= set(op["responses"])


def test_the_document_is_valid_openapi_3_1_json_schema() -> None:
    document = openapi_document()
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema), name
    assert document["openapi"] == "3.1.0"


def test_proto3_json_mapping_of_scalars() -> None:
    schemas = openapi_document()["components"]["schemas"]
    revision = schemas["RevisionInfo"]["properties"]
    assert revision["revision"]["type"] == ["integer", "string"]  # int64: json_format writes "1"
    assert revision["createdAt"]["type"] == "string"
    assert revision["createdAt"]["format"] == "date-time"
    assert schemas["AgentInstance"]["properties"]["state"]["enum"][0] == "ENGINE_STATE_UNSPECIFIED"
    tracks = schemas["AgentStatus"]["properties"]["tracks"]
    assert tracks["additionalProperties"] == {"$ref": "#/components/schemas/TrackStatus"}
    spec = schemas["Agent"]["properties"]["spec"]  # a Struct with (json_schema) = "AgentSpec"
    assert "#/components/schemas/AgentSpec" in str(spec)
    assert "AgentSpec" in schemas
    jsonschema.validate(
        {"revision": "3", "author": "a", "createdAt": "2026-01-01T00:00:00Z", "message": ""},
        {**schemas["RevisionInfo"], "components": {"schemas": schemas}},
    )


def _service_with_a_bare_struct() -> Any:
    """A service whose response has a Struct field without the json_schema option."""
    file = descriptor_pb2.FileDescriptorProto(
        name="bare/v1/bare.proto",
        package="bare.v1",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto", "google/api/annotations.proto"],
    )
    request = file.message_type.add(name="GetThingRequest")
    request.field.add(name="name", number=1, type=9, label=1, json_name="name")
    response = file.message_type.add(name="Thing")
    response.field.add(
        name="doc", number=1, type=11, label=1, type_name=".google.protobuf.Struct",
        json_name="doc",
    )  # fmt: skip
    method = file.service.add(name="ThingService").method.add(
        name="GetThing", input_type=".bare.v1.GetThingRequest", output_type=".bare.v1.Thing"
    )
    method.options.Extensions[annotations_pb2.http].get = "/v1/things/{name}"
    pool = descriptor_pool.Default()  # where Struct and google.api.http already are
    assert struct_pb2.Struct.DESCRIPTOR.file.pool is pool
    try:
        return pool.FindServiceByName("bare.v1.ThingService")
    except KeyError:
        pool.Add(file)
        return pool.FindServiceByName("bare.v1.ThingService")


def test_a_struct_without_its_json_schema_option_fails_the_bare_object_check() -> None:
    document = openapi_document([_service_with_a_bare_struct()], title="bare")
    assert document["paths"]["/v1/things/{name}"]["get"]["operationId"] == "GetThing"
    assert list(bare_objects(document)) == ["#/components/schemas/Thing/properties/doc"]


def test_path_templates_become_aiohttp_routes() -> None:
    route, openapi_path, variables = _compile_template("/v1/{parent.name}/files/{path=**}:get")
    assert route == "/v1/{parent__name:[^/]+}/files/{path:.+}:get"
    assert openapi_path == "/v1/{parent.name}/files/{path}:get"
    assert variables == {"parent__name": "parent.name", "path": "path"}


def test_query_fields_are_the_fields_outside_the_path_and_body() -> None:
    bindings = {b.method.name: b for b in http_bindings(SERVICES)}
    get_agent = [q.name for q in query_fields(bindings["GetAgent"])]
    assert get_agent == ["revision"]  # agentName is in the path
    assert query_fields(bindings["ApplyAgent"]) == []  # body "*": everything in the body
    set_release = {q.name for q in query_fields(bindings["SetRelease"])}
    assert "release" not in set_release and "agentName" not in set_release
    assert {"dryRun", "message"} <= set_release
