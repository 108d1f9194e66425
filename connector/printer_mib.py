"""What a printer's SNMP agent says about it, in the words IPP printers use.

A RAW or LPD printer reports its state through the Host Resources MIB (RFC 2790) and the Printer MIB
(RFC 3805). This module turns what it says into the ``state`` / ``reasons`` / ``message`` that IPP printers
give (``idle`` / ``processing`` / ``stopped``, ``media-empty-error``, ...), so API users see one vocabulary
whatever the protocol, and the relay holds the jobs of a printer that cannot print (``stopped``) instead of
sending them into it. The objects:

* ``hrPrinterStatus`` (1.3.6.1.2.1.25.3.5.1.1.1): other(1) unknown(2) idle(3) printing(4) warmup(5);
* ``hrPrinterDetectedErrorState`` (1.3.6.1.2.1.25.3.5.1.2.1): BITS in an OCTET STRING, bit 0 the most
  significant bit of the first octet: lowPaper(0) noPaper(1) lowToner(2) noToner(3) doorOpen(4)
  jammed(5) offline(6) serviceRequested(7) inputTrayMissing(8) outputTrayMissing(9)
  markerSupplyMissing(10) outputNearFull(11) outputFull(12) inputTrayEmpty(13) overduePreventMaint(14);
* ``prtAlertTable`` (1.3.6.1.2.1.43.18.1.1): the printer's active alerts, with a severity, a code and a
  description for people: the message, and reasons for the codes known below;
* ``prtMarkerLifeCount`` (1.3.6.1.2.1.43.10.2.1.4.1.1): the pages the printer has printed in its life.
  Read before a job and once the printer settles after it, the difference is the job's page count: best
  effort, since another computer may print in between and some printers count late or not at all.

The mapping follows CUPS's SNMP code (``backend/snmp-supplies.c``), with ``-error`` for the conditions in
which the printer cannot print: CUPS leaves the holding to its backend, here the relay holds the jobs, and
it does so for ``stopped`` printers. Like CUPS, the offline and service bits are left out: printers set
them while asleep, and a printer whose jobs are held until it wakes up never wakes up.

Everything down to :class:`PrinterMib` is pure (values in, :class:`MibStatus` out); :class:`PrinterMib`
asks an agent through :class:`~connector.snmp.SnmpClient` and never raises for the printer's sake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import trio

from connector.snmp import Oid, SnmpClient, SnmpError, Varbind, parse_oid, under
from tunnel.messages import KEPT_PRINTER_MESSAGE

HR_PRINTER_STATUS = parse_oid("1.3.6.1.2.1.25.3.5.1.1.1")
HR_PRINTER_DETECTED_ERROR_STATE = parse_oid("1.3.6.1.2.1.25.3.5.1.2.1")
PRT_MARKER_LIFE_COUNT = parse_oid("1.3.6.1.2.1.43.10.2.1.4.1.1")
PRT_ALERT_ENTRY = parse_oid("1.3.6.1.2.1.43.18.1.1")
PRT_ALERT_SEVERITY_LEVEL = (*PRT_ALERT_ENTRY, 2)
PRT_ALERT_GROUP = (*PRT_ALERT_ENTRY, 4)
PRT_ALERT_CODE = (*PRT_ALERT_ENTRY, 7)
PRT_ALERT_DESCRIPTION = (*PRT_ALERT_ENTRY, 8)
ALERT_COLUMNS = (PRT_ALERT_SEVERITY_LEVEL, PRT_ALERT_GROUP, PRT_ALERT_CODE, PRT_ALERT_DESCRIPTION)
#: alert rows read per poll (one GETBULK); printers keep a handful
MAX_ALERTS = 16

# hrPrinterStatus
OTHER, UNKNOWN, IDLE, PRINTING, WARMUP = 1, 2, 3, 4, 5

#: hrPrinterDetectedErrorState bit -> (its name in RFC 3805, the IPP printer-state-reasons keyword, words
#: for the message when the printer gives none)
ERROR_BITS: dict[int, tuple[str, str, str]] = {
    0: ("lowPaper", "media-low-warning", "paper low"),
    1: ("noPaper", "media-empty-error", "out of paper"),
    2: ("lowToner", "toner-low-warning", "toner low"),
    3: ("noToner", "toner-empty-error", "out of toner"),
    4: ("doorOpen", "door-open-error", "door open"),
    5: ("jammed", "media-jam-error", "paper jam"),
    # 6 offline, 7 serviceRequested: unreliable (CUPS leaves them out too); see the module's docstring
    8: ("inputTrayMissing", "input-tray-missing-warning", "input tray missing"),
    9: ("outputTrayMissing", "output-tray-missing-warning", "output tray missing"),
    10: ("markerSupplyMissing", "marker-supply-missing-error", "toner or ink cartridge missing"),
    11: ("outputNearFull", "output-area-almost-full-report", "output tray almost full"),
    12: ("outputFull", "output-area-full-error", "output tray full"),
    # one tray of several (a bypass tray, say): the printer may well print from another
    13: ("inputTrayEmpty", "media-empty-warning", "input tray empty"),
    # 14 overduePreventMaint: as serviceRequested
}

# prtAlertSeverityLevel -> the suffix of its reason; warningBinaryChangeEvent(5) is an event that
# happened (a cover was closed), not a condition that holds: it gives no reason
SEVERITY_SUFFIX = {1: "report", 3: "error", 4: "warning"}
CRITICAL, WARNING, BINARY_CHANGE = 3, 4, 5
#: prtAlertCode (IANA-PRINTER-MIB PrtAlertCodeTC) -> the IPP keyword for the condition
ALERT_CODES: dict[int, str] = {
    3: "cover-open",  # coverOpen
    5: "interlock-open",  # interlockOpen
    8: "media-jam",  # jam
    501: "door-open",  # doorOpen
    801: "input-tray-missing",  # inputMediaTrayMissing
    807: "media-low",  # inputMediaSupplyLow
    808: "media-empty",  # inputMediaSupplyEmpty
    901: "output-tray-missing",  # outputMediaTrayMissing
    902: "output-area-almost-full",  # outputMediaTrayAlmostFull
    903: "output-area-full",  # outputMediaTrayFull
    1001: "fuser-under-temp",  # markerFuserUnderTemperature
    1002: "fuser-over-temp",  # markerFuserOverTemperature
    1101: "toner-empty",  # markerTonerEmpty
    1102: "marker-supply-empty",  # markerInkEmpty
    1104: "toner-low",  # markerTonerAlmostEmpty
    1105: "marker-supply-low",  # markerInkAlmostEmpty
    1107: "marker-waste-almost-full",  # markerWasteTonerReceptacleAlmostFull
    1108: "marker-waste-almost-full",  # markerWasteInkReceptacleAlmostFull
    1109: "marker-waste-full",  # markerWasteTonerReceptacleFull
    1110: "marker-waste-full",  # markerWasteInkReceptacleFull
    1111: "opc-near-eol",  # markerOpcLifeAlmostOver
    1112: "opc-life-over",  # markerOpcLifeOver
    1113: "developer-low",  # markerDeveloperAlmostEmpty
    1114: "developer-empty",  # markerDeveloperEmpty
}
SUFFIX_RANK = {"report": 0, "warning": 1, "error": 2}


@dataclass(frozen=True)
class Alert:
    """One row of prtAlertTable."""

    severity: int  # other(1) critical(3) warning(4) warningBinaryChangeEvent(5)
    group: int | None = None  # prtAlertGroup: input(8), output(9), marker(10), mediaPath(13), ...
    code: int | None = None  # prtAlertCode (ALERT_CODES)
    description: str = ""


@dataclass(frozen=True)
class MibStatus:
    state: str  # idle | processing | stopped
    reasons: tuple[str, ...] = ()
    message: str = ""


def error_bits(octets: bytes) -> set[int]:
    """The bits set in a BITS value: bit 0 is the most significant bit of the first octet (RFC 2578 §7.1.4).
    Agents send one octet or two (some pad more); bits past the ones RFC 2790 names are kept, and ignored."""
    return {
        index * 8 + bit for index, octet in enumerate(octets[:4]) for bit in range(8) if octet & (0x80 >> bit)
    }


def _text(raw: bytes) -> str:
    """An alert description: UTF-8 (or Latin-1 when it is not), control characters dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())[:KEPT_PRINTER_MESSAGE]


