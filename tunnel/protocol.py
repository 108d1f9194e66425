"""The tunnel's HTTP/2 connection as a sans-IO state machine.

h2 does the framing, HPACK, stream states and flow control. This layer adds what h2 leaves to its user
(DESIGN §8): our settings (large windows, large frames), and caps on what a hostile peer can make us do
per second — stream resets (rapid reset, CVE-2023-44487), PINGs and SETTINGS, each of which costs us a
reply. Over a cap the peer gets GOAWAY and the connection closes: memory stays bounded either way.

Like h2 itself it has no sockets and no clock: the caller passes ``now`` in, so every rule is testable with
bytes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.frame

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class TunnelSettings:
    """Limits and windows of one tunnel session; both sides use the same defaults."""

    # Flow control (DESIGN §4): a stream being read may have 8 MiB in flight, the connection 16 MiB; data
    # is acknowledged only once the consumer (the printer side) took it. The consumer takes data in
    # batches and the two processes share a busy machine: with a 1 MiB stream window the relay sat waiting
    # for WINDOW_UPDATEs. A stream nobody reads yet (a job waiting for its printer) gets only
    # unread_stream_window, the window every stream starts with: streams waiting their turn must not use
    # up the connection window that the stream being printed needs (32 waiting jobs x 256 KiB = 8 MiB).
    stream_window: int = 8 * MiB
    unread_stream_window: int = 256 * KiB
    connection_window: int = 16 * MiB
    # Pure-Python h2 pays per frame, so large frames are cheaper; the WebSocket batch caps them anyway.
    max_frame_size: int = 256 * KiB
    max_concurrent_streams: int = 256
    max_header_list_size: int = 64 * KiB
    # Per-second caps on frames that make us do work for the peer.
    max_resets_per_second: float = 200.0
    max_pings_per_second: float = 20.0
    max_settings_per_second: float = 20.0
    # Output the peer has not read yet; beyond it the peer is not reading and the session is closed.
    max_pending_output: int = 32 * MiB
    # Writers pause above this many unsent bytes, so a fast sender cannot fill memory.
    output_high_water: int = 1 * MiB
    ping_interval: float = 15.0
    # The client side (the relay) pings only a quiet peer, plus once per rtt_interval for the round trip.
    rtt_interval: float = 60.0
    dead_after: float = 45.0
    send_timeout: float = 45.0


def _data_frame_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    """hyperframe's text for a DATA frame's body ("<hex:" + the first 10 bytes in hex + "...>"), from the
    first bytes alone.

    h2 builds ``repr(frame)`` for its trace log on every frame it receives, logger or not
    (``H2Connection._receive_frame``), and hyperframe's default serializes the whole body and hex-encodes
    all of it to show 10 bytes: a third of the connector's CPU while a job streams.
    """
    head = bytes(frame.data[:11])
    if not head:
        return "None"
    text = head.hex()
    return f"<hex:{text[:20]}...>" if len(text) > 20 else f"<hex:{text}>"


hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


class ProtocolViolation(Exception):
    """The peer broke the protocol or a limit; the session must send GOAWAY with ``error_code`` and close."""

    def __init__(self, reason: str, error_code: h2.errors.ErrorCodes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_code = error_code


class RateLimit:
    """A token bucket: ``rate`` events per second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._tokens = self.burst
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


CLIENT_PREFACE_BYTES = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9
RST_STREAM = 0x3


class FrameScanner:
    """Frame types as their headers go by, without parsing frames (h2 does that).

    h2 drops some frames without an event — RST_STREAM on a stream that is already closed — so counting
    events would let a peer send those without limit. The scanner sees every frame header.
    """

    def __init__(self, *, skip: int = 0) -> None:
        self._skip = skip  # bytes of the current payload (or the preface) still to pass over
        self._header = bytearray()

    def feed(self, data: bytes) -> list[int]:
        types: list[int] = []
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            need = FRAME_HEADER_BYTES - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == FRAME_HEADER_BYTES:
                types.append(self._header[3])
                self._skip = int.from_bytes(self._header[:3], "big")
                self._header.clear()
        return types


class PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding. hpack codes Huffman in pure Python: a job ticket (~400 bytes) cost
    ~200 µs to encode at the relay and as much to decode at the connector, to save ~70 bytes on a
    tunnel that carries megabytes. Peers decode either form (RFC 7541 §5.2)."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _Pending(list[Any]):
    """A setting's values as h2 keeps them (the current one first, then those awaiting an ACK), in a list:
    h2 uses a deque, 760 bytes for one or two ints, and a connection has about fourteen (10 KiB, a seventh
    of what an idle tunnel held in the relay). h2 calls only popleft, append, [0] and len on it."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class CompactSettings(h2.settings.Settings):
    """h2's Settings with :class:`_Pending` lists instead of deques."""

    def __init__(self, client: bool = True, initial_values: dict[int, int] | None = None) -> None:
        super().__init__(client=client, initial_values=initial_values)  # type: ignore[arg-type]
        self._settings = {key: _Pending(values) for key, values in self._settings.items()}  # type: ignore[misc]

    def __setitem__(self, key: h2.settings.SettingCodes | int, value: int) -> None:
        if key not in self._settings:  # h2 would add a deque([None]) for a setting it has not seen
            self._settings[key] = _Pending([None])  # type: ignore[assignment]
        super().__setitem__(key, value)


class _DynamicEntries(list[Any]):
    """An HPACK dynamic table in a list (a few entries here; hpack's deque costs 760 bytes empty). hpack
    calls appendleft, pop, clear, len, indexing and iteration on it."""

    __slots__ = ()

    def appendleft(self, entry: Any) -> None:
        self.insert(0, entry)


class TunnelProtocol:
    """One HTTP/2 connection of the tunnel: the relay is the client, the connector the server."""

    def __init__(self, settings: TunnelSettings, *, client_side: bool) -> None:
        self.settings = settings
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.encoder = PlainEncoder()
        # Memory: a relay holds thousands of idle tunnels. Both replaced before anything was sent.
        self.conn.encoder.header_table.dynamic_entries = _DynamicEntries()  # type: ignore[assignment]
        self.conn.decoder.header_table.dynamic_entries = _DynamicEntries()  # type: ignore[assignment]
        self.conn.remote_settings = CompactSettings(client=not client_side)
        codes = h2.settings.SettingCodes
        self.conn.local_settings = CompactSettings(
            client=client_side,
            initial_values={
                codes.INITIAL_WINDOW_SIZE: min(settings.unread_stream_window, settings.stream_window),
                codes.MAX_FRAME_SIZE: settings.max_frame_size,
                codes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                codes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
                codes.ENABLE_PUSH: 0,
            },
        )
        # h2 applies an advertised MAX_FRAME_SIZE to inbound frames only at the start of a receive_data()
        # call; if the peer's SETTINGS ACK and its first large frame arrive together it would reject the
        # frame (DESIGN §8). We advertise the size up front, so accept it from the first byte.
        self.conn.max_inbound_frame_size = settings.max_frame_size
        self._resets = RateLimit(settings.max_resets_per_second, settings.max_resets_per_second * 2)
        self._pings = RateLimit(settings.max_pings_per_second, settings.max_pings_per_second * 2)
        self._settings_changes = RateLimit(settings.max_settings_per_second)
        self._frames = FrameScanner(skip=0 if client_side else CLIENT_PREFACE_BYTES)

    def initiate(self) -> None:
        """Queue our preface and settings (prior knowledge: both sides send at once) and open the
        connection window beyond the 64 KiB that HTTP/2 starts with."""
        self.conn.initiate_connection()
        increment = self.settings.connection_window - self.conn.inbound_flow_control_window
        if increment > 0:
            self.conn.increment_flow_control_window(increment)

    def receive_data(self, data: bytes, now: float) -> list[h2.events.Event]:
        """Feed bytes from the peer; return h2 events, or raise :class:`ProtocolViolation`."""
        for frame_type in self._frames.feed(data):
            if frame_type == RST_STREAM and not self._resets.allow(now):
                raise ProtocolViolation(
                    "stream resets exceed "
                    f"max_resets_per_second={self.settings.max_resets_per_second:g} (rapid reset)",
                    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                )
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.FrameTooLargeError as exc:
            raise ProtocolViolation(
                f"frame too large: exceeds max_frame_size={self.settings.max_frame_size}",
                h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
            ) from exc
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            raise ProtocolViolation(f"HTTP/2 protocol error: {exc}", code) from exc
        for event in events:
            self._check_rates(event, now)
        return events

    def _check_rates(self, event: h2.events.Event, now: float) -> None:
        calm = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        # Resets are counted by frame in receive_data (some never become events).
        if isinstance(event, h2.events.PingReceived):
            if not self._pings.allow(now):
                raise ProtocolViolation(
                    f"PINGs exceed max_pings_per_second={self.settings.max_pings_per_second:g}",
                    calm,
                )
        elif isinstance(event, h2.events.RemoteSettingsChanged) and not self._settings_changes.allow(now):
            raise ProtocolViolation(
                f"SETTINGS frames exceed max_settings_per_second={self.settings.max_settings_per_second:g}",
                calm,
            )

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()
