"""Reading manifests: one YAML/JSON document, a multi-document file, or a folder.

Accepted forms:

* a document with ``apiVersion: specmesh.io/v1``, ``kind`` (Agent, Prompt, McpServer,
  Release), ``metadata.name`` and ``spec``; a YAML file may hold several (``---``);
* a Prompt Center entry as the seed writes it (``promptKey``, ``version``, ``template``...);
* an agent folder holding the six part files (``agent-base.json``, ``model.json``,
  ``mcp-servers.json``, ``partner-agents.json``, ``knowledge.json``, ``memory.json``, and
  optionally ``deployment.json``);
  the folder's name is the agent's name; ``agent-base.json`` and ``model.json`` are
  required;
* any other folder: every ``.json``/``.yaml``/``.yml`` file and agent folder in it, in
  name order.

``-`` names standard input (``specmesh get agent X -o yaml | specmesh apply -f -``); its
source is ``<stdin>``.

Everything is normalised to manifest models; errors name the file, and the line and
column for malformed JSON/YAML.

A manifest comes from outside, so reading one is bounded: at most
:data:`MAX_DOCUMENT_BYTES` of UTF-8, lists and objects nested at most
:data:`MAX_NESTING_DEPTH` deep, at most :data:`MAX_NODES` values once YAML aliases are
expanded (a "billion laughs" file is refused as soon as one anchor grows too big, in
time linear in the file), no duplicate keys, and at least one document. Each refusal is a
:class:`~specmesh.errors.ManifestParseError` naming the file, line and column.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import yaml
from yaml.events import CollectionEndEvent, CollectionStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode

from specmesh.errors import ManifestParseError, SpecError, SpecIssue

from .models import (
    API_VERSION,
    AgentBase,
    AgentManifest,
    AgentSpec,
    DeploymentSpec,
    KnowledgeSpec,
    McpServerManifest,
    McpServersPart,
    MemorySpec,
    Metadata,
    ModelSpec,
    PartnerAgentsPart,
    PromptEntry,
    PromptManifest,
    PromptSpec,
    ReleaseManifest,
)
from .validation import check_agent, validate_model

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_NESTING_DEPTH",
    "MAX_NODES",
    "PART_FILES",
    "STDIN",
    "LoadedManifest",
    "load_agent_folder",
    "load_path",
    "parse_documents",
    "parse_manifest",
]

MAX_DOCUMENT_BYTES = 1024 * 1024
"""Largest manifest file accepted (etcd's request limit is 1.5 MiB)."""

MAX_NESTING_DEPTH = 64
"""Most lists/objects nested inside each other in one document (manifests nest about ten
deep; the bound keeps the recursive parsers and validators far from Python's stack limit)."""

MAX_NODES = 20_000
"""Most values (scalars, lists, objects; a mapping key counts as one) a file may hold once
YAML aliases are expanded. Every alias adds at least one value, so this bounds aliases
too; a file within :data:`MAX_DOCUMENT_BYTES` without aliases rarely comes close."""

STDIN = "-"
"""The path that names standard input; its source is ``<stdin>``."""

_STDIN_SOURCE = "<stdin>"

#: part wire name -> (file name, model of the file, key holding the part inside the file)
PART_FILES: dict[str, tuple[str, type[Any], str | None]] = {
    "base": ("agent-base.json", AgentBase, None),
    "model": ("model.json", ModelSpec, None),
    "mcpServers": ("mcp-servers.json", McpServersPart, "mcpServers"),
    "partnerAgents": ("partner-agents.json", PartnerAgentsPart, "agents"),
    "knowledge": ("knowledge.json", KnowledgeSpec, None),
    "memory": ("memory.json", MemorySpec, None),
    "deployment": ("deployment.json", DeploymentSpec, None),
}
_REQUIRED_PARTS = ("base", "model")
_ENVELOPES: dict[str, type[Any]] = {
    "Agent": AgentManifest,
    "Prompt": PromptManifest,
    "McpServer": McpServerManifest,
    "Release": ReleaseManifest,
}
_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class LoadedManifest:
    """A validated manifest and where it came from."""

    source: str
    manifest: Any  # one of the Manifest union's members

    @property
    def kind(self) -> str:
        return str(self.manifest.kind)

    @property
    def name(self) -> str:
        return str(self.manifest.metadata.name)


def load_path(path: str | Path, *, stdin: BinaryIO | None = None) -> list[LoadedManifest]:
    """Load every manifest at ``path`` (file, folder, or ``-`` for standard input); raise
    SpecError on the first bad one. ``stdin`` replaces ``sys.stdin.buffer`` for ``-``."""
    if str(path) == STDIN:
        text = _read_stdin(stdin)
        return _load_text(text, source=_STDIN_SOURCE)
    p = Path(path)
    if not p.exists():
        raise SpecError([SpecIssue("", "not_found", f"{p}: no such file or folder")])
    if p.is_dir():
        if any((p / f).exists() for f, _, _ in PART_FILES.values()):
            return [load_agent_folder(p)]
        out: list[LoadedManifest] = []
        for child in sorted(p.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() or child.suffix in _SUFFIXES:
                out.extend(load_path(child))
        return out
    return _load_text(_read(p), source=str(p))


def _load_text(text: str, *, source: str) -> list[LoadedManifest]:
    return [
        LoadedManifest(src, parse_manifest(doc, source=src))
        for src, doc in _documents(text, source=source)
    ]


def _documents(text: str, *, source: str) -> list[tuple[str, Any]]:
    """:func:`parse_documents`, refusing a file with no document in it."""
    docs = parse_documents(text, source=source) if text.strip() else []
    if not docs:
        raise ManifestParseError(
            source=source,
            line=None,
            column=None,
            reason="no manifest in it (it is empty, or holds only comments and `---`)",
        )
    return docs


def _read(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise ManifestParseError(
                source=str(path),
                line=None,
                column=None,
                reason=f"file is {size} bytes; the limit is {MAX_DOCUMENT_BYTES}",
            )
        with path.open("rb") as f:  # bounded even where st_size says nothing (a FIFO)
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as e:
        raise ManifestParseError(
            source=str(path), line=None, column=None, reason=f"cannot read it: {e.strerror}"
        ) from None
    return _decode(data, source=str(path))


def _read_stdin(stdin: BinaryIO | None) -> str:
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise ManifestParseError(
            source=_STDIN_SOURCE, line=None, column=None, reason="standard input is closed"
        )
    try:
        data = stream.read(MAX_DOCUMENT_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: read from a closed file
        raise ManifestParseError(
            source=_STDIN_SOURCE, line=None, column=None, reason=f"cannot read it: {e}"
        ) from None
    return _decode(data, source=_STDIN_SOURCE)


def _decode(data: bytes, *, source: str) -> str:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ManifestParseError(
            source=source,
            line=None,
            column=None,
            reason=f"larger than the limit of {MAX_DOCUMENT_BYTES} bytes",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestParseError(
            source=source, line=None, column=None, reason=f"not UTF-8 text ({e.reason})"
        ) from None


def parse_documents(text: str, *, source: str) -> list[tuple[str, Any]]:
    """Parse JSON or (multi-document) YAML text; errors carry line and column.

    A ``.json`` source, or text starting with ``{`` or ``[``, is read as JSON (so the
    output of ``specmesh get -o json`` reads back whatever the file is called); anything
    else as YAML. Empty text gives no documents. The bounds of this module apply.
    """
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise ManifestParseError(
            source=source,
            line=None,
            column=None,
            reason=f"document is larger than {MAX_DOCUMENT_BYTES} bytes",
        )
    if source.endswith(".json") or text.lstrip().startswith(("{", "[")):
        return [(source, _parse_json(text, source=source))]
    docs = _parse_yaml(text, source=source)
    if len(docs) == 1:
        return [(source, docs[0])]
    return [(f"{source}#{i + 1}", d) for i, d in enumerate(docs)]


# ---------------------------------------------------------------- bounded JSON

# a whole string | one structural character | a bare word (number, true, false, null)
# | a lone quote (an unterminated string: json.loads reports it)
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:,]|[^\s"\[\]{}:,]+|"')


def _parse_json(text: str, *, source: str) -> Any:
    _check_json(text, source=source)  # before json.loads, which recurses per level
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestParseError(
            source=source, line=e.lineno, column=e.colno, reason=f"invalid JSON: {e.msg}"
        ) from None


def _check_json(text: str, *, source: str) -> None:
    """One linear pass over the tokens: refuse deep nesting, too many values and
    duplicate keys, with the position of the offending token. Syntax is json.loads's job;
    this pass stops where it cannot follow the text."""
    stack: list[dict[str, int] | None] = []  # per open container: keys seen, or None (list)
    values = 0
    last_string: tuple[str, int] | None = None  # a string token and where it starts
    for m in _JSON_TOKEN.finditer(text):
        token, at = m.group(), m.start()
        first = token[0]
        string, last_string = last_string, None
        if first in "[{":
            if len(stack) >= MAX_NESTING_DEPTH:
                raise _refused(text, at, source, _too_deep())
            stack.append({} if first == "{" else None)
            values += 1
        elif first in "]}":
            if stack:
                stack.pop()
        elif first == ":":
            keys = stack[-1] if stack else None
            if keys is not None and string is not None:
                key = _json_key(string[0])
                if key is None:
                    return
                if key in keys:
                    first_at = _line_column(text, keys[key])
                    raise _refused(text, string[1], source, _duplicate(key, *first_at))
                keys[key] = string[1]
        elif first == '"':
            if len(token) == 1:
                return
            last_string = (token, at)
            values += 1
        elif first != ",":
            values += 1
        if values > MAX_NODES:
            raise _refused(text, at, source, _too_many())


def _json_key(token: str) -> str | None:
    if "\\" not in token:
        return token[1:-1]
    try:
        key = json.loads(token)
    except json.JSONDecodeError:
        return None
    return key if isinstance(key, str) else None


def _line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of ``offset``, counted as json.JSONDecodeError does."""
    return text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)


def _refused(text: str, offset: int, source: str, reason: str) -> ManifestParseError:
    line, column = _line_column(text, offset)
    return ManifestParseError(source=source, line=line, column=column, reason=reason)


def _too_deep() -> str:
    return f"lists/objects nested more than {MAX_NESTING_DEPTH} deep (the limit)"


def _too_many() -> str:
    return (
        f"more than {MAX_NODES} values once aliases are expanded (the limit); "
        "a manifest is far smaller"
    )


def _duplicate(key: Any, line: int, column: int) -> str:
    return f"duplicate key {key!r} (first at line {line}, column {column})"


# ---------------------------------------------------------------- bounded YAML

_MERGE_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")


class _Refused(yaml.MarkedYAMLError):
    """The YAML is well formed, but breaks one of this module's bounds."""

    def __init__(self, reason: str, mark: Any) -> None:  # event marks are loosely typed
        super().__init__(problem=reason, problem_mark=mark)


class _YamlBounds:
    """Watches a YAML event stream and refuses it as soon as it breaks a bound.

    Counting events rather than nodes makes every check happen before the composer
    recurses or the constructor expands anything: a collection is refused on its start
    event when it would nest too deep; an alias adds the expanded size of its anchor,
    measured once when the anchored node closed, so a "billion laughs" file is refused
    at the alias that crosses :data:`MAX_NODES`, in time linear in the file.
    """

    def __init__(self) -> None:
        self._values = 0  # expanded values so far, over every document of the file
        self._open: list[tuple[str | None, int]] = []  # open collections: anchor, values before
        self._sizes: dict[str, int] = {}  # closed anchor -> expanded size, this document

    def see(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.DocumentStartEvent):
            self._sizes = {}  # anchors are per document
        elif isinstance(event, yaml.AliasEvent):
            anchor = event.anchor
            if any(open_anchor == anchor for open_anchor, _ in self._open):
                raise _Refused(
                    f"alias *{anchor} refers to a node that contains it", event.start_mark
                )
            self._add(self._sizes.get(anchor or "", 0), event)  # undefined: the composer says
        elif isinstance(event, yaml.ScalarEvent):
            self._add(1, event)
            if event.anchor is not None:
                self._sizes[event.anchor] = 1
        elif isinstance(event, CollectionStartEvent):
            if len(self._open) >= MAX_NESTING_DEPTH:
                raise _Refused(_too_deep(), event.start_mark)
            self._open.append((event.anchor, self._values))
            self._add(1, event)
        elif isinstance(event, CollectionEndEvent) and self._open:
            anchor, before = self._open.pop()
            if anchor is not None:
                self._sizes[anchor] = self._values - before

    def _add(self, values: int, event: yaml.Event) -> None:
        self._values += values
        if self._values > MAX_NODES:
            raise _Refused(_too_many(), event.start_mark)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that enforces the bounds on every event the composer takes, and refuses
    duplicate keys.

    Duplicates are looked for on each composed mapping, before merge keys (``<<``) are
    flattened, so a key that overrides a merged one stays allowed, as YAML intends.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._bounds = _YamlBounds()

    def get_event(self) -> Any:
        event = super().get_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
        self._bounds.see(event)
        return event

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag in _MERGE_TAGS:
                continue  # a collection key is unhashable: the constructor refuses it
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable: the constructor refuses it
                continue
            if first is not key_node:
                mark = first.start_mark
                raise _Refused(_duplicate(key, mark.line + 1, mark.column + 1), key_node.start_mark)
        return node


def _parse_yaml(text: str, *, source: str) -> list[Any]:
    try:
        return [d for d in yaml.load_all(text, Loader=_BoundedLoader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestParseError(
            source=source,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
            reason=problem if isinstance(e, _Refused) else f"invalid YAML: {problem}",
        ) from None


def parse_manifest(doc: Any, *, source: str) -> Any:
    """Validate one parsed document as a manifest (or a seed-style prompt entry)."""
    if not isinstance(doc, dict):
        raise SpecError(
            [
                SpecIssue(
                    "", "dict_type", f"a manifest must be an object (got {type(doc).__name__})"
                )
            ],
            source=source,
        )
    if "apiVersion" not in doc and "kind" not in doc and "promptKey" in doc:
        entry = validate_model(PromptEntry, doc, source=source)
        return prompt_manifest_from_entry(entry)
    if "kind" not in doc:
        raise SpecError(
            [
                SpecIssue(
                    "kind",
                    "missing",
                    "required field is missing "
                    f"(a manifest has apiVersion: {API_VERSION}, kind, metadata, spec)",
                )
            ],
            source=source,
        )
    envelope = _ENVELOPES.get(str(doc.get("kind")))
    if envelope is None:
        got = json.dumps(doc.get("kind"))
        raise SpecError(
            [
                SpecIssue(
                    "kind",
                    "literal_error",
                    f"must be one of {', '.join(repr(k) for k in _ENVELOPES)} (got {got})",
                )
            ],
            source=source,
        )
    # `status` is what the server observed (`specmesh get -o yaml` prints it): read-only,
    # dropped here as kubectl's apply drops it, so what `get` prints applies back unchanged
    doc = {k: v for k, v in doc.items() if k != "status"}
    manifest = validate_model(envelope, doc, source=source)
    if isinstance(manifest, AgentManifest):
        issues = check_agent(manifest.metadata.name, manifest.spec)
        if issues:
            raise SpecError(
                [SpecIssue(f"spec.{i.path}", i.rule, i.message, i.severity) for i in issues],
                source=source,
            )
    return manifest


def prompt_manifest_from_entry(entry: PromptEntry) -> PromptManifest:
    """The manifest form of a seed-style Prompt Center entry."""
    return PromptManifest(
        api_version=API_VERSION,
        kind="Prompt",
        metadata=Metadata(name=entry.prompt_key),
        spec=PromptSpec(
            version=entry.version,
            template=entry.template,
            variables=entry.variables,
            description=entry.description,
        ),
    )


def _unknown_part_files(folder: Path) -> list[SpecIssue]:
    """A JSON/YAML file in an agent folder that is none of the six parts is a mistake (a
    misspelt ``mcp-server.json`` would otherwise be silently left out of the agent)."""
    known = [f for f, _, _ in PART_FILES.values()]
    issues = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or child.suffix not in _SUFFIXES or child.name in known:
            continue
        close = difflib.get_close_matches(child.name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        issues.append(
            SpecIssue(
                child.name,
                "unknown_part_file",
                f"not a part file ({hint}an agent folder holds {', '.join(known)})",
            )
        )
    return issues


def load_agent_folder(folder: Path, *, name: str | None = None) -> LoadedManifest:
    """Load the six part files of one agent; errors name the file and the path in it."""
    agent_name = name or folder.name
    issues: list[SpecIssue] = _unknown_part_files(folder)
    parts: dict[str, Any] = {}
    for part, (filename, model, key) in PART_FILES.items():
        file = folder / filename
        if not file.exists():
            if part in _REQUIRED_PARTS:
                issues.append(SpecIssue(filename, "missing", "required part file is missing"))
            continue
        docs = _documents(_read(file), source=str(file))
        if len(docs) > 1:
            raise ManifestParseError(
                source=str(file),
                line=None,
                column=None,
                reason=f"holds {len(docs)} documents; a part file holds one",
            )
        ((src, doc),) = docs
        try:
            value = validate_model(model, doc, source=src)
        except SpecError as e:
            issues.extend(
                SpecIssue(f"{filename}: {i.path}" if i.path else filename, i.rule, i.message)
                for i in e.issues
            )
            continue
        dumped = value.model_dump(mode="json")
        parts[part] = dumped[key] if key else dumped
    if issues:
        raise SpecError(issues, source=str(folder))
    metadata = validate_model(Metadata, {"name": agent_name}, source=str(folder))
    spec = validate_model(AgentSpec, parts, source=str(folder))
    cross = check_agent(agent_name, spec)
    if cross:
        raise SpecError([_to_file_issue(i) for i in cross], source=str(folder))
    manifest = AgentManifest(api_version=API_VERSION, kind="Agent", metadata=metadata, spec=spec)
    return LoadedManifest(str(folder), manifest)


def _to_file_issue(issue: SpecIssue) -> SpecIssue:
    for part, (filename, _, key) in PART_FILES.items():
        if issue.path.startswith(part):
            rest = issue.path[len(part) :]
            inner = f"{key}{rest}" if key else rest.lstrip(".")
            return SpecIssue(f"{filename}: {inner}", issue.rule, issue.message, issue.severity)
    return issue
