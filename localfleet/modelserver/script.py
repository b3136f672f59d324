"""Scripts: what the scripted model answers, as an ordered list of rules.

A script is pure data (YAML or JSON)::

    rules:
      - name: ask-weather                 # optional; shows in logs and recorded requests
        match:
          lastUser: "weather in (?P<city>\\w+)"
          lastMessageIsTool: false
          toolOffered: get_weather
        reply:
          type: toolCalls
          toolCalls:
            - name: get_weather
              arguments: {city: "{{city}}"}
      - name: answer-weather
        match: {toolResult: "sunny"}
        reply: {type: text, text: "It is {{last_tool_result}}."}
        times: 1                           # fires once, then is skipped
      - match: {lastUser: "(?i)explode"}
        reply: {type: error, status: 503, message: "overloaded"}
      - match: {system: "flaky"}
        cycle: {every: 10, first: 3}       # 3 of every 10 matching requests: a 30 % error rate
        reply: {type: error, status: 500, message: "scripted failure"}
    fallback: {type: text, text: "scripted: {{last_user}}"}

The first rule whose every given condition holds, and that has not yet fired ``times``
times, answers. Conditions (all optional; an empty ``match`` matches everything):

* ``model``: a regular expression that must match the *whole* model name;
* ``lastUser``: a regular expression searched (``re.search``) in the last user message;
* ``system``: a regular expression searched in the system prompt (every ``system`` and
  ``developer`` message, joined by newlines);
* ``lastMessageIsTool``: whether the last message is a tool result;
* ``toolResult``: a regular expression searched in the last message, which must be a
  tool result;
* ``toolOffered``: the name of a function that must be among the request's ``tools``.

Note that a tool-result turn still carries the user message that started it, so a rule
meant for the first turn only should say ``lastMessageIsTool: false`` (or come after the
rule for the tool result).

Replies are a union on ``type``: ``text``; ``toolCalls`` (one or more calls, with an
optional text beside them; ``arguments`` is an object, JSON-encoded on the wire, or a
string sent verbatim -- the way to script malformed arguments); ``error`` (an HTTP
status and message, answered with an OpenAI-style error body). Texts and argument
strings may hold placeholders: ``{{last_user}}``, ``{{last_tool_result}}``,
``{{model}}`` and any named group of the rule's regular expressions; an unknown
placeholder is refused when the script loads. ``delayMs`` waits before answering and
``chunkDelayMs`` between streamed chunks.

:func:`load_script` and :func:`parse_script` raise :class:`ScriptError` naming the path
of every problem; :class:`ScriptEngine` compiles a script once and picks the reply for
each request, counting how often each rule fired.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from specmesh.errors import SpecError, SpecIssue
from specmesh.spec.manifest import parse_documents
from specmesh.spec.models import SpecModel
from specmesh.spec.validation import issues_from_validation_error

from .errors import ScriptError
from .tokens import content_text

__all__ = [
    "BUILTIN_PLACEHOLDERS",
    "ChatView",
    "Cycle",
    "Decision",
    "ErrorReply",
    "Match",
    "Reply",
    "Rule",
    "Script",
    "ScriptEngine",
    "ScriptedToolCall",
    "TextReply",
    "ToolCallsReply",
    "load_script",
    "parse_script",
    "parse_script_text",
]

#: Placeholders every reply may use.
BUILTIN_PLACEHOLDERS: frozenset[str] = frozenset({"last_user", "last_tool_result", "model"})

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_MAX_DELAY_MS = 600_000


class _ScriptModel(SpecModel):
    """Base of the script's models: the spec's conventions (camelCase, strict, frozen)."""


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
    return value


class Match(_ScriptModel):
    """Conditions a request must meet; every condition given must hold."""

    model: str | None = None
    """Regular expression matching the whole model name (``scripted``, ``gpt-.*``)."""
    last_user: str | None = None
    """Regular expression searched in the text of the last user message."""
    system: str | None = None
    """Regular expression searched in the system prompt (system and developer messages)."""
    last_message_is_tool: bool | None = None
    """Whether the last message must (true) or must not (false) be a tool result."""
    tool_result: str | None = None
    """Regular expression searched in the last message, which must be a tool result."""
    tool_offered: str | None = Field(default=None, min_length=1)
    """Name of a function that must be among the request's ``tools``."""

    _check = field_validator("model", "last_user", "system", "tool_result")(_check_regex)

    def group_names(self) -> set[str]:
        """Named groups of this match's regular expressions (placeholders a reply may use)."""
        names: set[str] = set()
        for pattern in (self.model, self.last_user, self.system, self.tool_result):
            if pattern is not None:
                names.update(re.compile(pattern).groupindex)
        return names


