"""Paging of the API's list calls, one way for every list and every transport.

A list call takes a :class:`PageRequest` (``page_size``: 0 for :data:`DEFAULT_PAGE_SIZE`,
at most :data:`MAX_PAGE_SIZE`; ``page_token``: empty for the first page) and answers a
:class:`Page` whose ``next_page_token`` is empty on the last page. Tokens are opaque to
clients (an offset into the list, base64url); a malformed one is a
:class:`~control_plane.errors.BadRequestError` naming ``page_token``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from control_plane.errors import BadRequestError

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Page", "PageRequest", "paginate"]

DEFAULT_PAGE_SIZE = 100
"""Page size when a request's ``page_size`` is 0."""
MAX_PAGE_SIZE = 1000
"""Larger page sizes are reduced to this."""

_T = TypeVar("_T")
_KIND = "offset"


@dataclass(frozen=True)
class PageRequest:
    """Which page a list call asks for."""

    page_size: int = 0
    page_token: str = ""

    @property
    def size(self) -> int:
        """The page size to use: the default for 0, at most :data:`MAX_PAGE_SIZE`."""
        if self.page_size < 0:
            raise BadRequestError(f"page_size: must be >= 0 (got {self.page_size})")
        return min(self.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

    @property
    def offset(self) -> int:
        """Where the page starts in the whole list."""
        if not self.page_token:
            return 0
        try:
            raw = base64.urlsafe_b64decode(self.page_token.encode()).decode()
            kind, _, number = raw.partition(":")
            offset = int(number)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadRequestError("page_token: not a token from a previous response") from None
        if kind != _KIND or offset < 0:
            raise BadRequestError("page_token: not a token from a previous response")
        return offset

    @property
    def end(self) -> int:
        """Where the page ends (exclusive): for sources that read the first ``n`` items."""
        return self.offset + self.size


@dataclass(frozen=True)
class Page(Generic[_T]):
    """One page of a list and the token of the next (empty on the last page)."""

    items: list[_T]
    next_page_token: str = ""


def paginate(items: Sequence[_T], request: PageRequest) -> Page[_T]:
    """The page of ``items`` (the whole list, in its final order) that ``request`` asks
    for. A source that reads only its first ``n`` items may read ``request.end + 1`` and
    pass those: one past the page tells whether a next page exists."""
    offset, end = request.offset, request.end
    token = ""
    if end < len(items):
        token = base64.urlsafe_b64encode(f"{_KIND}:{end}".encode()).decode()
    return Page(list(items[offset:end]), token)
