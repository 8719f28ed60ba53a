"""The destination guard, checked on addresses as data: no test here opens a connection."""

from __future__ import annotations

import pytest

from models import errors
from worker.guard import checked_addresses, is_allowed_address

REFUSED = {
    "127.0.0.1": "IPv4 loopback",
    "127.5.5.5": "IPv4 loopback, not only .1",
    "::1": "IPv6 loopback",
    "10.0.0.1": "private 10/8",
    "172.16.0.1": "private 172.16/12",
    "192.168.1.1": "private 192.168/16",
    "169.254.169.254": "link-local: the cloud metadata address",
    "100.64.0.1": "shared address space (carrier-grade NAT)",
    "0.0.0.0": "IPv4 unspecified",
    "::": "IPv6 unspecified",
    "224.0.0.1": "IPv4 multicast",
    "ff02::1": "IPv6 multicast",
    "fc00::1": "IPv6 unique local",
    "fe80::1": "IPv6 link-local",
    "fe80::1%eth0": "IPv6 link-local with a zone id",
    "::ffff:127.0.0.1": "IPv4-mapped loopback",
    "::ffff:10.0.0.1": "IPv4-mapped private",
    "::ffff:169.254.169.254": "IPv4-mapped cloud metadata",
    "240.0.0.1": "IPv4 reserved 240/4",
    "255.255.255.255": "IPv4 limited broadcast",
}

PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", list(REFUSED), ids=list(REFUSED.values()))
def test_non_public_address_is_refused_by_default(address: str) -> None:
    # Given an address that is not on the public internet
    # When the guard decides with private destinations disallowed (the default)
    allowed = is_allowed_address(address, allow_private=False)
    # Then the hub may not connect to it
    assert allowed is False


@pytest.mark.parametrize("address", PUBLIC)
def test_public_address_is_allowed(address: str) -> None:
    # Given a public address
    # When the guard decides with private destinations disallowed
    allowed = is_allowed_address(address, allow_private=False)
    # Then the hub may connect to it
    assert allowed is True


@pytest.mark.parametrize("address", [*REFUSED, *PUBLIC])
def test_every_address_is_allowed_when_private_destinations_are_allowed(address: str) -> None:
    # Given the hub configured to reach private destinations (dev and tests)
    # When the guard decides on any address
    allowed = is_allowed_address(address, allow_private=True)
    # Then nothing is refused
    assert allowed is True


@pytest.mark.parametrize("address", ["::127.0.0.1", "2002:7f00:1::1", "2002:a00:1::1", "64:ff9b::7f00:1"])
def test_ipv6_forms_of_internal_ipv4_addresses_are_refused(address: str) -> None:
    # Given an IPv6 address that carries an internal IPv4 one: IPv4-compatible (reserved ::/8),
    # 6to4 of 127.0.0.1 or 10.0.0.1, NAT64 of 127.0.0.1
    # When the guard decides with private destinations disallowed
    allowed = is_allowed_address(address, allow_private=False)
    # Then it is refused
    assert allowed is False


class FakeResolver:
    """Answers every host with fixed addresses and records what it was asked."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return self.addresses


@pytest.mark.parametrize(
    "addresses",
    [
        ("10.0.0.7",),
        ("8.8.8.8", "169.254.169.254"),
        ("2606:4700:4700::1111", "1.1.1.1", "::1"),
        ("::ffff:192.168.0.10", "8.8.4.4"),
    ],
    ids=["only-private", "public-then-metadata", "public-then-loopback", "mapped-private-first"],
)
def test_host_resolving_to_any_private_address_is_blocked(addresses: tuple[str, ...]) -> None:
    # Given a host that resolves to several addresses, at least one of them non-public
    resolve = FakeResolver(*addresses)
    # When the destination is checked
    with pytest.raises(errors.Blocked) as caught:
        checked_addresses("api.example.com", 443, allow_private=False, resolve=resolve)
    # Then it is blocked with the stable code, and the resolver was asked for that host
    assert caught.value.code == "blocked_destination"
    assert resolve.calls == [("api.example.com", 443)]


def test_host_resolving_only_to_public_addresses_passes() -> None:
    # Given a host that resolves to public addresses only
    resolve = FakeResolver("8.8.8.8", "2606:4700:4700::1111")
    # When the destination is checked
    addresses = checked_addresses("api.example.com", 8443, allow_private=False, resolve=resolve)
    # Then those are the addresses to connect to, and the host was looked up once
    assert addresses == ["8.8.8.8", "2606:4700:4700::1111"]
    assert resolve.calls == [("api.example.com", 8443)]


def test_allow_private_lifts_the_address_check_only() -> None:
    # Given private destinations allowed, and a host that resolves to loopback
    resolve = FakeResolver("127.0.0.1")
    # When the destination is checked, then loopback is where the connection goes
    assert checked_addresses("localhost.example.com", 80, allow_private=True, resolve=resolve) == ["127.0.0.1"]


@pytest.mark.parametrize("literal", ["127.0.0.1", "[::1]", "::ffff:127.0.0.1", "0.0.0.0"])
def test_ip_literals_are_checked_without_a_lookup(literal: str) -> None:
    # Given a URL host that is an address already
    resolve = FakeResolver("8.8.8.8")
    # When it is checked, then it is refused as itself, and nothing was looked up
    with pytest.raises(errors.Blocked):
        checked_addresses(literal, 443, allow_private=False, resolve=resolve)
    assert resolve.calls == []
