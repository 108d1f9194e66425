"""Load-test documents: a tag line (``PRLOAD <tag>\\n``), then a slice of a seeded pseudo-random block.

The block is a pure function of its seed (SHAKE-256 output, incompressible like PDFs and rasters), so a
document is fully described by ``(tag, seed, offset, length)``: the job record carries that, and the judge
(``loadtest/verdict.py``) rebuilds the exact bytes that were submitted to tell a prefix of them (a delivery
cut by a cancel) from a copy whose bytes differ, without anyone keeping gigabytes of documents around.
This module imports nothing but the standard library: Locust (gevent) imports it too.
"""

from __future__ import annotations

import hashlib

TAG_PREFIX = b"PRLOAD "
TITLE_PREFIX = "prload-"  # a job's title is this and its tag: the relay's job list names the documents
MiB = 1024 * 1024


def tag_line(tag: str) -> bytes:
    return TAG_PREFIX + tag.encode() + b"\n"


def tagged(tag: str, payload: bytes | memoryview) -> bytes:
    """A load-test document: the tag line, then ``payload``."""
    return tag_line(tag) + bytes(payload)


def block(seed: int, size: int) -> bytes:
    """``size`` pseudo-random bytes from ``seed``; a shorter block is a prefix of a longer one (XOF)."""
    return hashlib.shake_256(b"printrelay load block %d" % seed).digest(size)


def document(tag: str, seed: int, offset: int, length: int) -> bytes:
    """The document whose payload is ``block(seed)[offset : offset + length]``."""
    return tagged(tag, memoryview(block(seed, offset + length))[offset:])
