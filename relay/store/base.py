"""What the relay keeps, and the store's interface: one small protocol per aggregate.

Callers depend on the aggregate they use (:class:`JobStore`, :class:`TokenStore`, ...); :class:`Store` is
all of them plus opening, closing and the notices of other processes. SQLite (``relay.store.sqlite``) is the
embedded default, PostgreSQL (``relay.store.postgres``) the scale-out backend; both run the SQL of
``relay.store.sql``, and ``tests/test_store_contract.py`` holds both to the same behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from relay.jobs import IppJobState, Job, JobEvent, JobHistoryEntry, JobState, _iso


@dataclass
class TokenRecord:
    id: str  # the public prefix shown in listings and logs
    tenant: str
    kind: str  # "api" | "connector" | "user" (a person's own token, for print clients)
    secret_hash: str
    scopes: tuple[str, ...] = ()
    connector_id: str | None = None
    label: str = ""
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    user_id: str | None = None  # kind "user": whose


@dataclass
class UserRecord:
    """A person of a tenant. Emails are unique across the relay (sign-in names the email, not the tenant)."""

    id: str
    tenant: str
    email: str  # lower case
    name: str = ""
    role: str = "user"  # "user" | "admin" (the tenant's administrator)
    state: str = "active"  # "active" | "disabled"
    password_hash: str = ""  # argon2; empty: no password (tokens only)
    created_at: float = 0.0
    disabled_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "email": self.email, "name": self.name, "role": self.role, "state": self.state,
            "has_password": bool(self.password_hash), "created_at": _iso(self.created_at),
            "disabled_at": _iso(self.disabled_at) if self.disabled_at is not None else None,
        }  # fmt: skip


@dataclass
class TenantRecord:
    """A child tenant, made by its parent over the integrator API (relay/api/tenants.py). A tenant with no
    record (named on tokens by ``printrelay token create``) is a top-level tenant: only those have
    children."""

    id: str  # "t_" + random: generated, never chosen, so no child can take an existing tenant's name
    parent: str
    name: str = ""
    created_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "parent": self.parent, "name": self.name, "created_at": _iso(self.created_at)}


@dataclass
class WebSession:
    """A person signed in to the portal. The cookie holds a random secret; the store keeps its SHA-256."""

    id: str  # SHA-256 hex of the cookie's secret
    tenant: str
    user_id: str
    created_at: float
    expires_at: float
    last_seen_at: float = 0.0
    revoked_at: float | None = None
    via: str = "password"  # "password" | "oidc"


@dataclass
class OidcProvider:
    """A tenant's OpenID Connect sign-in: authorization code with PKCE against ``issuer``."""

    tenant: str
    issuer: str
    client_id: str
    client_secret_sealed: bytes = b""  # sealed with the relay's secret key (relay/secretbox.py)
    email_claim: str = "email"
    create_users: bool = False  # sign-in of an unknown email creates a user (role user) in the tenant
    created_at: float = 0.0


@dataclass
class ConnectorRecord:
    tenant: str
    id: str
    public_key: bytes = b""
    key_id: str = ""
    name: str = ""
    version: str = ""
    sessions: int = 0  # sessions to live relay replicas (read, never written)
    last_seen: float = 0.0

    @property
    def online(self) -> bool:
        return self.sessions > 0


@dataclass
class Printer:
    tenant: str
    id: str
    connector_id: str
    uri: str = ""
    kind: str = ""
    state: str = "unknown"  # idle | processing | stopped | unknown (as the printer reports it)
    reasons: list[str] = field(default_factory=list)
    capabilities: dict[str, Any] = field(default_factory=dict)
    online: bool = False  # its connector holds a session to a live replica (read, never written)
    updated_at: float = 0.0
    # A pull printer holds every job until its owner releases it at the printer. Set by a tenant admin
    # (ConnectorStore.set_printer_pull), never by the connector's reports.
    pull: bool = False
    # What the printer says of its state for people: IPP printer-state-message, a RAW or LPD printer's
    # Printer MIB alerts ("Tray 1 empty")
    message: str = ""

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "connector_id": self.connector_id,
            "online": self.online,
            "pull": self.pull,
            "state": self.state if self.online else "offline",
            "printer_state": self.state,
            "reasons": self.reasons,
            "message": self.message,
            "kind": self.kind,
            "capabilities": self.capabilities,
        }


