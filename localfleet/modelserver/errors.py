"""Errors of the scripted model server::

    SpecmeshError
    +-- SpecError              (specmesh.errors) ``issues``: list of SpecIssue, ``source``
        +-- ScriptError        a script is invalid: not JSON/YAML, or a rule breaks the schema

A :class:`ScriptError` is a :class:`~specmesh.errors.SpecError`, so the CLI maps it to
the "invalid" exit code and every issue names its path in the script
(``rules[0].match.lastUser: invalid regular expression: ...``).

Problems of a *request* (bad JSON, no ``messages``) are not raised: the server answers
them with an OpenAI-style error body and a 4xx status, as the real API does.
"""

from __future__ import annotations

from collections.abc import Sequence

from specmesh.errors import SpecError, SpecIssue

__all__ = ["ScriptError"]


class ScriptError(SpecError):
    """A script is invalid; ``issues`` lists every problem with its path."""

    def __init__(self, issues: Sequence[SpecIssue], *, source: str | None = None) -> None:
        super().__init__(issues, source=source)
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  {i}" for i in self.issues)
        n = len(self.issues)
        self.args = (f"{head}{n} problem{'s' if n != 1 else ''} in script:\n{lines}",)
