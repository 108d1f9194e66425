"""The store's SQL, once for both backends.

Every statement here is written for SQLite and PostgreSQL alike (``?`` placeholders, ``ON CONFLICT``,
``RETURNING``, ``FILTER``); what differs — placeholders, the database clock, row locks, notifications,
error classes — is a :class:`Dialect`. A backend (relay/store/sqlite.py, relay/store/postgres.py) supplies
its dialect, its schema and a :class:`~service.groupcommit.GroupCommit` whose calls get a :class:`Tx`; it
overrides a method only where it really does something else (SQLite's ``PRAGMA data_version``).

Each write runs inside its batch's transaction: the job row, its history event, its webhook outbox rows and
its notice commit together or not at all.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from relay.jobs import (
    FINAL_STATES,
    MOVES,
    RELAY_STOPPED,
    IllegalTransition,
    IppJobState,
    Job,
    JobEvent,
    JobHistoryEntry,
    JobState,
    _iso,
)
from relay.store import rows
from relay.store.base import (
    CONNECTOR_OFFLINE,
    CONNECTOR_ONLINE,
    PRINTER_ADDED,
    PRINTER_REMOVED,
    PRINTER_STATE_CHANGED,
    Conflict,
    ConnectorRecord,
    ConnectorRequest,
    IppJob,
    Lease,
    Notice,
    NoticeHandler,
    OidcProvider,
    Printer,
    Quota,
    QuotaExceeded,
    SessionRecord,
    StoreError,
    StoreObserver,
    StoreSample,
    TenantRecord,
    TokenRecord,
    UserRecord,
    Webhook,
    WebhookDelivery,
    WebSession,
    device_line,
)
from service.groupcommit import GroupCommit

T = TypeVar("T")

MAX_SQL_VARIABLES = 500  # well under SQLite's oldest default limit of 999 bound parameters
# IPP job-id is a signed 32-bit integer (RFC 8011 §5.3.2: 1 to 2**31 - 1).
MAX_IPP_JOB_NUMBER = 2**31 - 1
OPEN_STATES = ("held", "queued", "sending", "printing")
IN_FLIGHT = ("sending", "printing")
# Fields a transition may change besides the state.
MUTABLE_JOB_FIELDS = {
    "attempts", "next_attempt_at", "last_error", "completed_at", "wrapped_key", "printer_id",
    "connector_id", "key_id", "expires_at", "unknown_outcomes", "pages",
}  # fmt: skip


@dataclass(frozen=True)
class Dialect:
    name: str
    clock: str  # SQL for the database's clock, in seconds since the epoch
    skip_locked: str  # appended to a claim's inner SELECT: rows another replica is claiming are skipped
    event_order: str  # the column that orders job_events rows written in the same instant
    integrity_errors: tuple[type[BaseException], ...]
    # Statements sent without reading their outcome (Tx.send) are combined into one, as data-modifying
    # WITH clauses (PostgreSQL): one round of parsing, planning and protocol instead of one each.
    combines_sends: bool = False
    # Look whether a tenant has webhooks (once per transaction) before filling their outbox: on SQLite an
    # INSERT ... SELECT that finds none still costs ~40 µs, four times per job (Tx.wants_webhooks).
    probes_webhooks: bool = False
    translate: Callable[[str], str] = lambda sql: sql
    # sends a committing batch's notices to the other processes (PostgreSQL NOTIFY), in its transaction
    notify: Callable[[Any, Sequence[Notice], str], None] | None = None
    _prepared: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def prepare(self, sql: str) -> str:
        """The statement in this dialect (cached: the same few hundred statements run all day)."""
        found = self._prepared.get(sql)
        if found is None:
            found = self._prepared[sql] = self.translate(sql.replace("{clock}", self.clock))
        return found


class Tx:
    """One store call's view of its connection: statements by dialect, rows by column name, notices."""

    def __init__(self, conn: Any, dialect: Dialect, origin: str) -> None:
        self.conn = conn
        self.dialect = dialect
        self.origin = origin  # this process's replica id, carried by its notices
        self.notices: list[Notice] = []  # the running call's
        self.outgoing: list[Notice] = []  # the batch's calls that succeeded: sent before it commits
        self.pipeline: Any = None  # a psycopg pipeline while the batch's first pass runs in one
        self._sends: list[tuple[str, Sequence[Any]]] = []  # sent statements not yet executed
        self._expected: list[Any] = []  # cursors of expect()ed statements, checked before commit
        self._webhooks: dict[str, bool] = {}  # whether a tenant has webhooks, in this transaction

    def forget_webhooks(self) -> None:
        """A transaction begins, or a webhook was added in this one: ask again whether tenants have any."""
        self._webhooks.clear()

    def wants_webhooks(self, tenant: str) -> bool:
        """Whether the tenant's events may fill a webhook outbox. Asked once per tenant and transaction
        where the dialect probes (nobody else writes meanwhile: SQLite's one writer); a webhook added in
        the transaction makes it ask again (:meth:`forget_webhooks`)."""
        if not self.dialect.probes_webhooks:
            return True
        found = self._webhooks.get(tenant)
        if found is None:
            row = self.one("SELECT EXISTS (SELECT 1 FROM webhooks WHERE tenant = ?) AS found", (tenant,))
            found = self._webhooks[tenant] = bool(row["found"])
        return found

    def _sql(self, sql: str) -> str:
        return self.dialect.prepare(sql)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self.flush()
        return list(self.conn.execute(self._sql(sql), params).fetchall())

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self.flush()
        return self.conn.execute(self._sql(sql), params).fetchone()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """A statement's count of changed rows."""
        self.flush()
        cursor = self.conn.execute(self._sql(sql), params)
        if self.pipeline is not None:
            self.pipeline.sync()  # the count is known once the server answered
        return int(cursor.rowcount)

    def expect(self, sql: str, params: Sequence[Any] = ()) -> bool:
        """Whether a statement changed rows. In a pipeline it is assumed to, without waiting: the batch
        checks before it commits, and when one did not, runs again the careful way, where this answers
        truly (so the code for the other answer runs there)."""
        if self.pipeline is None:
            return self.run(sql, params) > 0
        self.flush()
        self._expected.append(self.conn.execute(self._sql(sql), params))
        return True

    def send(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A statement whose outcome nobody reads but success. It may run later: with the next statement
        that reads, at :meth:`flush`, or when the call ends, combined with the others sent meanwhile (so
        none may depend on another's effect). In a pipeline it goes out without waiting; an error then
        fails the batch's pass (service/groupcommit.py)."""
        if not self.dialect.combines_sends:
            self.conn.execute(self._sql(sql), params)
            return
        self._sends.append((sql, params))

    def flush(self) -> None:
        """Run what :meth:`send` left waiting, as one statement."""
        if not self._sends:
            return
        sends, self._sends = self._sends, []
        *heads, (last, _) = sends
        sql = "".join(f"{'WITH' if n == 0 else ','} s{n} AS ({head})" for n, (head, _) in enumerate(heads))
        params = [value for _, values in sends for value in values]
        self.conn.execute(self._sql(f"{sql} {last}" if heads else last), params)

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.flush()
        if params:
            self.conn.cursor().executemany(self._sql(sql), params)

    def notify(self, notice: Notice) -> None:
        """Heard by this process once committed, and by the other replicas (PostgreSQL NOTIFY)."""
        self.notices.append(notice)

    def begin(self) -> None:
        self.outgoing.clear()
        self._expected.clear()
        self.forget_webhooks()
        self.conn.execute("BEGIN")

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        """PostgreSQL's pipeline mode: statements go out without waiting for the one before."""
        with self.conn.pipeline() as pipeline:
            self.pipeline = pipeline
            try:
                yield
            finally:
                self.pipeline = None

    def call(self, fn: Callable[[Tx], T]) -> tuple[T, list[Notice]]:
        """Run one store call's function; its result and notices. A batch may run a call twice (when a
        write fails in the optimistic pass, service/groupcommit.py): each run starts afresh."""
        self.notices = []
        self._sends = []
        result = fn(self)
        self.flush()
        if self.dialect.notify is not None:
            self.outgoing += self.notices
        return result, self.notices

    def before_commit(self) -> None:
        """Check what :meth:`expect` assumed, then send the batch's notices (in its transaction)."""
        if self._expected:
            expected, self._expected = self._expected, []
            if self.pipeline is not None:
                self.pipeline.sync()
            if any(cursor.rowcount <= 0 for cursor in expected):
                raise Unexpected("a statement expected to change rows did not")
        if self.outgoing and self.dialect.notify is not None:
            self.dialect.notify(self.conn, self.outgoing, self.origin)


class Unexpected(StoreError):
    """An optimistic pass assumed wrong (Tx.expect): the batch runs again the careful way."""


def new_replica_id() -> str:
    return f"relay-{secrets.token_hex(6)}"


def marks(count: int) -> str:
    return ", ".join("?" * count)


def chunks(items: Sequence[T], size: int = MAX_SQL_VARIABLES) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


PRINTER_SELECT = (
    "SELECT p.*, EXISTS (SELECT 1 FROM connector_sessions s WHERE s.tenant = p.tenant "
    "AND s.connector_id = p.connector_id) AS online FROM printers p"
)
CONNECTOR_SELECT = (
    "SELECT c.*, (SELECT COUNT(*) FROM connector_sessions s WHERE s.tenant = c.tenant "
    "AND s.connector_id = c.id) AS sessions FROM connectors c"
)
NEXT_DUE = (
    # the same held printers as the claim: their jobs are not due, or the dispatcher would spin
    "SELECT MIN(j.next_attempt_at) AS due FROM jobs j JOIN printers p "
    "ON p.tenant = j.tenant AND p.id = j.printer_id "
    "WHERE j.tenant = ? AND j.connector_id = ? AND j.state = 'queued' "
    "AND p.state NOT IN ('stopped', 'offline')"
)


def _due(row: Any) -> float | None:
    return None if row is None or row["due"] is None else float(row["due"])


class SqlStore:
    """The store, over a backend's group commit and dialect. Subclasses open and close the database."""

    def __init__(self, dialect: Dialect, replica_id: str | None = None) -> None:
        self.dialect = dialect
        # Who this process is among the replicas: lease owner, session holder, origin of its notices.
        self.replica_id = replica_id or new_replica_id()
        self._commits: GroupCommit[Tx] | None = None
        # Reads on a pipeline of their own, beside the writes' (PostgreSQL: another pooled connection), or
        # with the writes' batches (SQLite: one connection).
        self._reads: GroupCommit[Tx] | None = None
        self._handlers: list[NoticeHandler] = []
        self.observer: StoreObserver | None = None

    # --- plumbing -------------------------------------------------------------------------------

    @property
    def batches(self) -> int:
        return self._commits.batches if self._commits is not None else 0

    @property
    def batched_writes(self) -> int:
        return self._commits.batched_writes if self._commits is not None else 0

    def on_notice(self, handler: NoticeHandler) -> None:
        self._handlers.append(handler)

    def observe(self, observer: StoreObserver) -> None:
        self.observer = observer

    def deliver(self, notices: Sequence[Notice]) -> None:
        """Hand notices to this process's handlers (after commit, or as another process sent them)."""
        for notice in notices:
            for handler in self._handlers:
                handler(notice)

    def _open_commits(self) -> GroupCommit[Tx]:
        if self._commits is None:
            raise StoreError("store is not open")
        return self._commits

    async def _read(self, fn: Callable[[Tx], T]) -> T:
        """A read: runs with the next batch, outside its transaction."""
        started = time.perf_counter()
        result = await (self._reads or self._open_commits()).read(fn)
        if self.observer is not None:
            self.observer.store_call("read", time.perf_counter() - started)
        return result

    async def _write(self, fn: Callable[[Tx], T]) -> T:
        """A write: runs inside the next batch's transaction, under a savepoint of its own (an error
        undoes this call only). Returns once committed, after this process heard its notices."""
        notices: list[Notice] = []

        def call(tx: Tx) -> T:
            result, notices[:] = tx.call(fn)
            return result

        started = time.perf_counter()
        result = await self._open_commits().write(call)
        if self.observer is not None:
            self.observer.store_call("write", time.perf_counter() - started)
        self.deliver(notices)
        return result

    async def check_writable(self) -> None:
        await self._write(
            lambda tx: tx.run("UPDATE duties SET until = until WHERE name = ?", ("ready-probe",))
        )

    # --- tokens ---------------------------------------------------------------------------------

    async def add_token(self, token: TokenRecord) -> None:
        await self._write(lambda tx: add_token(tx, token))

    async def get_token(self, token_id: str) -> TokenRecord | None:
        row = await self._read(lambda tx: tx.one("SELECT * FROM tokens WHERE id = ?", (token_id,)))
        return rows.TOKENS.load(row) if row else None

    async def get_tokens(self, token_ids: Sequence[str]) -> dict[str, TokenRecord]:
        def select(tx: Tx) -> dict[str, TokenRecord]:
            found: dict[str, TokenRecord] = {}
            for batch in chunks(list(token_ids)):
                for row in tx.all(f"SELECT * FROM tokens WHERE id IN ({marks(len(batch))})", batch):
                    found[row["id"]] = rows.TOKENS.load(row)
            return found

        return await self._read(select)

    async def list_tokens(
        self, tenant: str | None = None, *, user_id: str | None = None
    ) -> list[TokenRecord]:
        return await self._read(lambda tx: list_tokens(tx, tenant, user_id))

    async def revoke_token(self, token_id: str, at: float) -> bool:
        return await self._write(lambda tx: revoke_token(tx, token_id, at))

    # --- users ----------------------------------------------------------------------------------

    async def add_user(self, user: UserRecord) -> None:
        integrity = self.dialect.integrity_errors

        def insert(tx: Tx) -> None:
            try:
                columns, count = rows.USERS.column_list(), len(rows.USERS.columns)
                tx.run(f"INSERT INTO users ({columns}) VALUES ({marks(count)})", rows.USERS.dump(user))
            except integrity:
                raise Conflict(f"a user with the email {user.email} exists") from None

        await self._write(insert)

    async def get_user(self, user_id: str) -> UserRecord | None:
        row = await self._read(lambda tx: tx.one("SELECT * FROM users WHERE id = ?", (user_id,)))
        return rows.USERS.load(row) if row else None

    async def find_user(self, email: str) -> UserRecord | None:
        row = await self._read(lambda tx: tx.one("SELECT * FROM users WHERE email = ?", (email,)))
        return rows.USERS.load(row) if row else None

    async def list_users(self, tenant: str) -> list[UserRecord]:
        found = await self._read(
            lambda tx: tx.all("SELECT * FROM users WHERE tenant = ? ORDER BY email", (tenant,))
        )
        return [rows.USERS.load(r) for r in found]

    async def update_user(self, user: UserRecord) -> bool:
        values = [user.name, user.role, user.state, user.password_hash, user.disabled_at]
        values += [user.id, user.tenant]

        def update(tx: Tx) -> bool:
            changed = tx.run(
                "UPDATE users SET name = ?, role = ?, state = ?, password_hash = ?, disabled_at = ? "
                "WHERE id = ? AND tenant = ?",
                values,
            )
            if changed:
                tx.notify(Notice("users", user.id))
            return changed > 0

        return await self._write(update)

    # --- child tenants (the integrator API) -----------------------------------------------------

    async def add_tenant(self, tenant: TenantRecord, limit: int) -> bool:
        integrity = self.dialect.integrity_errors

        def add(tx: Tx) -> bool:
            count = tx.one("SELECT COUNT(*) AS n FROM tenants WHERE parent = ?", (tenant.parent,))["n"]
            if count >= limit:
                return False
            try:
                tx.run(
                    f"INSERT INTO tenants ({rows.TENANTS.column_list()}) VALUES "
                    f"({marks(len(rows.TENANTS.columns))})",
                    rows.TENANTS.dump(tenant),
                )
            except integrity:
                raise Conflict(f"a tenant {tenant.id} exists") from None
            return True

        return await self._write(add)

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        row = await self._read(lambda tx: tx.one("SELECT * FROM tenants WHERE id = ?", (tenant_id,)))
        return rows.TENANTS.load(row) if row else None

    async def list_tenants(
        self, parent: str, *, after: str | None = None, limit: int = 100
    ) -> list[TenantRecord]:
        sql, args = "SELECT t.* FROM tenants t WHERE t.parent = ?", [parent]
        if after is not None:  # the page after this child: oldest first, by (created_at, id)
            sql += (
                " AND EXISTS (SELECT 1 FROM tenants a WHERE a.id = ? AND a.parent = t.parent"
                " AND (t.created_at > a.created_at OR (t.created_at = a.created_at AND t.id > a.id)))"
            )
            args.append(after)
        sql += " ORDER BY t.created_at, t.id LIMIT ?"
        found = await self._read(lambda tx: tx.all(sql, [*args, limit]))
        return [rows.TENANTS.load(r) for r in found]

    async def tenant_job_totals(
        self, tenant: str, *, since: float | None = None, until: float | None = None
    ) -> dict[str, tuple[int, int]]:
        sql = "SELECT state, COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM jobs WHERE tenant = ?"
        args: list[Any] = [tenant]
        sql += _created_in(since, until, args) + " GROUP BY state"
        found = await self._read(lambda tx: tx.all(sql, args))
        return {r["state"]: (int(r["n"]), int(r["bytes"])) for r in found}

    # --- connectors, sessions and printers ------------------------------------------------------

    async def upsert_connector(self, connector: ConnectorRecord) -> None:
        cols = rows.CONNECTORS.columns
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in ("tenant", "id"))
        sql = (
            f"INSERT INTO connectors ({rows.CONNECTORS.column_list()}) VALUES ({marks(len(cols))}) "
            f"ON CONFLICT (tenant, id) DO UPDATE SET {updates}"
        )
        await self._write(lambda tx: tx.run(sql, rows.CONNECTORS.dump(connector)))

    async def get_connector(self, tenant: str, connector_id: str) -> ConnectorRecord | None:
        return await self._read(lambda tx: _get_connector(tx, tenant, connector_id))

    async def submit_lookups(
        self, tenant: str, printer_id: str
    ) -> tuple[Printer | None, ConnectorRecord | None, tuple[int, int]]:
        def get(tx: Tx) -> tuple[Printer | None, ConnectorRecord | None, tuple[int, int]]:
            usage = _tenant_usage(tx, tenant)
            row = tx.one(f"{PRINTER_SELECT} WHERE p.tenant = ? AND p.id = ?", (tenant, printer_id))
            if row is None:
                return None, None, usage
            printer = _printer(row)
            return printer, _get_connector(tx, tenant, printer.connector_id), usage

        return await self._read(get)

    async def session_opened(self, session: SessionRecord) -> None:
        def opened(tx: Tx) -> None:
            tx.send(
                "INSERT INTO connector_sessions (id, tenant, connector_id, replica_id, opened_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (session.id, session.tenant, session.connector_id, session.replica_id, session.opened_at),
            )
            tx.send(
                "UPDATE connectors SET last_seen = ? WHERE tenant = ? AND id = ?",
                (session.opened_at, session.tenant, session.connector_id),
            )
            # Back after an announced offline, or seen for the first time: announced once, whichever
            # replica the session is on (a reconnect within the grace finds "online" and says nothing).
            back = tx.one(
                "UPDATE connectors SET announced = 'online' WHERE tenant = ? AND id = ? "
                "AND announced <> 'online' RETURNING *",
                (session.tenant, session.connector_id),
            )
            if back is not None:
                _connector_event(tx, CONNECTOR_ONLINE, back, session.opened_at)

        await self._write(opened)

    async def session_closed(self, session_id: str, at: float) -> None:
        def closed(tx: Tx) -> None:
            row = tx.one(
                "DELETE FROM connector_sessions WHERE id = ? RETURNING tenant, connector_id", (session_id,)
            )
            if row is not None:
                tx.send(
                    "UPDATE connectors SET last_seen = ? WHERE tenant = ? AND id = ?",
                    (at, row["tenant"], row["connector_id"]),
                )

        await self._write(closed)

    async def replace_printers(self, tenant: str, connector_id: str, printers: Sequence[Printer]) -> None:
        # Printer ids are per tenant. When another connector of the tenant reported the same id before,
        # the newest report wins; jobs queued for it stay sealed to the old connector (DESIGN §5).
        await self._write(lambda tx: _put_printers(tx, tenant, printers))

    async def update_printer(self, printer: Printer) -> None:
        await self._write(lambda tx: _put_printers(tx, printer.tenant, [printer]))

    async def get_printer(self, tenant: str, printer_id: str) -> Printer | None:
        row = await self._read(
            lambda tx: tx.one(f"{PRINTER_SELECT} WHERE p.tenant = ? AND p.id = ?", (tenant, printer_id))
        )
        return _printer(row) if row else None

    async def list_printers(self, tenant: str) -> list[Printer]:
        found = await self._read(
            lambda tx: tx.all(f"{PRINTER_SELECT} WHERE p.tenant = ? ORDER BY p.id", (tenant,))
        )
        return [_printer(r) for r in found]

    async def set_printer_pull(self, tenant: str, printer_id: str, pull: bool) -> bool:
        return await self._write(
            lambda tx: (
                tx.run(
                    "UPDATE printers SET pull = ? WHERE tenant = ? AND id = ?",
                    (1 if pull else 0, tenant, printer_id),
                )
                > 0
            )
        )

    # --- the portal's sessions and OpenID Connect providers ---------------------------------------

    async def add_web_session(self, session: WebSession) -> None:
        columns, count = rows.WEB_SESSIONS.column_list(), len(rows.WEB_SESSIONS.columns)
        await self._write(
            lambda tx: tx.run(
                f"INSERT INTO web_sessions ({columns}) VALUES ({marks(count)})",
                rows.WEB_SESSIONS.dump(session),
            )
        )

    async def get_web_session(self, session_id: str) -> WebSession | None:
        row = await self._read(lambda tx: tx.one("SELECT * FROM web_sessions WHERE id = ?", (session_id,)))
        return rows.WEB_SESSIONS.load(row) if row else None

    async def touch_web_session(self, session_id: str, at: float) -> None:
        await self._write(
            lambda tx: tx.send("UPDATE web_sessions SET last_seen_at = ? WHERE id = ?", (at, session_id))
        )

    async def revoke_web_sessions(
        self, *, session_id: str | None = None, user_id: str | None = None, at: float
    ) -> int:
        if (session_id is None) == (user_id is None):
            raise ValueError("revoke one session or one user's")
        column, value = ("id", session_id) if session_id is not None else ("user_id", user_id)
        return await self._write(
            lambda tx: tx.run(
                f"UPDATE web_sessions SET revoked_at = ? WHERE {column} = ? AND revoked_at IS NULL",
                (at, value),
            )
        )

    async def set_oidc_provider(self, provider: OidcProvider) -> None:
        cols = rows.OIDC_PROVIDERS.columns
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "tenant")
        await self._write(
            lambda tx: tx.run(
                f"INSERT INTO oidc_providers ({rows.OIDC_PROVIDERS.column_list()}) "
                f"VALUES ({marks(len(cols))}) ON CONFLICT (tenant) DO UPDATE SET {updates}",
                rows.OIDC_PROVIDERS.dump(provider),
            )
        )

    async def get_oidc_provider(self, tenant: str) -> OidcProvider | None:
        row = await self._read(lambda tx: tx.one("SELECT * FROM oidc_providers WHERE tenant = ?", (tenant,)))
        return rows.OIDC_PROVIDERS.load(row) if row else None

    async def delete_oidc_provider(self, tenant: str) -> bool:
        return await self._write(
            lambda tx: tx.run("DELETE FROM oidc_providers WHERE tenant = ?", (tenant,)) > 0
        )

    # --- candidates and requests to connectors ---------------------------------------------------

    async def announce_offline(self, before: float) -> list[tuple[str, str]]:
        # No session on any replica, and none since ``before``: a compare-and-set on ``announced``, so
        # replicas sweeping at once, or a session opening meanwhile, never make it twice or wrongly.
        due = (
            "announced = 'online' AND last_seen < ? AND NOT EXISTS (SELECT 1 FROM connector_sessions s "
            "WHERE s.tenant = connectors.tenant AND s.connector_id = connectors.id)"
        )

        def announce(tx: Tx) -> list[tuple[str, str]]:
            gone = tx.all(f"UPDATE connectors SET announced = 'offline' WHERE {due} RETURNING *", (before,))
            at = time.time()
            for row in gone:
                _connector_event(tx, CONNECTOR_OFFLINE, row, at)
            return [(r["tenant"], r["id"]) for r in gone]

        # Every sweep reads; only one that finds a connector to announce writes.
        if not await self._read(lambda tx: tx.one(f"SELECT 1 AS due FROM connectors WHERE {due}", (before,))):
            return []
        return await self._write(announce)

    async def connectors_online(self, tenant: str) -> list[str]:
        found = await self._read(
            lambda tx: tx.all(
                "SELECT DISTINCT connector_id FROM connector_sessions WHERE tenant = ? ORDER BY connector_id",
                (tenant,),
            )
        )
        return [r["connector_id"] for r in found]

    async def add_candidate(
        self, tenant: str, connector_id: str, uri: str, data: dict[str, Any], at: float, limit: int
    ) -> bool:
        def add(tx: Tx) -> bool:
            known = tx.one(
                "SELECT COUNT(*) FILTER (WHERE uri = ?) AS this, COUNT(*) AS n FROM candidates "
                "WHERE tenant = ? AND connector_id = ?",
                (uri, tenant, connector_id),
            )
            if not known["this"] and known["n"] >= limit:
                return False
            tx.run(
                "INSERT INTO candidates (tenant, connector_id, uri, data, seen_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (tenant, connector_id, uri) DO UPDATE SET data = excluded.data, "
                "seen_at = excluded.seen_at",
                (tenant, connector_id, uri, json.dumps(data, separators=(",", ":")), at),
            )
            return True

        return await self._write(add)

    async def remove_candidate(self, tenant: str, connector_id: str, uri: str) -> None:
        await self._write(
            lambda tx: tx.run(
                "DELETE FROM candidates WHERE tenant = ? AND connector_id = ? AND uri = ?",
                (tenant, connector_id, uri),
            )
        )

    async def list_candidates(self, tenant: str) -> list[tuple[str, dict[str, Any]]]:
        found = await self._read(
            lambda tx: tx.all(
                "SELECT c.connector_id, c.data FROM candidates c WHERE c.tenant = ? AND EXISTS "
                "(SELECT 1 FROM connector_sessions s WHERE s.tenant = c.tenant AND s.connector_id = "
                "c.connector_id) "
                "ORDER BY c.connector_id, c.uri",
                (tenant,),
            )
        )
        return [(r["connector_id"], json.loads(r["data"])) for r in found]

    async def add_connector_request(self, request: ConnectorRequest) -> None:
        def add(tx: Tx) -> None:
            tx.run(
                "INSERT INTO connector_requests (id, tenant, connector_id, method, path, body, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (request.id, request.tenant, request.connector_id, request.method, request.path, request.body,
                 request.created_at),
            )  # fmt: skip
            tx.notify(
                Notice(
                    "request", request.id, {"tenant": request.tenant, "connector_id": request.connector_id}
                )
            )

        await self._write(add)

    async def take_connector_request(self, request_id: str, owner: str) -> ConnectorRequest | None:
        def take(tx: Tx) -> ConnectorRequest | None:
            row = tx.one(
                "UPDATE connector_requests SET claimed_by = ? WHERE id = ? AND claimed_by IS NULL "
                "RETURNING *",
                (owner, request_id),
            )
            if row is None:
                return None
            body = row["body"]
            return ConnectorRequest(
                row["id"], row["tenant"], row["connector_id"], row["method"], row["path"],
                bytes(body) if body is not None else None, row["created_at"],
            )  # fmt: skip

        return await self._write(take)

    async def answer_connector_request(self, request_id: str, status: int, answer: bytes) -> None:
        def answered(tx: Tx) -> None:
            tx.run(
                "UPDATE connector_requests SET status = ?, answer = ? WHERE id = ?",
                (status, answer, request_id),
            )
            tx.notify(Notice("answer", request_id))

        await self._write(answered)

    async def connector_answer(self, request_id: str) -> tuple[int, bytes] | None:
        row = await self._read(
            lambda tx: tx.one("SELECT status, answer FROM connector_requests WHERE id = ?", (request_id,))
        )
        if row is None or row["status"] is None:
            return None
        return int(row["status"]), bytes(row["answer"] or b"")

    async def forget_connector_request(self, request_id: str) -> None:
        await self._write(lambda tx: tx.run("DELETE FROM connector_requests WHERE id = ?", (request_id,)))

    # --- jobs -----------------------------------------------------------------------------------

    async def insert_job(
        self, job: Job, message: str, *, payload: bytes | None = None, quota: Quota | None = None
    ) -> Job:
        integrity = self.dialect.integrity_errors

        def insert(tx: Tx) -> Job:
            if not job.state.final:
                _use_quota(tx, job.tenant, job.sealed_size, 1, quota)
            try:
                tx.send(
                    f"INSERT INTO jobs ({rows.JOBS.column_list()}) VALUES ({marks(len(rows.JOBS.columns))})",
                    rows.JOBS.dump(job),
                )
                if payload is not None:
                    tx.send("INSERT INTO payloads (job_id, sealed) VALUES (?, ?)", (job.id, payload))
                _record_event(tx, job, job.created_at, message)
                tx.flush()  # here, so that a reused Idempotency-Key is a Conflict
            except integrity as exc:
                raise Conflict(str(exc)) from exc
            return job

        return await self._write(insert)

    async def get_payload(self, job_id: str) -> bytes | None:
        row = await self._read(lambda tx: tx.one("SELECT sealed FROM payloads WHERE job_id = ?", (job_id,)))
        return None if row is None else bytes(row["sealed"])

    async def get_job(self, tenant: str, job_id: str) -> Job | None:
        row = await self._read(
            lambda tx: tx.one("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        )
        return rows.JOBS.load(row) if row else None

    async def find_job_by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        row = await self._read(
            lambda tx: tx.one("SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?", (tenant, key))
        )
        return rows.JOBS.load(row) if row else None

    async def list_jobs(
        self,
        tenant: str,
        *,
        printer_id: str | None = None,
        state: JobState | None = None,
        owner: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 100,
    ) -> list[Job]:
        sql = "SELECT * FROM jobs WHERE tenant = ?"
        args: list[Any] = [tenant]
        state_text = str(state) if state is not None else None
        equal = {"owner": owner, '"user"': user, "printer_id": printer_id, "state": state_text}
        for column, value in equal.items():
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        sql += _created_in(since, until, args)
        if before is not None:  # the page after one that ended at this job: newest first, by (created_at, id)
            sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            args += [before[0], before[0], before[1]]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        found = await self._read(lambda tx: tx.all(sql, args))
        return [rows.JOBS.load(r) for r in found]

    async def claim_jobs_and_next_due(
        self, tenant: str, connector_id: str, now: float, limit: int, lease: Lease
    ) -> tuple[list[Job], float | None]:
        sql = (
            "UPDATE jobs SET state = 'sending', attempts = attempts + 1, updated_at = ?, "
            "lease_owner = ?, lease_expires_at = {clock} + ? "
            "WHERE id IN (SELECT j.id FROM jobs j JOIN printers p ON p.tenant = j.tenant AND p.id = "
            "j.printer_id "
            "WHERE j.tenant = ? AND j.connector_id = ? AND p.connector_id = ? AND j.state = 'queued' "
            # a stopped or unreachable printer holds its jobs instead of spending their attempts; its next
            # state event wakes the dispatcher
            "AND p.state NOT IN ('stopped', 'offline') "
            # unary +: not an index term, so SQLite walks jobs_claim in created_at order
            f"AND +j.next_attempt_at <= ? ORDER BY j.created_at LIMIT ?{self.dialect.skip_locked}) "
            "RETURNING *"
        )

        def claim(tx: Tx) -> tuple[list[Job], float | None]:
            found = tx.all(
                sql, (now, lease.owner, lease.seconds, tenant, connector_id, connector_id, now, limit)
            )
            jobs = sorted((rows.JOBS.load(r) for r in found), key=lambda j: j.created_at)
            for job in jobs:
                _record_event(tx, job, now, f"attempt {job.attempts}: sending to connector {connector_id}")
            # A full claim may have left due jobs behind: the caller claims again, no need to look.
            return jobs, None if len(jobs) >= limit else _due(tx.one(NEXT_DUE, (tenant, connector_id)))

        return await self._write(claim)

    async def transition(
        self, job_id: str, event: JobEvent, message: str, at: float, **fields: Any
    ) -> Job | None:
        unknown = set(fields) - MUTABLE_JOB_FIELDS
        if unknown:
            raise ValueError(f"cannot set {sorted(unknown)} in a transition")

        sources, state = MOVES[event]
        values: dict[str, Any] = {**fields, "state": str(state), "updated_at": at}
        if "wrapped_key" in values:
            values["wrapped_key"] = bytes(values["wrapped_key"])
        if state.final and "completed_at" not in fields:
            values["completed_at"] = at
        if state not in (JobState.SENDING, JobState.PRINTING):
            values["lease_owner"] = values["lease_expires_at"] = None  # nobody holds it any more
        assignments = ", ".join(f"{name} = ?" for name in values)
        # One statement, a compare-and-set on the state: two replicas never both move a job from one state.
        update = (
            f"UPDATE jobs SET {assignments} WHERE id = ? AND state IN ({marks(len(sources))}) RETURNING *"
        )
        args = [*values.values(), job_id, *sorted(str(s) for s in sources)]
        leaves_flight = state.final and not any(s.final for s in sources)

        def apply(tx: Tx) -> Job | None:
            updated = tx.one(update, args)
            if updated is None:
                row = tx.one("SELECT state FROM jobs WHERE id = ?", (job_id,))
                if row is None or JobState(row["state"]) in sources:
                    return None  # gone, or moved meanwhile
                raise IllegalTransition(JobState(row["state"]), event)
            changed = rows.JOBS.load(updated)
            if leaves_flight:
                _use_quota(tx, changed.tenant, -changed.sealed_size, -1, None)
                # Erased with the final state: the payload kept with the row, or its chunks.
                tx.send("DELETE FROM payloads WHERE job_id = ?", (job_id,))
                tx.send("DELETE FROM payload_chunks WHERE job_id = ?", (job_id,))
            _record_event(tx, changed, at, message)
            return changed

        return await self._write(apply)

    async def job_history(self, job_id: str) -> list[JobHistoryEntry]:
        found = await self._read(
            lambda tx: tx.all(
                f"SELECT * FROM job_events WHERE job_id = ? ORDER BY at, {self.dialect.event_order}",
                (job_id,),
            )
        )
        return [JobHistoryEntry(r["job_id"], r["at"], JobState(r["state"]), r["message"]) for r in found]

    async def next_due(self, tenant: str, connector_id: str) -> float | None:
        return await self._read(lambda tx: _due(tx.one(NEXT_DUE, (tenant, connector_id))))

    async def renew_leases(self, lease: Lease, job_ids: Sequence[str]) -> None:
        def renew(tx: Tx) -> None:
            for batch in chunks(list(job_ids)):
                tx.send(
                    "UPDATE jobs SET lease_expires_at = {clock} + ? WHERE lease_owner = ? "
                    f"AND state IN ('sending', 'printing') AND id IN ({marks(len(batch))})",
                    [lease.seconds, lease.owner, *batch],
                )

        if job_ids:
            await self._write(renew)

    async def lapsed_leases(self, limit: int) -> list[Job]:
        found = await self._read(
            lambda tx: tx.all(
                "SELECT * FROM jobs WHERE state IN ('sending', 'printing') AND lease_expires_at < {clock} "
                "LIMIT ?",
                (limit,),
            )
        )
        return [rows.JOBS.load(r) for r in found]

    async def requeue_orphaned(self, at: float) -> list[str]:
        def requeue(tx: Tx) -> list[str]:
            found = tx.all(
                # Not the job's fault (nor is a lapsed lease, relay/leases.py): the attempt is given back,
                # or a few restarts while it streams fail a job that was never refused.
                "UPDATE jobs SET state = 'queued', updated_at = ?, next_attempt_at = ?, lease_owner = NULL, "
                "lease_expires_at = NULL, attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, "
                "last_error = ? WHERE state IN ('sending', 'printing') "
                "AND (lease_owner IS NULL OR lease_owner NOT IN (SELECT id FROM replicas)) RETURNING *",
                (at, at, RELAY_STOPPED),
            )
            jobs = [rows.JOBS.load(r) for r in found]
            for job in jobs:
                _record_event(tx, job, at, RELAY_STOPPED)
            return [job.id for job in jobs]

        return await self._write(requeue)

    async def expired_jobs(self, now: float, limit: int) -> list[Job]:
        found = await self._read(
            lambda tx: tx.all(
                "SELECT * FROM jobs WHERE state IN ('held', 'queued') AND expires_at IS NOT NULL "
                "AND expires_at <= ? LIMIT ?",
                (now, limit),
            )
        )
        return [rows.JOBS.load(r) for r in found]

    async def next_expiry(self) -> float | None:
        row = await self._read(
            lambda tx: tx.one(
                "SELECT MIN(expires_at) AS due FROM jobs WHERE state IN ('held', 'queued') "
                "AND expires_at IS NOT NULL"
            )
        )
        return _due(row)

    async def tenant_usage(self, tenant: str) -> tuple[int, int]:
        return await self._read(lambda tx: _tenant_usage(tx, tenant))

    async def all_job_ids_with_payload(self) -> set[str]:
        found = await self._read(
            lambda tx: tx.all("SELECT id FROM jobs WHERE state IN ('held', 'queued', 'sending', 'printing')")
        )
        return {r["id"] for r in found}

    async def sample(self, now: float) -> StoreSample:
        def read(tx: Tx) -> StoreSample:
            states = tx.all(
                "SELECT state, COUNT(*) AS n FROM jobs WHERE state IN ('held', 'queued', 'sending', "
                "'printing') "
                "GROUP BY state"
            )
            oldest = tx.one("SELECT MIN(created_at) AS at FROM jobs WHERE state = 'queued'")["at"]
            # A connector whose tokens are all revoked or expired is retired, not down.
            fleet = tx.one(
                "SELECT COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM connector_sessions s "
                "WHERE s.tenant = c.tenant AND s.connector_id = c.id)) AS online, COUNT(*) AS known "
                "FROM connectors c WHERE EXISTS (SELECT 1 FROM tokens t WHERE t.tenant = c.tenant "
                "AND t.kind = 'connector' AND t.connector_id = c.id AND t.revoked_at IS NULL "
                "AND (t.expires_at IS NULL OR t.expires_at > ?))",
                (now,),
            )
            online = int(fleet["online"] or 0)
            sessions = tx.all(
                "SELECT r.id, (SELECT COUNT(*) FROM connector_sessions s WHERE s.replica_id = r.id) AS n "
                "FROM replicas r"
            )
            return StoreSample(
                {r["state"]: int(r["n"]) for r in states}, oldest, online, int(fleet["known"] or 0) - online,
                {r["id"]: int(r["n"]) for r in sessions},
            )  # fmt: skip

        return await self._read(read)

    # --- IPP job numbers ------------------------------------------------------------------------

    async def ipp_job_numbers(
        self, tenant: str, printer_id: str, job_ids: Sequence[str], at: float
    ) -> dict[str, int]:
        def numbers(tx: Tx) -> dict[str, int]:
            found: dict[str, int] = {}
            for batch in chunks(list(job_ids)):
                for row in tx.all(
                    "SELECT job_id, number FROM ipp_jobs WHERE tenant = ? AND job_id IN "
                    f"({marks(len(batch))})",
                    [tenant, *batch],
                ):
                    found[row["job_id"]] = int(row["number"])
            missing = [j for j in dict.fromkeys(job_ids) if j not in found]
            if missing:
                last = _take_ipp_numbers(tx, tenant, len(missing))
                for number, job_id in enumerate(missing, start=last - len(missing) + 1):
                    # Another replica may number the same job meanwhile: its number stands, ours is a gap.
                    tx.run(
                        "INSERT INTO ipp_jobs (tenant, number, printer_id, job_id, state, ticket, "
                        "created_at, "
                        "updated_at) VALUES (?, ?, ?, ?, 'attached', '{}', ?, ?) "
                        "ON CONFLICT (tenant, job_id) WHERE job_id IS NOT NULL DO NOTHING",
                        (tenant, number, printer_id, job_id, at, at),
                    )
                for batch in chunks(missing):
                    for row in tx.all(
                        "SELECT job_id, number FROM ipp_jobs WHERE tenant = ? AND job_id IN "
                        f"({marks(len(batch))})",
                        [tenant, *batch],
                    ):
                        found[row["job_id"]] = int(row["number"])
            return found

        if not job_ids:
            return {}
        # Only a job shown over IPP for the first time needs a write.
        known = await self._read(
            lambda tx: {
                r["job_id"]: int(r["number"])
                for batch in chunks(list(job_ids))
                for r in tx.all(
                    "SELECT job_id, number FROM ipp_jobs WHERE tenant = ? AND job_id IN "
                    f"({marks(len(batch))})",
                    [tenant, *batch],
                )
            }
        )
        if all(j in known for j in job_ids):
            return known
        return await self._write(numbers)

    async def create_ipp_job(self, job: IppJob) -> IppJob:
        def create(tx: Tx) -> IppJob:
            job.number = _take_ipp_numbers(tx, job.tenant, 1)
            tx.run(
                f"INSERT INTO ipp_jobs ({rows.IPP_JOBS.column_list()}) VALUES "
                f"({marks(len(rows.IPP_JOBS.columns))})",
                rows.IPP_JOBS.dump(job),
            )
            return job

        return await self._write(create)

    async def get_ipp_job(self, tenant: str, number: int) -> IppJob | None:
        row = await self._read(
            lambda tx: tx.one("SELECT * FROM ipp_jobs WHERE tenant = ? AND number = ?", (tenant, number))
        )
        return rows.IPP_JOBS.load(row) if row else None

    async def set_ipp_job_state(
        self,
        tenant: str,
        number: int,
        expect: IppJobState,
        state: IppJobState,
        at: float,
        job_id: str | None = None,
    ) -> bool:
        return bool(
            await self._write(
                lambda tx: tx.run(
                    "UPDATE ipp_jobs SET state = ?, job_id = COALESCE(?, job_id), updated_at = ? "
                    "WHERE tenant = ? AND number = ? AND state = ?",
                    (str(state), job_id, at, tenant, number, str(expect)),
                )
            )
        )

    async def list_ipp_jobs(
        self, tenant: str, printer_id: str, states: Sequence[IppJobState], limit: int
    ) -> list[IppJob]:
        if not states:
            return []
        found = await self._read(
            lambda tx: tx.all(
                "SELECT * FROM ipp_jobs WHERE tenant = ? AND printer_id = ? AND state IN "
                f"({marks(len(states))}) "
                "ORDER BY number DESC LIMIT ?",
                [tenant, printer_id, *(str(s) for s in states), limit],
            )
        )
        return [rows.IPP_JOBS.load(r) for r in found]

    # --- webhooks -------------------------------------------------------------------------------

    async def add_webhook(self, hook: Webhook, limit: int) -> bool:
        def add(tx: Tx) -> bool:
            count = tx.one("SELECT COUNT(*) AS n FROM webhooks WHERE tenant = ?", (hook.tenant,))["n"]
            if count >= limit:
                return False
            tx.forget_webhooks()
            tx.run(
                f"INSERT INTO webhooks ({rows.WEBHOOKS.column_list()}) VALUES "
                f"({marks(len(rows.WEBHOOKS.columns))})",
                rows.WEBHOOKS.dump(hook),
            )
            return True

        return await self._write(add)

    async def list_webhooks(self, tenant: str) -> list[Webhook]:
        found = await self._read(
            lambda tx: tx.all(
                "SELECT w.*, (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id) AS "
                "pending "
                "FROM webhooks w WHERE w.tenant = ? ORDER BY w.created_at, w.id",
                (tenant,),
            )
        )
        return [rows.WEBHOOKS.load(r) for r in found]

    async def rewrite_webhook_secrets(self, rewrite: Callable[[str, str], str]) -> int:
        def apply(tx: Tx) -> int:
            changed = [
                (new, row["id"])
                for row in tx.all("SELECT id, secret FROM webhooks")
                if (new := rewrite(row["id"], row["secret"])) != row["secret"]
            ]
            tx.many("UPDATE webhooks SET secret = ? WHERE id = ?", changed)
            return len(changed)

        return await self._write(apply)

    async def delete_webhook(self, tenant: str, webhook_id: str) -> Webhook | None:
        def delete(tx: Tx) -> Webhook | None:
            tx.run("DELETE FROM webhook_deliveries WHERE webhook_id = ? AND tenant = ?", (webhook_id, tenant))
            row = tx.one("DELETE FROM webhooks WHERE tenant = ? AND id = ? RETURNING *", (tenant, webhook_id))
            return rows.WEBHOOKS.load(row, pending=0) if row else None

        return await self._write(delete)

    async def claim_webhook_deliveries(
        self, owner: str, now: float, limit: int, *, per_webhook: int, lease_seconds: float
    ) -> list[WebhookDelivery]:
        def heads(tx: Tx, limit: int) -> list[Any]:
            # Heads of their (webhook, job) line, due, unclaimed (or their sender's claim lapsed), and at
            # most per_webhook in flight per webhook, counting those already claimed.
            return tx.all(
                "SELECT seq FROM (SELECT d.seq, d.next_attempt_at, ROW_NUMBER() OVER "
                "(PARTITION BY d.webhook_id ORDER BY d.next_attempt_at, d.seq) + (SELECT COUNT(*) "
                "FROM webhook_deliveries f WHERE f.webhook_id = d.webhook_id AND f.claimed_until > "
                "{clock}) AS n "
                "FROM webhook_deliveries d WHERE d.next_attempt_at <= ? "
                "AND (d.claimed_until IS NULL OR d.claimed_until <= {clock}) "
                "AND d.seq = (SELECT MIN(e.seq) FROM webhook_deliveries e "
                "WHERE e.webhook_id = d.webhook_id AND e.job_id = d.job_id)) AS heads "
                "WHERE n <= ? ORDER BY next_attempt_at, seq LIMIT ?",
                (now, per_webhook, limit),
            )

        def claim(tx: Tx) -> list[WebhookDelivery]:
            found = heads(tx, limit)
            seqs = [r["seq"] for r in found]
            claimed: list[Any] = []
            for batch in chunks(seqs):
                claimed += tx.all(
                    "UPDATE webhook_deliveries SET claimed_by = ?, claimed_until = {clock} + ? "
                    f"WHERE seq IN ({marks(len(batch))}) AND (claimed_until IS NULL OR claimed_until <= "
                    f"{{clock}}) "
                    "RETURNING seq",
                    [owner, lease_seconds, *batch],
                )
            mine = [r["seq"] for r in claimed]
            if not mine:
                return []
            got = tx.all(
                "SELECT d.*, w.url, w.secret FROM webhook_deliveries d JOIN webhooks w ON w.id = "
                "d.webhook_id "
                f"WHERE d.seq IN ({marks(len(mine))}) ORDER BY d.next_attempt_at, d.seq",
                mine,
            )
            return [rows.DELIVERIES.load(r, url=r["url"], secret=r["secret"]) for r in got]

        # Every replica looks at every job change: a read finds that nothing is due (the usual answer, and
        # always for a tenant without webhooks); only then a write transaction claims, looking again.
        if not await self._read(lambda tx: heads(tx, 1)):
            return []
        return await self._write(claim)

    async def next_webhook_due(self) -> float | None:
        row = await self._read(
            lambda tx: tx.one(
                "SELECT MIN(CASE WHEN d.claimed_until > {clock} THEN d.claimed_until "
                "ELSE d.next_attempt_at END) AS due FROM webhook_deliveries d "
                "WHERE d.seq = (SELECT MIN(e.seq) FROM webhook_deliveries e "
                "WHERE e.webhook_id = d.webhook_id AND e.job_id = d.job_id)"
            )
        )
        return _due(row)

    async def webhook_delivery_failed(
        self, seq: int, attempts: int, next_attempt_at: float, error: str, at: float | None = None
    ) -> None:
        def failed(tx: Tx) -> None:
            tx.send(
                "UPDATE webhooks SET last_error = ?, last_error_at = ? "
                "WHERE id = (SELECT webhook_id FROM webhook_deliveries WHERE seq = ?)",
                (error, time.time() if at is None else at, seq),
            )
            tx.send(
                "UPDATE webhook_deliveries SET attempts = ?, next_attempt_at = ?, last_error = ?, "
                "claimed_by = NULL, claimed_until = NULL WHERE seq = ?",
                (attempts, next_attempt_at, error, seq),
            )

        await self._write(failed)

    async def remove_webhook_delivery(
        self, seq: int, *, delivered_at: float | None = None, error: str | None = None
    ) -> None:
        def remove(tx: Tx) -> None:
            # The webhook keeps the outcome (delivered, or dropped with its last error) in the same
            # transaction: a listing never shows the delivery gone and its outcome not yet there.
            if delivered_at is not None or error is not None:
                column = "last_delivered_at = ?" if error is None else "last_error = ?, last_error_at = ?"
                values: list[Any] = [delivered_at] if error is None else [error, time.time()]
                tx.send(
                    f"UPDATE webhooks SET {column} "
                    "WHERE id = (SELECT webhook_id FROM webhook_deliveries WHERE seq = ?)",
                    [*values, seq],
                )
            tx.send("DELETE FROM webhook_deliveries WHERE seq = ?", (seq,))

        await self._write(remove)

    # --- payload chunks -------------------------------------------------------------------------

    async def add_payload_chunk(self, job_id: str, seq: int, data: bytes) -> None:
        await self._write(
            lambda tx: tx.send(
                "INSERT INTO payload_chunks (job_id, seq, data, written_at) VALUES (?, ?, ?, {clock})",
                (job_id, seq, data),
            )
        )

    async def payload_chunks(self, job_id: str, first: int, limit: int) -> list[bytes]:
        found = await self._read(
            lambda tx: tx.all(
                "SELECT data FROM payload_chunks WHERE job_id = ? AND seq >= ? ORDER BY seq LIMIT ?",
                (job_id, first, limit),
            )
        )
        return [bytes(r["data"]) for r in found]

    async def erase_payload_chunks(self, job_id: str) -> None:
        await self._write(lambda tx: tx.run("DELETE FROM payload_chunks WHERE job_id = ?", (job_id,)))

    async def payload_chunk_usage(self) -> tuple[int, int]:
        row = await self._read(
            lambda tx: tx.one(
                "SELECT COALESCE(SUM(length(data)), 0) AS bytes, COUNT(DISTINCT job_id) AS payloads "
                "FROM payload_chunks"
            )
        )
        return int(row["bytes"]), int(row["payloads"])

    async def remove_orphan_chunks(self, older_than: float) -> int:
        def remove(tx: Tx) -> int:
            stale = [
                r["job_id"]
                for r in tx.all(
                    "SELECT c.job_id FROM payload_chunks c WHERE NOT EXISTS "
                    "(SELECT 1 FROM jobs j WHERE j.id = c.job_id) "
                    "GROUP BY c.job_id HAVING MAX(c.written_at) < {clock} - ?",
                    (older_than,),
                )
            ]
            for batch in chunks(stale):
                tx.run(f"DELETE FROM payload_chunks WHERE job_id IN ({marks(len(batch))})", batch)
            return len(stale)

        return await self._write(remove)

    # --- replicas -------------------------------------------------------------------------------

    async def register_replica(self, replica_id: str, name: str) -> None:
        def register(tx: Tx) -> None:
            tx.run(
                "INSERT INTO replicas (id, name, started_at, heartbeat_at) VALUES (?, ?, {clock}, {clock}) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (replica_id, name),
            )
            tx.notify(Notice("replicas", replica_id))

        await self._write(register)

    async def heartbeat(self, replica_id: str) -> None:
        await self._write(
            lambda tx: tx.run("UPDATE replicas SET heartbeat_at = {clock} WHERE id = ?", (replica_id,))
        )

    async def retire_replica(self, replica_id: str) -> None:
        await self._write(lambda tx: retire_replicas(tx, [replica_id]))

    async def retire_silent_replicas(self, silent_for: float) -> list[str]:
        def retire(tx: Tx) -> list[str]:
            silent = [
                r["id"]
                for r in tx.all("SELECT id FROM replicas WHERE heartbeat_at < {clock} - ?", (silent_for,))
            ]
            retire_replicas(tx, silent)
            return silent

        return await self._write(retire)

    async def live_replicas(self, silent_for: float) -> int:
        row = await self._read(
            lambda tx: tx.one(
                "SELECT COUNT(*) AS n FROM replicas WHERE heartbeat_at >= {clock} - ?", (silent_for,)
            )
        )
        return int(row["n"])

    async def agree(self, name: str, value: str) -> str:
        def agree(tx: Tx) -> str:
            tx.run(
                "INSERT INTO relay_settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, value),
            )
            return str(tx.one("SELECT value FROM relay_settings WHERE name = ?", (name,))["value"])

        return await self._write(agree)

    async def take_duty(self, name: str, owner: str, seconds: float) -> bool:
        def take(tx: Tx) -> bool:
            tx.run(
                "INSERT INTO duties (name, owner, until) VALUES (?, ?, 0) ON CONFLICT (name) DO NOTHING",
                (name, owner),
            )
            return bool(
                tx.run(
                    "UPDATE duties SET owner = ?, until = {clock} + ? WHERE name = ? "
                    "AND (owner = ? OR until < {clock})",
                    (owner, seconds, name, owner),
                )
            )

        return await self._write(take)


# --- statements shared by several calls ---------------------------------------------------------------


def _created_in(since: float | None, until: float | None, args: list[Any]) -> str:
    """The conditions of jobs created in [since, until) (either may be open), their values added to
    ``args``."""
    sql = ""
    for bound, condition in ((since, " AND created_at >= ?"), (until, " AND created_at < ?")):
        if bound is not None:
            sql += condition
            args.append(bound)
    return sql


def _printer(row: Any) -> Printer:
    return rows.PRINTERS.load(row, online=bool(row["online"]))


def _get_connector(tx: Tx, tenant: str, connector_id: str) -> ConnectorRecord | None:
    row = tx.one(f"{CONNECTOR_SELECT} WHERE c.tenant = ? AND c.id = ?", (tenant, connector_id))
    return rows.CONNECTORS.load(row, sessions=int(row["sessions"])) if row else None


def _upsert_printer(tx: Tx, printer: Printer, announced: str) -> None:
    if not printer.updated_at:
        printer.updated_at = time.time()
    cols = (*rows.PRINTERS.columns, "announced")  # announced: the state its events last told (_put_printers)
    # pull is the tenant admin's to set (set_printer_pull), never a connector's report
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in ("tenant", "id", "pull"))
    tx.send(
        f"INSERT INTO printers ({rows.PRINTERS.column_list()}, announced) VALUES ({marks(len(cols))}) "
        f"ON CONFLICT (tenant, id) DO UPDATE SET {updates}",
        [*rows.PRINTERS.dump(printer), announced],
    )


# A reported state that says nothing yet (a connector's inventory before its first poll): stored, but not
# announced, so a connector that reconnects does not announce its printers going unknown and back.
UNANNOUNCED_STATE = "unknown"
MAX_EVENT_REASONS = 16  # state reasons carried by a printer event (a NOTIFY payload must stay small)
MAX_EVENT_TEXT = 128


def _put_printers(tx: Tx, tenant: str, printers: Sequence[Printer]) -> None:
    """Store printers as their connector reports them, announcing what changed since the last
    announcement: ``printer.added`` (new, or back after being removed), ``printer.removed``,
    ``printer.state_changed`` (a known state other than the last announced one)."""
    before: dict[str, Any] = {}
    for batch in chunks([p.id for p in printers]):
        for row in tx.all(
            "SELECT id, state, announced, pull FROM printers WHERE tenant = ? "
            f"AND id IN ({marks(len(batch))})",
            [tenant, *batch],
        ):
            before[row["id"]] = row
    for printer in printers:
        old = before.get(printer.id)
        known = printer.state != UNANNOUNCED_STATE
        event, previous, announced = None, None, old["announced"] if old is not None else ""
        if old is None or old["state"] == "removed":
            if printer.state != "removed":
                event, announced = PRINTER_ADDED, printer.state if known else ""
        elif printer.state == "removed":
            event, previous, announced = PRINTER_REMOVED, old["announced"] or None, "removed"
        elif known and printer.state != old["announced"]:
            event, previous, announced = PRINTER_STATE_CHANGED, old["announced"] or None, printer.state
        _upsert_printer(tx, printer, announced)
        if event is not None:
            pull = bool(old["pull"]) if old is not None else printer.pull
            snapshot = {**printer.public(), "pull": pull}
            snapshot.pop("capabilities", None)
            snapshot["reasons"] = [r[:MAX_EVENT_TEXT] for r in printer.reasons[:MAX_EVENT_REASONS]]
            data = {"printer": snapshot, "previous_state": previous}
            line = device_line(event, printer.id)
            _device_event(tx, tenant, event, line, printer.state, data, printer.updated_at)


def _connector_event(tx: Tx, event: str, row: Any, at: float) -> None:
    data = {
        "connector_id": row["id"], "name": row["name"], "version": row["version"],
        "online": event == CONNECTOR_ONLINE, "last_seen": _iso(float(row["last_seen"])),
    }  # fmt: skip
    _device_event(tx, row["tenant"], event, device_line(event, row["id"]), event.split(".")[1], data, at)


def _device_event(
    tx: Tx, tenant: str, event: str, line: str, state: str, data: dict[str, Any], at: float
) -> None:
    """A connector's or printer's change: one outbox row per webhook of its tenant that asked for its type
    (or its family, ``printer.*``), in the device's line, and the notice event streams hear."""
    _enqueue(tx, tenant, line, event, at, state, "", data, (event, f"{event.split('.')[0]}.*"))
    tx.notify(Notice("device", line, {"tenant": tenant, "type": event, "at": at, "data": data}))


def _enqueue(
    tx: Tx,
    tenant: str,
    line: str,
    event: str,
    at: float,
    state: str,
    message: str,
    data: dict[str, Any],
    subscriptions: tuple[str, str],
) -> None:
    """One outbox row per webhook of ``tenant`` subscribed to either of ``subscriptions``, in ``line``
    (a job's id, or a device's "connector:ID" / "printer:ID"); ``event`` is '' for a job's change."""
    if not tx.wants_webhooks(tenant):
        return
    tx.send(
        "INSERT INTO webhook_deliveries (id, webhook_id, tenant, job_id, event, at, state, message, job, "
        "next_attempt_at) SELECT ? || substr(w.id, 4), w.id, w.tenant, ?, ?, ?, ?, ?, ?, ? FROM webhooks w "
        "WHERE w.tenant = ? AND (w.events LIKE ? OR w.events LIKE ?)",
        (
            f"whd_{secrets.token_hex(8)}", line, event, at, state, message,
            json.dumps(data, separators=(",", ":")), at, tenant,
            f"% {subscriptions[0]} %", f"% {subscriptions[1]} %",
        ),
    )  # fmt: skip


def _record_event(tx: Tx, job: Job, at: float, message: str) -> None:
    """A job's change: its history row, one outbox row per webhook of its tenant that wants it, and the
    notice that wakes watchers (here and on other replicas) once it commits."""
    state = str(job.state)
    tx.send(
        "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
        (job.id, at, state, message),
    )
    _enqueue(
        tx, job.tenant, job.id, "", at, state, message, job.snapshot(), ("job.state_changed", f"job.{state}")
    )
    tx.notify(
        Notice(
            "job",
            job.id,
            {
                "tenant": job.tenant,
                "connector_id": job.connector_id,
                "printer_id": job.printer_id,
                "owner": job.owner,  # event streams of a person show only their own jobs
                "state": state,
                "at": at,
                "message": message,
            },
        )
    )


def _tenant_usage(tx: Tx, tenant: str) -> tuple[int, int]:
    row = tx.one("SELECT bytes, jobs FROM tenant_usage WHERE tenant = ?", (tenant,))
    return (0, 0) if row is None else (int(row["bytes"]), int(row["jobs"]))


def _use_quota(tx: Tx, tenant: str, sealed_bytes: int, jobs: int, quota: Quota | None) -> None:
    """Count a job in (or out of) its tenant's usage; with ``quota``, refuse it past the limits. One
    statement, so replicas submitting at once cannot both take the last of a quota."""
    if quota is None:
        tx.send(
            "INSERT INTO tenant_usage (tenant, bytes, jobs) VALUES (?, ?, ?) ON CONFLICT (tenant) "
            "DO UPDATE SET bytes = tenant_usage.bytes + excluded.bytes, "
            "jobs = tenant_usage.jobs + excluded.jobs",
            (tenant, sealed_bytes, jobs),
        )
        return
    take = (
        "UPDATE tenant_usage SET bytes = bytes + ?, jobs = jobs + ? WHERE tenant = ? "
        "AND bytes + ? <= ? AND jobs + ? <= ?"
    )
    args = (sealed_bytes, jobs, tenant, sealed_bytes, quota.max_bytes, jobs, quota.max_jobs)
    if tx.expect(take, args):
        return
    used = tx.one("SELECT bytes, jobs FROM tenant_usage WHERE tenant = ?", (tenant,))
    if used is None:  # the tenant's first job
        tx.run(
            "INSERT INTO tenant_usage (tenant, bytes, jobs) VALUES (?, 0, 0) ON CONFLICT (tenant) DO NOTHING",
            (tenant,),
        )
        if tx.run(take, args):
            return
        used = tx.one("SELECT bytes, jobs FROM tenant_usage WHERE tenant = ?", (tenant,))
    if used["jobs"] + jobs > quota.max_jobs:
        raise QuotaExceeded(
            "jobs", f"quota reached: {used['jobs']} undelivered jobs (tenant_max_jobs={quota.max_jobs})"
        )
    raise QuotaExceeded(
        "bytes", f"quota reached: {used['bytes']} bytes spooled (tenant_max_spool_bytes={quota.max_bytes})"
    )


def _take_ipp_numbers(tx: Tx, tenant: str, count: int) -> int:
    """Reserve ``count`` IPP job numbers for the tenant; the last of them (a row lock, no MAX + 1 race)."""
    tx.run("INSERT INTO ipp_counters (tenant, last) VALUES (?, 0) ON CONFLICT (tenant) DO NOTHING", (tenant,))
    row = tx.one("UPDATE ipp_counters SET last = last + ? WHERE tenant = ? RETURNING last", (count, tenant))
    last = int(row["last"])
    if last > MAX_IPP_JOB_NUMBER:
        raise StoreError(f"tenant {tenant} used all {MAX_IPP_JOB_NUMBER} IPP job numbers")
    return last


def retire_replicas(tx: Tx, replica_ids: Sequence[str]) -> None:
    """These replicas are gone: their sessions with them, and their claims on the webhook outbox (their
    leases on jobs lapse on their own, or were handed back)."""
    for batch in chunks(list(replica_ids)):
        tx.run(f"DELETE FROM connector_sessions WHERE replica_id IN ({marks(len(batch))})", batch)
        tx.run(
            "UPDATE webhook_deliveries SET claimed_by = NULL, claimed_until = NULL "
            f"WHERE claimed_by IN ({marks(len(batch))})",
            batch,
        )
        tx.run(f"DELETE FROM replicas WHERE id IN ({marks(len(batch))})", batch)
    if replica_ids:
        tx.notify(Notice("replicas", ""))


# Token operations as functions of a Tx: the CLI runs them too.


def add_token(tx: Tx, token: TokenRecord) -> None:
    tx.run(
        f"INSERT INTO tokens ({rows.TOKENS.column_list()}) VALUES ({marks(len(rows.TOKENS.columns))})",
        rows.TOKENS.dump(token),
    )


def list_tokens(tx: Tx, tenant: str | None, user_id: str | None = None) -> list[TokenRecord]:
    sql, args = "SELECT * FROM tokens WHERE 1 = 1", []
    for column, value in (("tenant", tenant), ("user_id", user_id)):
        if value is not None:
            sql += f" AND {column} = ?"
            args.append(value)
    return [rows.TOKENS.load(r) for r in tx.all(sql + " ORDER BY created_at", args)]


def revoke_token(tx: Tx, token_id: str, at: float) -> bool:
    revoked = (
        tx.run("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (at, token_id)) > 0
    )
    if revoked:
        tx.notify(Notice("tokens", token_id))
    return revoked


__all__ = ["FINAL_STATES", "IN_FLIGHT", "OPEN_STATES", "Dialect", "SqlStore", "Tx"]