@dataclass
class IppJob:
    """The IPP side of a job: IPP names jobs by integers, the relay by strings.

    Every relay job shown over IPP gets a per-tenant ``number`` (its ``job-id``). A Create-Job makes an
    IppJob before any relay job exists: ``state`` says where it is until its document arrives (the table
    in relay/jobs.py), and ``ticket`` holds what the job was created with. Once ``attached``, the relay
    job (``job_id``) is the truth.
    """

    tenant: str
    number: int
    printer_id: str
    job_id: str | None = None
    state: IppJobState = IppJobState.ATTACHED
    ticket: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class Webhook:
    """A URL that receives its tenant's job state changes, and the device events it subscribed to
    (relay/webhooks.py)."""

    id: str
    tenant: str
    url: str
    events: tuple[str, ...]
    secret: str  # sealed at rest (relay/secretbox.py); shown to the tenant only when created
    created_at: float = 0.0
    pending: int = 0  # deliveries waiting in the outbox (listings only)
    # The last attempt's outcome, kept after its delivery left the outbox (delivered or dropped).
    last_error: str = ""
    last_error_at: float | None = None
    last_delivered_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "created_at": _iso(self.created_at),
            "pending": self.pending,
            "last_error": self.last_error or None,
            "last_error_at": _iso(self.last_error_at),
            "last_delivered_at": _iso(self.last_delivered_at),
        }


@dataclass
class WebhookDelivery:
    """One outbox row: a job change (with the job as it was then), or a device event, on its way to one
    webhook."""

    seq: int  # outbox order
    id: str  # delivery_id: the same on every attempt, for receivers to dedupe
    webhook_id: str
    tenant: str
    job_id: str
    at: float
    state: str
    message: str
    job: dict[str, Any]
    url: str
    secret: str
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str = ""
    # "" for a job change; else a device event (DEVICE_EVENTS), whose ``job_id`` is its line
    # ("connector:ID" or "printer:ID", see device_line) and ``job`` its data
    event: str = ""


# Changes of a tenant's connectors and printers, announced to webhooks and event streams like job changes.
CONNECTOR_ONLINE = "connector.online"
CONNECTOR_OFFLINE = "connector.offline"
PRINTER_ADDED = "printer.added"
PRINTER_REMOVED = "printer.removed"
PRINTER_STATE_CHANGED = "printer.state_changed"
DEVICE_EVENTS = (CONNECTOR_ONLINE, CONNECTOR_OFFLINE, PRINTER_ADDED, PRINTER_REMOVED, PRINTER_STATE_CHANGED)


def device_line(event: str, device_id: str) -> str:
    """A device's events are delivered in order, as a job's are: ``connector:ID`` or ``printer:ID`` (never
    a job id, which has no colon)."""
    return f"{event.split('.')[0]}:{device_id}"


@dataclass(frozen=True)
class StoreSample:
    """The fleet and the queue as /metrics shows them (all replicas: read from the store)."""

    jobs_by_state: dict[str, int]  # jobs not final yet
    oldest_queued_at: float | None  # created_at of the oldest queued job
    connectors_online: int  # connectors with a valid token and a session to some replica
    connectors_offline: int  # connectors with a valid token and no session
    sessions_by_replica: dict[str, int] = field(default_factory=dict)  # live replicas and their sessions


@dataclass(frozen=True)
class Lease:
    """A replica's claim on the jobs it streams: who holds them, and for how long without a renewal."""

    owner: str
    seconds: float


@dataclass(frozen=True)
class Quota:
    """What a tenant's jobs not final yet may hold (checked atomically with the insert)."""

    max_bytes: int
    max_jobs: int


@dataclass(frozen=True)
class SessionRecord:
    """A connector's tunnel session held by one relay replica."""

    id: str
    tenant: str
    connector_id: str
    replica_id: str
    opened_at: float


