"""Cutting documents into overlapping chunks, and the chunk ids that make ingest idempotent.

A chunk is at most ``size`` characters of the document. Its end is the last paragraph
break in the second half of that window, else the last sentence end there, else the
last whitespace, else the window's end (a hard cut). The next chunk starts at most
``overlap`` characters before that end: at the first sentence (or paragraph) start inside
those ``overlap`` characters, else the first word start, else exactly ``overlap`` back.
Consecutive chunks therefore share at most ``overlap`` characters, and both usually begin
and end on sentence boundaries. Leading and trailing whitespace of a chunk is dropped;
``start``/``end`` are its offsets in the document.

A chunk's id is a hash of (source, position, text): the same document gives the same
ids on every ingest, so re-ingesting it writes nothing, and an edited document keeps
the ids of the chunks it did not change.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["Chunk", "chunk_id", "chunk_text", "document_digest"]

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f][\"')\]\u201d\u2019]*\s+")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunk:
    """One piece of a document."""

    id: str
    source: str
    position: int
    """0-based index of the chunk in its document."""
    start: int
    """Offset of the chunk's first character in the document."""
    end: int
    """Offset just past its last character."""
    text: str


def chunk_id(source: str, position: int, text: str) -> str:
    """The chunk's stable id: a hash of (source, position, text)."""
    digest = hashlib.sha256()
    for part in (source, str(position), text):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def document_digest(text: str) -> str:
    """A hash of a whole document (kept beside its chunks)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _last_end(pattern: re.Pattern[str], text: str, lo: int, hi: int) -> int | None:
    """End of the last match of ``pattern`` inside text[lo:hi], or None."""
    found = None
    for m in pattern.finditer(text, lo, hi):
        found = m.end()
    return found


def _cut(text: str, start: int, size: int) -> int:
    """Where the chunk starting at ``start`` ends (see the module docstring)."""
    limit = start + size
    if limit >= len(text):
        return len(text)
    lo = start + size // 2
    for pattern in (_PARAGRAPH, _SENTENCE_END, _SPACE):
        end = _last_end(pattern, text, lo, limit)
        if end is not None and end > start:
            return end
    return limit


def _restart(text: str, start: int, end: int, overlap: int) -> int:
    """Where the chunk after text[start:end] starts (see the module docstring)."""
    if overlap <= 0:
        return end
    lo = max(start + 1, end - overlap)
    for pattern in (_PARAGRAPH, _SENTENCE_END, _SPACE):
        m = pattern.search(text, lo, end)
        if m is not None and m.end() < end:
            return m.end()
    return lo


def chunk_text(text: str, *, source: str, size: int, overlap: int) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``size`` characters sharing at most ``overlap``."""
    if size < 1:
        raise ValueError(f"size must be >= 1 (got {size})")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in 0..size-1 (got {overlap}, size {size})")
    chunks: list[Chunk] = []
    n = len(text)
    start = 0
    while start < n:
        end = _cut(text, start, size)
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            first = start + lead
            position = len(chunks)
            chunks.append(
                Chunk(
                    id=chunk_id(source, position, stripped),
                    source=source,
                    position=position,
                    start=first,
                    end=first + len(stripped),
                    text=stripped,
                )
            )
        if end >= n:
            break
        start = _restart(text, start, end, overlap)
    return chunks
