"""The scripted model server: a local OpenAI-compatible HTTP server driven by scripts.

It is the one scripted boundary of the tests and the offline default LLM of the local
fleet: the real litellm path calls it like any OpenAI-compatible endpoint
(``litellm.acompletion(model="openai/scripted", api_base=server.url, api_key="any")``).

* :mod:`.script` -- scripts (ordered rules and replies) and how a request is matched;
* :mod:`.server` -- the aiohttp app: chat completions (whole and SSE), embeddings,
  models, health, and the ``/_scripted`` admin routes;
* :mod:`.recording` -- the ring buffer of received requests, secret headers redacted;
* :mod:`.completions` -- the OpenAI wire format of answers, chunks and errors;
* :mod:`.tokens`, :mod:`.embeddings` -- deterministic usage and vectors;
* :mod:`.cli` -- ``specmesh model-server``.

Example::

    async with ScriptedModelServer(script={"rules": [...]}) as server:
        await litellm.acompletion(model="openai/scripted", api_base=server.url, ...)
        assert server.requests()[0].has_authorization
"""

from .cli import add_arguments, main, run, serve
from .embeddings import DEFAULT_DIMENSIONS, cosine, embed_text
from .errors import ScriptError
from .recording import RecordedRequest
from .script import (
    ErrorReply,
    Match,
    Rule,
    Script,
    ScriptedToolCall,
    TextReply,
    ToolCallsReply,
    load_script,
    parse_script,
    parse_script_text,
)
from .server import ScriptedModelServer
from .tokens import count_tokens

__all__ = [
    "DEFAULT_DIMENSIONS",
    "ErrorReply",
    "Match",
    "RecordedRequest",
    "Rule",
    "Script",
    "ScriptError",
    "ScriptedModelServer",
    "ScriptedToolCall",
    "TextReply",
    "ToolCallsReply",
    "add_arguments",
    "cosine",
    "count_tokens",
    "embed_text",
    "load_script",
    "main",
    "parse_script",
    "parse_script_text",
    "run",
    "serve",
]
