"""What the relay keeps about tenants' tokens, connectors, printers and jobs — the store's interface.

Callers depend on :class:`Store` only; SQLite (``relay.store.sqlite``) is the embedded default and a
PostgreSQL backend can follow without touching them (DESIGN §7). All SQL lives in the backends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.jobs import Job, JobEvent, JobHistoryEntry, JobState, _iso


@dataclass
class TokenRecord:
    id: str  # the public prefix shown in listings and logs
    tenant: str
    kind: str  # "api" | "connector"
    secret_hash: str
    scopes: tuple[str, ...] = ()
    connector_id: str | None = None
    label: str = ""
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None


@dataclass
class ConnectorRecord:
    tenant: str
    id: str
    public_key: bytes = b""
    key_id: str = ""
    name: str = ""
    version: str = ""
    sessions: int = 0
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
    online: bool = False  # its connector holds a session
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "connector_id": self.connector_id,
            "online": self.online,
            "state": self.state if self.online else "offline",
            "printer_state": self.state,
            "reasons": self.reasons,
            "kind": self.kind,
            "capabilities": self.capabilities,
        }


@dataclass
class IppJob:
    """The IPP side of a job: IPP names jobs by integers, the relay by strings.

    Every relay job shown over IPP gets a per-tenant ``number`` (its ``job-id``). A Create-Job makes an
    IppJob before any relay job exists: ``state`` says where it is until its document arrives
    (``incoming`` -> ``receiving`` -> ``attached``, via ``open`` when a document came with
    last-document=false; or ``canceled`` / ``aborted``), and ``ticket``
    holds what the job was created with. Once ``attached``, the relay job (``job_id``) is the truth.
    """

    tenant: str
    number: int
    printer_id: str
    job_id: str | None = None
    state: str = "attached"
    ticket: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class Webhook:
    """A URL that receives its tenant's job state changes (relay/webhooks.py)."""

    id: str
    tenant: str
    url: str
    events: tuple[str, ...]
    secret: str  # sealed at rest (relay/secretbox.py); shown to the tenant only when created
    created_at: float = 0.0
    pending: int = 0  # deliveries waiting in the outbox (listings only)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "created_at": _iso(self.created_at),
            "pending": self.pending,
        }


@dataclass
class WebhookDelivery:
    """One outbox row: a job change (with the job as it was then) on its way to one webhook."""

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


@dataclass(frozen=True)
class StoreSample:
    """The fleet and the queue as /metrics shows them (all replicas: read from the store)."""

    jobs_by_state: dict[str, int]  # jobs not final yet
    oldest_queued_at: float | None  # created_at of the oldest queued job
    connectors_online: int  # connectors with a valid token and a session to some replica
    connectors_offline: int  # connectors with a valid token and no session


@dataclass(frozen=True)
class Lease:
    """A replica's claim on the jobs it streams: who holds them, and for how long without a renewal."""

    owner: str
    seconds: float


class StoreError(Exception):
    pass


