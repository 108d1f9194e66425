"""JSON from the network, with its nesting bounded before the parser sees it.

Python's json module recurses once per level: 8,000 nested brackets end in RecursionError, which no
caller expects from a parser (the REST API answered 500). Real messages here are a few levels deep, so
anything deeper than ``MAX_DEPTH`` is refused as a ValueError like any other malformed JSON. The check
counts brackets outside strings: linear, and in C but for the brackets themselves.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = frozenset(b"[{")


class JsonTooDeep(ValueError):
    pass


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads``, refusing documents nested deeper than ``max_depth`` (JsonTooDeep, a ValueError)."""
    raw = data.encode() if isinstance(data, str) else data
    depth = 0
    for byte in _STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        depth += 1 if byte in _OPENING else -1
        if depth > max_depth:
            raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
    return json.loads(raw)
