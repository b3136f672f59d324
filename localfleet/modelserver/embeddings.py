"""Deterministic embeddings: a signed, hashed bag of words, L2-normalised.

Each lower-cased word (a run of letters, digits or ``_``) is hashed with BLAKE2b into
one of ``dimensions`` buckets and a sign; the vector is the sum of those ``±1`` over
the words, then scaled to unit length. Two texts that share words therefore have a
positive cosine similarity, and more shared words give a higher one; texts with no
word in common are near-orthogonal (only hash collisions make them otherwise). The
same text always gives the same vector, on every machine.

A text with no word at all (empty, or only punctuation) gets a fixed unit vector, so
that a cosine against it is always defined.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from collections.abc import Sequence

__all__ = ["DEFAULT_DIMENSIONS", "cosine", "embed_text", "encode_base64"]

#: Length of the vectors when a request does not ask for another one.
DEFAULT_DIMENSIONS = 256

_WORD = re.compile(r"\w+")


def _bucket(word: str, dimensions: int) -> tuple[int, float]:
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    sign = 1.0 if value & 1 else -1.0
    return (value >> 1) % dimensions, sign


def embed_text(text: str, *, dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The unit-length embedding of ``text`` (see the module docstring)."""
    if dimensions < 1:
        raise ValueError(f"dimensions must be >= 1 (got {dimensions})")
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        index, sign = _bucket(word, dimensions)
        vector[index] += sign
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:
        vector[0] = 1.0
        return vector
    return [x / norm for x in vector]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors of the same length (0.0 if either is zero)."""
    if len(a) != len(b):
        raise ValueError(f"vectors differ in length ({len(a)} != {len(b)})")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return dot / (na * nb)


def encode_base64(vector: Sequence[float]) -> str:
    """``vector`` as little-endian float32 bytes in base64 (OpenAI ``encoding_format``)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
