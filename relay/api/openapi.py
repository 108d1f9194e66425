"""The REST API's OpenAPI 3.1 document, served at ``/openapi.json``.

Written as data, next to the routes it describes (``relay/api/rest.py``); ``tests/test_openapi.py``
checks that every route is described and every described operation is routed, with the same scope, and
fuzzes the API from this document. ``x-scope`` names the token scope an operation needs (``admin``
implies every scope).
"""

from __future__ import annotations

from typing import Any

from ipp.options import OPTION_NAMES
from relay.auth import API_SCOPES
from relay.jobs import JobState

VERSION = "0.1.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


PRINTER = _path_param("printer", "printer id (unique within the tenant)")
JOB = _path_param("job", "job id")

AUTH_ERRORS: dict[str, Any] = {
    "401": _error("missing, invalid, expired or revoked token; wrong email or password; a disabled user"),
    "403": _error("the token lacks this operation's scope (a user: it needs a tenant admin)"),
    "429": {
        "description": "the token exceeds its request rate, or too many failed sign-ins; wait Retry-After "
        "seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
        "content": {"application/json": {"schema": _ref("Error")}},
    },
}
NOT_FOUND = {"404": _error("no such id in the caller's tenant (ids of other tenants answer the same)")}


def _op(
    summary: str,
    scope: str,
    responses: dict[str, Any],
    *,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "x-scope": scope,
        "security": [{"bearer": []}, {"basic": []}],
        "parameters": parameters or [],
        "responses": {**responses, **AUTH_ERRORS},
    }
    if body is not None:
        op["requestBody"] = body
    return op


SUBMIT_PARAMETERS = [
    PRINTER,
    _query("title", {"type": "string", "maxLength": 255}, "job name (default: X-Job-Title or 'untitled')"),
    _query("copies", {"type": "integer", "minimum": 1, "maximum": 999}, "copies (default 1)"),
    _query("user", {"type": "string", "maxLength": 255}, "requesting user shown to the printer"),
    _query(
        "hold",
        {"type": "string", "enum": ["true", "false", "1", "0"]},
        "hold for release (pull print); a pull printer holds every job",
    ),
    _query(
        "expires_in",
        {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)?$"},
        "undelivered job expires after this long, e.g. 2h (at most 365 days); a held job at most the "
        "relay's held_job_ttl until it is released",
    ),
    *[_query(name, {"type": "string", "maxLength": 255}, f"IPP {name}") for name in OPTION_NAMES],
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": "a retried submission with the same key returns the first job (200)",
    },
    {"name": "X-Job-Title", "in": "header", "required": False, "schema": {"type": "string"}},
]

PRINTER_CHANGE = {
    "type": "object",
    "properties": {
        "uri": {"type": "string", "description": "ipp://, ipps://, socket://, lpd:// or cups: URI"},
        "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
        "connector_id": {"type": "string"},
        "pull": {
            "type": "boolean",
            "description": "a pull printer holds every job until its owner (or a tenant admin) releases it",
        },
    },
    "description": 'adopt, add or change a printer (uri required), or {"id", "pull"} alone: only make it a '
    "pull printer or not (the connector is not asked)",
    "anyOf": [{"required": ["uri"]}, {"required": ["id", "pull"]}],
}

# Print from a URL (relay.fetch): the relay fetches the document; nothing of the URL is kept.
SOURCE: dict[str, Any] = {
    "type": "object",
    "required": ["source_url"],
    "additionalProperties": False,
    "properties": {
        "source_url": {"type": "string", "maxLength": 2048, "description": "http, https or ftp URL"},
        "source_headers": {
            "type": "object", "maxProperties": 32,
            "additionalProperties": {"type": "string", "maxLength": 4096},
            "description": "headers sent to the source_url's own origin only (not after a redirect away)",
        },
        "document_format": {"type": "string", "description": "MIME type; default: the source's Content-Type"},
    },
}  # fmt: skip