class ScriptedToolCall(_ScriptModel):
    """One tool call of a ``toolCalls`` reply."""

    name: str = Field(min_length=1)
    """Function name."""
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    """An object (JSON-encoded on the wire) or a string sent verbatim."""
    id: str | None = Field(default=None, min_length=1)
    """Tool call id; generated (``call_<n>_<i>``) when absent."""


class TextReply(_ScriptModel):
    """Answer with text (``finish_reason: stop``, or ``length`` past ``max_tokens``)."""

    type: Literal["text"]
    text: str
    """The answer; may hold placeholders."""
    delay_ms: int = Field(default=0, ge=0, le=_MAX_DELAY_MS)
    """Wait this long before answering."""
    chunk_delay_ms: int = Field(default=0, ge=0, le=_MAX_DELAY_MS)
    """When streaming, wait this long between chunks."""


class ToolCallsReply(_ScriptModel):
    """Answer with tool calls (``finish_reason: tool_calls``)."""

    type: Literal["toolCalls"]
    tool_calls: list[ScriptedToolCall] = Field(min_length=1)
    """The calls, in order."""
    text: str | None = None
    """Optional text content beside the calls; may hold placeholders."""
    delay_ms: int = Field(default=0, ge=0, le=_MAX_DELAY_MS)
    """Wait this long before answering."""
    chunk_delay_ms: int = Field(default=0, ge=0, le=_MAX_DELAY_MS)
    """When streaming, wait this long between chunks."""


class ErrorReply(_ScriptModel):
    """Fail with an HTTP status and an OpenAI-style error body."""

    type: Literal["error"]
    status: int = Field(ge=400, le=599)
    """HTTP status (400-599)."""
    message: str = Field(min_length=1)
    """``error.message``; may hold placeholders."""
    error_type: str | None = None
    """``error.type``; derived from the status when absent (``rate_limit_error`` for 429)."""
    code: str | None = None
    """``error.code``."""
    delay_ms: int = Field(default=0, ge=0, le=_MAX_DELAY_MS)
    """Wait this long before answering."""


Reply = Annotated[TextReply | ToolCallsReply | ErrorReply, Field(discriminator="type")]


def _templates(reply: TextReply | ToolCallsReply | ErrorReply) -> Iterator[tuple[str, str]]:
    """``(path, template)`` of every string of ``reply`` that placeholders may appear in."""
    if isinstance(reply, TextReply):
        yield "text", reply.text
    elif isinstance(reply, ErrorReply):
        yield "message", reply.message
    else:
        if reply.text is not None:
            yield "text", reply.text
        for i, call in enumerate(reply.tool_calls):
            yield from _argument_templates(call.arguments, f"toolCalls[{i}].arguments")


