"""A print job's life, as a transition table (DESIGN §6). Pure: no I/O, no clock.

    held ──release──▶ queued ──dispatch──▶ sending ──accepted──▶ printing ──complete──▶ completed
     ▲                  ▲                    │  │                  │  │
     │                  └──────retry─────────┘  └──────fail────────┴──┴──▶ failed
     └──────────────────hold (outcome unknown)───────────────────────┘
    any non-final state ──cancel──▶ canceled;  held/queued ──expire──▶ expired;  queued ──set_aside──▶ held

A retry returns the job to ``queued`` (tunnel lost, printer busy); the dispatcher honours its
``next_attempt_at``. A hold from ``sending`` or ``printing`` means the connector cannot know whether a
RAW or LPD printer took the job before the connector stopped (``unknown_outcomes`` counts these): a
person decides, by releasing the job (print it again) or canceling it. Final states never change again.
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field
from typing import Any


class JobState(enum.StrEnum):
    HELD = "held"
    QUEUED = "queued"
    SENDING = "sending"
    PRINTING = "printing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


#: why a job in flight went back to the queue when its claim lapsed (relay/leases.py); kept as its last_error,
#: so the claim that takes it again is counted as a re-claim
LEASE_LAPSED = "its claim lapsed: the stream that was sending it is gone; queued again"
RELAY_STOPPED = "the relay that was sending it stopped; queued again"

#: why a job to a pull printer is held (relay/submit.py), kept as its last_error while it waits: its
#: hold_reason over REST, its job-state-message over IPP. It prints only once a person releases it
#: (JobLifecycle.release), never when an IPP job's last document arrives (documents_complete).
AWAITING_RELEASE = "waiting for release at the printer"

FINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED})


class JobEvent(enum.StrEnum):
    RELEASE = "release"
    DISPATCH = "dispatch"
    ACCEPTED = "accepted"
    COMPLETE = "complete"
    FAIL = "fail"
    RETRY = "retry"
    HOLD = "hold"  # outcome unknown: a person decides whether to print again
    SET_ASIDE = "set_aside"  # a person holds their queued job until they release it (IPP Hold-Job)
    CANCEL = "cancel"
    EXPIRE = "expire"


S, E = JobState, JobEvent
TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (S.HELD, E.RELEASE): S.QUEUED,
    (S.HELD, E.CANCEL): S.CANCELED,
    (S.HELD, E.EXPIRE): S.EXPIRED,
    (S.QUEUED, E.DISPATCH): S.SENDING,
    (S.QUEUED, E.SET_ASIDE): S.HELD,
    (S.QUEUED, E.CANCEL): S.CANCELED,
    (S.QUEUED, E.EXPIRE): S.EXPIRED,
    (S.QUEUED, E.FAIL): S.FAILED,
    (S.SENDING, E.ACCEPTED): S.PRINTING,
    (S.SENDING, E.COMPLETE): S.COMPLETED,
    (S.SENDING, E.FAIL): S.FAILED,
    (S.SENDING, E.RETRY): S.QUEUED,
    (S.SENDING, E.CANCEL): S.CANCELED,
    (S.SENDING, E.HOLD): S.HELD,
    (S.PRINTING, E.COMPLETE): S.COMPLETED,
    (S.PRINTING, E.FAIL): S.FAILED,
    (S.PRINTING, E.RETRY): S.QUEUED,
    (S.PRINTING, E.CANCEL): S.CANCELED,
    (S.PRINTING, E.HOLD): S.HELD,
}
del S, E

# IPP job-state values (RFC 8011 §5.3.7) for each relay state.
IPP_JOB_STATE: dict[JobState, int] = {
    JobState.HELD: 4,  # pending-held
    JobState.QUEUED: 3,  # pending
    JobState.SENDING: 5,  # processing
    JobState.PRINTING: 5,
    JobState.COMPLETED: 9,
    JobState.FAILED: 8,  # aborted
    JobState.CANCELED: 7,
    JobState.EXPIRED: 8,
}


class IllegalTransition(Exception):
    def __init__(self, state: JobState, event: JobEvent) -> None:
        super().__init__(f"a {state} job cannot {event}")
        self.state = state
        self.event = event


def next_state(state: JobState, event: JobEvent) -> JobState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def _moves() -> dict[JobEvent, tuple[frozenset[JobState], JobState]]:
    found: dict[JobEvent, tuple[frozenset[JobState], JobState]] = {}
    for (state, event), target in TRANSITIONS.items():
        sources, known = found.get(event, (frozenset(), target))
        if known is not target:  # the store applies an event in one statement, relying on this
            raise AssertionError(f"event {event} leads to both {known} and {target}")
        found[event] = (sources | {state}, target)
    return found


#: per event: the states it applies to, and the one state it leads to from each of them
MOVES = _moves()


def new_job_id() -> str:
    """Time-ordered (milliseconds, hex) then random: ids sort by submission and are unguessable."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(8)}"