PATHS: dict[str, dict[str, Any]] = {
    "/v1/printers/{printer}/jobs": {
        "post": _op(
            "Submit a document to a printer: the raw body, or a JSON body naming a URL the relay fetches",
            "jobs:submit",
            {
                "201": _json(_ref("Job"), "accepted: spooled and queued (or held)"),
                "200": _json(_ref("Job"), "an earlier submission with this Idempotency-Key"),
                "400": _error("a bad parameter, or a source_url the relay does not fetch (private address)"),
                "413": _error("document exceeds max_job_bytes"),
                "502": _error("the source_url did not give the document"),
                "504": _error("the source_url's fetch took longer than fetch_timeout"),
                "507": _error("spool full"),
                **NOT_FOUND,
            },
            parameters=SUBMIT_PARAMETERS,
            body={
                "required": True,
                "content": {
                    "application/json": {"schema": SOURCE},
                    "*/*": {"schema": {"type": "string", "format": "binary"}},
                },
            },
        )
    },
    "/v1/printers": {
        "get": _op(
            "List the tenant's printers",
            "jobs:read",
            {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"printers": {"type": "array", "items": _ref("Printer")}},
                    },
                    "printers",
                )
            },
        ),
        "post": _op(
            "Adopt a discovered candidate, or add or change a printer, on a connected connector",
            "printers:admin",
            {
                "201": _json(_ref("Printer"), "added"),
                "200": _json(_ref("Printer"), "changed"),
                "400": _error("malformed request"),
                "503": _error("the connector is not connected"),
                **NOT_FOUND,
            },
            body={"required": True, "content": {"application/json": {"schema": PRINTER_CHANGE}}},
        ),
    },
    "/v1/printers/{printer}": {
        "get": _op(
            "One printer",
            "jobs:read",
            {"200": _json(_ref("Printer"), "the printer"), **NOT_FOUND},
            parameters=[PRINTER],
        ),
        "delete": _op(
            "Remove a printer from its connector",
            "printers:admin",
            {
                "200": _json(_ref("Printer"), "removed"),
                "503": _error("connector not connected"),
                **NOT_FOUND,
            },
            parameters=[PRINTER],
        ),
    },
    "/v1/candidates": {
        "get": _op(
            "Printers the tenant's connectors discovered and do not serve yet",
            "printers:admin",
            {"200": _json({"type": "object", "properties": {"candidates": {"type": "array"}}}, "candidates")},
        )
    },
    "/v1/webhooks": {
        "post": _op(
            "Register a webhook: job state changes are POSTed to url, signed with the secret (shown once)",
            "printers:admin",
            {
                "201": _json(_ref("Webhook"), "registered; the body carries the secret"),
                "400": _error("bad url"),
            },
            body={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["url"],
                            "properties": {
                                "url": {"type": "string"},
                                "events": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": "job.state_changed (the default), job.<state>, "
                                    "connector.online, connector.offline, printer.added, printer.removed, "
                                    "printer.state_changed, connector.*, printer.*",
                                },
                            },
                        }
                    }
                },
            },
        ),
        "get": _op(
            "List the tenant's webhooks (without secrets)",
            "printers:admin",
            {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"webhooks": {"type": "array", "items": _ref("Webhook")}},
                    },
                    "webhooks",
                )
            },
        ),
    },
    "/v1/webhooks/{hook}": {
        "delete": _op(
            "Remove a webhook",
            "printers:admin",
            {"200": _json(_ref("Webhook"), "removed"), **NOT_FOUND},
            parameters=[_path_param("hook", "webhook id")],
        )
    },
    "/v1/jobs": {
        "get": _op(
            "List the tenant's jobs (a user: their own), newest first, a page at a time",
            "jobs:read",
            {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "jobs": {"type": "array", "items": _ref("Job")},
                            "next": {
                                "type": ["string", "null"],
                                "description": "give it as after= for the next page; null on the last",
                            },
                        },
                    },
                    "jobs",
                ),
                "400": _error("a bad parameter"),
            },
            parameters=[
                _query("state", {"type": "string", "enum": [s.value for s in JobState]}, "only this state"),
                _query("printer_id", {"type": "string"}, "only this printer"),
                _query("user", {"type": "string"}, "only jobs submitted by or for this user"),
                _query("since", {"type": "string"}, "created at or after (ISO 8601 or epoch seconds)"),
                _query("until", {"type": "string"}, "created before (ISO 8601 or epoch seconds)"),
                _query("after", {"type": "string"}, "the next cursor of the previous page"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "per page (default 100)"),
            ],
        )
    },
    "/v1/jobs/{job}": {
        "get": _op(
            "One job", "jobs:read", {"200": _json(_ref("Job"), "the job"), **NOT_FOUND}, parameters=[JOB]
        )
    },
    "/v1/jobs/{job}/events": {
        "get": _op(
            "A job's state history",
            "jobs:read",
            {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"job_id": {"type": "string"}, "events": {"type": "array"}},
                    },
                    "history",
                ),
                **NOT_FOUND,
            },
            parameters=[JOB],
        )
    },
    "/v1/jobs/{job}/watch": {
        "get": _op(
            "Server-Sent Events: the history, then each change until the job is final",
            "jobs:read",
            {"200": {"description": "event stream", "content": {"text/event-stream": {}}}, **NOT_FOUND},
            parameters=[JOB],
        )
    },
    "/v1/events": {
        "get": _op(
            "Server-Sent Events: the tenant's job changes (a user: their own jobs') and device events "
            "(connector.online, connector.offline, printer.added, printer.removed, printer.state_changed), "
            "live from now on; no replay (429: also too many streams of the tenant open on this relay)",
            "jobs:read",
            {"200": {"description": "event stream", "content": {"text/event-stream": {}}}},
        )
    },
    "/v1/jobs/{job}/cancel": {
        "post": _op(
            "Cancel a job that is not final yet",
            "jobs:submit",
            {"200": _json(_ref("Job"), "canceled"), "409": _error("already final"), **NOT_FOUND},
            parameters=[JOB],
        )
    },
    "/v1/jobs/{job}/release": {
        "post": _op(
            "Release a held job (a user: their own), optionally to another printer of the same connector",
            "jobs:submit",
            {
                "200": _json(_ref("Job"), "queued"),
                "409": _error(
                    "not held, or the printer cannot take it (another connector's, or it does not support "
                    "the job's document format or options)"
                ),
                **NOT_FOUND,
            },
            parameters=[JOB, _query("printer_id", {"type": "string"}, "print on this printer instead")],
            body={
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "properties": {"printer_id": {"type": "string"}}}
                    }
                },
            },
        )
    },
}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object", "additionalProperties": False, "required": list(required),
                    "properties": properties,
                }
            }
        },
    }  # fmt: skip