@dataclass(frozen=True)
class ConnectorRequest:
    """A change of printers for one connector, asked on one replica and carried out by the replica that
    holds the connector's session."""

    id: str
    tenant: str
    connector_id: str
    method: str
    path: str
    body: bytes | None
    created_at: float


@dataclass(frozen=True)
class Notice:
    """A change another part of the relay (maybe on another replica) must hear about.

    ``kind``: ``job`` (a job changed state; ``data`` has tenant, connector_id, printer_id, owner, state,
    at, message), ``device`` (a connector or printer event; ``key`` is its line, ``data`` has tenant,
    type, at and the event's data),
    ``tokens`` (tokens were revoked or deleted; ``key`` is a token id, or empty for "any"), ``users`` (a
    user was disabled, enabled or changed; ``key`` is the user id),
    ``request`` / ``answer`` (a change of printers asked of the replica holding a connector's session;
    ``key`` is the request id, ``data`` has tenant and connector_id), ``replicas`` (a replica joined or
    was retired), ``resync`` (notices may have been missed while the listener reconnected: look again).
    """

    kind: str
    key: str
    data: dict[str, Any] = field(default_factory=dict)


NoticeHandler = Callable[[Notice], None]


class StoreObserver(Protocol):
    """What the store tells /metrics about itself."""

    def store_call(self, kind: str, seconds: float) -> None:
        """A call (``read`` or ``write``) took ``seconds``, from asking to its answer (batching included)."""
        ...

    def notice_heard(self, lag: float) -> None:
        """A notice from another replica arrived ``lag`` seconds after that replica committed it."""
        ...


class StoreError(Exception):
    pass


class Conflict(StoreError):
    """A uniqueness rule was broken (an id or Idempotency-Key already used)."""


class QuotaExceeded(StoreError):
    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what  # "jobs" or "bytes"
        self.message = message


class StoreUnavailable(StoreError):
    """The database cannot be reached now (PostgreSQL restarting, say): try again shortly."""


class TokenStore(Protocol):
    async def add_token(self, token: TokenRecord) -> None: ...
    async def get_token(self, token_id: str) -> TokenRecord | None: ...
    async def get_tokens(self, token_ids: Sequence[str]) -> dict[str, TokenRecord]:
        """The records of these tokens that exist, by id (one query for many sessions)."""
        ...

    async def list_tokens(
        self, tenant: str | None = None, *, user_id: str | None = None
    ) -> list[TokenRecord]:
        """Tokens, oldest first: all, a tenant's, or one user's own."""
        ...

    async def revoke_token(self, token_id: str, at: float) -> bool:
        """Revoke it; every relay replica hears of it (a ``tokens`` notice)."""
        ...


class UserStore(Protocol):
    async def add_user(self, user: UserRecord) -> None:
        """Raises :class:`Conflict` when the email is taken."""
        ...

    async def get_user(self, user_id: str) -> UserRecord | None: ...
    async def find_user(self, email: str) -> UserRecord | None:
        """By email (lower case), in any tenant."""
        ...

    async def list_users(self, tenant: str) -> list[UserRecord]: ...
    async def update_user(self, user: UserRecord) -> bool:
        """Store the user's name, role, state, password and disabled_at; every replica hears of it (a
        ``users`` notice). False when there is no such user in its tenant."""
        ...


class TenantStore(Protocol):
    """Child tenants (the integrator API) and what each submitted."""

    async def add_tenant(self, tenant: TenantRecord, limit: int) -> bool:
        """False (and nothing stored) if the parent already has ``limit`` children; :class:`Conflict` when
        the id is taken."""
        ...

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None: ...
    async def list_tenants(
        self, parent: str, *, after: str | None = None, limit: int = 100
    ) -> list[TenantRecord]:
        """The parent's children, oldest first; ``after``: those after that child (the next page)."""
        ...

    async def tenant_job_totals(
        self, tenant: str, *, since: float | None = None, until: float | None = None
    ) -> dict[str, tuple[int, int]]:
        """The tenant's jobs created in [since, until), by state: (jobs, document bytes). States with no
        job are absent."""
        ...


