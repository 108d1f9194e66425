"""Records to rows and back, by the records' own field names: no hand-written mapper per record.

A column holds a field of the same name. What a column cannot hold as it is — JSON of lists and dicts,
tuples kept as text, enums — is named once per record in its :class:`RowMap`; both backends use the same
maps, and rows from either (``sqlite3.Row`` and psycopg's dicts) are read by column name.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from relay.jobs import IppJobState, Job, JobState
from relay.store.base import (
    ConnectorRecord,
    IppJob,
    OidcProvider,
    Printer,
    TenantRecord,
    TokenRecord,
    UserRecord,
    Webhook,
    WebhookDelivery,
    WebSession,
)

R = TypeVar("R")

MAX_ROW_SHAPES = 64  # row shapes a RowMap remembers (a statement's columns; see RowMap.load)


class Row(Protocol):
    def __getitem__(self, key: str) -> Any: ...
    def keys(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one field is stored: ``dump`` to the column, ``load`` back."""

    dump: Callable[[Any], Any]
    load: Callable[[Any], Any]


def _json_load(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


JSON = Codec(lambda v: json.dumps(v, separators=(",", ":")), _json_load)
BYTES = Codec(bytes, lambda v: bytes(v) if v is not None else b"")
COMMA_LIST = Codec(lambda v: ",".join(v), lambda v: tuple(p for p in (v or "").split(",") if p))
# Webhook events with a space on each side, so one LIKE pattern (' job.completed ') finds a name.
SPACED_LIST = Codec(lambda v: f" {' '.join(v)} ", lambda v: tuple((v or "").split()))


def enum_codec(kind: type[enum.StrEnum]) -> Codec:
    return Codec(str, kind)


class RowMap(Generic[R]):
    def __init__(
        self, record: type[R], codecs: Mapping[str, Codec] | None = None, *, read_only: Sequence[str] = ()
    ) -> None:
        self.record = record
        self.codecs = dict(codecs or {})
        self.fields = tuple(f.name for f in dataclasses.fields(record))  # type: ignore[arg-type]
        # Columns of the record's table (computed fields such as Printer.online are read, not written).
        self.columns = tuple(name for name in self.fields if name not in read_only)
        self._column_list = ", ".join(f'"{name}"' for name in self.columns)
        # Per shape of row read (its column names): the fields it holds and their codecs. Rows are read
        # by the thousand a second, and a store has a few dozen statements.
        self._plans: dict[tuple[str, ...], tuple[tuple[str, Codec | None], ...]] = {}

    def load(self, row: Row, **overrides: Any) -> R:
        shape = tuple(row.keys())
        plan = self._plans.get(shape)
        if plan is None:
            if len(self._plans) >= MAX_ROW_SHAPES:
                self._plans.clear()
            plan = self._plans[shape] = tuple((f, self.codecs.get(f)) for f in self.fields if f in shape)
        values: dict[str, Any] = {}
        for name, codec in plan:
            value = row[name]
            values[name] = codec.load(value) if codec is not None else value
        for name, value in overrides.items():
            if name in self.fields:
                values[name] = value
        return self.record(**values)

    def dump(self, record: R) -> list[Any]:
        """The record's values in the order of :attr:`columns`."""
        out = []
        for name in self.columns:
            value = getattr(record, name)
            codec = self.codecs.get(name)
            out.append(codec.dump(value) if codec is not None and value is not None else value)
        return out

    def column_list(self) -> str:
        """The columns, quoted (``user`` is a reserved word in PostgreSQL)."""
        return self._column_list


JOBS = RowMap(Job, {"state": enum_codec(JobState), "wrapped_key": BYTES, "options": JSON})
BOOL = Codec(lambda v: 1 if v else 0, bool)
PRINTERS = RowMap(Printer, {"reasons": JSON, "capabilities": JSON, "pull": BOOL}, read_only=("online",))
CONNECTORS = RowMap(ConnectorRecord, {"public_key": BYTES}, read_only=("sessions",))
TOKENS = RowMap(TokenRecord, {"scopes": COMMA_LIST})
USERS = RowMap(UserRecord)
TENANTS = RowMap(TenantRecord)
WEB_SESSIONS = RowMap(WebSession)
OIDC_PROVIDERS = RowMap(OidcProvider, {"client_secret_sealed": BYTES, "create_users": BOOL})
IPP_JOBS = RowMap(IppJob, {"state": enum_codec(IppJobState), "ticket": JSON})
WEBHOOKS = RowMap(Webhook, {"events": SPACED_LIST}, read_only=("pending",))
DELIVERIES = RowMap(WebhookDelivery, {"job": JSON}, read_only=("url", "secret"))
