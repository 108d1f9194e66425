"""The OpenAPI document at /openapi.json: it describes exactly the routes rest.py serves, and the REST API
holds up under inputs generated from it (hypothesis).

Hypothesis runs in a worker thread (as in test_ipp_fuzz.py); each example is answered by the relay's REST
handler in the test's trio run, against the in-process relay with its real store and spool.
"""

from __future__ import annotations

import json
import re
from typing import Any

import trio
from fixtures_relay import RelayStack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ipp_endpoint import offline_printer

from relay.api.openapi import OPENAPI, PATHS, PUBLIC_PATHS
from relay.api.people import PEOPLE_ROUTES
from relay.api.rest import ROUTES
from relay.api.tenants import TENANT_ROUTES
from relay.ratelimit import TokenRateLimiter
from service.http.message import Headers, HTTPError, Request, RequestBody, Response

METHODS = ("get", "post", "put", "patch", "delete")
# Answers any operation may give besides the ones it lists: a malformed request, a conflict with state.
GENERAL = {400, 401, 403, 404, 405, 409, 429}


def _sample_path(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", template)


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in PATHS.items() for method, op in item.items()]


async def test_document_is_served_without_a_token(relay_stack: RelayStack) -> None:
    async with relay_stack.client("none") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps(OPENAPI))
    assert OPENAPI["openapi"].startswith("3.1")


def test_every_route_is_described_and_every_description_routed() -> None:
    served = {
        (method, pattern.pattern): scope
        for method, pattern, scope, _ in ROUTES + PEOPLE_ROUTES + TENANT_ROUTES
    }
    described: dict[tuple[str, str], str] = {}
    for method, path, op in _operations():
        sample = _sample_path(path)
        matches = [(m, p) for m, p in served if m == method and re.match(p, sample)]
        assert len(matches) == 1, f"{method} {path} matches routes {matches}"
        described[matches[0]] = op["x-scope"]
    assert described == served, f"undescribed routes: {set(served) - set(described)}"
    for path in PUBLIC_PATHS:  # served without a token, outside the route table
        assert not any(re.match(p, _sample_path(path)) for _, p in served)


def test_every_reference_resolves() -> None:
    text = json.dumps(OPENAPI)
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/([A-Za-z]+)"', text)):
        assert ref in OPENAPI["components"]["schemas"], ref
    for method, path, op in _operations():
        names = set(re.findall(r"\{([^}]+)\}", path))
        declared = {p["name"] for p in op["parameters"] if p["in"] == "path"}
        assert names == declared, f"{method} {path}: path parameters {names} declared as {declared}"


# ---- fuzzing from the document -------------------------------------------------------------------------

IDS = st.one_of(
    st.sampled_from(["office", "away", "x1", "..", "%2e%2e", "a" * 200, "job_1"]),
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/?#"), min_size=1, max_size=40),
)
GARBAGE = st.one_of(
    st.text(max_size=30),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["", "-1", "1e9", "true", "NaN"]),
)


def _value(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    if "enum" in schema:
        valid: st.SearchStrategy[str] = st.sampled_from([str(v) for v in schema["enum"]])
    elif schema.get("type") == "integer":
        valid = st.integers(schema.get("minimum", -5) - 2, schema.get("maximum", 1000) + 2).map(str)
    else:
        valid = st.text(max_size=40)
    return st.one_of(valid, GARBAGE)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, list[str]], list[tuple[str, str]], bytes]:
    method, template, op = draw(st.sampled_from(_operations()))
    path = template
    query: dict[str, list[str]] = {}
    headers: list[tuple[str, str]] = []
    for param in op["parameters"]:
        if param["in"] == "path":
            path = path.replace("{" + param["name"] + "}", draw(IDS))
        elif draw(st.booleans()):
            value = draw(_value(param["schema"]))
            if param["in"] == "query":
                query[param["name"]] = [value]
            elif value.isprintable() and value.isascii():
                headers.append((param["name"], value))
    body = b""
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = draw(
            st.one_of(
                st.binary(max_size=200),
                st.dictionaries(
                    st.sampled_from(["uri", "id", "connector_id", "url", "events", "printer_id", "x"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=60), st.lists(st.text(max_size=10))),
                ).map(lambda d: json.dumps(d).encode()),
            )
        )
        headers.append(("content-type", "application/json"))
    elif content:
        body = draw(st.binary(max_size=300))
        headers.append(
            ("content-type", draw(st.sampled_from(["application/pdf", "text/plain", "bogus", "a/b;c"])))
        )
    return method, path, query, headers, body


class Harness:
    def __init__(self, stack: RelayStack, tokens: list[str]) -> None:
        self.stack = stack
        self.tokens = tokens
        self.seen: dict[int, int] = {}

    async def answer(
        self, method: str, path: str, query: dict[str, list[str]], headers: list[tuple[str, str]],
        body: bytes, token: str,
    ) -> Response:  # fmt: skip
        request = Request(
            method=method,
            target=path,
            path=path,
            query=query,
            headers=Headers([*headers, ("authorization", f"Bearer {token}")]),
            client=("127.0.0.1", 1),
            body=RequestBody.from_bytes(body),
        )
        try:
            with trio.fail_after(10):
                response = await self.stack.relay.api.handle(request)
        except HTTPError as exc:
            return Response.json({"error": exc.message}, exc.status, exc.headers)
        if not isinstance(response.body, bytes | bytearray):
            aclose = getattr(response.body, "aclose", None)
            if aclose is not None:
                await aclose()
            response.body = b"{}"
        return response


def _fuzz(harness: Harness, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=requests(), token=st.sampled_from(harness.tokens))
    def run(request: tuple[str, str, dict[str, list[str]], list[tuple[str, str]], bytes], token: str) -> None:
        method, path, query, headers, body = request
        response = trio.from_thread.run(harness.answer, method, path, query, headers, body, token)
        harness.seen[response.status] = harness.seen.get(response.status, 0) + 1
        matched = [op for m, p, op in _operations() if m == method and re.fullmatch(
            re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)), path)]  # fmt: skip
        documented = {int(code) for op in matched for code in op["responses"]} | GENERAL
        # A 5xx only where the document says why (503: the connector is offline; 507: spool full).
        assert response.status in documented, (method, path, query, headers, body, response.body)
        if response.status >= 400:
            assert isinstance(response.body, bytes)
            assert isinstance(json.loads(response.body)["error"], str)

    run()


async def test_fuzz_rest_inputs_from_the_document(relay_stack: RelayStack) -> None:
    relay_stack.relay.rate_limiter = TokenRateLimiter(0, 1)  # the fuzzer is one very busy client
    await offline_printer(relay_stack, "office")
    reader = await relay_stack.token("api", scopes=("jobs:read",))
    harness = Harness(relay_stack, [relay_stack.api_token, relay_stack.api_token, reader, "pra_bogus"])
    await trio.to_thread.run_sync(_fuzz, harness, 400)
    assert harness.seen.get(201, 0) + harness.seen.get(200, 0) > 0, harness.seen  # some requests were valid
    await relay_stack.relay.store.check_writable()  # the store survived it all