class WebStore(Protocol):
    """The portal's sessions and the tenants' OpenID Connect providers."""

    async def add_web_session(self, session: WebSession) -> None: ...
    async def get_web_session(self, session_id: str) -> WebSession | None: ...
    async def touch_web_session(self, session_id: str, at: float) -> None: ...
    async def revoke_web_sessions(
        self, *, session_id: str | None = None, user_id: str | None = None, at: float
    ) -> int:
        """Revoke one session, or every session of a user; how many were live."""
        ...

    async def set_oidc_provider(self, provider: OidcProvider) -> None: ...
    async def get_oidc_provider(self, tenant: str) -> OidcProvider | None: ...
    async def delete_oidc_provider(self, tenant: str) -> bool: ...


class ConnectorStore(Protocol):
    """Connectors, the sessions replicas hold to them, and their printers."""

    async def upsert_connector(self, connector: ConnectorRecord) -> None: ...
    async def get_connector(self, tenant: str, connector_id: str) -> ConnectorRecord | None: ...
    async def submit_lookups(
        self, tenant: str, printer_id: str
    ) -> tuple[Printer | None, ConnectorRecord | None, tuple[int, int]]:
        """What every submit looks up first, in one call: a printer, the connector that serves it, and the
        tenant's usage (as ``tenant_usage``)."""
        ...

    async def session_opened(self, session: SessionRecord) -> None: ...
    async def session_closed(self, session_id: str, at: float) -> None: ...
    async def replace_printers(self, tenant: str, connector_id: str, printers: Sequence[Printer]) -> None: ...
    async def update_printer(self, printer: Printer) -> None: ...
    async def get_printer(self, tenant: str, printer_id: str) -> Printer | None: ...
    async def list_printers(self, tenant: str) -> list[Printer]: ...
    async def set_printer_pull(self, tenant: str, printer_id: str, pull: bool) -> bool:
        """Make the printer a pull printer (or not); False when the tenant has no such printer."""
        ...

    async def connectors_online(self, tenant: str) -> list[str]:
        """Ids of the tenant's connectors that hold a session to some replica now."""
        ...

    async def announce_offline(self, before: float) -> list[tuple[str, str]]:
        """Connectors announced online that hold no session and were last seen before ``before``: each is
        announced offline (``connector.offline``), once; (tenant, connector id) of those announced.
        (``connector.online`` is announced by :meth:`session_opened` when the last announcement was not
        online; printer events by :meth:`replace_printers` and :meth:`update_printer`.)"""
        ...

    # Printers a connector discovered and does not serve yet (read on every replica).
    async def add_candidate(
        self, tenant: str, connector_id: str, uri: str, data: dict[str, Any], at: float, limit: int
    ) -> bool:
        """Record it (or refresh it); False when the connector already has ``limit`` others."""
        ...

    async def remove_candidate(self, tenant: str, connector_id: str, uri: str) -> None: ...
    async def list_candidates(self, tenant: str) -> list[tuple[str, dict[str, Any]]]:
        """(connector id, candidate) of the tenant's connectors that hold a session now."""
        ...

    # A change of printers asked of a connector whose session another replica holds (relay/adoption.py).
    async def add_connector_request(self, request: ConnectorRequest) -> None:
        """Stored, and heard by every replica (a ``request`` notice)."""
        ...

    async def take_connector_request(self, request_id: str, owner: str) -> ConnectorRequest | None:
        """The request, if no replica took it before (then it is this one's to carry out)."""
        ...

    async def answer_connector_request(self, request_id: str, status: int, answer: bytes) -> None:
        """Stored, and heard by every replica (an ``answer`` notice)."""
        ...

    async def connector_answer(self, request_id: str) -> tuple[int, bytes] | None: ...
    async def forget_connector_request(self, request_id: str) -> None: ...


