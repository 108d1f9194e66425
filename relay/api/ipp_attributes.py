"""What the relay says about its IPP printers and jobs: attribute sets, built without I/O.

A printer's attributes start from what its connector reported (the real printer's Get-Printer-Attributes
answer, ``capabilities["ipp"]`` in :mod:`ipp.jsonattrs` form) or, for printers that reported none (RAW
sockets, not yet polled), from :data:`DEFAULT_PRINTER_ATTRIBUTES`. The relay then replaces every
attribute that describes the endpoint rather than the device: its URIs (the printer's own would leak an
address nobody outside the site can reach), the operations and features the relay implements, and the
state, which is the connector's as much as the printer's.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ipp import Attribute, JobState, Operation, PrinterState, Range, Resolution, ValueTag, collection
from ipp.jsonattrs import attributes_from_json
from relay.fetch import SCHEMES as URI_SCHEMES

log = logging.getLogger("printrelay.relay.ipp")

#: operations the relay carries out itself, in operations-supported (Print-URI and Send-URI fetch with
#: the rules of relay.fetch: public addresses only, unless fetch_allow_private)
RELAY_OPERATIONS = (
    Operation.PRINT_JOB,
    Operation.PRINT_URI,
    Operation.VALIDATE_JOB,
    Operation.CREATE_JOB,
    Operation.SEND_DOCUMENT,
    Operation.SEND_URI,
    Operation.CANCEL_JOB,
    Operation.GET_JOB_ATTRIBUTES,
    Operation.GET_JOBS,
    Operation.GET_PRINTER_ATTRIBUTES,
    Operation.HOLD_JOB,
    Operation.RELEASE_JOB,
    Operation.CLOSE_JOB,
)
#: job-hold-until values the relay keeps (RFC 8011 §5.2.2): a job prints now, or waits for Release-Job.
#: Times of day (evening, night, ...) are not kept: see ipp_ticket for what a request for one gets.
HOLD_UNTIL = ("no-hold", "indefinite")
#: a Create-Job waits this long for its document (multiple-operation-time-out, RFC 8011 §5.4.28)
MULTIPLE_OPERATION_TIMEOUT = 300
WHICH_JOBS = ("completed", "not-completed", "all")
#: what a RAW socket printer is sent unchanged; the printer itself decides what it can print
RAW_FORMATS = (
    "application/octet-stream",
    "application/pdf",
    "application/postscript",
    "application/vnd.hp-pcl",
    "image/pwg-raster",
    "image/urf",
    "text/plain",
)
KEYWORD_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,254}$")

# Job template attributes (RFC 8011 §5.2, PWG 5100.x); "xxx-default", "xxx-supported", "xxx-ready" and
# "xxx-database" of these are in the printer's 'job-template' group, everything else in
# 'printer-description'.
JOB_TEMPLATE = frozenset(
    {
        "copies", "finishings", "finishings-col", "job-hold-until", "job-priority", "job-sheets",
        "job-sheets-col", "media", "media-col", "multiple-document-handling", "number-up",
        "number-up-layout", "orientation-requested", "output-bin", "overrides", "page-delivery",
        "page-ranges", "pages-per-subset", "presentation-direction-number-up", "print-color-mode",
        "print-content-optimize", "print-quality", "print-rendering-intent", "print-scaling",
        "printer-resolution", "sides", "job-account-id", "job-accounting-user-id", "job-error-action",
        "job-delay-output-until", "job-retain-until", "separator-sheets", "insert-sheet",
        "imposition-template", "job-cover-back", "job-cover-front", "cover-back", "cover-front",
        "feed-orientation", "x-image-position", "x-image-shift", "x-side1-image-shift",
        "x-side2-image-shift", "y-image-position", "y-image-shift", "y-side1-image-shift",
        "y-side2-image-shift", "media-source", "media-type", "media-size", "media-size-name",
        "media-top-margin", "media-bottom-margin", "media-left-margin", "media-right-margin",
        "finishing-template",
    }
)  # fmt: skip
_TEMPLATE_SUFFIXES = ("-default", "-supported", "-ready", "-database")

# Attributes that describe the endpoint, the queue or the protocol, not the device: the printer's own
# values are dropped and the relay's (if any) put in their place.
RELAY_OWNED = frozenset(
    {
        "printer-uri-supported", "uri-security-supported", "uri-authentication-supported",
        "printer-name", "printer-state", "printer-state-reasons", "printer-state-message",
        "printer-is-accepting-jobs", "printer-up-time", "printer-current-time",
        "printer-state-change-time", "printer-state-change-date-time", "printer-config-change-time",
        "printer-config-change-date-time", "operations-supported", "queued-job-count",
        "printer-uuid", "printer-more-info", "printer-icons", "printer-strings-uri",
        "printer-supply-info-uri", "printer-xri-supported", "printer-more-info-manufacturer",
        "printer-driver-installer", "reference-uri-schemes-supported", "compression-supported",
        "multiple-document-jobs-supported", "multiple-operation-time-out",
        "multiple-operation-time-out-action", "which-jobs-supported", "job-ids-supported",
        "identify-actions-default", "identify-actions-supported", "ipp-features-supported",
        "document-password-supported", "job-creation-attributes-supported",
        "printer-get-attributes-supported", "notify-events-default", "notify-events-supported",
        "notify-lease-duration-default", "notify-lease-duration-supported",
        "notify-max-events-supported", "notify-pull-method-supported", "notify-schemes-supported",
        "ippget-event-life", "printer-strings-languages-supported", "charset-configured",
        "charset-supported", "natural-language-configured", "generated-natural-language-supported",
        "ipp-versions-supported", "pdl-override-supported", "preferred-attributes-supported",
        "job-k-octets-supported", "job-password-supported", "job-password-encryption-supported",
        "printer-id", "printer-service-type", "printer-dns-sd-name", "job-hold-until-default",
        "job-hold-until-supported", "job-hold-until-time-supported", "job-presets-supported",
        "job-release-action-supported", "job-spooling-supported", "proof-print-supported",
        "printer-kind", "destination-uri-ready", "printer-static-resource-directory-uri",
        "printer-static-resource-k-octets-supported", "printer-static-resource-k-octets-free",
    }
)  # fmt: skip

#: what the relay records of a job's ticket and forwards to the printer (see ipp_ticket)
CREATION_ATTRIBUTES = (
    "copies", "document-format", "document-name", "ipp-attribute-fidelity", "job-hold-until", "job-name",
    "media", "media-col", "orientation-requested", "page-ranges", "print-color-mode", "print-quality",
    "sides",
)  # fmt: skip


def _a(name: str, tag: int, *values: Any) -> Attribute:
    return Attribute(name, tag, tuple(values))


def _media_col(name: str, x: int, y: int) -> dict[str, Attribute]:
    return collection(
        _a("media-size", ValueTag.BEG_COLLECTION, collection(
            _a("x-dimension", ValueTag.INTEGER, x), _a("y-dimension", ValueTag.INTEGER, y)
        )),
        _a("media-size-name", ValueTag.KEYWORD, name),
    )  # fmt: skip


#: A printer that reported no attributes (RAW sockets take bytes and nothing else): one value for every
#: job template attribute, the one the printer uses anyway, so the relay promises nothing it cannot
#: deliver; complete enough for IPP Everywhere clients (and ipp-2.0.test) to make a queue. Copies are
#: done by sending the document again.
DEFAULT_PRINTER_ATTRIBUTES: tuple[Attribute, ...] = (
    _a("printer-info", ValueTag.TEXT, ""),
    _a("printer-location", ValueTag.TEXT, ""),
    _a("printer-make-and-model", ValueTag.TEXT, "printrelay generic printer"),
    _a("color-supported", ValueTag.BOOLEAN, False),
    _a("copies-default", ValueTag.INTEGER, 1),
    _a("copies-supported", ValueTag.RANGE_OF_INTEGER, Range(1, 999)),
    _a("document-format-default", ValueTag.MIME_MEDIA_TYPE, "application/octet-stream"),
    _a("document-format-supported", ValueTag.MIME_MEDIA_TYPE, *RAW_FORMATS),
    _a("finishings-default", ValueTag.ENUM, 3),
    _a("finishings-supported", ValueTag.ENUM, 3),
    _a("media-default", ValueTag.KEYWORD, "iso_a4_210x297mm"),
    _a("media-supported", ValueTag.KEYWORD, "iso_a4_210x297mm"),
    _a("media-ready", ValueTag.KEYWORD, "iso_a4_210x297mm"),
    _a("media-col-default", ValueTag.BEG_COLLECTION, _media_col("iso_a4_210x297mm", 21000, 29700)),
    _a("media-col-supported", ValueTag.KEYWORD, "media-size", "media-size-name"),
    _a(
        "media-size-supported",
        ValueTag.BEG_COLLECTION,
        collection(_a("x-dimension", ValueTag.INTEGER, 21000), _a("y-dimension", ValueTag.INTEGER, 29700)),
    ),
    _a("multiple-document-handling-supported", ValueTag.KEYWORD, "separate-documents-uncollated-copies"),
    _a("orientation-requested-default", ValueTag.ENUM, 3),
    _a("orientation-requested-supported", ValueTag.ENUM, 3),
    _a("output-bin-default", ValueTag.KEYWORD, "face-down"),
    _a("output-bin-supported", ValueTag.KEYWORD, "face-down"),
    _a("pages-per-minute", ValueTag.INTEGER, 1),
    _a("print-color-mode-default", ValueTag.KEYWORD, "monochrome"),
    _a("print-color-mode-supported", ValueTag.KEYWORD, "monochrome"),
    _a("print-quality-default", ValueTag.ENUM, 4),
    _a("print-quality-supported", ValueTag.ENUM, 4),
    _a("printer-resolution-default", ValueTag.RESOLUTION, Resolution(600, 600, 3)),
    _a("printer-resolution-supported", ValueTag.RESOLUTION, Resolution(600, 600, 3)),
    _a("sides-default", ValueTag.KEYWORD, "one-sided"),
    _a("sides-supported", ValueTag.KEYWORD, "one-sided"),
    _a("job-sheets-default", ValueTag.NAME, "none"),
    _a("job-sheets-supported", ValueTag.NAME, "none"),
)


def reported_attributes(capabilities: Mapping[str, Any], printer_id: str) -> list[Attribute] | None:
    """The printer's own attributes as its connector reported them; None when there are none (or they
    do not validate: then the printer is described by the defaults, and the reason is logged)."""
    data = capabilities.get("ipp")
    if data is None:
        return None
    try:
        return attributes_from_json(data)
    except ValueError as exc:
        log.warning("printer %s: reported IPP attributes ignored: %s", printer_id, exc)
        return None


def is_job_template(name: str) -> bool:
    for suffix in _TEMPLATE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] in JOB_TEMPLATE
    return False


# --------------------------------------------------------------------------------------------
# printers


@dataclass(frozen=True)
class PrinterView:
    """What the relay knows about one printer at the moment it answers for it."""

    tenant: str
    printer_id: str
    printer_uri: str  # ipp://HOST/ipp/print/ID (ipps:// behind TLS)
    more_info: str  # the printer in the REST API
    online: bool  # its connector holds a session
    state: str = "unknown"  # idle | processing | stopped | unknown, as the connector reports it
    reasons: Sequence[str] = ()
    queued_jobs: int = 0
    connector_id: str = ""
    pull: bool = False  # every job is held until its owner releases it
    message: str = ""  # what the printer says of its state (its printer-state-message, its SNMP alerts)
    now: float = field(default_factory=time.time)

    @property
    def tls(self) -> bool:
        return self.printer_uri.startswith("ipps:")


def printer_uuid(tenant: str, printer_id: str) -> str:
    # Stable across relay replicas and restarts, distinct per tenant, says nothing about either.
    return uuid.uuid5(uuid.NAMESPACE_URL, f"printrelay:{tenant}/{printer_id}").urn


def up_time(now: float) -> int:
    """printer-up-time and the time-at-* job attributes are seconds of the Unix epoch, as in CUPS:
    they must stay comparable across relay restarts and replicas, which a process uptime is not."""
    return max(1, int(now))


def _date(ts: float) -> datetime:
    return datetime.fromtimestamp(int(ts * 10) / 10, UTC)


def _printer_state(view: PrinterView) -> tuple[int, list[str], str]:
    if not view.online:
        message = f"connector {view.connector_id} is offline; jobs wait in the relay until it returns"
        return PrinterState.STOPPED, ["offline-report"], message
    state = {"processing": PrinterState.PROCESSING, "stopped": PrinterState.STOPPED}.get(
        view.state, PrinterState.IDLE
    )
    reasons = [r for r in view.reasons if KEYWORD_RE.match(r) and r != "none"][:32] or ["none"]
    return state, reasons, view.message[:255] or {3: "Idle.", 4: "Printing.", 5: "Stopped."}[state]


def printer_attributes(reported: Iterable[Attribute] | None, view: PrinterView) -> dict[str, Attribute]:
    """Every attribute of the printer, as the relay answers for it."""
    result: dict[str, Attribute] = {}
    for attribute in DEFAULT_PRINTER_ATTRIBUTES if reported is None else reported:
        if attribute.name not in RELAY_OWNED:
            result[attribute.name] = attribute
    if reported is not None:
        for attribute in DEFAULT_PRINTER_ATTRIBUTES:  # what IPP requires even if the device omits it
            result.setdefault(attribute.name, attribute)

    state, reasons, message = _printer_state(view)
    now = up_time(view.now)
    formats = result.get("document-format-supported")
    creation = [n for n in CREATION_ATTRIBUTES if n in _supported_names(result)]
    relay = [
        _a("printer-uri-supported", ValueTag.URI, view.printer_uri),
        _a("uri-security-supported", ValueTag.KEYWORD, "tls" if view.tls else "none"),
        _a("uri-authentication-supported", ValueTag.KEYWORD, "basic"),
        _a("printer-name", ValueTag.NAME, view.printer_id[:127]),
        _a("printer-uuid", ValueTag.URI, printer_uuid(view.tenant, view.printer_id)),
        _a("printer-more-info", ValueTag.URI, view.more_info),
        _a("printer-state", ValueTag.ENUM, state),
        _a("printer-state-reasons", ValueTag.KEYWORD, *reasons),
        _a("printer-state-message", ValueTag.TEXT, message),
        # The relay spools while the printer or its connector is away: it always accepts jobs.
        _a("printer-is-accepting-jobs", ValueTag.BOOLEAN, True),
        _a("printer-up-time", ValueTag.INTEGER, now),
        _a("printer-current-time", ValueTag.DATE_TIME, _date(view.now)),
        _a("queued-job-count", ValueTag.INTEGER, view.queued_jobs),
        _a("operations-supported", ValueTag.ENUM, *(int(op) for op in RELAY_OPERATIONS)),
        _a("reference-uri-schemes-supported", ValueTag.URI_SCHEME, *URI_SCHEMES),
        _a("charset-configured", ValueTag.CHARSET, "utf-8"),
        _a("charset-supported", ValueTag.CHARSET, "us-ascii", "utf-8"),
        _a("natural-language-configured", ValueTag.NATURAL_LANGUAGE, "en"),
        _a("generated-natural-language-supported", ValueTag.NATURAL_LANGUAGE, "en"),
        _a("ipp-versions-supported", ValueTag.KEYWORD, "1.1", "2.0"),
        # Documents go to the printer byte for byte: the relay decompresses nothing.
        _a("compression-supported", ValueTag.KEYWORD, "none"),
        _a("pdl-override-supported", ValueTag.KEYWORD, "attempted"),
        _a("multiple-document-jobs-supported", ValueTag.BOOLEAN, False),
        _a("multiple-operation-time-out", ValueTag.INTEGER, MULTIPLE_OPERATION_TIMEOUT),
        _a("multiple-operation-time-out-action", ValueTag.KEYWORD, "abort-job"),
        _a("which-jobs-supported", ValueTag.KEYWORD, *WHICH_JOBS),
        _a("job-ids-supported", ValueTag.BOOLEAN, True),
        # A pull printer holds every job: "no-hold" is not one it can keep.
        _a("job-hold-until-default", ValueTag.KEYWORD, "indefinite" if view.pull else "no-hold"),
        _a("job-hold-until-supported", ValueTag.KEYWORD, *(("indefinite",) if view.pull else HOLD_UNTIL)),
        _a("job-creation-attributes-supported", ValueTag.KEYWORD, *creation),
        _a("preferred-attributes-supported", ValueTag.BOOLEAN, False),
    ]
    if formats is not None and "ipp-everywhere" in _values(reported, "ipp-features-supported"):
        relay.append(_a("ipp-features-supported", ValueTag.KEYWORD, "ipp-everywhere"))
    for attribute in relay:
        result[attribute.name] = attribute
    return result


def _values(attrs: Iterable[Attribute] | None, name: str) -> tuple[Any, ...]:
    for attribute in attrs or ():
        if attribute.name == name:
            return attribute.values
    return ()


def _supported_names(attrs: Mapping[str, Attribute]) -> set[str]:
    names = {"document-format", "document-name", "ipp-attribute-fidelity", "job-hold-until", "job-name"}
    names.update(n[: -len("-supported")] for n in attrs if n.endswith("-supported"))
    if "media-supported" in attrs:
        names.add("media-col")
    return names


def select(
    attributes: Mapping[str, Attribute],
    requested: Sequence[str] | None,
    groups: Mapping[str, frozenset[str] | None],
    default: Sequence[str] = ("all",),
) -> list[Attribute]:
    """The attributes ``requested`` names (RFC 8011 §4.2.5.1): attribute names and group names.

    ``groups`` maps each group keyword to its member names (None: every attribute). Names the
    object does not have are left out, as the RFC allows.
    """
    wanted: set[str] = set()
    for name in requested or default:
        if name in groups:
            members = groups[name]
            if members is None:
                return list(attributes.values())
            wanted |= members
        else:
            wanted.add(name)
    return [attribute for name, attribute in attributes.items() if name in wanted]


def printer_groups(attributes: Mapping[str, Attribute]) -> dict[str, frozenset[str] | None]:
    template = frozenset(n for n in attributes if is_job_template(n))
    return {
        "all": None,
        "job-template": template,
        "printer-description": frozenset(attributes) - template,
    }


# --------------------------------------------------------------------------------------------
# jobs

# job-state-reasons for each IPP job-state, when nothing more specific is known
_STATE_REASONS = {
    JobState.PENDING: "none",
    JobState.PENDING_HELD: "job-hold-until-specified",
    JobState.PROCESSING: "job-printing",
    JobState.PROCESSING_STOPPED: "printer-stopped",
    JobState.CANCELED: "job-canceled-by-user",
    JobState.ABORTED: "aborted-by-system",
    JobState.COMPLETED: "job-completed-successfully",
}


@dataclass(frozen=True)
class JobView:
    """One job as IPP shows it (a relay job, or a Create-Job still waiting for its document)."""

    number: int
    job_uri: str
    printer_uri: str
    more_info: str | None
    name: str
    user: str
    state: int
    created_at: float
    reasons: tuple[str, ...] = ()
    message: str = ""
    processing_at: float | None = None
    completed_at: float | None = None
    size: int | None = None
    document_format: str | None = None
    documents: int = 1
    template: tuple[Attribute, ...] = ()  # the job template attributes it was created with
    uuid: str = ""


def job_state_reasons(state: int) -> str:
    return _STATE_REASONS.get(JobState(state), "none")


def job_attributes(job: JobView) -> dict[str, Attribute]:
    def time_attrs(name: str, ts: float | None) -> list[Attribute]:
        if ts is None:
            return [
                _a(f"time-at-{name}", ValueTag.NO_VALUE, None),
                _a(f"date-time-at-{name}", ValueTag.NO_VALUE, None),
            ]
        return [
            _a(f"time-at-{name}", ValueTag.INTEGER, up_time(ts)),
            _a(f"date-time-at-{name}", ValueTag.DATE_TIME, _date(ts)),
        ]

    attrs = [
        _a("job-id", ValueTag.INTEGER, job.number),
        _a("job-uri", ValueTag.URI, job.job_uri),
        _a("job-printer-uri", ValueTag.URI, job.printer_uri),
        _a("job-name", ValueTag.NAME, job.name[:255] or "untitled"),
        _a("job-originating-user-name", ValueTag.NAME, job.user[:255] or "anonymous"),
        _a("job-state", ValueTag.ENUM, job.state),
        _a("job-state-reasons", ValueTag.KEYWORD, *(job.reasons or (job_state_reasons(job.state),))),
        _a("number-of-documents", ValueTag.INTEGER, job.documents),
        *time_attrs("creation", job.created_at),
        *time_attrs("processing", job.processing_at),
        *time_attrs("completed", job.completed_at),
        _a("job-printer-up-time", ValueTag.INTEGER, up_time(time.time())),
    ]
    if job.message:
        attrs.append(_a("job-state-message", ValueTag.TEXT, job.message[:1023]))
    if job.more_info:
        attrs.append(_a("job-more-info", ValueTag.URI, job.more_info))
    if job.uuid:
        attrs.append(_a("job-uuid", ValueTag.URI, job.uuid))
    if job.size is not None:
        attrs.append(_a("job-k-octets", ValueTag.INTEGER, min(2**31 - 1, (job.size + 1023) // 1024)))
    if job.document_format:
        attrs.append(_a("document-format", ValueTag.MIME_MEDIA_TYPE, job.document_format))
    result = {a.name: a for a in attrs}
    for attribute in job.template:
        result.setdefault(attribute.name, attribute)
    return result


def job_groups(attributes: Mapping[str, Attribute]) -> dict[str, frozenset[str] | None]:
    template = frozenset(n for n in attributes if n in JOB_TEMPLATE)
    return {"all": None, "job-template": template, "job-description": frozenset(attributes) - template}