@dataclass
class Job:
    id: str
    tenant: str
    printer_id: str
    state: JobState
    title: str = ""
    document_format: str = "application/octet-stream"
    copies: int = 1
    user: str = ""
    owner: str = ""  # the user id of the person who submitted it; empty for API tokens' jobs
    size: int = 0
    sealed_size: int = 0
    sha256: str = ""
    wrapped_key: bytes = b""
    key_id: str = ""
    connector_id: str = ""
    attempts: int = 0
    max_attempts: int = 5
    next_attempt_at: float = 0.0
    last_error: str = ""
    idempotency_key: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    # Deliveries whose outcome the connector could not know (see JobEvent.HOLD). The ticket carries it, so
    # the connector can tell a person's release (a higher count than it recorded) from a plain resend.
    unknown_outcomes: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    completed_at: float | None = None
    expires_at: float | None = None
    # A completed job's pages, by its printer's page counter before and after it (RAW and LPD printers
    # whose SNMP agent answers): best effort; None when unknown.
    pages: int | None = None

    @property
    def awaits_release_at_printer(self) -> bool:
        return self.state is JobState.HELD and self.last_error == AWAITING_RELEASE

    def snapshot(self) -> dict[str, Any]:
        """The job as a webhook delivery keeps it (the fields ``public()`` shows), taken with the change."""
        return {name: getattr(self, name) for name in SNAPSHOT_FIELDS}

    def public(self) -> dict[str, Any]:
        """The job as the REST API shows it: never key material."""
        return {
            "id": self.id,
            "state": str(self.state),
            "printer_id": self.printer_id,
            "title": self.title,
            "document_format": self.document_format,
            "copies": self.copies,
            "user": self.user,
            "owner": self.owner or None,
            "size": self.size,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "last_error": self.last_error or None,
            # Why it is held: a delivery of unknown outcome, or a pull printer waiting for its release;
            # None for a job held with hold=true to a printer that is not a pull printer.
            "hold_reason": self.last_error
            if self.awaits_release_at_printer or (self.state is JobState.HELD and self.unknown_outcomes)
            else None,
            "options": self.options,
            "pages": self.pages,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "completed_at": _iso(self.completed_at),
            "expires_at": _iso(self.expires_at),
        }


# Job fields a webhook delivery carries: what Job.public() shows, as the job was at the change.
SNAPSHOT_FIELDS = (
    "id", "tenant", "printer_id", "state", "title", "document_format", "copies", "user", "owner", "size",
    "attempts", "max_attempts", "last_error", "unknown_outcomes", "options", "created_at", "updated_at",
    "completed_at", "expires_at", "pages",
)  # fmt: skip


@dataclass(frozen=True)
class JobHistoryEntry:
    job_id: str
    at: float
    state: JobState
    message: str

    def public(self) -> dict[str, Any]:
        return {"at": _iso(self.at), "state": str(self.state), "message": self.message}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


# --- IPP Create-Job records ---------------------------------------------------------------------------
#
# A Create-Job has an IPP job number before any relay job exists. Its record moves through these
# sub-states until its document arrives; once ``attached`` the relay job is the truth:
#
#     incoming ──upload──▶ receiving ──attach──▶ attached
#        │  ▲                  │ └──attach_open──▶ open ──close──▶ attached
#        │  └──upload_failed───┤                    (a held relay job waiting for Close-Job)
#        ├──cancel──▶ canceled ◀──cancel──┤
#        └──abandon──▶ aborted ◀─abandon──┘   (no document within the time limits, or Close-Job)


class IppJobState(enum.StrEnum):
    INCOMING = "incoming"  # waiting for its document
    RECEIVING = "receiving"  # a Send-Document is streaming in (one at a time)
    OPEN = "open"  # has its document, more may follow (last-document=false): held until Close-Job
    ATTACHED = "attached"  # the relay job is the truth
    CANCELED = "canceled"
    ABORTED = "aborted"


class IppJobEvent(enum.StrEnum):
    UPLOAD = "upload"
    UPLOAD_FAILED = "upload_failed"
    ATTACH = "attach"  # the last document arrived
    ATTACH_OPEN = "attach_open"  # a document arrived, more may follow
    CLOSE = "close"
    CANCEL = "cancel"
    ABANDON = "abandon"


IS, IE = IppJobState, IppJobEvent
IPP_TRANSITIONS: dict[tuple[IppJobState, IppJobEvent], IppJobState] = {
    (IS.INCOMING, IE.UPLOAD): IS.RECEIVING,
    (IS.RECEIVING, IE.UPLOAD_FAILED): IS.INCOMING,
    (IS.RECEIVING, IE.ATTACH): IS.ATTACHED,
    (IS.RECEIVING, IE.ATTACH_OPEN): IS.OPEN,
    (IS.OPEN, IE.CLOSE): IS.ATTACHED,
    (IS.INCOMING, IE.CANCEL): IS.CANCELED,
    (IS.RECEIVING, IE.CANCEL): IS.CANCELED,
    (IS.INCOMING, IE.ABANDON): IS.ABORTED,
    (IS.RECEIVING, IE.ABANDON): IS.ABORTED,
}
del IS, IE


def next_ipp_state(state: IppJobState, event: IppJobEvent) -> IppJobState | None:
    """The state ``event`` leads to from ``state``, or None when it does not apply there."""
    return IPP_TRANSITIONS.get((state, event))
