"""The entry's conversation affinity: the contextId read from each A2A binding's request
(a2a-sdk's protobuf types), and the track a known conversation keeps."""

from __future__ import annotations

import json
import random
import uuid

from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest
from google.protobuf.json_format import MessageToDict, Parse, ParseDict

from sidecar.affinity import (
    ConversationTracks,
    context_id_of_grpc,
    context_id_of_http,
    message_context_grpc,
    message_context_http,
)
from sidecar.router import InMemoryInstanceSource, InMemoryReleaseSource, Instance, Router
from specmesh.spec.models import ReleaseSpec


def _request(context_id: str = "") -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=uuid.uuid4().hex,
            context_id=context_id,
            parts=[Part(text="hi")],
        )
    )


def _jsonrpc(method: str, request: SendMessageRequest) -> bytes:
    params = MessageToDict(request)
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


def test_the_context_id_is_read_from_every_binding() -> None:
    request = _request("conv-1")
    http_json = json.dumps(MessageToDict(request)).encode()

    assert context_id_of_http("POST", "/", _jsonrpc("SendMessage", request)) == "conv-1"
    assert context_id_of_http("POST", "/", _jsonrpc("SendStreamingMessage", request)) == "conv-1"
    assert context_id_of_http("POST", "/v1/message:send", http_json) == "conv-1"
    assert context_id_of_http("POST", "/tenant-a/v1/message:stream", http_json) == "conv-1"
    assert context_id_of_http("POST", "/v1/invoke", b'{"contextId": "conv-1", "message": "x"}') == (
        "conv-1"
    )
    assert context_id_of_grpc("SendMessage", request.SerializeToString()) == "conv-1"
    assert context_id_of_grpc("SendStreamingMessage", request.SerializeToString()) == "conv-1"


def test_no_context_id_or_an_unparseable_body_pins_nothing() -> None:
    assert context_id_of_http("POST", "/", _jsonrpc("SendMessage", _request())) is None
    assert context_id_of_http("POST", "/", _jsonrpc("GetTask", _request("conv-1"))) is None
    assert context_id_of_http("POST", "/", b"{not json") is None
    assert (
        context_id_of_http("POST", "/", b'{"method": "SendMessage", "params": {"message": 3}}')
        is None
    )
    assert context_id_of_http("GET", "/v1/message:send", b"{}") is None
    assert context_id_of_http("POST", "/v1/invoke", b'{"contextId": 7}') is None
    assert context_id_of_grpc("SendMessage", b"\xff\xff\xff") is None
    assert context_id_of_grpc("GetTask", _request("conv-1").SerializeToString()) is None


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


CANARY_2 = ReleaseSpec.model_validate({"canaryRevision": 2, "canaryWeight": 100})


def test_a_canary_pin_holds_only_while_the_same_canary_is_released() -> None:
    clock = Clock()
    tracks = ConversationTracks(max_age=60, max_entries=10, clock=clock)
    tracks.remember("c1", "canary", CANARY_2)
    tracks.remember("c2", "stable", CANARY_2)
    weight_0 = CANARY_2.model_copy(update={"canary_weight": 0})

    assert tracks.track("c1", weight_0) == "canary"
    assert tracks.track("c2", CANARY_2) == "stable"
    new_canary = CANARY_2.model_copy(update={"canary_revision": 3})
    assert tracks.track("c1", new_canary) is None  # another canary: routed by the release
    assert tracks.track("c2", ReleaseSpec()) == "stable"
    clock.now = 60
    assert tracks.track("c2", CANARY_2) is None and len(tracks) == 0


def test_the_router_keeps_a_pinned_track_but_a_header_match_wins() -> None:
    instances = InMemoryInstanceSource(
        [Instance("s1", "a", "http://s1", "stable"), Instance("k1", "a", "http://k1", "canary")]
    )
    release = ReleaseSpec.model_validate(
        {"canaryRevision": 2, "canaryWeight": 0, "headerMatch": [{"name": "x-t", "exact": "1"}]}
    )
    router = Router(
        instances=instances,
        releases=InMemoryReleaseSource({"a": release}),
        rng=random.Random(7),
    )

    assert router.pick("a", {}, pinned="canary").instance == "k1"
    assert router.pick("a", {"x-t": "1"}, pinned="stable").instance == "k1"
    assert router.pick("a", {}).instance == "s1"


def test_a_message_starting_a_conversation_is_named_on_every_binding() -> None:
    def named() -> str:
        return "named-1"

    request = _request()
    rpc = message_context_http("POST", "/", _jsonrpc("SendMessage", request), assign=named)
    http_json = json.dumps(MessageToDict(request)).encode()
    rest = message_context_http("POST", "/v1/message:send", http_json, assign=named)
    grpc = message_context_grpc("SendMessage", request.SerializeToString(), assign=named)
    invoke = message_context_http("POST", "/v1/invoke", b'{"message": "hi"}', assign=named)

    assert rpc.rewritten is not None and rest.rewritten is not None
    assert grpc.rewritten is not None and invoke.rewritten is not None
    assert (rpc.context_id, rest.context_id, grpc.context_id) == ("named-1",) * 3
    sent = json.loads(rpc.rewritten)["params"]
    assert ParseDict(sent, SendMessageRequest()).message.context_id == "named-1"
    assert sent["message"]["messageId"] == request.message.message_id  # the rest kept
    assert Parse(rest.rewritten, SendMessageRequest()).message.context_id == "named-1"
    assert SendMessageRequest.FromString(grpc.rewritten).message.context_id == "named-1"
    assert json.loads(invoke.rewritten) == {"message": "hi", "contextId": "named-1"}


def test_a_message_of_a_task_or_a_named_conversation_is_not_rewritten() -> None:
    def named() -> str:
        raise AssertionError("no contextId may be assigned")

    of_task = SendMessageRequest()
    of_task.CopyFrom(_request())
    of_task.message.task_id = "task-1"
    for request in (of_task, _request("conv-1")):
        rpc = message_context_http("POST", "/", _jsonrpc("SendMessage", request), assign=named)
        grpc = message_context_grpc("SendMessage", request.SerializeToString(), assign=named)
        assert rpc.rewritten is None and grpc.rewritten is None
        assert rpc.context_id == grpc.context_id == (request.message.context_id or None)


def test_an_empty_context_id_under_the_proto_name_is_replaced_not_doubled() -> None:
    params = {"message": {"messageId": "m1", "role": "ROLE_USER", "context_id": "", "parts": []}}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": params})

    call = message_context_http("POST", "/", body.encode(), assign=lambda: "named-2")

    assert call.rewritten is not None
    sent = json.loads(call.rewritten)["params"]
    assert "context_id" not in sent["message"]  # whichever a parser reads last, it is ours
    assert ParseDict(sent, SendMessageRequest()).message.context_id == "named-2"
