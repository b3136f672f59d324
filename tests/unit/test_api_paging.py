"""Paging of the API's list calls (control_plane/paging.py)."""

from __future__ import annotations

import pytest

from control_plane.errors import BadRequestError
from control_plane.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageRequest, paginate


def test_pages_walk_the_whole_list_in_order() -> None:
    items = list(range(7))
    seen: list[int] = []
    request = PageRequest(page_size=3)
    while True:
        page = paginate(items, request)
        seen.extend(page.items)
        if not page.next_page_token:
            break
        request = PageRequest(page_size=3, page_token=page.next_page_token)
    assert seen == items


def test_an_exact_last_page_has_no_next_token() -> None:
    assert paginate([1, 2], PageRequest(page_size=2)).next_page_token == ""


def test_zero_is_the_default_size_and_large_sizes_are_capped() -> None:
    items = list(range(MAX_PAGE_SIZE + 5))
    assert len(paginate(items, PageRequest()).items) == DEFAULT_PAGE_SIZE
    assert len(paginate(items, PageRequest(page_size=10**6)).items) == MAX_PAGE_SIZE


@pytest.mark.parametrize("token", ["nope", "b2Zmc2V0Oi0x", "a2luZDox"], ids=["junk", "neg", "kind"])
def test_a_token_not_from_a_response_is_refused_naming_the_field(token: str) -> None:
    with pytest.raises(BadRequestError, match=r"^page_token: "):
        paginate([1], PageRequest(page_token=token))


def test_a_negative_page_size_is_refused_naming_the_field() -> None:
    with pytest.raises(BadRequestError, match=r"^page_size: must be >= 0 \(got -1\)$"):
        paginate([1], PageRequest(page_size=-1))
