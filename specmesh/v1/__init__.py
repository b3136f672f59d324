"""Generated protobuf and gRPC code of ``proto/specmesh/v1`` (do not edit).

Regenerate with ``scripts/gen-proto``; ``tests/unit/test_proto.py`` fails when the code here
is not current. ruff and mypy skip this package.
"""
