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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import httpcore
import trio

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[Address]]]

# NAT64's well-known prefix (RFC 6052) carries an IPv4 address in its last 32 bits; a gateway would
# connect to that one.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
MAX_ADDRESSES = 16  # of one name tried in turn; a longer DNS answer is cut (each try has its timeout)


class EgressRefused(Exception):
    """The destination is not public and private destinations are not allowed; the message says which."""


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to (mapped, NAT64, 6to4, Teredo), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def refusal(address: Address) -> str | None:
    """Why ``address`` is not a public destination, or None when it is."""
    for candidate in (address, embedded_ipv4(address)):
        if candidate is None:
            continue
        if not candidate.is_global or candidate.is_multicast:
            return f"the non-public address {address}"
    return None


async def resolve(host: str, port: int) -> list[Address]:
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:  # ValueError: a host name IDNA cannot encode
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
            shown = "" if str(address) == host.strip("[]") else f"{host} resolves to "
            raise EgressRefused(f"{shown}{why}")


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
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            addresses = list(await self._resolve(host, port))[:MAX_ADDRESSES]
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
