"""The sans-IO tunnel protocol: limits a hostile peer meets, tested with bytes alone."""

from __future__ import annotations

from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import pytest

from tunnel.backoff import Backoff
from tunnel.messages import MessageError, parse_replicas, replicas_message
from tunnel.protocol import ProtocolViolation, RateLimit, TunnelProtocol, TunnelSettings


def connector_and_hostile_relay(
    settings: TunnelSettings,
) -> tuple[TunnelProtocol, h2.connection.H2Connection]:
    server = TunnelProtocol(settings, client_side=False)
    server.initiate()
    attacker = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    attacker.initiate_connection()
    server.receive_data(attacker.data_to_send(), now=0.0)
    attacker.receive_data(server.data_to_send())
    return server, attacker


def test_our_settings_and_windows_are_advertised() -> None:
    server, attacker = connector_and_hostile_relay(TunnelSettings())
    attacker.receive_data(server.data_to_send())
    remote = attacker.remote_settings
    assert remote.initial_window_size == 256 * 1024  # a stream's window before anyone reads it
    assert remote.max_frame_size == 256 * 1024
    assert attacker.outbound_flow_control_window >= 16 * 1024 * 1024


def test_rapid_reset_is_refused_with_enhance_your_calm() -> None:
    settings = TunnelSettings(max_resets_per_second=100)
    server, attacker = connector_and_hostile_relay(settings)
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", "c"), (":path", "/v1/printers")]
    with pytest.raises(ProtocolViolation) as info:
        for _ in range(1000):
            stream_id = attacker.get_next_available_stream_id()
            attacker.send_headers(stream_id, headers)
            attacker.reset_stream(stream_id)
            server.receive_data(attacker.data_to_send(), now=0.5)
    assert info.value.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert "max_resets_per_second=100" in info.value.reason


def test_resets_at_a_normal_rate_are_fine() -> None:
    settings = TunnelSettings(max_resets_per_second=100)
    server, attacker = connector_and_hostile_relay(settings)
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", "c"), (":path", "/")]
    for i in range(500):
        stream_id = attacker.get_next_available_stream_id()
        attacker.send_headers(stream_id, headers)
        attacker.reset_stream(stream_id)
        server.receive_data(attacker.data_to_send(), now=i * 0.02)  # 50 resets/s


def test_ping_flood_is_refused() -> None:
    server, attacker = connector_and_hostile_relay(TunnelSettings(max_pings_per_second=20))
    with pytest.raises(ProtocolViolation, match="max_pings_per_second=20"):
        for i in range(200):
            attacker.ping(i.to_bytes(8, "big"))
            server.receive_data(attacker.data_to_send(), now=1.0)


def test_settings_flood_is_refused() -> None:
    server, attacker = connector_and_hostile_relay(TunnelSettings(max_settings_per_second=20))
    with pytest.raises(ProtocolViolation, match="SETTINGS"):
        for _ in range(200):
            attacker.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
            server.receive_data(attacker.data_to_send(), now=1.0)


def test_garbage_is_a_protocol_violation() -> None:
    server = TunnelProtocol(TunnelSettings(), client_side=False)
    server.initiate()
    with pytest.raises(ProtocolViolation):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10, now=0.0)


def test_large_frame_in_the_same_read_as_the_settings_ack_is_accepted() -> None:
    """DESIGN §8: h2 would reject it unless max_inbound_frame_size is raised up front."""
    settings = TunnelSettings(max_frame_size=256 * 1024)
    client = TunnelProtocol(settings, client_side=True)
    server = TunnelProtocol(settings, client_side=False)
    client.initiate()
    server.initiate()
    server.receive_data(client.data_to_send(), now=0.0)
    client.receive_data(server.data_to_send(), now=0.0)
    stream_id = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        stream_id, [(":method", "POST"), (":scheme", "https"), (":authority", "c"), (":path", "/v1/jobs/1")]
    )
    client.conn.send_data(stream_id, b"x" * 200_000)
    events = server.receive_data(client.data_to_send(), now=0.0)
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert sum(len(e.data) for e in data) == 200_000


def test_rate_limit_refills_over_time() -> None:
    limit = RateLimit(rate=10, burst=10)
    assert all(limit.allow(0.0) for _ in range(10))
    assert not limit.allow(0.0)
    assert limit.allow(0.2)


def test_backoff_is_full_jitter_capped_and_resets_after_a_stable_session() -> None:
    import random

    backoff = Backoff(base=1, cap=60, reset_after=30, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0 <= d <= 60 for d in delays)
    assert delays[0] <= 1 and delays[1] <= 2 and delays[2] <= 4
    assert max(delays[8:]) > 8  # the ceiling grew to the cap
    attempt = backoff.attempt
    assert 30 <= backoff.next_delay(retry_after=30) <= 31
    assert backoff.next_delay(retry_after=600) <= 60
    assert 2 <= backoff.next_delay(retry_after=2) <= 3  # the server's time, not the grown window
    assert backoff.attempt == attempt
    backoff.session_ended(lasted=5)
    assert backoff.attempt > 0
    backoff.session_ended(lasted=31)
    assert backoff.attempt == 0