def alerts_from(varbinds: Iterable[Varbind]) -> list[Alert]:
    """The rows of prtAlertTable among the answers to a GETBULK of its columns (rows by their index)."""
    rows: dict[Oid, dict[Oid, Varbind]] = {}
    for varbind in varbinds:
        for column in ALERT_COLUMNS:
            if under(varbind.oid, column) and varbind.exists:
                rows.setdefault(varbind.oid[len(column) :], {})[column] = varbind
    alerts = []
    for index in sorted(rows)[:MAX_ALERTS]:
        row = rows[index]

        def number(column: Oid, row: dict[Oid, Varbind] = row) -> int | None:
            varbind = row.get(column)
            return varbind.value if varbind and isinstance(varbind.value, int) else None

        severity = number(PRT_ALERT_SEVERITY_LEVEL)
        if severity is None:
            continue
        description = row.get(PRT_ALERT_DESCRIPTION)
        text = _text(description.value) if description and isinstance(description.value, bytes) else ""
        alerts.append(Alert(severity, number(PRT_ALERT_GROUP), number(PRT_ALERT_CODE), text))
    return alerts


def interpret(
    printer_status: int | None, error_state: bytes | None, alerts: Iterable[Alert] = ()
) -> MibStatus:
    """hrPrinterStatus, hrPrinterDetectedErrorState and the alerts -> state, reasons and message.

    1. Each error bit gives its reason (:data:`ERROR_BITS`), each alert of a known code one with the suffix
       of its severity (critical: ``-error``); a keyword given twice keeps its most severe suffix.
    2. Any ``-error`` reason: ``stopped``. Else printing or warming up: ``processing``. Else ``idle`` (other
       and unknown too: a printer in standby says other, and a printer with nothing wrong prints).
    3. The message: the descriptions of the critical alerts, then the warnings; without any, the words for
       the error bits.
    """
    alerts = list(alerts)
    severities: dict[str, str] = {}

    def add(reason: str) -> None:
        keyword, _, suffix = reason.rpartition("-")
        if SUFFIX_RANK[suffix] >= SUFFIX_RANK.get(severities.get(keyword, ""), -1):
            severities[keyword] = suffix

    bits = error_bits(error_state or b"")
    for bit in sorted(bits):
        if bit in ERROR_BITS:
            add(ERROR_BITS[bit][1])
    for alert in alerts:
        keyword = ALERT_CODES.get(alert.code or 0)
        suffix = SEVERITY_SUFFIX.get(alert.severity)
        if keyword and suffix:
            add(f"{keyword}-{suffix}")
    reasons = tuple(sorted(f"{keyword}-{suffix}" for keyword, suffix in severities.items()))
    if any(reason.endswith("-error") for reason in reasons):
        state = "stopped"
    elif printer_status in (PRINTING, WARMUP):
        state = "processing"
    else:
        state = "idle"
    said = [a.description for a in alerts if a.severity == CRITICAL and a.description]
    said += [a.description for a in alerts if a.severity == WARNING and a.description]
    words = list(dict.fromkeys(said)) or [ERROR_BITS[bit][2] for bit in sorted(bits) if bit in ERROR_BITS]
    return MibStatus(state, reasons, "; ".join(words)[:KEPT_PRINTER_MESSAGE])


