"""Chunking: sizes, overlap, sentence and paragraph boundaries, stable ids."""

from __future__ import annotations

import re
from itertools import pairwise

import pytest

from engine.knowledge.chunking import Chunk, chunk_id, chunk_text

SENTENCES = " ".join(
    f"Sentence number {i} talks about topic {i % 7} in a few words." for i in range(40)
)


def _covered(text: str, chunks: list[Chunk]) -> bool:
    covered = [False] * len(text)
    for c in chunks:
        for i in range(c.start, c.end):
            covered[i] = True
    return all(covered[i] for i, ch in enumerate(text) if not ch.isspace())


def test_chunks_fit_the_size_and_cover_the_whole_text() -> None:
    chunks = chunk_text(SENTENCES, source="s.md", size=200, overlap=50)

    assert len(chunks) > 5
    assert all(len(c.text) <= 200 for c in chunks)
    assert all(SENTENCES[c.start : c.end] == c.text for c in chunks)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    assert _covered(SENTENCES, chunks)


def test_consecutive_chunks_share_at_most_the_overlap() -> None:
    chunks = chunk_text(SENTENCES, source="s.md", size=200, overlap=80)

    for prev, nxt in pairwise(chunks):
        shared = prev.end - nxt.start
        assert 0 < shared <= 80
        assert prev.text.endswith(SENTENCES[nxt.start : prev.end])


def test_no_overlap_means_disjoint_chunks() -> None:
    chunks = chunk_text(SENTENCES, source="s.md", size=200, overlap=0)

    assert all(nxt.start >= prev.end for prev, nxt in pairwise(chunks))
    assert _covered(SENTENCES, chunks)


def test_chunks_end_and_restart_on_sentence_boundaries() -> None:
    # sentences of ~60 characters: a sentence end always falls in the second half of a
    # 200-character window, and a sentence start within 80 characters of its end
    chunks = chunk_text(SENTENCES, source="s.md", size=200, overlap=80)

    assert all(c.text.endswith(".") for c in chunks)
    assert all(c.text.startswith("Sentence number") for c in chunks)


def test_paragraph_breaks_win_over_sentence_ends() -> None:
    para = "Alpha beta gamma. Delta epsilon zeta. Eta theta iota kappa."
    text = f"{para}\n\n{para} Lambda mu nu.\n\n{para}"
    chunks = chunk_text(text, source="p.md", size=90, overlap=0)

    assert chunks[0].text == para
    assert chunks[1].text.startswith("Alpha beta") and chunks[1].text.endswith("Lambda mu nu.")


def test_text_without_boundaries_is_cut_hard() -> None:
    text = "x" * 250
    chunks = chunk_text(text, source="x", size=100, overlap=10)

    assert [len(c.text) for c in chunks] == [100, 100, 70]
    assert [c.start for c in chunks] == [0, 90, 180]


def test_words_are_not_split_when_there_is_whitespace() -> None:
    text = " ".join(["lorem", "ipsum", "dolor", "sit", "amet"] * 40)
    words = set(text.split())
    for c in chunk_text(text, source="w", size=64, overlap=16):
        assert set(re.findall(r"\S+", c.text)) <= words


def test_empty_and_blank_texts_have_no_chunks() -> None:
    assert chunk_text("", source="e", size=100, overlap=10) == []
    assert chunk_text(" \n\n \t", source="e", size=100, overlap=10) == []


def test_ids_are_stable_and_depend_on_source_position_and_text() -> None:
    one = chunk_text(SENTENCES, source="a.md", size=200, overlap=50)
    two = chunk_text(SENTENCES, source="a.md", size=200, overlap=50)
    other = chunk_text(SENTENCES, source="b.md", size=200, overlap=50)

    assert [c.id for c in one] == [c.id for c in two]
    assert len({c.id for c in one}) == len(one)
    assert not {c.id for c in one} & {c.id for c in other}
    assert one[0].id == chunk_id("a.md", 0, one[0].text)
    assert chunk_id("a.md", 1, one[0].text) != one[0].id


def test_an_edit_near_the_end_keeps_the_earlier_ids() -> None:
    edited = SENTENCES.replace("Sentence number 39", "Sentence NUMBER 39")
    before = chunk_text(SENTENCES, source="a.md", size=200, overlap=50)
    after = chunk_text(edited, source="a.md", size=200, overlap=50)

    assert len(before) == len(after)
    assert [c.id for c in before[:-1]] == [c.id for c in after[:-1]]
    assert before[-1].id != after[-1].id


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (100, 100), (100, -1)])
def test_bad_sizes_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk_text("text", source="t", size=size, overlap=overlap)
