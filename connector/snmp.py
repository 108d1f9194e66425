"""An SNMPv2c client for printer status: GET and GETBULK over UDP, nothing else.

RAW and LPD printers say nothing about themselves on their print port, but nearly every network printer
runs an SNMP agent on UDP 161 with the Printer MIB (RFC 3805); CUPS's ``socket`` and ``lpd`` backends ask
it too. :mod:`connector.printer_mib` reads what it says; this module only carries the requests.

The messages are built and read with pysnmp's message layer (``pysnmp.proto.api.v2c``: the PDUs and the
message of RFC 3416 / RFC 1901) and pyasn1's BER codec, both pure and without I/O of their own
(:func:`encode_request`, :func:`decode_response`, tested with bytes alone). The I/O is ours: one trio UDP
socket per request, connected to the agent so the kernel drops datagrams from anyone else, the same
request-id on each retry (a late answer to the first try still counts), and every answer checked before
it is believed: its size, that it is BER for one whole SNMP message, its version and community, that it is
a Response to *this* request-id, its error-status, and each value's type. Whatever fails those checks is
dropped and the wait goes on, so a stray or forged datagram costs nothing but itself.

An agent that does not exist answers nothing (or an ICMP port-unreachable, which a connected UDP socket
reports at once): :class:`SnmpError`, after at most ``timeout`` x (``retries`` + 1) seconds.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trio
from pyasn1.codec.ber import decoder, encoder
from pyasn1.error import PyAsn1Error
from pysnmp.proto.api import v2c

from service.settings import parse_bool

Oid = tuple[int, ...]

DEFAULT_PORT = 161
DEFAULT_COMMUNITY = "public"
#: one GET asks for at most this many objects (printer agents are small; some answer tooBig past ~40)
MAX_GET_OIDS = 32
#: GETBULK repetitions per column: printers keep a few alerts (RFC 3805 bounds the table by
#: prtAlertCriticalEvents / prtAlertAllEvents); more than this many rows are not read
MAX_BULK_REPETITIONS = 32
#: an answer to our requests (at most 32 objects, a printer's alert texts included) fits well within this;
#: a longer datagram is not decoded at all (pyasn1 takes about 7 ms per KiB: a flood of forged 64 KiB
#: datagrams would otherwise hold the connector's event loop)
MAX_ANSWER_BYTES = 16 * 1024
#: request-ids are positive Integer32 values (RFC 3416 §3)
MAX_REQUEST_ID = 2**31 - 1
#: SNMPv2c is message version 1 (RFC 1901); version 0 is SNMPv1
VERSION_2C = 1
ERROR_STATUS = (
    "noError", "tooBig", "noSuchName", "badValue", "readOnly", "genErr", "noAccess", "wrongType",
    "wrongLength", "wrongEncoding", "wrongValue", "noCreation", "inconsistentValue", "resourceUnavailable",
    "commitFailed", "undoFailed", "authorizationError", "notWritable", "inconsistentName",
)  # fmt: skip


class SnmpError(Exception):
    """No usable answer: nobody answered in time, the port is closed, or the agent reported an error."""


def parse_oid(text: str) -> Oid:
    """``"1.3.6.1.2.1.43"`` (a leading dot is allowed) -> ``(1, 3, 6, 1, 2, 1, 43)``."""
    parts = text.strip().lstrip(".").split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not an OID: {text!r}")
    return tuple(int(p) for p in parts)


def format_oid(oid: Oid) -> str:
    return ".".join(str(n) for n in oid)


def under(oid: Oid, prefix: Oid) -> bool:
    return len(oid) > len(prefix) and oid[: len(prefix)] == prefix


# --- the printer URI's option ---------------------------------------------------------------------------


def snmp_enabled(uri: str) -> bool:
    """Whether a printer URI leaves SNMP on: ``socket://host:9100/?snmp=false`` turns it off, as in CUPS
    (``snmp=no``, ``off`` and ``0`` too). Other query options are CUPS's and are ignored here."""
    for name, value in parse_qsl(urlsplit(uri).query, keep_blank_values=True):
        if name.lower() == "snmp":
            try:
                return parse_bool(value)
            except ValueError:
                raise ValueError(f"printer URI {uri!r}: snmp must be true or false, not {value!r}") from None
    return True


