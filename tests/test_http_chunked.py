"""service.http.chunked with bytes alone: chunk sizes followed across any split of the body."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.http.chunked import ChunkSizeError, ChunkSizes


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces if p)
    return body + b"0\r\n" + trailer + b"\r\n"


def feed_split(data: bytes, cuts: list[int]) -> ChunkSizes:
    sizes = ChunkSizes()
    last = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        sizes.feed(data[last:cut])
        last = cut
    return sizes


@given(
    st.lists(st.binary(max_size=300), max_size=8),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
)
def test_valid_bodies_pass_and_end_where_they_end(pieces: list[bytes], cuts: list[int]) -> None:
    body = chunked(pieces, b"X-Sum: 1\r\n")
    sizes = feed_split(body + b"GET / HTTP/1.1\r\n\r\nffffffffffffffffffff\r\n", cuts)
    assert sizes.done  # what follows the body (a pipelined request) is not read as chunks


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_impossible_size_refused_wherever_it_is_split(cuts: list[int]) -> None:
    body = b'3;ext="a"\r\nabc\r\n' + b"fffffffffffffffff0\r\n" + b"x" * 50
    with pytest.raises(ChunkSizeError, match="chunk size fffffffffffffffff0 exceeds"):
        feed_split(body, cuts)


def test_largest_signed_64_bit_size_is_allowed() -> None:
    sizes = ChunkSizes()
    sizes.feed(b"7fffffffffffffff\r\n" + b"x" * 10)
    assert not sizes.done
    with pytest.raises(ChunkSizeError):
        ChunkSizes().feed(b"8000000000000000\r\n")


def test_data_that_looks_like_a_size_line_is_data() -> None:
    sizes = ChunkSizes()
    sizes.feed(b"14\r\nffffffffffffffffff\r\n\r\n0\r\n\r\n")
    assert sizes.done


def test_long_extension_is_skipped_not_kept() -> None:
    sizes = ChunkSizes()
    sizes.feed(b"2;" + b"e" * 100_000 + b"\r\nab\r\n0\r\n\r\n")
    assert sizes.done