class JobStore(Protocol):
    async def insert_job(
        self, job: Job, message: str, *, payload: bytes | None = None, quota: Quota | None = None
    ) -> Job:
        """Commit a new job; ``payload``: its sealed bytes when small enough to live with the row
        (relay/spool.py INLINE_MAX), erased by the transition to a final state. With ``quota``, the
        tenant's usage is checked and counted in the same transaction (QuotaExceeded)."""
        ...

    async def get_payload(self, job_id: str) -> bytes | None:
        """The sealed payload stored with the job, or None (its payload is a spool file)."""
        ...

    async def get_job(self, tenant: str, job_id: str) -> Job | None: ...
    async def find_job_by_idempotency_key(self, tenant: str, key: str) -> Job | None: ...
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
        """Newest first (``created_at``, then ``id``, descending); ``before`` continues after that job,
        so paging sees every job once while new ones arrive. ``since``/``until`` bound ``created_at``."""
        ...

    async def claim_jobs_and_next_due(
        self, tenant: str, connector_id: str, now: float, limit: int, lease: Lease
    ) -> tuple[list[Job], float | None]:
        """Move up to ``limit`` due queued jobs of this connector's printers to ``sending``, each leased to
        ``lease.owner``; when fewer than ``limit`` were due, also what ``next_due`` then says (else None):
        one round trip for the dispatcher's loop. Replicas claiming at once never claim the same job."""
        ...

    async def transition(
        self, job_id: str, event: JobEvent, message: str, at: float, **fields: Any
    ) -> Job | None: ...
    async def job_history(self, job_id: str) -> list[JobHistoryEntry]: ...
    async def next_due(self, tenant: str, connector_id: str) -> float | None: ...
    async def renew_leases(self, lease: Lease, job_ids: Sequence[str]) -> None:
        """Extend this owner's leases on these jobs (those still in flight), on the database's clock."""
        ...

    async def lapsed_leases(self, limit: int) -> list[Job]:
        """Jobs in ``sending`` or ``printing`` whose lease was not renewed in time (database clock)."""
        ...

    async def requeue_orphaned(self, at: float) -> list[str]:
        """Jobs in flight whose lease owner is no live replica go back to the queue (after a restart)."""
        ...

    async def expired_jobs(self, now: float, limit: int) -> list[Job]: ...
    async def next_expiry(self) -> float | None: ...
    async def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """Spooled bytes and number of jobs not yet final (what a quota counts)."""
        ...

    async def all_job_ids_with_payload(self) -> set[str]: ...
    async def sample(self, now: float) -> StoreSample: ...


class IppJobStore(Protocol):
    async def ipp_job_numbers(
        self, tenant: str, printer_id: str, job_ids: Sequence[str], at: float
    ) -> dict[str, int]:
        """The IPP number of each relay job, given in order to those that have none yet."""
        ...

    async def create_ipp_job(self, job: IppJob) -> IppJob:
        """Store a Create-Job's job (no relay job yet); returns it with its new number."""
        ...

    async def get_ipp_job(self, tenant: str, number: int) -> IppJob | None: ...
    async def set_ipp_job_state(
        self,
        tenant: str,
        number: int,
        expect: IppJobState,
        state: IppJobState,
        at: float,
        job_id: str | None = None,
    ) -> bool:
        """Compare-and-set: move the job from ``expect`` to ``state``; False if it was not in ``expect``."""
        ...

    async def list_ipp_jobs(
        self, tenant: str, printer_id: str, states: Sequence[IppJobState], limit: int
    ) -> list[IppJob]: ...


