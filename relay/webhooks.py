"""Webhooks: a tenant's job state changes and device events, POSTed as signed JSON to the URLs it registered.

Durability comes from the store, not from this process: every job change the store records adds, in the
same transaction, one row per matching webhook of the job's tenant to the ``webhook_deliveries`` outbox,
with a snapshot of the job as it was then. So a change that is committed has its deliveries committed too,
however the relay dies afterwards; :class:`WebhookSender` claims rows of the outbox (one sender at a time
per row, whichever replica it runs on), sends, and deletes what was delivered or given up.

Device events (``connector.online``, ``connector.offline``, ``printer.added``, ``printer.removed``,
``printer.state_changed``) go through the same outbox, written in the transaction of the store change that
causes them (relay/store/sql.py); a webhook gets them only when it subscribed to them by name or by family
(``printer.*``, ``connector.*``), so receivers written for job changes see no new kind of body.

Guarantees: at least once (a relay that dies mid-request sends again after its restart; receivers dedupe
by ``delivery_id``), and in order per webhook and job, or per webhook and device (a job's next change waits
until the previous one was delivered or dropped). Changes of different jobs or devices may arrive in any
order.

Signature (as Stripe does it): header ``Printrelay-Signature: t=<unix seconds>,v1=<hex>`` where ``<hex>``
is HMAC-SHA256 keyed with the webhook's secret (its UTF-8 bytes, ``whsec_`` prefix included) over
``<t>.<raw body>``. Receivers recompute it, compare in constant time and reject old timestamps
(:func:`verify_signature`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import trio

from relay import egress
from relay.dispatch import retry_delay
from relay.jobs import SNAPSHOT_FIELDS, Job, JobHistoryEntry, JobState, _iso
from relay.secretbox import SecretBox
from relay.store.base import DEVICE_EVENTS, Notice, Store, StoreUnavailable, Webhook, WebhookDelivery
from service import bounded_json

log = logging.getLogger("printrelay.relay.webhooks")

EVENT_TYPE = "job.state_changed"
# A webhook subscribes to every change, or to changes into some states ("job.completed", ...); and to
# device events by name, or by family ("printer.*": every printer event, those added later too).
DEVICE_FAMILIES = ("connector.*", "printer.*")
EVENT_TYPES = frozenset(
    {EVENT_TYPE, *(f"job.{state}" for state in JobState), *DEVICE_EVENTS, *DEVICE_FAMILIES}
)
SIGNATURE_HEADER = "Printrelay-Signature"
SIGNATURE_TOLERANCE = 300.0  # seconds a receiver should accept a timestamp off by (replay window)

MAX_WEBHOOKS_PER_TENANT = 16  # each job change writes one outbox row per webhook, inside the transition
MAX_URL_CHARS = 2048
MAX_EVENTS = len(EVENT_TYPES)
MAX_BODY = 16 * 1024  # POST /v1/webhooks request body
# Free text copied from a job into a payload is cut to this, so a payload stays far below MAX_PAYLOAD_BYTES.
MAX_FIELD_CHARS = 1024
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_ERROR_SNIPPET = 512  # bytes of a receiver's error answer kept as last_error (the rest is not read)

REQUEST_TIMEOUT = 10.0  # a whole request: connect, send, the status line and headers
MAX_CONCURRENCY = 32  # requests in flight, all webhooks together
MAX_PER_WEBHOOK = 4  # requests in flight to one webhook, so one slow receiver cannot take every slot
RETRY_CAP = 6 * 3600.0  # longest wait between two attempts
# Job changes wake the sender (on every replica, through the store's notices); this is the safety sweep.
IDLE_POLL = 15.0


class WebhookError(Exception):
    """A registration the API refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- signatures -----------------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return mac.hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify_signature(
    secret: str, header: str, body: bytes, *, now: float | None = None, tolerance: float = SIGNATURE_TOLERANCE
) -> bool:
    """True if ``header`` signs ``body`` with ``secret`` and its timestamp is within ``tolerance``."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)


# --- registrations --------------------------------------------------------------------------------


def validate_url(url: object) -> str:
    """An absolute http(s) URL without credentials (they would end up in logs and listings)."""
    if not isinstance(url, str) or not url:
        raise WebhookError(400, "url must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise WebhookError(400, f"url of {len(url)} characters exceeds max_url_chars={MAX_URL_CHARS}")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise WebhookError(400, "url must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise WebhookError(400, f"url is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookError(400, f"url scheme must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise WebhookError(400, "url has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookError(400, "url must not carry credentials; verify the signature instead")
    if parts.fragment:
        raise WebhookError(400, "url must not have a #fragment")
    try:
        egress.http_target(url)  # a host name IDNA can encode
    except ValueError as exc:
        raise WebhookError(400, f"url: {exc}") from None
    return url


def validate_events(events: object) -> tuple[str, ...]:
    """What a registration subscribes to; without ``events``, job changes only (as before device events)."""
    if events is None:
        return (EVENT_TYPE,)
    known = ", ".join(sorted(EVENT_TYPES))
    if not isinstance(events, list) or not events or len(events) > MAX_EVENTS:
        raise WebhookError(400, f"events must be a list of 1 to {MAX_EVENTS} of: {known}")
    for event in events:
        if event not in EVENT_TYPES:
            raise WebhookError(400, f"unknown event {event!r}; events are {known}")
    return tuple(dict.fromkeys(events))


async def register(
    store: Store,
    secrets_at_rest: SecretBox,
    tenant: str,
    body: bytes,
    now: float | None = None,
    *,
    allow_private: bool = False,
) -> Webhook:
    """``POST /v1/webhooks``: ``{"url": ..., "events": [...]?}`` -> the webhook with its secret in clear
    (the store keeps it sealed). A URL the relay would never send to is refused now, not dropped later."""
    try:
        data = bounded_json.loads(body)
    except ValueError as exc:
        raise WebhookError(
            400, f'body must be JSON, e.g. {{"url": "https://example.com/hook"}}: {exc}'
        ) from None
    if not isinstance(data, dict):
        raise WebhookError(400, "body must be a JSON object")
    unknown = set(data) - {"url", "events"}
    if unknown:
        raise WebhookError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    hook = Webhook(
        id="wh_" + secrets.token_hex(8),
        tenant=tenant,
        url=validate_url(data.get("url")),
        events=validate_events(data.get("events")),
        secret=new_secret(),
        created_at=time.time() if now is None else now,
    )
    if not allow_private:
        refusal = await egress.destination_refusal(hook.url)
        if refusal:
            raise WebhookError(
                400, f"{refusal}: the relay does not deliver webhooks there (webhook_allow_private is off)"
            )
    sealed = dataclasses.replace(hook, secret=secrets_at_rest.seal(hook.secret, hook.id))
    if not await store.add_webhook(sealed, MAX_WEBHOOKS_PER_TENANT):
        raise WebhookError(
            409,
            f"tenant {tenant} has max_webhooks_per_tenant={MAX_WEBHOOKS_PER_TENANT} webhooks; "
            "delete one first",
        )
    return hook


# --- payloads -------------------------------------------------------------------------------------


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + "..."
    return value


def snapshot_job(snapshot: dict[str, Any]) -> Job:
    """The job as the outbox trigger saw it (a subset of its columns; the rest keep their defaults)."""
    fields = {
        name: _cut(snapshot[name]) for name in SNAPSHOT_FIELDS if name in snapshot and name != "options"
    }
    fields["state"] = JobState(fields["state"])
    fields["options"] = {str(k): _cut(str(v)) for k, v in (snapshot.get("options") or {}).items()}
    return Job(**fields)


def payload(delivery: WebhookDelivery) -> bytes:
    """The JSON body of one delivery; raises ValueError past MAX_PAYLOAD_BYTES."""
    if delivery.event:
        # A device event: {"type", "delivery_id", "created_at", "data"} (job changes keep their own shape).
        device = {"type": delivery.event, "delivery_id": delivery.id, "created_at": _iso(delivery.at)}
        body = json.dumps({**device, "data": delivery.job}, separators=(",", ":")).encode()
    else:
        job = snapshot_job(delivery.job)
        entry = JobHistoryEntry(
            delivery.job_id, delivery.at, JobState(delivery.state), _cut(delivery.message)
        )
        body = json.dumps(
            {"type": EVENT_TYPE, "job": job.public(), "event": entry.public(), "delivery_id": delivery.id},
            separators=(",", ":"),
        ).encode()
    if len(body) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(body)} bytes exceeds max_payload_bytes={MAX_PAYLOAD_BYTES}")
    return body


# --- sending --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    error: str = ""


class WebhookSender:
    """Sends the outbox. :meth:`notify` is a lifecycle listener: it only wakes :meth:`run`."""

    def __init__(
        self,
        store: Store,
        *,
        max_attempts: int,
        retry_base: float,
        retry_cap: float = RETRY_CAP,
        timeout: float = REQUEST_TIMEOUT,
        concurrency: int = MAX_CONCURRENCY,
        per_webhook: int = MAX_PER_WEBHOOK,
        network: httpcore.AsyncNetworkBackend | None = None,  # tests: where connections go
        allow_private: bool = False,
        secrets_at_rest: SecretBox | None = None,  # None: secrets are stored in clear (tests)
        owner: str = "relay",  # this replica: whose claims on outbox rows these are
    ) -> None:
        self.store = store
        self.owner = owner
        # A claim outlives the request it is for: a sender that dies leaves its rows to another after this.
        self.claim_seconds = 3 * timeout
        self.secrets_at_rest = secrets_at_rest
        self.allow_private = allow_private
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.timeout = timeout
        self.concurrency = concurrency
        self.per_webhook = per_webhook
        self._network = network
        self._wake = trio.Event()
        self._in_flight: dict[int, str] = {}  # outbox seq -> webhook id

    def notify(self, notice: Notice) -> None:
        """A job or a device changed (here or on another replica): its outbox rows may be waiting."""
        if notice.kind in ("job", "device"):
            self._wake.set()

    def _secret(self, delivery: WebhookDelivery) -> str:
        if self.secrets_at_rest is None:
            return delivery.secret
        return self.secrets_at_rest.open(delivery.secret, delivery.webhook_id)

    async def seal_stored_secrets(self) -> int:
        """Seal the secrets an older version stored in clear; how many there were."""
        box = self.secrets_at_rest
        if box is None:
            return 0
        return await self.store.rewrite_webhook_secrets(
            lambda hook_id, stored: stored if box.is_sealed(stored) else box.seal(stored, hook_id)
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Redirects are not followed (a redirect could lead the signed payload anywhere); every connection
        # goes through the address rule, on the address it is opened to (relay.egress).
        backend = egress.GuardedBackend(allow_private=self.allow_private, inner=self._network)
        client = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(), network_backend=backend,
            max_connections=self.concurrency, keepalive_expiry=30.0,
        )  # fmt: skip
        async with client, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                # A fresh event before reading, so a change committed during the read is not missed.
                self._wake = trio.Event()
                try:
                    delay = await self._start_due(client, nursery)
                except StoreUnavailable as exc:
                    log.warning("webhook outbox unreadable: %s", exc)
                    delay = IDLE_POLL
                if delay > 0:
                    with trio.move_on_after(delay):
                        await self._wake.wait()

    async def _start_due(self, client: httpcore.AsyncConnectionPool, nursery: trio.Nursery) -> float:
        """Claim and start what is due; returns how long to wait before looking again."""
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            return IDLE_POLL  # a finished request wakes us
        due = await self.store.claim_webhook_deliveries(
            self.owner, time.time(), free, per_webhook=self.per_webhook, lease_seconds=self.claim_seconds
        )
        for delivery in due:
            self._in_flight[delivery.seq] = delivery.webhook_id
            nursery.start_soon(self._deliver, client, delivery)
        if due:
            return 0.0  # look again at once: more may be due
        soonest = await self.store.next_webhook_due()
        if soonest is None:
            return IDLE_POLL
        return min(IDLE_POLL, max(0.0, soonest - time.time()))

    async def _deliver(self, client: httpcore.AsyncConnectionPool, delivery: WebhookDelivery) -> None:
        try:
            try:
                body = payload(delivery)
            except ValueError as exc:
                log.error("webhook %s: dropped delivery %s: %s", delivery.webhook_id, delivery.id, exc,
                          extra={"tenant": delivery.tenant, "job_id": delivery.job_id})  # fmt: skip
                await self.store.remove_webhook_delivery(delivery.seq)
                return
            outcome = await self.send(client, delivery, body)
            if outcome.delivered:
                await self.store.remove_webhook_delivery(delivery.seq, delivered_at=time.time())
                return
            attempts = delivery.attempts + 1
            if attempts >= self.max_attempts:
                log.warning(
                    "webhook %s: dropped delivery %s (job %s %s) after %d attempts "
                    "(webhook_max_attempts=%d); last error: %s", delivery.webhook_id, delivery.id,
                    delivery.job_id, delivery.state, attempts, self.max_attempts, outcome.error,
                    extra={"tenant": delivery.tenant, "job_id": delivery.job_id},
                )  # fmt: skip
                await self.store.remove_webhook_delivery(delivery.seq, error=outcome.error)
                return
            delay = retry_delay(attempts, self.retry_base, self.retry_cap)
            log.info("webhook %s: delivery %s failed (%s); attempt %d in %.1f s", delivery.webhook_id,
                     delivery.id, outcome.error, attempts + 1, delay,
                     extra={"tenant": delivery.tenant, "job_id": delivery.job_id})  # fmt: skip
            await self.store.webhook_delivery_failed(
                delivery.seq, attempts, time.time() + delay, outcome.error
            )
        except StoreUnavailable as exc:
            # The outcome is not recorded: the claim lapses and the delivery is sent again (receivers
            # dedupe by delivery_id).
            log.warning("webhook %s: outcome of %s not recorded: %s", delivery.webhook_id, delivery.id, exc)
        finally:
            self._in_flight.pop(delivery.seq, None)
            self._wake.set()

    async def send(
        self, client: httpcore.AsyncConnectionPool, delivery: WebhookDelivery, body: bytes
    ) -> Outcome:
        """One attempt: 2xx delivers; anything else (a redirect too) is an error worth a retry."""
        try:
            url, host = egress.http_target(delivery.url)
        except ValueError as exc:  # registered by an older version, which did not check the name
            return Outcome(False, str(exc)[:MAX_ERROR_SNIPPET])
        headers = [
            ("Host", host),
            ("User-Agent", "printrelay-webhooks/1"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            (SIGNATURE_HEADER, signature_header(self._secret(delivery), int(time.time()), body)),
            ("Printrelay-Delivery", delivery.id),
            ("Printrelay-Event", delivery.event or EVENT_TYPE),
        ]
        timeouts = {
            "connect": self.timeout,
            "read": self.timeout,
            "write": self.timeout,
            "pool": self.timeout,
        }
        try:
            with trio.fail_after(self.timeout):
                async with client.stream(
                    "POST", url, headers=headers, content=body, extensions={"timeout": timeouts}
                ) as response:
                    if 200 <= response.status < 300:
                        return Outcome(True)
                    snippet = b""
                    async for chunk in response.aiter_stream():
                        snippet += chunk
                        if len(snippet) >= MAX_ERROR_SNIPPET:
                            break
            text = snippet[:MAX_ERROR_SNIPPET].decode("utf-8", "replace").strip()
            return Outcome(False, f"HTTP {response.status}" + (f": {text}" if text else ""))
        except trio.TooSlowError:
            return Outcome(False, f"no answer within webhook timeout of {self.timeout:g} s")
        except egress.EgressRefused as exc:
            return Outcome(False, f"{exc}; set webhook_allow_private to send there")
        except (
            httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
            httpcore.UnsupportedProtocol, OSError,
        ) as exc:  # fmt: skip
            return Outcome(False, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_SNIPPET])
        except Exception as exc:  # a receiver nobody foresaw: a failed attempt, never the sender's end
            log.exception("webhook %s: delivery %s failed unexpectedly", delivery.webhook_id, delivery.id)
            return Outcome(False, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_SNIPPET])