USER = _path_param("user", "user id (usr_...)")
USER_FIELDS = {
    "email": {"type": "string", "maxLength": 254},
    "name": {"type": "string", "maxLength": 200},
    "role": {"type": "string", "enum": ["user", "admin"]},
    "password": {"type": "string", "minLength": 10, "maxLength": 1024},
}

# People: the caller (a person signs in with HTTP Basic email:password, or one of their own tokens) and a
# tenant admin's users. Scope "" = any authenticated caller.
PATHS.update(
    {
        "/v1/me": {
            "get": _op(
                "Who the credentials are: tenant, kind, scopes, and for a person their user record", "",
                {"200": _json({"type": "object"}, "the caller")},
            )
        },
        "/v1/me/tokens": {
            "get": _op(
                "A person's own tokens (never their secrets)", "",
                {"200": _json({"type": "object", "properties": {"tokens": {"type": "array"}}}, "listed")},
            ),
            "post": _op(
                "Make a token of one's own for a print client (the secret is shown once)", "",
                {"201": _json({"type": "object"}, "made; token holds the secret")},
                body=_object({"label": {"type": "string", "maxLength": 200},
                              "expires_in": {"type": "string", "description": "e.g. 90d"}}),
            ),
        },
        "/v1/me/tokens/{token}": {
            "delete": _op(
                "Revoke one of one's own tokens", "", {"204": {"description": "revoked"}, **NOT_FOUND},
                parameters=[_path_param("token", "token id")],
            )
        },
        "/v1/users": {
            "get": _op(
                "The tenant's users", "admin",
                {"200": _json({"type": "object",
                               "properties": {"users": {"type": "array", "items": _ref("User")}}}, "listed")},
            ),
            "post": _op(
                "Create a user (emails are unique on the relay)", "admin",
                {"201": _json(_ref("User"), "created"), "409": _error("the email is taken")},
                body=_object(USER_FIELDS, ("email",)),
            ),
        },
        "/v1/users/{user}": {
            "get": _op("A user of the tenant", "admin", {"200": _json(_ref("User"), "the user"), **NOT_FOUND},
                       parameters=[USER]),
            "post": _op(
                "Change a user's name, role, state (disabled: their passwords and tokens stop at once) or "
                "password", "admin", {"200": _json(_ref("User"), "changed"), **NOT_FOUND}, parameters=[USER],
                body=_object({**{k: v for k, v in USER_FIELDS.items() if k != "email"},
                              "state": {"type": "string", "enum": ["active", "disabled"]}}),
            ),
        },
    }
)  # fmt: skip


