"""Errors of the engine's runtime.

Every error the runtime raises derives from :class:`EngineError` and carries fields.
Errors of the libraries underneath are translated at one boundary each, with
``raise ... from e``: litellm in :mod:`engine.llm`, mcp in :mod:`engine.tools.mcp`, a2a
and httpx in :mod:`engine.tools.partners`, grpc in :mod:`engine.intake`::

    EngineError
    +-- ContextBuildError          a snapshot could not become a runtime context
    |                              (``revision``, ``reason``); the current context stays
    +-- PromptError                no usable prompt version (``prompt_key``, ``reason``)
    +-- ModelError                 the model call failed (``model``, ``status``)
    |   +-- ModelTimeoutError      no answer within the model part's timeout
    |   +-- ModelUnavailableError  connection failed, 5xx, overloaded or rate-limited;
    |   |                          the next fallback is tried
    |   +-- ModelRequestError      the request was refused (4xx: bad request,
    |       |                      authentication, unknown model, context window)
    |       +-- ModelBudgetError   the sidecar refused it: it could pass what is left of
    |                              the request's budget (the sidecar's text, with amounts)
    +-- ToolError                  a tool call failed (``tool``); its message goes back to
        |                          the model as the tool's result, the turn goes on
        +-- ToolTimeoutError       the tool did not answer within the tool timeout
        +-- CallDepthExceededError a partner call would exceed the call-depth limit
                                   (``depth``, ``limit``)
    +-- MemoryStoreError           the conversation memory store failed (``operation``,
    |                              ``reason``); redis errors translated in :mod:`engine.memory`
    +-- TaskStoreError             the A2A task store failed (``operation``, ``where``,
                                   ``reason``); redis errors translated in :mod:`engine.tasks`,
                                   logged there, and only the cause of the SDK's generic
                                   ``InternalError`` an A2A client sees (its message names
                                   an address: engine-side only)

Messages are safe to show a caller: they never hold a secret or message content
(:class:`TaskStoreError` names an address too, and is only logged).
"""

from __future__ import annotations

__all__ = [
    "CallDepthExceededError",
    "ContextBuildError",
    "EngineError",
    "MemoryStoreError",
    "ModelBudgetError",
    "ModelError",
    "ModelRequestError",
    "ModelTimeoutError",
    "ModelUnavailableError",
    "PromptError",
    "TaskStoreError",
    "ToolError",
    "ToolTimeoutError",
]


class EngineError(Exception):
    """Base of every engine runtime error."""


class ContextBuildError(EngineError):
    """A snapshot could not be turned into a runtime context."""

    def __init__(self, *, revision: int, reason: str) -> None:
        super().__init__(f"revision {revision}: {reason}")
        self.revision = revision
        self.reason = reason


class PromptError(EngineError):
    """The prompt has no usable version (missing, unknown label, bad weights)."""

    def __init__(self, *, prompt_key: str, reason: str) -> None:
        super().__init__(f"prompt {prompt_key!r}: {reason}")
        self.prompt_key = prompt_key
        self.reason = reason


class ModelError(EngineError):
    """A model call failed."""

    code = "model_error"

    def __init__(self, *, model: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"model {model!r}: {reason}")
        self.model = model
        self.reason = reason
        self.status = status


class ModelTimeoutError(ModelError):
    """The model did not answer in time."""

    code = "model_timeout"


class ModelUnavailableError(ModelError):
    """The model could not be reached, failed (5xx) or was rate-limited; worth a fallback."""

    code = "model_unavailable"


class ModelRequestError(ModelError):
    """The model refused the request (4xx); a fallback is not tried."""

    code = "model_refused"


class ModelBudgetError(ModelRequestError):
    """The sidecar refused the call: it could pass what is left of the request's budget
    (``BUDGET_EXCEEDED``); ``reason`` is the sidecar's text (amounts, no secret)."""

    code = "budget_exceeded"


class ToolError(EngineError):
    """A tool call failed; the message is what the model reads."""

    def __init__(self, *, tool: str, reason: str) -> None:
        super().__init__(reason)
        self.tool = tool
        self.reason = reason


class ToolTimeoutError(ToolError):
    """A tool call took longer than the tool timeout."""

    def __init__(self, *, tool: str, timeout: float) -> None:
        super().__init__(tool=tool, reason=f"tool {tool!r} timed out after {timeout:g} s")
        self.timeout = timeout


class CallDepthExceededError(ToolError):
    """Calling the partner would exceed the call-depth limit (stops A -> B -> A loops)."""

    def __init__(self, *, tool: str, depth: int, limit: int) -> None:
        super().__init__(
            tool=tool,
            reason=f"refused: calling another agent would reach call depth {depth}, "
            f"beyond the limit of {limit} (agents calling each other in a loop?)",
        )
        self.depth = depth
        self.limit = limit


class MemoryStoreError(EngineError):
    """The conversation memory store failed (unreachable, timed out, refused)."""

    code = "memory_unavailable"

    def __init__(self, *, operation: str, reason: str) -> None:
        super().__init__(f"memory {operation}: {reason}")
        self.operation = operation
        self.reason = reason


class TaskStoreError(EngineError):
    """The A2A task store failed (unreachable, timed out, refused). Its message names the
    store's address: it is logged, never shown to an A2A client."""

    def __init__(self, *, operation: str, where: str, reason: str) -> None:
        super().__init__(f"task store {where} {operation}: {reason}")
        self.operation = operation
        self.where = where
        self.reason = reason
