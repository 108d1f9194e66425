"""Connections the relay opens to addresses its tenants choose (a document's ``source_url``).

A hosted relay must not become a probe of its own network: loopback services, the cluster's private
ranges, link-local cloud metadata (169.254.169.254, fd00:ec2::254). The rule is checked on the address
each connection is actually opened to, not on a name looked up earlier: :class:`GuardedBackend` resolves
the host, refuses if any of its addresses is not public, and connects to the address it checked. So a
name whose DNS answer changes between a check and the connection (DNS rebinding) cannot get around it,
and neither can a redirect, which opens a connection of its own. TLS still verifies the host name: the
HTTP client hands the name, not the address, to the handshake.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import httpcore
import trio

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[Address]]]

log = logging.getLogger("printrelay.relay.egress")

# IPv6 prefixes that carry an IPv4 address in their last 32 bits, which a gateway or the host itself
# would connect to: NAT64's well-known prefix (RFC 6052), IPv4-translated (RFC 2765) and the deprecated
# IPv4-compatible addresses.
EMBEDDING = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
)
# Refused whatever they carry: NAT64 prefixes for local use (RFC 8215; an IPv6-only cluster's way to its
# own IPv4 networks) and the deprecated site-local range.
NOT_PUBLIC = (ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("fec0::/10"))
MAX_ADDRESSES = 16  # of one name tried in turn; a longer DNS answer is cut (each try has its timeout)
# Name lookups run in worker threads (getaddrinfo blocks). Their own pool, so that a resolver that never
# answers holds these threads and not the ones the spool and the store need.
RESOLVER_THREADS = 16
_resolver_threads: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("egress_resolver")


class EgressRefused(Exception):
    """The destination is not public and private destinations are not allowed; the message says which."""


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to (mapped, NAT64, 6to4, Teredo), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in prefix for prefix in EMBEDDING) and int(address) > 1:  # not :: or ::1 themselves
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def refusal(address: Address) -> str | None:
    """Why ``address`` is not a public destination, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and any(address in prefix for prefix in NOT_PUBLIC):
        return "a non-public address"
    for candidate in (address, embedded_ipv4(address)):
        if candidate is None:
            continue
        if not candidate.is_global or candidate.is_multicast:
            return "a non-public address"
    return None


def _threads() -> trio.CapacityLimiter:
    try:
        return _resolver_threads.get()
    except LookupError:
        limiter = trio.CapacityLimiter(RESOLVER_THREADS)
        _resolver_threads.set(limiter)
        return limiter


async def resolve(host: str, port: int) -> list[Address]:
    name = host.strip("[]")
    try:
        ipaddress.ip_address(name.split("%")[0])
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except ValueError:  # a name: ask the resolver, in a thread of the resolver's own
        try:
            infos = await trio.to_thread.run_sync(
                lambda: socket.getaddrinfo(name, port, type=socket.SOCK_STREAM), limiter=_threads(),
                abandon_on_cancel=True,
            )  # fmt: skip
        except (OSError, UnicodeError) as exc:  # UnicodeError: a host name IDNA cannot encode
            raise OSError(f"cannot resolve {host}: {exc}") from None
    except OSError as exc:
        raise OSError(f"cannot resolve {host}: {exc}") from None
    seen: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in seen:
            seen.append(address)
    return seen


def check(host: str, addresses: Iterable[Address]) -> None:
    """Refuses the whole name when any of its addresses is not public: which one a connection would use
    is the resolver's choice, so one bad address makes the name bad."""
    for address in addresses:
        why = refusal(address)
        if why is not None:
            if str(address) == host.strip("[]"):
                raise EgressRefused(f"{address} is {why}")
            # which address, the caller is not told: names of the relay's own network stay its own
            log.info("refused %s: it resolves to the non-public address %s", host, address)
            raise EgressRefused(f"{host} resolves to {why}")


async def destination_refusal(url: str) -> str | None:
    """Why ``url``'s host is not a public destination (resolved now), or None: for a check ahead of time,
    such as a webhook's registration. The connection itself is checked again by :class:`GuardedBackend`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        check(host, await resolve(host, parts.port or 0))
    except (EgressRefused, OSError) as exc:
        return str(exc)
    return None


# what a path and a query may hold as they are (RFC 3986 §3.3, §3.4); anything else is percent-encoded
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def http_target(url: str) -> tuple[str, str]:
    """(the URL without user info, its Host header) of an http(s) URL, for httpcore, which sends what it is
    given: the user info must not go out as part of the URL, a Host header is the caller's to write, and
    only ASCII goes on the wire (a host in IDNA, the rest percent-encoded as UTF-8, as browsers do).
    ValueError: a host name IDNA cannot encode."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"host {host!r} is not a valid name: {exc}") from None
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host += f":{parts.port}"
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    return f"{parts.scheme}://{host}{target}", host


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, connecting only to the addresses the rule allows (all, when
    ``allow_private``: an on-prem relay fetching from its own network)."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        resolver: Resolver = resolve,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.allow_private = allow_private
        self._resolve = resolver
        self._inner = inner or httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                addresses = list(await self._resolve(host, port))[:MAX_ADDRESSES]
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"no DNS answer for {host} within {timeout:g} s") from None
        if not addresses:
            raise OSError(f"{host} has no address")
        if not self.allow_private:
            check(host, addresses)
        failures: list[str] = []
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options,
                )  # fmt: skip
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failures.append(f"{address}: {exc or type(exc).__name__}")
        raise httpcore.ConnectError(f"cannot connect to {host} port {port} ({'; '.join(failures)})")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise EgressRefused("a Unix socket is not a destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
