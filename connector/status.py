"""Printer status and capabilities: what each printer says about itself, reported to the relay.

IPP printers (and CUPS queues, which are IPP) answer Get-Printer-Attributes with their state
(``idle`` / ``processing`` / ``stopped``), the reasons (``media-empty-error``, ``paused``, ...), their
supplies and every ``*-supported`` value. RAW and LPD have no way to ask on their own port: their
printer's SNMP agent is asked instead (the Printer MIB, :mod:`connector.printer_mib`), in the same words;
without an answer from it (or with ``?snmp=false`` on the URI) a TCP connect tells whether the printer is
there. Their capabilities are what the protocol can carry (copies, nothing else).
A printer that does not answer is ``offline`` with the reason ``offline-report``; the relay holds the
jobs of ``offline`` and ``stopped`` printers instead of spending their attempts.

:func:`summarize` is pure (IPP attributes in, :class:`PrinterStatus` out). Its ``capabilities`` hold a
short readable summary (``document_formats``, ``sides``, ``media``, ``color``, ``copies_max``, ...) that
the relay checks job options against, and under ``"ipp"`` the printer's description attributes in the
JSON form of :mod:`ipp.jsonattrs`, less the attributes that change on every poll (so only real changes
make events) and bounded in size (a printer's media database can run to megabytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from connector.delivery import Backend, CupsBackend, DeliveryError, IppBackend, LpdBackend, RawBackend
from ipp import Attribute, AttributeGroup, DelimiterTag, PrinterState, Range
from ipp.jsonattrs import attributes_to_json
from ipp.options import OPTION_NAMES, ORIENTATIONS, PRINT_QUALITIES
from tunnel.messages import KEPT_PRINTER_MESSAGE

OFFLINE = "offline"
OFFLINE_REASON = "offline-report"  # the IPP keyword for "the printer is not reachable"
#: the JSON of a printer's attributes in one event stays under this; the largest attributes go first
MAX_IPP_JSON_BYTES = 64 * 1024
#: attributes that change on every poll (clocks, counters) or are reported separately (the state)
VOLATILE = frozenset(
    {
        "printer-up-time", "printer-current-time", "printer-state-change-time",
        "printer-state-change-date-time", "printer-config-change-time", "printer-config-change-date-time",
        "queued-job-count", "printer-state", "printer-state-reasons", "printer-state-message",
        "printer-alert", "printer-alert-description", "printer-uuid-generation",
    }
)  # fmt: skip
#: what a stream protocol (RAW, LPD) can carry: the bytes, and copies by sending them again
STREAM_CAPABILITIES: dict[str, Any] = {"options": [], "copies_max": 999}
STATE_NAMES: dict[int, str] = {
    PrinterState.IDLE: "idle",
    PrinterState.PROCESSING: "processing",
    PrinterState.STOPPED: "stopped",
}
#: each option and the -supported attribute whose presence says the printer takes it
SUPPORTED_ATTRIBUTE = {
    "sides": "sides-supported",
    "media": "media-supported",
    "print-color-mode": "print-color-mode-supported",
    "page-ranges": "page-ranges-supported",
    "orientation-requested": "orientation-requested-supported",
    "print-quality": "print-quality-supported",
}


@dataclass(frozen=True)
class PrinterStatus:
    state: str  # idle | processing | stopped | offline
    reasons: tuple[str, ...] = ()
    capabilities: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    @property
    def reachable(self) -> bool:
        return self.state != OFFLINE


def _strings(group: AttributeGroup, name: str) -> list[str]:
    attribute = group.get(name)
    if attribute is None:
        return []
    return [v for v in attribute.values if isinstance(v, str)]


def _ints(group: AttributeGroup, name: str) -> list[int]:
    attribute = group.get(name)
    if attribute is None:
        return []
    return [v for v in attribute.values if isinstance(v, int) and not isinstance(v, bool)]


def _enum_names(values: list[int], table: Mapping[str, int]) -> list[str]:
    names = {number: name for name, number in table.items()}
    return [names[v] for v in values if v in names]


def _markers(group: AttributeGroup) -> list[dict[str, Any]]:
    """Supplies from the CUPS/PWG ``marker-*`` attributes (level -1 unknown, -2 unknown but not empty...)."""
    names = _strings(group, "marker-names")
    levels = _ints(group, "marker-levels")
    types = _strings(group, "marker-types")
    colors = _strings(group, "marker-colors")
    markers = []
    for index, name in enumerate(names[:64]):
        markers.append(
            {
                "name": name,
                "level": levels[index] if index < len(levels) else None,
                "type": types[index] if index < len(types) else None,
                "color": colors[index] if index < len(colors) else None,
            }
        )
    return markers


def _ipp_json(attributes: list[Attribute]) -> tuple[list[Any], list[str]]:
    """The attributes' JSON within :data:`MAX_IPP_JSON_BYTES`; names of those left out to fit."""
    kept = [a for a in attributes if a.name not in VOLATILE]
    items = attributes_to_json(kept)
    sizes = [len(json.dumps(item, separators=(",", ":"))) for item in items]
    total = sum(sizes)
    dropped: list[str] = []
    for index in sorted(range(len(items)), key=lambda i: -sizes[i]):
        if total <= MAX_IPP_JSON_BYTES:
            break
        total -= sizes[index]
        dropped.append(kept[index].name)
    return [item for item, a in zip(items, kept, strict=True) if a.name not in dropped], sorted(dropped)