TENANT = _path_param("tenant", "child tenant id (t_...)")
CHILD_TOKEN_FIELDS = {
    "kind": {"type": "string", "enum": ["api", "connector"], "description": "default api"},
    "scopes": {
        "type": "array",
        "items": {"type": "string", "enum": list(API_SCOPES)},
        "description": "an API token's scopes (default jobs:submit, jobs:read)",
    },
    "connector_id": {
        "type": "string",
        "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        "description": "a connector token's connector (default connector-<random>)",
    },
    "label": {"type": "string", "maxLength": 200},
    "expires_in": {"type": "string", "description": "e.g. 90d (at most 365 days; default: no expiry)"},
}

# The integrator API: a tenant's admin and its child tenants (relay/api/tenants.py). Ids of tenants that
# are not the caller's children (itself, its parent, a sibling) answer 404 like ids that do not exist.
PATHS.update(
    {
        "/v1/tenants": {
            "get": _op(
                "The caller's child tenants, oldest first, a page at a time", "admin",
                {"200": _json({"type": "object", "properties": {
                    "tenants": {"type": "array", "items": _ref("Tenant")},
                    "next": {"type": ["string", "null"], "description": "after= for the next page"},
                }}, "listed")},
                parameters=[
                    _query("after", {"type": "string"}, "the next cursor of the previous page"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "per page (100)"),
                ],
            ),
            "post": _op(
                "Create a child tenant (its id is generated); a child tenant cannot create children", "admin",
                {"201": _json(_ref("Tenant"), "created"),
                 "409": _error("the caller has max_child_tenants children already")},
                body=_object({"name": {"type": "string", "minLength": 1, "maxLength": 200}}, ("name",)),
            ),
        },
        "/v1/tenants/{tenant}": {
            "get": _op("A child tenant", "admin", {"200": _json(_ref("Tenant"), "the tenant"), **NOT_FOUND},
                       parameters=[TENANT]),
        },
        "/v1/tenants/{tenant}/tokens": {
            "get": _op(
                "A child tenant's tokens (never their secrets)", "admin",
                {"200": _json({"type": "object", "properties": {"tokens": {"type": "array"}}}, "listed"),
                 **NOT_FOUND},
                parameters=[TENANT],
            ),
            "post": _op(
                "Make an API or connector token of a child tenant (the secret is shown once)", "admin",
                {"201": _json({"type": "object"}, "made; token holds the secret"), **NOT_FOUND},
                parameters=[TENANT], body=_object(CHILD_TOKEN_FIELDS),
            ),
        },
        "/v1/tenants/{tenant}/tokens/{token}": {
            "delete": _op(
                "Revoke a child tenant's token (at once, on every replica; a connector's session closes)",
                "admin", {"204": {"description": "revoked"}, **NOT_FOUND},
                parameters=[TENANT, _path_param("token", "token id")],
            ),
        },
        "/v1/tenants/{tenant}/usage": {
            "get": _op(
                "Jobs a child tenant submitted in a period and their documents' bytes, in all and by state",
                "admin",
                {"200": _json({"type": "object", "properties": {
                    "tenant": {"type": "string"}, "since": {"type": ["string", "null"]},
                    "until": {"type": ["string", "null"]}, "jobs": {"type": "integer"},
                    "bytes": {"type": "integer"}, "by_state": {"type": "object"},
                }}, "usage"), **NOT_FOUND},
                parameters=[
                    TENANT,
                    _query("since", {"type": "string"}, "jobs created at or after (ISO 8601 or epoch s)"),
                    _query("until", {"type": "string"}, "jobs created before (ISO 8601 or epoch s)"),
                ],
            ),
        },
    }
)  # fmt: skip


def _qr(kind: str, media: str) -> dict[str, Any]:
    return {
        "get": _op(
            f"A QR code ({kind.upper()}) of the printer's release page, {{public_url}}/release/{{printer}}: "
            "people scan it at a pull printer to release their held jobs there",
            "jobs:read",
            {
                "200": {"description": "the code", "content": {media: {}}},
                "409": _error("the relay has no public_url and the request no usable Host header"),
                **NOT_FOUND,
            },
            parameters=[
                PRINTER,
                _query("scale", {"type": "integer", "minimum": 1, "maximum": 20}, "module size (default 6)"),
            ],
        )
    }


PATHS.update({"/v1/printers/{printer}/qr.svg": _qr("svg", "image/svg+xml"),
              "/v1/printers/{printer}/qr.png": _qr("png", "image/png")})  # fmt: skip