def counter(varbind: Varbind | None) -> int | None:
    """A page counter's value: Counter32 as RFC 3805 says, an Integer or Gauge from some printers too."""
    if varbind is None or varbind.kind not in ("counter", "integer", "gauge", "counter64"):
        return None
    return varbind.value if isinstance(varbind.value, int) and varbind.value >= 0 else None


def pages_between(before: int | None, after: int | None) -> int | None:
    """The job's pages from the life counter read before and after it; None when either is unknown or the
    counter went back (a reset, a replaced board, a Counter32 that wrapped)."""
    if before is None or after is None or after < before:
        return None
    return after - before


def _number(values: Mapping[Oid, Varbind], oid: Oid) -> int | None:
    varbind = values.get(oid)
    return varbind.value if varbind and varbind.kind == "integer" and isinstance(varbind.value, int) else None


def _octets(values: Mapping[Oid, Varbind], oid: Oid) -> bytes | None:
    varbind = values.get(oid)
    return (
        varbind.value if varbind and varbind.kind == "string" and isinstance(varbind.value, bytes) else None
    )


# --- asking the agent (I/O) ----------------------------------------------------------------------------

#: after a job: how often the page counter is read, and for how long at most
SETTLE_INTERVAL = 0.5
SETTLE_WITHIN = 5.0


