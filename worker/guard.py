"""The destination guard: outbound calls go only to public addresses unless configured otherwise.

The decision is a plain function over addresses (:func:`is_allowed_address`), so tests check
it on addresses as data without opening any connection. The worker resolves a host once
(:func:`checked_address`) and connects to that very address (:func:`pinned` with
:class:`PinnedTransport`), so a DNS answer that changes between check and connect cannot send
it elsewhere; each redirect hop is checked the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

from models import errors

Resolver = Callable[[str, int], Iterable[str]]


def is_allowed_address(address: str, *, allow_private: bool) -> bool:
    """Whether the hub may connect to ``address`` (an IPv4 or IPv6 literal).

    Unless ``allow_private``, only global unicast addresses are allowed: loopback, private,
    link-local (cloud metadata), multicast, reserved, unspecified and shared ranges are
    refused, and so are IPv6 forms that carry such an IPv4 address (mapped, 6to4).
    """
    if allow_private:
        return True
    ip: Any = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on the wire
            return is_allowed_address(str(ip.ipv4_mapped), allow_private=False)
        if ip.sixtofour is not None and not is_allowed_address(str(ip.sixtofour), allow_private=False):
            return False
    return bool(ip.is_global) and not (ip.is_multicast or ip.is_reserved)


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, through the operating system."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise errors.ConnectionRefused(f"could not resolve host {host!r}") from exc
    return [str(info[4][0]) for info in infos]


# --- connecting only to checked addresses ----------------------------------------------------

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("hub_deadline", default=None)
_PINS: contextvars.ContextVar[dict[tuple[str, int], list[str]] | None] = contextvars.ContextVar("hub_pins", default=None)


def checked_addresses(host: str, port: int, *, allow_private: bool, resolve: Resolver = system_resolver) -> list[str]:
    """Resolve ``host`` once; the addresses to connect to, every one of them allowed
    (:class:`~models.errors.Blocked` if any is not)."""
    literal = host.strip("[]")
    try:
        addresses = [str(ipaddress.ip_address(literal.split("%", 1)[0]))]
    except ValueError:
        addresses = list(dict.fromkeys(resolve(host, port)))
    if not addresses:
        raise errors.ConnectionRefused(f"could not resolve host {host!r}")
    for address in addresses:
        if not is_allowed_address(address, allow_private=allow_private):
            raise errors.Blocked(f"{host!r} resolves to a non-public address")
    return addresses


@contextlib.contextmanager
def pinned(host: str, port: int, addresses: list[str]) -> Iterator[None]:
    """Within the block, a connection to ``host:port`` goes to ``addresses`` (tried in order)
    and nowhere else."""
    token = _PINS.set({(host.strip("[]").lower(), port): addresses})
    try:
        yield
    finally:
        _PINS.reset(token)


@contextlib.contextmanager
def deadline(ends: float | None) -> Iterator[None]:
    """Within the block, no read or write on a pinned connection waits past ``ends``
    (``time.perf_counter()`` seconds): the headers of a service that drips them byte by byte
    end on time too."""
    token = _DEADLINE.set(ends)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _wait(timeout: float | None) -> float | None:
    ends = _DEADLINE.get()
    if ends is None:
        return timeout
    remaining = ends - time.perf_counter()
    if remaining <= 0:
        raise httpcore.ReadTimeout("past the attempt's deadline")
    return remaining if timeout is None else min(timeout, remaining)


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every wait is cut to the time left before the deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _wait(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _wait(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _wait(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """httpcore's network backend, connecting to the address the guard checked (no second DNS
    lookup between check and connect). Outside :func:`pinned` it refuses to connect at all."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        pins = _PINS.get() or {}
        addresses = pins.get((host.strip("[]").lower(), port))
        if not addresses:
            raise httpcore.ConnectError(f"no checked address for {host}:{port}")
        for address in addresses[:-1]:
            try:
                return DeadlineStream(self._inner.connect_tcp(address, port, timeout, local_address, socket_options))
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue
        return DeadlineStream(self._inner.connect_tcp(addresses[-1], port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not a destination")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


MAX_CONNECTIONS = 200
"""Connections a worker process's pool may hold: more than any sensible ``-c``."""


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport on a connection pool whose backend is :class:`PinnedBackend`."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context)
        # httpcore's default of 10 connections would let only 10 of a threads worker's slots call out at once
        self._pool = httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=PinnedBackend(),
                                             max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