def summarize(group: AttributeGroup) -> PrinterStatus:
    """A Get-Printer-Attributes answer's printer group -> state, reasons and capabilities (pure)."""
    state_value = group.get("printer-state")
    state_number = state_value.value if state_value is not None else None
    state = STATE_NAMES.get(state_number, "unknown") if isinstance(state_number, int) else "unknown"
    reasons = tuple(r for r in _strings(group, "printer-state-reasons") if r != "none")[:64]
    capabilities: dict[str, Any] = {}
    formats = _strings(group, "document-format-supported")
    if formats:
        capabilities["document_formats"] = formats
    for key, name in (("sides", "sides-supported"), ("media", "media-supported"),
                      ("print_color_modes", "print-color-mode-supported")):  # fmt: skip
        if name in group:
            capabilities[key] = _strings(group, name)
    if "orientation-requested-supported" in group:
        capabilities["orientations"] = _enum_names(
            _ints(group, "orientation-requested-supported"), ORIENTATIONS
        )
    if "print-quality-supported" in group:
        capabilities["print_qualities"] = _enum_names(
            _ints(group, "print-quality-supported"), PRINT_QUALITIES
        )
    page_ranges = group.get("page-ranges-supported")
    if page_ranges is not None:
        capabilities["page_ranges"] = page_ranges.value is True
    copies = group.get("copies-supported")
    if copies is not None and isinstance(copies.value, Range):
        capabilities["copies_max"] = copies.value.upper
    color = group.get("color-supported")
    modes = capabilities.get("print_color_modes", [])
    capabilities["color"] = (color is not None and color.value is True) or "color" in modes
    capabilities["options"] = [
        name
        for name in OPTION_NAMES
        if SUPPORTED_ATTRIBUTE[name] in group
        and not (name == "page-ranges" and capabilities.get("page_ranges") is False)
    ]
    model = group.get("printer-make-and-model")
    if model is not None and isinstance(model.value, str):
        capabilities["make_and_model"] = model.value
    markers = _markers(group)
    if markers:
        capabilities["markers"] = markers
    capabilities["ipp"], dropped = _ipp_json(list(group))
    if dropped:
        capabilities["ipp_left_out"] = dropped
    message = group.get("printer-state-message")
    text = message.value if message is not None and isinstance(message.value, str) else ""
    return PrinterStatus(state, reasons, capabilities, text[:KEPT_PRINTER_MESSAGE])


def offline(message: str) -> PrinterStatus:
    return PrinterStatus(OFFLINE, (OFFLINE_REASON,), {}, message[:KEPT_PRINTER_MESSAGE])


async def poll(backend: Backend, *, within: float = 15.0) -> PrinterStatus:
    """Ask one printer how it is, for at most ``within`` seconds; never raises for the printer's sake."""
    with trio.move_on_after(within):
        if isinstance(backend, IppBackend):  # CupsBackend too
            try:
                response = await backend.get_printer_attributes(["printer-description", "job-template"])
            except DeliveryError as exc:
                return offline(exc.message)
            group = response.group(DelimiterTag.PRINTER_ATTRIBUTES)
            if response.code >= 0x0100 or group is None:
                # it answered, so it is there; a CUPS queue that does not exist says not-found
                where = "queue" if isinstance(backend, CupsBackend) else "printer"
                return PrinterStatus(
                    "stopped", ("other",), {}, f"{where} answered status 0x{response.code:04x}"
                )
            return summarize(group)
        if isinstance(backend, RawBackend | LpdBackend):
            # The port decides whether jobs can go there at all (an agent answers while the print
            # service is down); the agent, when it answers, says how the printer is.
            if not await backend.probe():
                return offline("does not accept connections")
            if backend.snmp is not None:
                mib = await backend.snmp.status()
                if mib is not None:
                    return PrinterStatus(mib.state, mib.reasons, dict(STREAM_CAPABILITIES), mib.message)
            return PrinterStatus("idle", (), dict(STREAM_CAPABILITIES))
        return PrinterStatus("idle" if await backend.probe() else OFFLINE, (), {})
    return offline(f"no answer within {within:g} s")