# --- the messages (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Varbind:
    """One object of an answer, its value in plain Python.

    ``kind`` is the SMIv2 type: ``integer``, ``string`` (bytes), ``oid``, ``ipaddress`` (bytes),
    ``counter``, ``gauge``, ``timeticks``, ``opaque`` (bytes), ``counter64``, ``null``, or one of the
    exceptions of RFC 3416 (``noSuchObject``, ``noSuchInstance``, ``endOfMibView``, value None)."""

    oid: Oid
    kind: str
    value: int | bytes | Oid | None

    @property
    def exists(self) -> bool:
        return self.kind not in ("noSuchObject", "noSuchInstance", "endOfMibView")


# (class, kind, how to read the value): subclasses first, Counter32 & co. are Integer underneath
_KINDS: tuple[tuple[type[Any], str, Any], ...] = (
    (v2c.NoSuchObject, "noSuchObject", lambda v: None),
    (v2c.NoSuchInstance, "noSuchInstance", lambda v: None),
    (v2c.EndOfMibView, "endOfMibView", lambda v: None),
    (v2c.Counter32, "counter", int),
    (v2c.Gauge32, "gauge", int),
    (v2c.TimeTicks, "timeticks", int),
    (v2c.Counter64, "counter64", int),
    (v2c.IpAddress, "ipaddress", bytes),
    (v2c.Opaque, "opaque", bytes),
    (v2c.Integer, "integer", int),
    (v2c.OctetString, "string", bytes),
    (v2c.ObjectIdentifier, "oid", tuple),
    (v2c.Null, "null", lambda v: None),
)


def _varbind(oid: Any, value: Any) -> Varbind:
    for cls, kind, read in _KINDS:
        if isinstance(value, cls):
            return Varbind(tuple(oid), kind, read(value))
    raise SnmpError(f"{oid}: a value of type {type(value).__name__} is not an SNMPv2 type")


def encode_request(
    request_id: int, community: str, oids: Sequence[Oid], *, repetitions: int | None = None
) -> bytes:
    """A GetRequest for ``oids``, or with ``repetitions`` a GetBulkRequest (non-repeaters 0) that walks
    each of them that many objects on (RFC 3416 §4.2.3)."""
    if not 1 <= len(oids) <= MAX_GET_OIDS:
        raise ValueError(f"one request asks for 1 to {MAX_GET_OIDS} objects, not {len(oids)}")
    if not 0 < request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request-id {request_id} is not a positive Integer32")
    if repetitions is None:
        pdu = v2c.GetRequestPDU()
        v2c.apiPDU.set_defaults(pdu)
    else:
        if not 1 <= repetitions <= MAX_BULK_REPETITIONS:
            raise ValueError(f"repetitions must be 1 to {MAX_BULK_REPETITIONS}, not {repetitions}")
        pdu = v2c.GetBulkRequestPDU()
        v2c.apiBulkPDU.set_defaults(pdu)
        v2c.apiBulkPDU.set_non_repeaters(pdu, 0)
        v2c.apiBulkPDU.set_max_repetitions(pdu, repetitions)
    v2c.apiPDU.set_request_id(pdu, request_id)
    v2c.apiPDU.set_varbinds(pdu, [(v2c.ObjectIdentifier(oid), v2c.null) for oid in oids])
    message = v2c.Message()
    v2c.apiMessage.set_defaults(message)
    v2c.apiMessage.set_community(message, community.encode())
    v2c.apiMessage.set_pdu(message, pdu)
    return bytes(encoder.encode(message))


