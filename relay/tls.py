"""The relay's own TLS: certificate and key files, TLS 1.2 or newer, reloaded on SIGHUP.

One :class:`ssl.SSLContext` serves both listeners (HTTPS for the API and IPP, WSS for connectors).
Reloading loads the new files into that same context: OpenSSL copies the certificate into each
connection when the connection starts, so sessions already open keep theirs and are never dropped,
while every connection accepted afterwards gets the new one. A reload that fails (a half-written key,
a certificate that does not match its key) changes nothing and is logged; the old pair stays in use.

Behind a TLS-terminating ingress leave ``--tls-cert`` unset: the relay then speaks plain HTTP and WS on
its listeners, which must not be reachable except through the ingress (docs/security.md).
"""

from __future__ import annotations

import logging
import signal
import ssl
from datetime import UTC, datetime
from pathlib import Path

import trio
from cryptography import x509

log = logging.getLogger("printrelay.relay.tls")

MIN_VERSION = ssl.TLSVersion.TLSv1_2
# Both listeners speak HTTP/1.1 (the tunnel upgrades from it); public HTTP/2 comes from an ingress.
ALPN = ["http/1.1"]
MAX_PEM_BYTES = 1024 * 1024


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the file and the reason."""


def _check_files(cert: Path, key: Path) -> None:
    for what, path in (("certificate", cert), ("key", key)):
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise TlsError(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from None
        if size > MAX_PEM_BYTES:
            raise TlsError(f"TLS {what} {path}: {size} bytes exceeds the {MAX_PEM_BYTES} byte limit")


def _load(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    _check_files(cert, key)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot use TLS certificate {cert} with key {key}: {exc}") from None


def new_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with our policy: TLS 1.2+, OpenSSL's default (secure) ciphers, HTTP/1.1 ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    context.set_alpn_protocols(ALPN)
    # No session tickets: a ticket key that lives as long as the process would outlive a reloaded cert.
    context.options |= ssl.OP_NO_TICKET
    _load(context, cert, key)
    return context


def describe_certificate(cert: Path) -> str:
    """``CN=relay.example.com, valid until 2026-01-01`` for logs (best effort)."""
    try:
        first = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return str(cert)
    until = first.not_valid_after_utc
    note = " (EXPIRED)" if until < datetime.now(UTC) else ""
    return f"{first.subject.rfc4514_string()}, valid until {until:%Y-%m-%d %H:%M}Z{note}"


class ServerTls:
    """The relay's certificate: one live context, reloadable in place."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = new_server_context(cert, key)
        self.reloads = 0
        self.reloaded = trio.Event()  # fired (and replaced) after each successful reload
        log.info("TLS certificate %s", describe_certificate(cert))

    def reload(self) -> bool:
        """Load the files again; False (and the old pair stays) if they cannot be used."""
        try:
            # Validate on a scratch context first, so a bad pair never touches the live one.
            new_server_context(self.cert, self.key)
            _load(self.context, self.cert, self.key)
        except TlsError as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self.reloads += 1
        event, self.reloaded = self.reloaded, trio.Event()
        event.set()
        log.info("TLS certificate reloaded: %s", describe_certificate(self.cert))
        return True

    async def reload_on_sighup(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Reload on every SIGHUP for as long as this runs (main thread only, as signals are)."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                self.reload()
