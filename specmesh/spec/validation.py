"""Validation with errors a person can act on.

Pydantic errors become :class:`~specmesh.errors.SpecIssue` s that name the path as
written in the document, the rule, and the offending value
(``model.temperature: must be <= 2 (got 7)``); an unknown field comes with the nearest
valid name. Values of secret-bearing fields are never echoed. Checks that span fields
(self-partnering, duplicates) and the whole fleet (partner cycles, as warnings) live
here too.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from specmesh.errors import SpecError, SpecIssue
from specmesh.names import resource_name
from specmesh.secrets import REDACTED

from .models import AgentSpec, SecretMarker

__all__ = [
    "check_agent",
    "find_partner_cycles",
    "format_path",
    "issues_from_validation_error",
    "prompt_issues",
    "reference_warnings",
    "validate_model",
]

M = TypeVar("M", bound=BaseModel)


def validate_model(
    model: type[M], data: Any, *, source: str | None = None, prefix: Sequence[str | int] = ()
) -> M:
    """Validate ``data`` as ``model``; raise :class:`SpecError` listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(
            issues_from_validation_error(e, model, prefix=prefix), source=source
        ) from None


def issues_from_validation_error(
    error: ValidationError, model: type[BaseModel], *, prefix: Sequence[str | int] = ()
) -> list[SpecIssue]:
    """Translate a pydantic error of ``model`` into issues, in document order."""
    issues = [_issue(detail, model, prefix) for detail in error.errors(include_url=False)]
    return sorted(issues, key=lambda i: i.path)


# ------------------------------------------------------------ paths


@dataclass
class _Step:
    path: list[str | int]
    tp: Any
    secret: bool


def _strip(tp: Any) -> tuple[Any, bool]:
    """Unwrap Annotated and Optional; report whether a SecretMarker was seen."""
    secret = False
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            args = typing.get_args(tp)
            secret = secret or any(isinstance(a, SecretMarker) for a in args[1:])
            tp = args[0]
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp, secret


def _union_members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return []


def _field_of(model: type[BaseModel], key: str) -> tuple[str, Any, bool] | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            secret = any(isinstance(m, SecretMarker) for m in info.metadata)
            return info.alias or name, info.annotation, secret
    return None


def _walk(model: type[BaseModel], loc: Sequence[str | int]) -> tuple[list[str | int], Any, bool]:
    """Follow ``loc`` through the model's types; drop union tags from the path."""
    path: list[str | int] = []
    tp: Any = model
    secret = False
    for element in loc:
        tp, s = _strip(tp)
        secret = secret or s
        members = _union_members(tp)
        if members and isinstance(element, str):
            chosen = _variant_for_tag(members, element)
            if chosen is not None:
                tp = chosen
                continue
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(element, str):
            found = _field_of(tp, element)
            if found is not None:
                alias, tp, s = found
                secret = secret or s
                path.append(alias)
                continue
            path.append(element)
            tp = None
            continue
        origin = typing.get_origin(tp)
        if origin is list and isinstance(element, int):
            path.append(element)
            tp = typing.get_args(tp)[0]
            continue
        if origin is dict:
            if element == "[key]":
                continue
            path.append(str(element))
            tp = typing.get_args(tp)[1]
            continue
        if element == "[key]":
            continue
        path.append(element)
        tp = None
    tp, s = _strip(tp)
    return path, tp, secret or s


def _variant_for_tag(members: list[Any], tag: str) -> Any:
    for member in members:
        member, _ = _strip(member)
        if not (isinstance(member, type) and issubclass(member, BaseModel)):
            return None
        for field in ("type", "kind"):
            info = member.model_fields.get(field)
            if info is not None and tag in typing.get_args(info.annotation):
                return member
    return None