def _argument_templates(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _argument_templates(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _argument_templates(item, f"{path}[{i}]")


def _check_placeholders(
    reply: TextReply | ToolCallsReply | ErrorReply, known: set[str] | frozenset[str]
) -> None:
    for path, template in _templates(reply):
        for found in _PLACEHOLDER.finditer(template):
            if found[1] not in known:
                raise ValueError(
                    f"reply.{path}: unknown placeholder {found[0]}; "
                    f"known are {', '.join('{{' + k + '}}' for k in sorted(known))}"
                )


class Cycle(_ScriptModel):
    """A deterministic share of the matching requests: the first ``first`` of every
    ``every`` (``{every: 10, first: 3}``: 30 %)."""

    every: int = Field(ge=1, le=1_000_000)
    """Length of the cycle, in matching requests."""
    first: int = Field(ge=0)
    """How many requests at the start of each cycle the rule answers."""

    @model_validator(mode="after")
    def _within(self) -> Cycle:
        if self.first > self.every:
            raise ValueError(f"first must be <= every (got {self.first} > {self.every})")
        return self


class Rule(_ScriptModel):
    """When a request matches, answer with ``reply`` (at most ``times`` times)."""

    name: str | None = None
    """Shown in logs and in recorded requests."""
    match: Match = Field(default_factory=Match)
    """Conditions; empty matches every request."""
    reply: Reply
    """What to answer."""
    times: int | None = Field(default=None, ge=1)
    """How many times the rule may fire before it is skipped; unlimited when absent."""
    cycle: Cycle | None = None
    """Answer only this share of the requests that match (the others go on to the next
    rules), counted in arrival order: a scripted error rate without randomness."""

    @model_validator(mode="after")
    def _placeholders_known(self) -> Rule:
        _check_placeholders(self.reply, BUILTIN_PLACEHOLDERS | self.match.group_names())
        return self


def _default_fallback() -> TextReply:
    return TextReply(type="text", text="scripted: {{last_user}}")


class Script(_ScriptModel):
    """Ordered rules, and the reply when none matches."""

    rules: list[Rule] = Field(default_factory=list)
    """Tried in order; the first that matches (and has fired fewer than ``times``) answers."""
    fallback: Reply = Field(default_factory=_default_fallback)
    """Reply when no rule matches; by default echoes ``scripted: <last user message>``."""
    models: list[str] = Field(default_factory=lambda: ["scripted"])
    """Model ids listed by ``GET /v1/models`` (any model name is answered regardless)."""

    @model_validator(mode="after")
    def _fallback_placeholders_known(self) -> Script:
        try:
            _check_placeholders(self.fallback, BUILTIN_PLACEHOLDERS)
        except ValueError as e:
            raise ValueError(f"fallback: {e}") from None
        return self


# ---------------------------------------------------------------- loading


def parse_script(data: Any, *, source: str | None = None) -> Script:
    """Validate parsed JSON/YAML as a :class:`Script`; raise :class:`ScriptError`."""
    if data is None:
        data = {}
    try:
        return Script.model_validate(data)
    except ValidationError as e:
        raise ScriptError(issues_from_validation_error(e, Script), source=source) from None


def parse_script_text(text: str, *, source: str) -> Script:
    """Parse a JSON or YAML document and validate it as a :class:`Script`."""
    try:
        documents = parse_documents(text, source=source)
    except SpecError as e:
        raise ScriptError(e.issues) from None
    if len(documents) > 1:
        raise ScriptError(
            [SpecIssue("", "documents", f"holds {len(documents)} documents; a script is one")],
            source=source,
        )
    return parse_script(documents[0][1] if documents else None, source=source)


def load_script(path: str | Path) -> Script:
    """Read and validate a script file (JSON, or YAML); raise :class:`ScriptError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptError([SpecIssue("", "not_found", "no such file")], source=str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScriptError([SpecIssue("", "unreadable", str(e))], source=str(p)) from None
    return parse_script_text(text, source=str(p))


# ---------------------------------------------------------------- matching


@dataclass(frozen=True)
class ChatView:
    """What rules look at in a chat request."""

    model: str
    last_user: str
    system: str
    last_message_is_tool: bool
    last_tool_result: str
    tool_names: frozenset[str]

    @classmethod
    def of(
        cls, *, model: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()
    ) -> ChatView:
        """Extract the view from a request's ``model``, ``messages`` and ``tools``."""
        last_user = ""
        last_tool = ""
        system: list[str] = []
        for message in messages:
            role = message.get("role")
            text = content_text(message.get("content"))
            if role == "user":
                last_user = text
            elif role == "tool":
                last_tool = text
            elif role in ("system", "developer"):
                system.append(text)
        names: set[str] = set()
        for tool in tools:
            if isinstance(tool, Mapping):
                function = tool.get("function")
                if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                    names.add(function["name"])
        last_is_tool = bool(messages) and messages[-1].get("role") == "tool"
        return cls(
            model=model,
            last_user=last_user,
            system="\n".join(system),
            last_message_is_tool=last_is_tool,
            last_tool_result=last_tool,
            tool_names=frozenset(names),
        )


@dataclass(frozen=True)
class Decision:
    """The reply chosen for a request, and the values its placeholders take."""

    reply: TextReply | ToolCallsReply | ErrorReply
    rule_index: int | None
    """Index of the rule that fired; None for the fallback."""
    rule_name: str | None
    variables: Mapping[str, str] = field(default_factory=dict)

    def render(self, template: str, *, json_escape: bool = False) -> str:
        """``template`` with its placeholders filled in."""

        def fill(found: re.Match[str]) -> str:
            value = self.variables.get(found[1], "")
            return json.dumps(value, ensure_ascii=False)[1:-1] if json_escape else value

        return _PLACEHOLDER.sub(fill, template)

    def text(self) -> str | None:
        """The rendered text of a text or tool-calls reply (None when there is none)."""
        if isinstance(self.reply, TextReply):
            return self.render(self.reply.text)
        if isinstance(self.reply, ToolCallsReply) and self.reply.text is not None:
            return self.render(self.reply.text)
        return None

    def arguments(self, call: ScriptedToolCall) -> str:
        """The rendered arguments of ``call`` as the JSON string sent on the wire."""
        if isinstance(call.arguments, str):
            return self.render(call.arguments, json_escape=True)
        return json.dumps(self._render_value(call.arguments), ensure_ascii=False)

    def _render_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.render(value)
        if isinstance(value, Mapping):
            return {k: self._render_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._render_value(v) for v in value]
        return value


@dataclass(frozen=True)
class _CompiledRule:
    rule: Rule
    model: re.Pattern[str] | None
    last_user: re.Pattern[str] | None
    system: re.Pattern[str] | None
    tool_result: re.Pattern[str] | None

    @classmethod
    def of(cls, rule: Rule) -> _CompiledRule:
        m = rule.match

        def compiled(pattern: str | None) -> re.Pattern[str] | None:
            return re.compile(pattern) if pattern is not None else None

        return cls(
            rule, compiled(m.model), compiled(m.last_user), compiled(m.system),
            compiled(m.tool_result),
        )  # fmt: skip

    def groups(self, view: ChatView) -> dict[str, str] | None:
        """Named groups captured if the rule matches ``view``; None if it does not."""
        m = self.rule.match
        if (
            m.last_message_is_tool is not None
            and m.last_message_is_tool != view.last_message_is_tool
        ):
            return None
        if m.tool_offered is not None and m.tool_offered not in view.tool_names:
            return None
        if self.tool_result is not None and not view.last_message_is_tool:
            return None
        found: dict[str, str] = {}
        checks = (
            (self.model, view.model, True),
            (self.last_user, view.last_user, False),
            (self.system, view.system, False),
            (self.tool_result, view.last_tool_result, False),
        )
        for pattern, subject, whole in checks:
            if pattern is None:
                continue
            hit = pattern.fullmatch(subject) if whole else pattern.search(subject)
            if hit is None:
                return None
            found.update({k: v for k, v in hit.groupdict().items() if v is not None})
        return found


class ScriptEngine:
    """A script compiled for matching, with the count of times each rule fired.

    Not thread-safe; meant for one event loop, where :meth:`decide` runs without awaiting
    so that a rule's ``times`` holds under concurrent requests.
    """

    def __init__(self, script: Script) -> None:
        self._script = script
        self._rules = [_CompiledRule.of(rule) for rule in script.rules]
        self._fired = [0] * len(self._rules)
        self._matched = [0] * len(self._rules)

    @property
    def script(self) -> Script:
        """The script this engine runs."""
        return self._script

    @property
    def fired(self) -> list[int]:
        """How many times each rule has fired, by index."""
        return list(self._fired)

    def decide(self, view: ChatView) -> Decision:
        """Pick the reply for ``view`` and count the rule that fired."""
        variables = {
            "last_user": view.last_user,
            "last_tool_result": view.last_tool_result,
            "model": view.model,
        }
        for index, compiled in enumerate(self._rules):
            rule = compiled.rule
            if rule.times is not None and self._fired[index] >= rule.times:
                continue
            groups = compiled.groups(view)
            if groups is None:
                continue
            if rule.cycle is not None:
                position = self._matched[index] % rule.cycle.every
                self._matched[index] += 1
                if position >= rule.cycle.first:
                    continue
            self._fired[index] += 1
            return Decision(rule.reply, index, rule.name, {**variables, **groups})
        return Decision(self._script.fallback, None, None, variables)
