"""The destination guard: outbound calls go only to public addresses unless configured otherwise.

The decision is a plain function over addresses (:func:`is_allowed_address`), so tests check
it on addresses as data without opening any connection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

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


def check_destination(
    host: str, port: int, *, allow_private: bool, resolve: Resolver = system_resolver
) -> None:
    """Raise :class:`~models.errors.Blocked` if any address ``host`` resolves to is refused."""
    if allow_private:
        return
    for address in resolve(host, port):
        if not is_allowed_address(address, allow_private=False):
            raise errors.Blocked(f"{host!r} resolves to a non-public address")
