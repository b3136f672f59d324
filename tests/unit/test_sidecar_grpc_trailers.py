"""Which upstream trailers the sidecar's gRPC relay hands on."""

from __future__ import annotations

from sidecar.grpcproxy import relayed_trailers


def test_end_to_end_trailers_are_kept_in_order_and_transport_ones_dropped() -> None:
    upstream = [
        ("grpc-status", "5"),
        ("X-Upstream", "a"),
        ("grpc-status-details-bin", b"\x08\x05"),
        ("grpc-message", "nf"),
        ("grpc-timeout", "1S"),
        ("grpc-encoding", "gzip"),
        ("grpc-accept-encoding", "gzip"),
        ("grpc-previous-rpc-attempts", "1"),
        ("grpc-internal-encoding-request", "gzip"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        (":status", "200"),
        ("grpc-retry-pushback-ms", "100"),
        ("x-bin", b"\x00"),
    ]

    assert relayed_trailers(upstream) == (
        ("x-upstream", "a"),
        ("grpc-status-details-bin", b"\x08\x05"),
        ("grpc-retry-pushback-ms", "100"),
        ("x-bin", b"\x00"),
    )


def test_no_trailers_is_an_empty_tuple() -> None:
    assert relayed_trailers(None) == ()