# Served without a token: probes, this document, and the IPP endpoint (its own Basic/Bearer auth).
PUBLIC_PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {
        "get": {
            "summary": "Liveness",
            "security": [],
            "responses": {"200": _json({"type": "object"}, "alive")},
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: store writable and listeners up",
            "security": [],
            "responses": {
                "200": _json({"type": "object"}, "ready"),
                "503": _json({"type": "object"}, "not ready"),
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
        }
    },
    "/ipp/print/{printer}": {
        "post": {
            "summary": "IPP endpoint (RFC 8010 over HTTP); HTTP Basic (tenant, API token) or Bearer",
            "security": [{"basic": []}, {"bearer": []}],
            "parameters": [PRINTER],
            "requestBody": {"required": True, "content": {"application/ipp": {}}},
            "responses": {
                "200": {"description": "an IPP response", "content": {"application/ipp": {}}},
                "401": _error("credentials required"),
            },
        }
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
    "Job": {
        "type": "object",
        "required": ["id", "state", "printer_id"],
        "properties": {
            "id": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in JobState]},
            "printer_id": {"type": "string"},
            "title": {"type": "string"},
            "document_format": {"type": "string"},
            "copies": {"type": "integer"},
            "user": {"type": "string"},
            "size": {"type": "integer"},
            "attempts": {"type": "integer"},
            "max_attempts": {"type": "integer"},
            "last_error": {"type": ["string", "null"]},
            "hold_reason": {
                "type": ["string", "null"],
                "description": "why the job is held: the outcome of a delivery is unknown, or it is "
                "waiting for release at a pull printer; null for a job held with hold=true",
            },
            "options": {"type": "object"},
            "pages": {
                "type": ["integer", "null"],
                "description": "a completed job's pages by its printer's page counter, read before and "
                "after the job (RAW and LPD printers whose SNMP agent answers): best effort; null when "
                "unknown",
            },
            "created_at": {"type": "string"},
            "updated_at": {"type": "string"},
            "completed_at": {"type": ["string", "null"]},
            "expires_at": {"type": ["string", "null"]},
        },
    },
    "Webhook": {
        "type": "object",
        "required": ["id", "url"],
        "properties": {
            "id": {"type": "string"},
            "url": {"type": "string"},
            "events": {"type": "array"},
            "secret": {"type": "string"},
            "pending": {"type": "integer"},
            "last_error": {"type": ["string", "null"], "description": "the last failed attempt's error"},
            "last_error_at": {"type": ["string", "null"]},
            "last_delivered_at": {"type": ["string", "null"]},
        },
    },
    "Tenant": {
        "type": "object",
        "required": ["id", "parent", "name"],
        "properties": {
            "id": {"type": "string"},
            "parent": {"type": "string"},
            "name": {"type": "string"},
            "created_at": {"type": ["string", "null"]},
        },
    },
    "User": {
        "type": "object",
        "required": ["id", "email", "role", "state"],
        "properties": {
            "id": {"type": "string"},
            "email": {"type": "string"},
            "name": {"type": "string"},
            "role": {"type": "string", "enum": ["user", "admin"]},
            "state": {"type": "string", "enum": ["active", "disabled"]},
            "has_password": {"type": "boolean"},
            "created_at": {"type": ["string", "null"]},
            "disabled_at": {"type": ["string", "null"]},
        },
    },
    "Printer": {
        "type": "object",
        "required": ["id", "connector_id", "online", "state"],
        "properties": {
            "id": {"type": "string"},
            "connector_id": {"type": "string"},
            "online": {"type": "boolean"},
            "state": {"type": "string"},
            "printer_state": {"type": "string"},
            "reasons": {
                "type": "array",
                "items": {"type": "string"},
                "description": "IPP printer-state-reasons keywords (media-empty-error, media-jam-error, "
                "...), from the printer itself: IPP, or a RAW or LPD printer's Printer MIB over SNMP",
            },
            "message": {
                "type": "string",
                "description": "what the printer says of its state for people (IPP printer-state-message, "
                "the Printer MIB's alert descriptions); empty when it says nothing",
            },
            "kind": {"type": "string"},
            "capabilities": {"type": "object"},
            "pull": {
                "type": "boolean",
                "description": "holds every job until its owner (or a tenant admin) releases it",
            },
        },
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "printrelay",
        "version": VERSION,
        "description": "Submit print jobs to printers behind connectors. Every id is scoped to the tenant "
        "of the bearer token; another tenant's ids answer 404 like ids that do not exist.",
    },
    "paths": {**PATHS, **PUBLIC_PATHS},
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "pra_<id>_<secret> API token, or pru_<id>_<secret>: a person's own token",
            },
            "basic": {
                "type": "http",
                "scheme": "basic",
                "description": "a person: email and password (or one of their pru_ tokens); over IPP also "
                "tenant and API token",
            },
        },
    },
}
