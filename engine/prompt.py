"""The system prompt: which Prompt Center version a conversation gets, rendered.

Version choice, in order:

1. ``base.promptVersion`` pins one version;
2. ``base.promptLabel`` takes the version the prompt's release gives that label;
3. the release's A/B ``weights`` split conversations: the contextId is hashed into one of
   100 buckets, so the same conversation always gets the same version;
4. otherwise the release's ``current`` version (set by a prompt rollback), else the highest
   version (``3.0.11`` > ``3.0.9`` > ``3.0``).

The snapshot carries only the versions the served agent revision recorded (see
:mod:`specmesh.resolution`), so this choice replays what was resolved when it was written.

Templates hold ``{{name}}`` placeholders filled from the prompt's default variables,
overridden by ``base.variables``; an unknown placeholder is left as written.
Every version is rendered once when the context is built; a turn only picks one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from specmesh.resolution import version_key
from specmesh.snapshot import PromptBundle
from specmesh.spec.models import AgentBase, PromptEntry

from .errors import PromptError

__all__ = ["PromptSet", "RenderedPrompt", "bucket_of", "render_template", "version_key"]

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")


@dataclass(frozen=True)
class RenderedPrompt:
    """One version of the system prompt, ready to send."""

    version: str
    text: str


def render_template(template: str, variables: Mapping[str, str]) -> str:
    """Fill ``{{name}}`` placeholders; unknown names are left as written."""

    def fill(m: re.Match[str]) -> str:
        return variables.get(m.group(1), m.group(0))

    return _PLACEHOLDER.sub(fill, template)


def bucket_of(context_id: str) -> int:
    """The A/B bucket (0..99) of a conversation; stable across processes and restarts."""
    digest = hashlib.sha256(context_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


@dataclass(frozen=True)
class PromptSet:
    """Every rendered version of the agent's prompt and the rule choosing one."""

    prompt_key: str
    rendered: Mapping[str, RenderedPrompt]
    fixed: str | None
    """The version every conversation gets (pinned, labelled or the highest), if any."""
    weights: tuple[tuple[str, int], ...]
    """A/B split as (version, percent), in version order; used when ``fixed`` is None."""

    @classmethod
    def build(cls, base: AgentBase, bundle: PromptBundle) -> PromptSet:
        """Render every version; raise :class:`PromptError` if none can be chosen."""
        key = base.prompt_key
        if not bundle.versions:
            raise PromptError(prompt_key=key, reason="no version in the Prompt Center")
        rendered = {
            v: RenderedPrompt(version=v, text=_render(entry, base.variables))
            for v, entry in bundle.versions.items()
        }
        release = bundle.release
        fixed: str | None = None
        weights: tuple[tuple[str, int], ...] = ()
        if base.prompt_version is not None:
            fixed = base.prompt_version
            if fixed not in rendered:
                raise PromptError(prompt_key=key, reason=f"pinned version {fixed!r} not found")
        elif base.prompt_label is not None:
            label = base.prompt_label
            fixed = release.labels.get(label) if release else None
            if fixed is None:
                raise PromptError(prompt_key=key, reason=f"no version has label {label!r}")
            if fixed not in rendered:
                raise PromptError(
                    prompt_key=key, reason=f"label {label!r} names missing version {fixed!r}"
                )
        elif release is not None and release.weights:
            missing = [v for v, w in release.weights.items() if w and v not in rendered]
            if missing:
                raise PromptError(
                    prompt_key=key, reason=f"A/B weights name missing versions {missing}"
                )
            weights = tuple(
                (v, w)
                for v, w in sorted(release.weights.items(), key=lambda kv: version_key(kv[0]))
                if w > 0
            )
        elif release is not None and release.current is not None:
            fixed = release.current
            if fixed not in rendered:
                raise PromptError(prompt_key=key, reason=f"current version {fixed!r} not found")
        else:
            fixed = max(rendered, key=version_key)
        return cls(prompt_key=key, rendered=rendered, fixed=fixed, weights=weights)

    def choose(self, context_id: str) -> RenderedPrompt:
        """The version this conversation gets."""
        if self.fixed is not None:
            return self.rendered[self.fixed]
        bucket = bucket_of(context_id)
        upper = 0
        for version, weight in self.weights:
            upper += weight
            if bucket < upper:
                return self.rendered[version]
        return self.rendered[self.weights[-1][0]]


def _render(entry: PromptEntry, overrides: Mapping[str, str]) -> str:
    return render_template(entry.template, {**entry.variables, **overrides})
