"""Reading manifests: one YAML/JSON document, a multi-document file, or a folder.

Accepted forms:

* a document with ``apiVersion: specmesh.io/v1``, ``kind`` (Agent, Prompt, McpServer,
  Release), ``metadata.name`` and ``spec``; a YAML file may hold several (``---``);
* a Prompt Center entry as the seed writes it (``promptKey``, ``version``, ``template``...);
* an agent folder holding the six part files (``agent-base.json``, ``model.json``,
  ``mcp-servers.json``, ``partner-agents.json``, ``knowledge.json``, ``memory.json``);
  the folder's name is the agent's name; ``agent-base.json`` and ``model.json`` are
  required;
* any other folder: every ``.json``/``.yaml``/``.yml`` file and agent folder in it, in
  name order.

Everything is normalised to manifest models; errors name the file, and the line and
column for malformed JSON/YAML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from specmesh.errors import ManifestParseError, SpecError, SpecIssue

from .models import (
    API_VERSION,
    AgentBase,
    AgentManifest,
    AgentSpec,
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
    "PART_FILES",
    "LoadedManifest",
    "load_agent_folder",
    "load_path",
    "parse_documents",
    "parse_manifest",
]

MAX_DOCUMENT_BYTES = 1024 * 1024
"""Largest manifest file accepted (etcd's request limit is 1.5 MiB)."""

#: part wire name -> (file name, model of the file, key holding the part inside the file)
PART_FILES: dict[str, tuple[str, type[Any], str | None]] = {
    "base": ("agent-base.json", AgentBase, None),
    "model": ("model.json", ModelSpec, None),
    "mcpServers": ("mcp-servers.json", McpServersPart, "mcpServers"),
    "partnerAgents": ("partner-agents.json", PartnerAgentsPart, "agents"),
    "knowledge": ("knowledge.json", KnowledgeSpec, None),
    "memory": ("memory.json", MemorySpec, None),
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


def load_path(path: str | Path) -> list[LoadedManifest]:
    """Load every manifest at ``path`` (file or folder); raise SpecError on the first bad one."""
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
    text = _read(p)
    return [
        LoadedManifest(source, parse_manifest(doc, source=source))
        for source, doc in parse_documents(text, source=str(p))
    ]


def _read(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        raise ManifestParseError(
            source=str(path),
            line=None,
            column=None,
            reason=f"file is {size} bytes; the limit is {MAX_DOCUMENT_BYTES}",
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ManifestParseError(
            source=str(path), line=None, column=None, reason=f"not UTF-8 text ({e.reason})"
        ) from None


def parse_documents(text: str, *, source: str) -> list[tuple[str, Any]]:
    """Parse JSON or (multi-document) YAML text; errors carry line and column."""
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise ManifestParseError(
            source=source,
            line=None,
            column=None,
            reason=f"document is larger than {MAX_DOCUMENT_BYTES} bytes",
        )
    if source.endswith(".json") or text.lstrip().startswith(("{", "[")):
        try:
            return [(source, json.loads(text))]
        except json.JSONDecodeError as e:
            raise ManifestParseError(
                source=source, line=e.lineno, column=e.colno, reason=f"invalid JSON: {e.msg}"
            ) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestParseError(
            source=source,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
            reason=f"invalid YAML: {problem}",
        ) from None
    if len(docs) == 1:
        return [(source, docs[0])]
    return [(f"{source}#{i + 1}", d) for i, d in enumerate(docs)]


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


def load_agent_folder(folder: Path, *, name: str | None = None) -> LoadedManifest:
    """Load the six part files of one agent; errors name the file and the path in it."""
    agent_name = name or folder.name
    issues: list[SpecIssue] = []
    parts: dict[str, Any] = {}
    for part, (filename, model, key) in PART_FILES.items():
        file = folder / filename
        if not file.exists():
            if part in _REQUIRED_PARTS:
                issues.append(SpecIssue(filename, "missing", "required part file is missing"))
            continue
        ((src, doc),) = parse_documents(_read(file), source=str(file))
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
