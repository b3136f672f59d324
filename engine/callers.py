"""Who called the engine, as the A2A SDK sees it: the ``user`` of its ``ServerCallContext``.

The sidecar that authenticated a call names the caller to its engine --
``X-Specmesh-Caller`` (a partner agent, mTLS) and ``X-Specmesh-Principal`` (an external
caller whose bearer token it verified); gRPC metadata ``x-specmesh-caller`` /
``x-specmesh-principal`` -- after removing whatever a client sent. The engine trusts
them (it listens on loopback, behind its sidecar) and keys the caller's tasks by
:func:`specmesh.callers.owner`. A call no sidecar named is ``anonymous``.
"""

from __future__ import annotations

import grpc
from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.grpc_handler import DefaultGrpcServerCallContextBuilder
from a2a.server.routes import DefaultServerCallContextBuilder
from starlette.requests import Request

from specmesh.callers import CALLER_HEADER, CALLER_KEY, PRINCIPAL_HEADER, PRINCIPAL_KEY, owner

__all__ = [
    "CallerContextBuilder",
    "CallerUser",
    "GrpcCallerContextBuilder",
    "resolve_owner",
]


class CallerUser(User):
    """The caller a sidecar named; its ``user_name`` is its owner key."""

    def __init__(self, *, caller: str | None, principal: str | None) -> None:
        self.caller = caller or None
        self.principal = principal or None

    @property
    def is_authenticated(self) -> bool:
        return bool(self.caller or self.principal)

    @property
    def user_name(self) -> str:
        return owner(caller=self.caller, principal=self.principal)


def resolve_owner(context: ServerCallContext) -> str:
    """The SDK's owner resolver: the task owner of the call (``anonymous`` when no
    sidecar named a caller)."""
    user = context.user
    if isinstance(user, CallerUser):
        return user.user_name
    return owner(caller=None, principal=None)


class CallerContextBuilder(DefaultServerCallContextBuilder):
    """HTTP (JSON-RPC and HTTP+JSON): the user from the sidecar's headers."""

    def build_user(self, request: Request) -> User:
        return CallerUser(
            caller=request.headers.get(CALLER_HEADER),
            principal=request.headers.get(PRINCIPAL_HEADER),
        )


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k.lower() == key:
            return v if isinstance(v, str) else v.decode()
    return None


class GrpcCallerContextBuilder(DefaultGrpcServerCallContextBuilder):
    """gRPC: the user from the sidecar's metadata."""

    def build_user(self, context: grpc.aio.ServicerContext) -> User:
        return CallerUser(
            caller=_metadata(context, CALLER_KEY), principal=_metadata(context, PRINCIPAL_KEY)
        )