class PrinterMib:
    """The Printer MIB of one printer, read through its agent. Never raises for the printer's sake: a
    printer that does not answer, or answers without the Printer MIB, is None."""

    def __init__(self, client: SnmpClient) -> None:
        self.client = client
        # Whether the agent answered when last asked. Status polls always ask; a job does not wait for the
        # timeout of an agent that stayed silent at the last poll (most printers without SNMP), it goes
        # without a page count until a poll hears the agent again.
        self.answering = True

    def __repr__(self) -> str:
        return f"PrinterMib({self.client!r})"

    async def status(self) -> MibStatus | None:
        """State, reasons and message; None without an answer or without hrPrinterStatus and
        hrPrinterDetectedErrorState (a print server's host, say: its TCP port tells more)."""
        try:
            values = await self.client.get([HR_PRINTER_STATUS, HR_PRINTER_DETECTED_ERROR_STATE])
        except SnmpError:
            self.answering = False
            return None
        self.answering = True
        printer_status = _number(values, HR_PRINTER_STATUS)
        error_state = _octets(values, HR_PRINTER_DETECTED_ERROR_STATE)
        if printer_status is None and error_state is None:
            return None
        try:
            alerts = alerts_from(await self.client.bulk(ALERT_COLUMNS, MAX_ALERTS))
        except SnmpError:
            alerts = []  # the state without the message is still the state
        return interpret(printer_status, error_state, alerts)

    async def life_count(self) -> int | None:
        """prtMarkerLifeCount now; None without an answer or without the counter, and at once when the
        agent did not answer last time."""
        if not self.answering:
            return None
        try:
            values = await self.client.get([PRT_MARKER_LIFE_COUNT])
        except SnmpError:
            self.answering = False
            return None
        return counter(values.get(PRT_MARKER_LIFE_COUNT))

    async def settled_count(
        self,
        before: int,
        *,
        within: float = SETTLE_WITHIN,
        interval: float = SETTLE_INTERVAL,
        give_up: Callable[[], bool] = lambda: False,
    ) -> int | None:
        """The life counter once the printer is done with a job it was just given, within ``within``
        seconds; None when it did not settle by then (a long job, a printer slow to start): no count
        is better than a wrong one; None too as soon as ``give_up()`` (another job waits for the printer).

        1. read the counter and hrPrinterStatus every ``interval`` seconds;
        2. done when the printer is not printing (nor warming up), the counter has moved past ``before``
           and reads as it did the time before.
        """
        last: int | None = None
        with trio.move_on_after(within):
            while not give_up():
                try:
                    values = await self.client.get([PRT_MARKER_LIFE_COUNT, HR_PRINTER_STATUS])
                except SnmpError:
                    values = {}
                count = counter(values.get(PRT_MARKER_LIFE_COUNT))
                busy = _number(values, HR_PRINTER_STATUS) in (PRINTING, WARMUP)
                if count is not None:
                    settled = count == last
                    last = count
                    if not busy and settled and count != before:
                        return count
                await trio.sleep(interval)
        return None
