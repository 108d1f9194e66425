"""Printing from a URL: the relay fetches the document (http, https, ftp) and streams it into the spool.

Used by ``POST /v1/printers/{id}/jobs`` with a JSON body ``{"source_url": ..., "source_headers": ...}``
and by IPP Print-URI and Send-URI. Every connection goes through :mod:`relay.egress` (public addresses
only, checked on the address connected to, unless ``fetch_allow_private``); a fetch is bounded in time
(connect, each read, the whole) and in size (``max_job_bytes``). The URL and its credentials (user info,
``source_headers``) live only as long as the fetch: nothing of them is stored, and logs and errors name
the origin (scheme, host, port) alone, since a query string often carries a signature.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import ftplib
import re
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit

import httpcore
import trio

from relay import egress
from relay.egress import EgressRefused, GuardedBackend
from relay.submit import FORMAT_RE

SCHEMES = ("http", "https", "ftp")  # reference-uri-schemes-supported
MAX_URL_CHARS = 2048
MAX_HEADERS = 32
MAX_HEADER_VALUE = 4096
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
# Headers the relay writes itself: a caller's copy would desynchronise the exchange or undo a rule.
RESERVED_HEADERS = frozenset(
    {
        "host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
        "trailer", "expect", "accept-encoding", "proxy-authorization", "proxy-connection",
    }
)  # fmt: skip
REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK = 64 * 1024
SOURCE_KEYS = ("source_url", "source_headers", "document_format")


class Failure(enum.Enum):
    """What went wrong, as the HTTP status a REST client gets."""

    BAD_SOURCE = 400  # the request's own mistake: a bad URL, a refused address
    TOO_LARGE = 413
    UNREACHABLE = 502  # the source did not give the document
    BUSY = 503  # too many fetches at once: the client tries again later
    TIMEOUT = 504


class FetchError(Exception):
    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


@dataclass(frozen=True)
class Source:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    document_format: str | None = None

    @property
    def origin(self) -> str:
        return origin(self.url)


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout: float = 300.0  # the whole fetch, first connection to last byte
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # silence between two reads
    max_redirects: int = 5
    allow_private: bool = False
    max_fetches: int = 32  # at once in this relay process (each holds a connection, FTP a thread)
    max_fetches_per_owner: int = 8  # at once for one tenant


@dataclass
class Download:
    length: int | None  # what the source announced, if it did
    document_format: str | None  # the source's Content-Type, when that is a MIME type
    body: AsyncIterator[bytes]


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL: what logs and errors may show of it."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        host = parts.hostname or ""
    except ValueError:
        return "(an invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme.lower()}://{host}{port}"


def check_uri(url: object, *, what: str = "source_url") -> str:
    """A URL the relay can fetch, checked without any network (IPP: before a job is touched)."""
    if not isinstance(url, str) or not url:
        raise FetchError(Failure.BAD_SOURCE, f"{what} must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise FetchError(Failure.BAD_SOURCE, f"{what} of {len(url)} characters exceeds {MAX_URL_CHARS}")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise FetchError(Failure.BAD_SOURCE, f"{what} must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise FetchError(Failure.BAD_SOURCE, f"{what} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise SchemeRefused(f"{what} scheme must be one of {', '.join(SCHEMES)}, not {parts.scheme!r}")
    if not parts.hostname:
        raise FetchError(Failure.BAD_SOURCE, f"{what} has no host")
    try:
        egress.http_target(url)  # a host name IDNA can encode
    except ValueError as exc:
        raise FetchError(Failure.BAD_SOURCE, f"{what}: {exc}") from None
    return url


class SchemeRefused(FetchError):
    """A URL scheme the relay does not fetch (IPP answers client-error-uri-scheme-not-supported)."""

    def __init__(self, message: str) -> None:
        super().__init__(Failure.BAD_SOURCE, message)


def parse_source(obj: object) -> Source:
    """The JSON body of a print-from-URL request."""
    if not isinstance(obj, dict):
        raise FetchError(Failure.BAD_SOURCE, "the body must be a JSON object with source_url")
    unknown = sorted(set(obj) - set(SOURCE_KEYS))
    if unknown:
        raise FetchError(
            Failure.BAD_SOURCE, f"unknown field {unknown[0][:40]!r}; the body takes {', '.join(SOURCE_KEYS)}"
        )
    url = check_uri(obj.get("source_url"))
    raw_headers = obj.get("source_headers") or {}
    if not isinstance(raw_headers, dict):
        raise FetchError(Failure.BAD_SOURCE, "source_headers must be an object of header names to values")
    if len(raw_headers) > MAX_HEADERS:
        raise FetchError(Failure.BAD_SOURCE, f"source_headers: {len(raw_headers)} exceeds {MAX_HEADERS}")
    headers: dict[str, str] = {}
    for name, value in raw_headers.items():
        if not HEADER_NAME_RE.match(name):
            raise FetchError(Failure.BAD_SOURCE, f"source_headers: {name[:64]!r} is not a header name")
        if name.lower() in RESERVED_HEADERS:
            raise FetchError(Failure.BAD_SOURCE, f"source_headers: {name} is set by the relay")
        if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE:
            raise FetchError(
                Failure.BAD_SOURCE, f"source_headers: {name} must be a string of at most {MAX_HEADER_VALUE}"
            )
        if any((ord(ch) < 0x20 and ch != "\t") or ord(ch) >= 0x7F for ch in value):
            raise FetchError(
                Failure.BAD_SOURCE, f"source_headers: {name} must be printable ASCII (encode anything else)"
            )
        headers[name] = value
    document_format = obj.get("document_format")
    if document_format is not None:
        if not isinstance(document_format, str) or not FORMAT_RE.match(document_format.lower()):
            raise FetchError(Failure.BAD_SOURCE, "document_format must be a MIME type (application/pdf)")
        document_format = document_format.lower()
    if urlsplit(url).scheme.lower() == "ftp" and headers:
        raise FetchError(Failure.BAD_SOURCE, "source_headers apply to http and https, not ftp")
    return Source(url=url, headers=headers, document_format=document_format)


def _media_type(value: str | None) -> str | None:
    if not value:
        return None
    text = value.split(";")[0].strip().lower()
    return text if FORMAT_RE.match(text) else None


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _too_large(length: int, limit: int) -> FetchError:
    return FetchError(
        Failure.TOO_LARGE, f"the source's document of {length} bytes exceeds max_job_bytes={limit}"
    )


class Fetcher:
    """Opens a source for reading; one instance serves every request (it keeps no connections)."""

    def __init__(
        self,
        limits: FetchLimits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        resolver: egress.Resolver = egress.resolve,
        network: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        """``resolver`` and ``network`` (what opens a connection to a checked address) are the system's
        unless a test gives its own."""
        self.limits = limits
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._resolve = resolver
        self._network = network
        self._running: dict[str, int] = {}  # fetches in progress, by tenant
        # FTP's blocking calls run in threads of their own pool: a server that answers a byte a minute
        # holds these, never the threads the spool and the store need.
        self._ftp_threads = trio.CapacityLimiter(limits.max_fetches)

    @asynccontextmanager
    async def open(self, source: Source, *, owner: str = "") -> AsyncIterator[Download]:
        """The document, to read inside the ``async with``; a FetchError says what failed. ``owner`` (the
        tenant) has at most ``max_fetches_per_owner`` fetches running, the relay ``max_fetches``."""
        limits = self.limits
        if sum(self._running.values()) >= limits.max_fetches:
            raise FetchError(Failure.BUSY, f"{limits.max_fetches} fetches are running (max_fetches); retry")
        if self._running.get(owner, 0) >= limits.max_fetches_per_owner:
            raise FetchError(
                Failure.BUSY,
                f"{limits.max_fetches_per_owner} fetches of this tenant are running (the most); retry",
            )
        self._running[owner] = self._running.get(owner, 0) + 1
        # The deadline bounds the network (connections, each read), not what the reader does with the
        # document: a job stored just after the deadline must not be answered as a failed fetch.
        deadline = trio.current_time() + limits.timeout
        try:
            scheme = urlsplit(source.url).scheme.lower()
            opener = self._ftp if scheme == "ftp" else self._http
            try:
                async with opener(source, deadline) as download:
                    yield download
            except EgressRefused as exc:
                allow = "set fetch_allow_private to fetch from there"
                raise FetchError(Failure.BAD_SOURCE, f"{source.origin}: {exc}; {allow}") from None
        finally:
            self._running[owner] -= 1
            if not self._running[owner]:
                del self._running[owner]

    def _late(self, where: str) -> FetchError:
        return FetchError(Failure.TIMEOUT, f"{where}: the fetch took more than {self.limits.timeout:g} s")

    # --- http and https ---------------------------------------------------------------------

    @asynccontextmanager
    async def _http(self, source: Source, deadline: float) -> AsyncIterator[Download]:
        limits = self.limits
        backend = GuardedBackend(
            allow_private=limits.allow_private, resolver=self._resolve, inner=self._network
        )
        url, first = source.url, origin(source.url)
        async with httpcore.AsyncConnectionPool(
            ssl_context=self._ssl_context, network_backend=backend, max_connections=1
        ) as pool:
            for _ in range(limits.max_redirects + 1):
                async with contextlib.AsyncExitStack() as stack:
                    response = await self._get(stack, pool, source, url, first, deadline)
                    location = _header(response.headers, b"location")
                    if response.status in REDIRECTS and location:
                        url = check_uri(urljoin(url, location), what="a redirect's Location")
                        if urlsplit(url).scheme.lower() == "ftp":
                            raise FetchError(
                                Failure.UNREACHABLE, f"{origin(url)}: a redirect to ftp is not followed"
                            )
                        continue
                    yield self._http_download(source, response, deadline)
                    return
        raise FetchError(Failure.UNREACHABLE, f"{first}: more than {limits.max_redirects} redirects")

    async def _get(
        self,
        stack: contextlib.AsyncExitStack,
        pool: httpcore.AsyncConnectionPool,
        source: Source,
        url: str,
        first: str,
        deadline: float,
    ) -> httpcore.Response:
        """One GET, up to its response's head; the network's failures as FetchErrors."""
        limits, where = self.limits, origin(url)
        parts = urlsplit(url)
        try:
            plain, hostport = egress.http_target(url)
        except ValueError as exc:
            raise FetchError(Failure.BAD_SOURCE, f"{where}: {exc}") from None
        headers = [("Host", hostport), ("Accept-Encoding", "identity"), ("User-Agent", "printrelay")]
        if where == first:  # the caller's credentials go to its own origin only
            headers += list(source.headers.items())
            if parts.username is not None:
                pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                headers.append(("Authorization", "Basic " + base64.b64encode(pair.encode()).decode()))
        timeouts = {
            "connect": limits.connect_timeout, "read": limits.read_timeout,
            "write": limits.read_timeout, "pool": limits.connect_timeout,
        }  # fmt: skip
        try:
            with trio.fail_at(deadline):
                return await stack.enter_async_context(
                    pool.stream("GET", plain, headers=headers, extensions={"timeout": timeouts})
                )
        except trio.TooSlowError:
            raise self._late(where) from None
        except httpcore.TimeoutException:
            raise FetchError(Failure.TIMEOUT, f"{where}: no answer in time") from None
        except httpcore.UnsupportedProtocol as exc:
            raise FetchError(Failure.BAD_SOURCE, f"{where}: {exc}") from None
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
            raise FetchError(Failure.UNREACHABLE, f"{where}: {exc or type(exc).__name__}") from None

    def _http_download(self, source: Source, response: httpcore.Response, deadline: float) -> Download:
        where = origin(source.url)
        if response.status != 200:
            raise FetchError(Failure.UNREACHABLE, f"{where} answered HTTP {response.status}, not 200")
        encoding = (_header(response.headers, b"content-encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise FetchError(Failure.UNREACHABLE, f"{where} sent a {encoding[:40]!r}-encoded document")
        length = None
        announced = _header(response.headers, b"content-length")
        if announced is not None:
            if not announced.strip().isdigit():
                raise FetchError(Failure.UNREACHABLE, f"{where} sent a bad Content-Length")
            length = int(announced)
            if length > self.limits.max_bytes:
                raise _too_large(length, self.limits.max_bytes)
        return Download(
            length=length,
            document_format=_media_type(_header(response.headers, b"content-type")),
            body=self._bounded(where, response.aiter_stream(), deadline),
        )

    async def _bounded(
        self, where: str, chunks: AsyncIterator[bytes], deadline: float
    ) -> AsyncIterator[bytes]:
        """The document's bytes, at most max_bytes of them by the deadline, with the source's failures as
        FetchErrors. Only the reads are under the deadline: the reader's own work between them is not."""
        seen = 0
        while True:
            try:
                with trio.fail_at(deadline):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except trio.TooSlowError:
                raise self._late(where) from None
            except (httpcore.TimeoutException, TimeoutError):
                why = f"{where}: nothing for {self.limits.read_timeout:g} s after {seen} bytes"
                raise FetchError(Failure.TIMEOUT, why) from None
            except (httpcore.NetworkError, httpcore.ProtocolError, ftplib.Error, EOFError, OSError) as exc:
                why = f"{where} broke off after {seen} bytes: {str(exc)[:200] or type(exc).__name__}"
                raise FetchError(Failure.UNREACHABLE, why) from None
            seen += len(chunk)
            if seen > self.limits.max_bytes:
                raise _too_large(seen, self.limits.max_bytes)
            yield chunk

    # --- ftp --------------------------------------------------------------------------------

    @asynccontextmanager
    async def _ftp(self, source: Source, deadline: float) -> AsyncIterator[Download]:
        """Passive-mode RETR through the standard library, its blocking calls in a thread. The data
        connection goes to the control connection's checked address: ftplib ignores the address in a
        PASV answer (``trust_server_pasv_ipv4_address`` is false), which would otherwise be a way round."""
        limits, where = self.limits, source.origin
        parts = urlsplit(source.url)
        path = unquote(parts.path).lstrip("/")
        user, password = unquote(parts.username or "anonymous"), unquote(parts.password or "anonymous@")
        if not path or any(ch in text for text in (path, user, password) for ch in "\r\n\0"):
            raise FetchError(
                Failure.BAD_SOURCE, f"{where}: an ftp source_url needs a file path, no line breaks"
            )
        host, port = parts.hostname or "", parts.port or 21
        try:
            with trio.fail_at(min(deadline, trio.current_time() + limits.connect_timeout)):
                addresses = list(await self._resolve(host, port))
        except trio.TooSlowError:
            raise FetchError(Failure.TIMEOUT, f"{where}: no DNS answer in time") from None
        except OSError as exc:
            raise FetchError(Failure.UNREACHABLE, f"{where}: {exc}") from None
        if not addresses:
            raise FetchError(Failure.UNREACHABLE, f"{where}: {host} has no address")
        if not limits.allow_private:
            egress.check(host, addresses)
        ftp = ftplib.FTP(timeout=limits.read_timeout)  # trust_server_pasv_ipv4_address stays False

        def start() -> tuple[socket.socket, int | None]:
            ftp.connect(str(addresses[0]), port, timeout=limits.connect_timeout)
            ftp.login(user, password)
            ftp.voidcmd("TYPE I")
            try:
                size = ftp.size(path)
            except (ftplib.error_perm, ValueError):
                size = None  # SIZE is an extension (RFC 3659), and some answer it oddly
            data, _ = ftp.ntransfercmd(f"RETR {path}")
            data.settimeout(limits.read_timeout)
            return data, size

        opened: list[socket.socket] = []
        try:
            try:
                with trio.fail_at(deadline):
                    data, size = await trio.to_thread.run_sync(
                        start, limiter=self._ftp_threads, abandon_on_cancel=True
                    )
                opened.append(data)
            except trio.TooSlowError:
                raise self._late(where) from None
            except (ftplib.Error, EOFError, ValueError) as exc:
                raise FetchError(Failure.UNREACHABLE, f"{where} answered {str(exc)[:200]}") from None
            except TimeoutError:
                raise FetchError(Failure.TIMEOUT, f"{where}: no answer in time") from None
            except OSError as exc:
                raise FetchError(Failure.UNREACHABLE, f"{where}: {exc}") from None
            if size is not None and size > limits.max_bytes:
                raise _too_large(size, limits.max_bytes)
            yield Download(length=size, document_format=None, body=self._ftp_body(where, ftp, data, deadline))
        finally:
            for data in opened:
                data.close()
            ftp.close()

    async def _ftp_body(
        self, where: str, ftp: ftplib.FTP, data: socket.socket, deadline: float
    ) -> AsyncIterator[bytes]:
        threads = self._ftp_threads

        async def read() -> AsyncIterator[bytes]:
            while chunk := await trio.to_thread.run_sync(
                data.recv, CHUNK, limiter=threads, abandon_on_cancel=True
            ):
                yield chunk
            data.close()
            await trio.to_thread.run_sync(ftp.voidresp, limiter=threads, abandon_on_cancel=True)  # 226

        async for chunk in self._bounded(where, read(), deadline):
            yield chunk