class Conflict(StoreError):
    """A uniqueness rule was broken (an id or Idempotency-Key already used)."""


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def check_writable(self) -> None: ...

    # tokens
    async def add_token(self, token: TokenRecord) -> None: ...
    async def get_token(self, token_id: str) -> TokenRecord | None: ...
    async def get_tokens(self, token_ids: Sequence[str]) -> dict[str, TokenRecord]:
        """The records of these tokens that exist, by id (one query for many sessions)."""
        ...

    async def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]: ...
    async def outside_writes(self) -> int:
        """A number that changes whenever another process commits to the store (SQLite's
        ``PRAGMA data_version``): tokens are revoked and deleted by the CLI, so an unchanged number means
        the tokens read before are still as read."""
        ...

    async def revoke_token(self, token_id: str, at: float) -> bool: ...

    # connectors and printers
    async def upsert_connector(self, connector: ConnectorRecord) -> None: ...
    async def get_connector(self, tenant: str, connector_id: str) -> ConnectorRecord | None: ...
    async def printer_and_connector(
        self, tenant: str, printer_id: str
    ) -> tuple[Printer | None, ConnectorRecord | None]:
        """A printer and the connector that serves it, in one call (every submit asks)."""
        ...

    async def connector_session_changed(
        self, tenant: str, connector_id: str, delta: int, at: float
    ) -> None: ...
    async def reset_sessions(self) -> None: ...
    async def replace_printers(self, tenant: str, connector_id: str, printers: Sequence[Printer]) -> None: ...
    async def update_printer(self, printer: Printer) -> None: ...
    async def get_printer(self, tenant: str, printer_id: str) -> Printer | None: ...
    async def list_printers(self, tenant: str) -> list[Printer]: ...

    # jobs
    async def insert_job(self, job: Job, message: str, *, payload: bytes | None = None) -> Job:
        """Commit a new job; ``payload``: its sealed bytes when small enough to live with the row
        (relay/spool.py INLINE_MAX), erased by the transition to a final state."""
        ...

    async def get_payload(self, job_id: str) -> bytes | None:
        """The sealed payload stored with the job, or None (its payload is a spool file)."""
        ...

    async def get_job(self, tenant: str, job_id: str) -> Job | None: ...
    async def find_job_by_idempotency_key(self, tenant: str, key: str) -> Job | None: ...
    async def list_jobs(
        self, tenant: str, *, printer_id: str | None = None, state: JobState | None = None, limit: int = 100
    ) -> list[Job]: ...
    async def claim_jobs(
        self, tenant: str, connector_id: str, now: float, limit: int, lease: Lease
    ) -> list[Job]: ...
    async def claim_jobs_and_next_due(
        self, tenant: str, connector_id: str, now: float, limit: int, lease: Lease
    ) -> tuple[list[Job], float | None]:
        """``claim_jobs``, and when fewer than ``limit`` were due, what ``next_due`` then says (else None):
        one round trip for the dispatcher's loop. Each claimed job is leased to ``lease.owner``."""
        ...

    async def renew_leases(self, lease: Lease, job_ids: Sequence[str], now: float) -> None: ...
    async def lapsed_leases(self, now: float, limit: int) -> list[Job]:
        """Jobs in ``sending`` or ``printing`` whose lease was not renewed in time."""
        ...

    async def transition(
        self, job_id: str, event: JobEvent, message: str, at: float, **fields: Any
    ) -> Job | None: ...
    async def job_history(self, job_id: str) -> list[JobHistoryEntry]: ...
    async def next_due(self, tenant: str, connector_id: str) -> float | None: ...
    async def requeue_interrupted(self, at: float) -> list[str]: ...
    async def expired_jobs(self, now: float, limit: int) -> list[Job]: ...
    async def next_expiry(self) -> float | None: ...
    async def tenant_usage(self, tenant: str) -> tuple[int, int]: ...
    async def all_job_ids_with_payload(self) -> set[str]: ...
    async def sample(self, now: float) -> StoreSample: ...

    # IPP job numbers (relay/api/ipp.py)
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
        self, tenant: str, number: int, expect: str, state: str, at: float, job_id: str | None = None
    ) -> bool:
        """Compare-and-set: move the job from ``expect`` to ``state``; False if it was not in ``expect``."""
        ...

    async def list_ipp_jobs(
        self, tenant: str, printer_id: str, states: Sequence[str], limit: int
    ) -> list[IppJob]: ...

    # webhooks (relay/webhooks.py); job changes fill the outbox in the transaction that records them
    async def add_webhook(self, hook: Webhook, limit: int) -> bool:
        """False (and nothing stored) if the tenant already has ``limit`` webhooks."""
        ...

    async def list_webhooks(self, tenant: str) -> list[Webhook]: ...
    async def rewrite_webhook_secrets(self, rewrite: Callable[[str, str], str]) -> int:
        """Replace each webhook's stored secret by ``rewrite(webhook_id, stored)``; how many changed."""
        ...

    async def delete_webhook(self, tenant: str, webhook_id: str) -> Webhook | None: ...
    async def due_webhook_deliveries(
        self, now: float, limit: int, *, per_webhook: int, skip: Sequence[int], skip_webhooks: Sequence[str]
    ) -> list[WebhookDelivery]:
        """Due deliveries that head their (webhook, job) line, at most ``per_webhook`` per webhook."""
        ...

    async def next_webhook_due(
        self, *, skip: Sequence[int], skip_webhooks: Sequence[str]
    ) -> float | None: ...
    async def webhook_delivery_failed(
        self, seq: int, attempts: int, next_attempt_at: float, error: str
    ) -> None: ...
    async def remove_webhook_delivery(self, seq: int) -> None: ...
