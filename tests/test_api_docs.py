"""docs/api.md describes every route the OpenAPI document (and so the router: tests/test_openapi.py)
has, so a new route cannot ship undocumented."""

from __future__ import annotations

import re
from pathlib import Path

from relay.api.openapi import OPENAPI

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
METHODS = ("get", "post", "put", "patch", "delete")


def _shape(text: str) -> str:
    """Parameters named alike (``{printer}`` and ``{printer_id}`` are one route) and spaces folded."""
    return re.sub(r"[ \t]+", " ", re.sub(r"\{[^}/]*\}", "{}", text))


def test_every_route_of_the_openapi_document_is_in_api_md() -> None:
    doc = _shape(API_MD.read_text())
    missing = []
    for path, operations in OPENAPI["paths"].items():
        for method in METHODS:
            if method not in operations:
                continue
            route = f"{method.upper()} {_shape(path)}"
            # the route itself, not a longer one it begins (GET /v1/jobs is not GET /v1/jobs/{})
            if not re.search(re.escape(route) + r"(?![\w/{}-])", doc):
                missing.append(route)
    assert not missing, f"docs/api.md does not describe: {missing}"