class WebhookStore(Protocol):
    """Webhooks, and their outbox: job changes and device events fill it in the transaction that records
    them."""

    async def add_webhook(self, hook: Webhook, limit: int) -> bool:
        """False (and nothing stored) if the tenant already has ``limit`` webhooks."""
        ...

    async def list_webhooks(self, tenant: str) -> list[Webhook]: ...
    async def rewrite_webhook_secrets(self, rewrite: Callable[[str, str], str]) -> int:
        """Replace each webhook's stored secret by ``rewrite(webhook_id, stored)``; how many changed."""
        ...

    async def delete_webhook(self, tenant: str, webhook_id: str) -> Webhook | None: ...
    async def claim_webhook_deliveries(
        self, owner: str, now: float, limit: int, *, per_webhook: int, lease_seconds: float
    ) -> list[WebhookDelivery]:
        """Due deliveries that head their (webhook, job) line, at most ``per_webhook`` in flight per
        webhook, claimed for ``owner`` for ``lease_seconds``: no two senders (replicas) get the same."""
        ...

    async def next_webhook_due(self) -> float | None: ...
    async def webhook_delivery_failed(
        self, seq: int, attempts: int, next_attempt_at: float, error: str, at: float | None = None
    ) -> None:
        """Retry it at ``next_attempt_at``; its webhook shows ``error`` as its last one."""
        ...

    async def remove_webhook_delivery(
        self, seq: int, *, delivered_at: float | None = None, error: str | None = None
    ) -> None:
        """It left the outbox: delivered at ``delivered_at``, or dropped after ``error``; its webhook
        keeps that outcome."""
        ...


class PayloadStore(Protocol):
    """Sealed payloads as numbered chunk rows, for replicas that share no disk (relay/spool.py)."""

    async def add_payload_chunk(self, job_id: str, seq: int, data: bytes) -> None: ...
    async def payload_chunks(self, job_id: str, first: int, limit: int) -> list[bytes]:
        """Chunks ``first``, ``first + 1``, ... (at most ``limit``), in order; fewer at the end."""
        ...

    async def erase_payload_chunks(self, job_id: str) -> None: ...
    async def payload_chunk_usage(self) -> tuple[int, int]:
        """(bytes, payloads) held as chunks."""
        ...

    async def remove_orphan_chunks(self, older_than: float) -> int:
        """Chunks of no job, last written more than ``older_than`` seconds ago (an upload that died with
        its replica); how many payloads went."""
        ...


class ReplicaStore(Protocol):
    """The relay replicas sharing the database: who is alive, and duties one of them does at a time."""

    async def register_replica(self, replica_id: str, name: str) -> None:
        """This replica is alive (database clock). With SQLite, where one process owns the database, every
        other replica's sessions and leases are forgotten at once."""
        ...

    async def heartbeat(self, replica_id: str) -> None: ...
    async def retire_replica(self, replica_id: str) -> None:
        """This replica stops: its sessions are gone (its leases lapse or were handed back)."""
        ...

    async def retire_silent_replicas(self, silent_for: float) -> list[str]:
        """Forget replicas whose heartbeat is older than ``silent_for`` seconds, and their sessions."""
        ...

    async def live_replicas(self, silent_for: float) -> int:
        """Replicas whose heartbeat is newer than ``silent_for`` seconds."""
        ...

    async def agree(self, name: str, value: str) -> str:
        """The value every replica must share for ``name``: the first one stored (``value`` if none was)."""
        ...

    async def take_duty(self, name: str, owner: str, seconds: float) -> bool:
        """Be the one replica doing ``name`` for the next ``seconds`` (or keep being it)."""
        ...


class Store(
    TokenStore,
    UserStore,
    TenantStore,
    WebStore,
    ConnectorStore,
    JobStore,
    IppJobStore,
    WebhookStore,
    PayloadStore,
    ReplicaStore,
    Protocol,
):
    """Everything, plus the store's own life."""

    replica_id: str  # this process among the replicas: lease owner, session holder, origin of notices

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def check_writable(self) -> None: ...
    def on_notice(self, handler: NoticeHandler) -> None:
        """Call ``handler`` with every notice: those this process's writes made (once committed), and
        those of other processes (other replicas; the CLI revoking a token)."""
        ...

    def observe(self, observer: StoreObserver) -> None:
        """Report call latencies and notice lag to ``observer``."""
        ...

    async def follow_other_processes(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Runs until cancelled: turns other processes' changes into notices (LISTEN on PostgreSQL; on
        SQLite, tokens the CLI revoked or deleted, noticed by PRAGMA data_version). Started once it
        follows."""
        ...