def decode_response(data: bytes, request_id: int, community: str, *, most: int) -> list[Varbind] | None:
    """The objects of the answer to request ``request_id``; None when ``data`` is not that answer (not
    one whole SNMPv2c message, another community, another PDU type or request-id): the caller drops it and
    keeps waiting. An answer with more than ``most`` objects, or one that says an error, is an
    :class:`SnmpError`."""
    if len(data) > MAX_ANSWER_BYTES:
        return None
    try:
        message, rest = decoder.decode(data, asn1Spec=v2c.Message())
        if rest or int(message["version"]) != VERSION_2C:
            return None
        if bytes(v2c.apiMessage.get_community(message)) != community.encode():
            return None
        pdu = v2c.apiMessage.get_pdu(message)
        if not isinstance(pdu, v2c.ResponsePDU) or int(v2c.apiPDU.get_request_id(pdu)) != request_id:
            return None
        status = int(v2c.apiPDU.get_error_status(pdu))
        index = int(v2c.apiPDU.get_error_index(pdu))
        pairs = v2c.apiPDU.get_varbinds(pdu)
    except (PyAsn1Error, ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError):
        # Whatever the decoder makes of a datagram it cannot read, it is not our answer (a length of 2**63
        # reaches BytesIO.read as an OverflowError).
        return None
    if status != 0:
        name = ERROR_STATUS[status] if 0 <= status < len(ERROR_STATUS) else f"error {status}"
        raise SnmpError(f"the agent answered {name} (object {index})")
    if len(pairs) > most:
        raise SnmpError(f"the agent answered {len(pairs)} objects to a request for at most {most}")
    return [_varbind(oid, value) for oid, value in pairs]


# --- the client (I/O) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnmpClient:
    """Requests to one agent. Holds no socket: each request opens one and closes it."""

    host: str
    port: int = DEFAULT_PORT
    community: str = DEFAULT_COMMUNITY
    timeout: float = 1.0  # seconds to wait for an answer to each try
    retries: int = 1  # tries after the first

    def __repr__(self) -> str:  # the community is a password of sorts: never in logs
        return f"SnmpClient({self.host!r}, {self.port})"

    async def get(self, oids: Sequence[Oid]) -> dict[Oid, Varbind]:
        """The values of ``oids`` (missing ones: ``exists`` false); :class:`SnmpError` without an answer."""
        found = await self._request(list(oids), None, most=len(oids))
        if [v.oid for v in found] != list(oids):
            raise SnmpError("the agent answered other objects than those asked for")
        return {v.oid: v for v in found}

    async def bulk(self, oids: Sequence[Oid], repetitions: int) -> list[Varbind]:
        """GETBULK: up to ``repetitions`` objects after each of ``oids``, row by row, as the agent sends
        them (they may run past a column's end: the caller keeps those it wants)."""
        return await self._request(list(oids), repetitions, most=len(oids) * repetitions)

    async def _request(self, oids: list[Oid], repetitions: int | None, *, most: int) -> list[Varbind]:
        request_id = secrets.randbelow(MAX_REQUEST_ID) + 1
        data = encode_request(request_id, self.community, oids, repetitions=repetitions)
        where = f"{self.host}:{self.port}"
        tries = self.retries + 1
        # The name lookup shares the bound: a job never waits on a slow DNS server for a page count.
        with trio.move_on_after(self.timeout * (tries + 1)):
            try:
                found = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                raise SnmpError(f"cannot resolve {self.host}: {exc}") from None
            family, kind, proto, _, address = found[0]
            with trio.socket.socket(family, kind, proto) as sock:
                try:
                    await sock.connect(address)
                    for _ in range(tries):
                        await sock.send(data)
                        with trio.move_on_after(self.timeout):
                            while True:
                                packet = await sock.recv(
                                    MAX_ANSWER_BYTES + 1
                                )  # larger answers are dropped unread
                                answer = decode_response(packet, request_id, self.community, most=most)
                                if answer is not None:
                                    return answer
                except ConnectionRefusedError:
                    raise SnmpError(f"no SNMP agent at {where} (port unreachable)") from None
                except OSError as exc:
                    raise SnmpError(f"SNMP to {where}: {exc}") from None
        raise SnmpError(f"no SNMP answer from {where} within {self.timeout:g} s x {tries}")