def format_path(parts: Iterable[str | int]) -> str:
    """``('mcpServers', 0, 'headers', 'key')`` -> ``mcpServers[0].headers.key``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p.replace("_", "").replace("-", "").isalnum() and p[:1].isalpha():
            out += f".{p}" if out else p
        else:
            out += f"[{json.dumps(p)}]"
    return out


# ------------------------------------------------------------ messages


_SECRET_CONTAINERS = frozenset({"apiKey", "headers", "queryParams", "credentials"})


def _show(value: Any, *, secret: bool) -> str:
    if secret and value is not None:
        return REDACTED
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "a list",
    type(None): "null",
}


def _kind(value: Any) -> str:
    for tp, name in _TYPE_NAMES.items():
        if type(value) is tp:
            return {"true or false": "a boolean"}.get(name, name)
    return type(value).__name__


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
}


def _issue(detail: ErrorDetails, model: type[BaseModel], prefix: Sequence[str | int]) -> SpecIssue:
    kind = detail["type"]
    loc = detail["loc"]
    ctx = detail.get("ctx") or {}
    value = detail.get("input")
    path, _, secret = _walk(model, loc)
    full = list(prefix) + path
    # a secret container given the wrong type (``headers: "Bearer x"``) is masked too
    secret = secret or bool(path and path[-1] in _SECRET_CONTAINERS)
    got = _show(value, secret=secret)
    if kind == "extra_forbidden":
        parent_path, parent_tp, _ = _walk(model, loc[:-1])
        unknown = str(loc[-1])
        message = f"unknown field {unknown!r}"
        if isinstance(parent_tp, type) and issubclass(parent_tp, BaseModel):
            names = [info.alias or n for n, info in parent_tp.model_fields.items()]
            near = difflib.get_close_matches(unknown, names, n=1, cutoff=0.6)
            if near:
                message += f" (did you mean {near[0]!r}?)"
            else:
                message += f"; valid fields are {', '.join(sorted(names))}"
        return SpecIssue(format_path(list(prefix) + parent_path + [unknown]), kind, message)
    message = _message(kind, ctx, value, got, str(detail["msg"]))
    return SpecIssue(format_path(full), kind, message)


def _message(kind: str, ctx: Mapping[str, Any], value: Any, got: str, default: str) -> str:
    if kind == "missing":
        return "required field is missing"
    if kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        op = {
            "less_than_equal": "<=",
            "less_than": "<",
            "greater_than_equal": ">=",
            "greater_than": ">",
        }[kind]
        bound = ctx.get({"<=": "le", "<": "lt", ">=": "ge", ">": "gt"}[op])
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {op} {bound} (got {got})"
    if kind == "string_too_short":
        n = ctx.get("min_length", 1)
        if n == 1:
            return "must not be empty"
        return f"must be at least {n} characters (got {len(value)})"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters (got {len(value)})"
    if kind in ("too_long", "too_short"):
        word = "most" if kind == "too_long" else "least"
        bound = ctx.get("max_length" if kind == "too_long" else "min_length")
        actual = ctx.get("actual_length")
        if actual is None and hasattr(value, "__len__"):
            actual = len(value)  # a dict stops counting at the limit; ctx has no length
        return f"must have at {word} {bound} items (got {actual})"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')} (got {got})"
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]} (got {_kind(value)} {got})"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')} (got {got})"
    if kind == "union_tag_invalid":
        return (
            f"{ctx.get('discriminator')} must be one of {ctx.get('expected_tags')} "
            f"(got {_show(ctx.get('tag'), secret=False)})"
        )
    if kind == "union_tag_not_found":
        return f"required field {ctx.get('discriminator')} is missing"
    if kind in ("json_invalid", "json_type"):
        return f"invalid JSON: {ctx.get('error', default)}"
    if kind == "value_error":
        return str(ctx.get("error", default)).removeprefix("Value error, ")
    return default


# ------------------------------------------------------------ cross-field checks


def check_agent(name: str, spec: AgentSpec) -> list[SpecIssue]:
    """Checks that span fields of one agent: self-partnering and duplicates."""
    issues: list[SpecIssue] = []
    me = resource_name(name)
    seen: dict[str, int] = {}
    for i, ref in enumerate(spec.mcp_servers):
        if ref.mcp_server_name in seen:
            issues.append(
                SpecIssue(
                    f"mcpServers[{i}].mcpServerName",
                    "duplicate",
                    f"duplicate MCP server {ref.mcp_server_name!r} "
                    f"(already at mcpServers[{seen[ref.mcp_server_name]}])",
                )
            )
        else:
            seen[ref.mcp_server_name] = i
    partners: dict[str, int] = {}
    for i, partner in enumerate(spec.partner_agents):
        target = resource_name(partner.agent_name)
        if target == me:
            issues.append(
                SpecIssue(
                    f"partnerAgents[{i}].agentName",
                    "self_reference",
                    f"an agent cannot list itself as a partner (got {partner.agent_name!r})",
                )
            )
        elif target in partners:
            issues.append(
                SpecIssue(
                    f"partnerAgents[{i}].agentName",
                    "duplicate",
                    f"duplicate partner agent {partner.agent_name!r} "
                    f"(already at partnerAgents[{partners[target]}])",
                )
            )
        else:
            partners[target] = i
    return issues


def prompt_issues(
    spec: AgentSpec, prompts: Mapping[str, Collection[str]], labels: Collection[str] = ()
) -> tuple[list[SpecIssue], list[SpecIssue]]:
    """``(errors, warnings)`` of the agent's prompt against the Prompt Center: ``prompts``
    maps each stored key to its versions, ``labels`` are the release labels of the agent's
    prompt. An unknown key or pinned version is an error (the agent could not start); a
    label nobody has set yet is a warning."""
    base = spec.base
    versions = prompts.get(base.prompt_key)
    if versions is None:
        known = ", ".join(sorted(prompts)[:10]) or "none"
        return [
            SpecIssue(
                "base.promptKey",
                "unknown_prompt",
                f"no prompt {base.prompt_key!r} in the Prompt Center (apply its Prompt first; "
                f"known: {known})",
            )
        ], []
    if base.prompt_version is not None and base.prompt_version not in versions:
        return [
            SpecIssue(
                "base.promptVersion",
                "unknown_version",
                f"prompt {base.prompt_key!r} has no version {base.prompt_version!r} "
                f"(it has {', '.join(sorted(versions))})",
            )
        ], []
    if base.prompt_label is not None and base.prompt_label not in labels:
        return [], [
            SpecIssue(
                "base.promptLabel",
                "unknown_label",
                f"prompt {base.prompt_key!r} has no release label {base.prompt_label!r} yet",
                "warning",
            )
        ]
    return [], []


def reference_warnings(
    spec: AgentSpec, *, agents: Iterable[str], mcp_servers: Iterable[str]
) -> list[SpecIssue]:
    """Partners and MCP servers the spec names that are not stored (yet): warnings, since
    either may be applied after the agent."""
    known_agents = {resource_name(a) for a in agents}
    known_servers = set(mcp_servers)
    warnings = [
        SpecIssue(
            f"partnerAgents[{i}].agentName",
            "unknown_agent",
            f"partner agent {p.agent_name!r} is not applied yet (calls to it fail until it is)",
            "warning",
        )
        for i, p in enumerate(spec.partner_agents)
        if resource_name(p.agent_name) not in known_agents
    ]
    warnings += [
        SpecIssue(
            f"mcpServers[{i}].mcpServerName",
            "unregistered",
            f"MCP server {m.mcp_server_name!r} is not in the MCP Registry yet",
            "warning",
        )
        for i, m in enumerate(spec.mcp_servers)
        if m.mcp_server_name not in known_servers
    ]
    return warnings


def find_partner_cycles(graph: Mapping[str, Sequence[str]], start: str) -> list[list[str]]:
    """Cycles through ``start`` in the partner graph (names compared by resource name).

    Each cycle is listed once, starting and ending at ``start``: ``[a, b, a]``.
    """
    norm = {resource_name(k): [resource_name(v) for v in vs] for k, vs in graph.items()}
    origin = resource_name(start)
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in norm.get(node, []):
            if nxt == origin:
                cycles.append([*trail, nxt])
            elif nxt not in trail:
                visit(nxt, [*trail, nxt])

    visit(origin, [origin])
    return cycles
