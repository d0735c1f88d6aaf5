"""Which URLs a webhook may be sent to: no way into our own network (SSRF).

A URL is checked when an endpoint is saved and again before every attempt, because DNS can
change in between (rebinding). Every address the host resolves to must be public; the
attempt then connects to one of exactly those addresses, so a second lookup by the HTTP
client cannot swap in a private one.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}
# NAT64 (RFC 6052) carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class UrlNotAllowed(ValueError):
    """The URL may never be a webhook target as it stands; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UrlUnresolvable(UrlNotAllowed):
    """The host name does not resolve now (it may later: a delivery retries)."""


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed the checks, with the addresses the check approved."""

    url: str
    scheme: str
    host: str
    port: int
    # Empty when private targets are allowed: the HTTP client resolves the name itself.
    addresses: tuple[IPAddress, ...] = ()

    def pinned(self, address: IPAddress) -> tuple[str, dict[str, str], dict[str, Any]]:
        """URL, headers and request extensions that reach ``address`` while naming the host
        (``Host`` header, and TLS server name and certificate check for https)."""
        parts = urlsplit(self.url)
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{literal}:{self.port}"
        url = parts._replace(netloc=netloc).geturl()
        default = DEFAULT_PORTS[self.scheme] == self.port
        host_header = _host_literal(self.host) + ("" if default else f":{self.port}")
        extensions: dict[str, Any] = {}
        if self.scheme == "https":
            extensions["sni_hostname"] = self.host
        return url, {"Host": host_header}, extensions


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_literal(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def blocked_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = blocked_reason(embedded)
            return f"embeds {embedded}, which {reason}" if reason else None
    checks = (
        (address.is_unspecified, "is unspecified"),
        (address.is_loopback, "is a loopback address"),
        (address.is_link_local, "is link-local"),
        (address.is_multicast, "is multicast"),
        (address.is_private, "is a private address"),
        (address.is_reserved, "is reserved"),
        (not address.is_global, "is not a public address"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _split(url: str, *, allow_private: bool) -> tuple[SplitResult, str, int]:
    if len(url) > MAX_URL_LENGTH:
        raise UrlNotAllowed(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UrlNotAllowed("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlNotAllowed("the URL cannot be parsed") from exc
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlNotAllowed("only http and https URLs are allowed")
    if scheme != "https" and not allow_private:
        raise UrlNotAllowed("the URL must use https")
    if parts.username is not None or parts.password is not None:
        raise UrlNotAllowed("credentials in the URL are not allowed")
    if parts.fragment:
        raise UrlNotAllowed("the URL must not have a fragment")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlNotAllowed("the URL has no host")
    return parts, host, port or DEFAULT_PORTS[scheme]


def _resolve(host: str, port: int, resolver: Resolver) -> tuple[IPAddress, ...]:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return (literal,)
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise UrlNotAllowed("the host name is not valid") from exc
    try:
        infos = resolver(ascii_host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UrlUnresolvable(f"the host {host} does not resolve") from exc
    found: list[IPAddress] = []
    for info in infos:
        # IPv6 scope ids ("fe80::1%eth0") are dropped; link-local is refused anyway.
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise UrlUnresolvable(f"the host {host} does not resolve")
    return tuple(found)


def check_url(url: str, *, allow_private: bool, resolver: Resolver | None = None) -> CheckedUrl:
    """Refuse a URL that is malformed, not http(s), not https while private targets are
    refused, or whose host resolves to any address that is not public. Blocking (DNS)."""
    parts, host, port = _split(url, allow_private=allow_private)
    scheme = parts.scheme.lower()
    if allow_private:
        return CheckedUrl(url=url, scheme=scheme, host=host, port=port)
    addresses = _resolve(host, port, resolver or socket.getaddrinfo)
    for address in addresses:
        reason = blocked_reason(address)
        if reason is not None:
            subject = host if _is_ip_literal(host) else f"{host} resolves to {address}, which"
            raise UrlNotAllowed(f"{subject} {reason}")
    return CheckedUrl(url=url, scheme=scheme, host=host, port=port, addresses=addresses)