def test_data_frames_are_not_hex_encoded_whole_for_h2s_trace_line() -> None:
    """h2 formats every received frame (``repr``) even with no logger: the text must come from the first
    bytes, not from the whole payload, and still read like hyperframe's."""
    big = hyperframe.frame.DataFrame(1, b"\xab" * (1024 * 1024))
    assert repr(big).endswith("<hex:abababababababababab...>")
    assert repr(hyperframe.frame.DataFrame(1, b"\x01\x02")).endswith("<hex:0102>")
    assert repr(hyperframe.frame.DataFrame(1, b"")).endswith("None")


def test_headers_are_sent_without_huffman_coding_and_still_decode() -> None:
    relay = TunnelProtocol(TunnelSettings(), client_side=True)
    connector = TunnelProtocol(TunnelSettings(), client_side=False)
    relay.initiate()
    connector.initiate()
    connector.receive_data(relay.data_to_send(), now=0.0)
    relay.receive_data(connector.data_to_send(), now=0.0)
    ticket = "eyJqb2JfaWQiOiJqXzEyMyIsIndyYXBwZWRfa2V5IjoiQUFBQSJ9" * 8
    headers = [(":method", "POST"), (":scheme", "https"), (":authority", "c"), (":path", "/v1/jobs/j_123")]
    stream_id = relay.conn.get_next_available_stream_id()
    relay.conn.send_headers(stream_id, [*headers, ("x-job-ticket", ticket)])
    wire = relay.data_to_send()
    assert ticket.encode() in wire  # a literal string, not Huffman-coded (RFC 7541 §5.2, H bit clear)
    [request] = [e for e in connector.receive_data(wire, now=0.0) if isinstance(e, h2.events.RequestReceived)]
    assert ("x-job-ticket", ticket) in request.headers


def test_settings_and_header_tables_hold_no_deques_and_still_work() -> None:
    # A relay holds thousands of idle tunnels: h2's deques (760 bytes each) were a seventh of each one.
    relay = TunnelProtocol(TunnelSettings(max_concurrent_streams=7), client_side=True)
    connector = TunnelProtocol(TunnelSettings(max_concurrent_streams=90), client_side=False)
    relay.initiate()
    connector.initiate()
    connector.receive_data(relay.data_to_send(), now=0.0)
    relay.receive_data(connector.data_to_send(), now=0.0)
    connector.receive_data(relay.data_to_send(), now=0.0)  # the ACK of the connector's settings
    for side in (relay, connector):
        tables = [side.conn.encoder.header_table, side.conn.decoder.header_table]
        assert not any(isinstance(v, deque) for s in (side.conn.local_settings, side.conn.remote_settings)
                       for v in s._settings.values())  # fmt: skip
        assert not any(isinstance(t.dynamic_entries, deque) for t in tables)
    assert relay.conn.remote_settings.max_concurrent_streams == 90
    assert connector.conn.remote_settings.max_concurrent_streams == 7
    assert connector.conn.local_settings.max_concurrent_streams == 90  # acknowledged: no pending value
    assert relay.conn.remote_settings.initial_window_size == 256 * 1024
    # Indexed headers go through the dynamic tables: the same name and value twice, then evictions.
    for n in range(60):
        stream_id = relay.conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "https"), (":authority", "c"), (":path", f"/p/{n % 3}"),
                   ("x-filler", "f" * 200 + str(n))]  # fmt: skip
        relay.conn.send_headers(stream_id, headers, end_stream=True)
        events = connector.receive_data(relay.data_to_send(), now=0.0)
        [request] = [e for e in events if isinstance(e, h2.events.RequestReceived)]
        assert list(request.headers) == headers
    assert 0 < len(relay.conn.encoder.header_table.dynamic_entries) < 30


def test_the_replicas_message_is_bounded_and_validated() -> None:
    assert parse_replicas(replicas_message(3)) == 3
    for bad in (b'{"alive": 0}', b'{"alive": true}', b'{"alive": "2"}', b"[2]", b"not json", b"{}"):
        with pytest.raises(MessageError):
            parse_replicas(bad)
    with pytest.raises(MessageError, match="over 1024 bytes"):
        parse_replicas(b'{"alive": 2, "pad": "' + b"x" * 2000 + b'"}')
    with pytest.raises(MessageError, match="from 1 to 10000"):
        parse_replicas(b'{"alive": 10001}')
