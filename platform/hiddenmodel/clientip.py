"""The client address of a request: the peer, or what a trusted proxy says it forwarded.

``X-Forwarded-For`` is believed only when the peer is one of ``HM_TRUSTED_PROXIES``; a client
talking to the API directly could otherwise name any address and escape every per-address
limit. Behind trusted proxies the client is the right-most address no trusted proxy added.
"""

from __future__ import annotations

import ipaddress
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from hiddenmodel.settings import get_settings

UNKNOWN = "unknown"

_current: ContextVar[str] = ContextVar("hm_client_address", default=UNKNOWN)

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(value: str) -> _Address | None:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def resolve(peer: str | None, forwarded_for: list[str]) -> str:
    """The client address for a peer and the request's ``X-Forwarded-For`` header values."""
    networks = get_settings().trusted_proxy_networks()
    peer_ip = _parse(peer) if peer else None
    if peer_ip is None:
        return peer or UNKNOWN

    def trusted(address: _Address) -> bool:
        return any(address in network for network in networks)

    if not networks or not trusted(peer_ip):
        return str(peer_ip)
    chain = [part for value in forwarded_for for part in value.split(",") if part.strip()]
    client = peer_ip
    for hop in reversed(chain):
        address = _parse(hop)
        if address is None:
            break  # garbage in the header: the last address we could trust stands
        client = address
        if not trusted(address):
            break
    return str(client)


def client_address() -> str:
    """The current request's client address (see :class:`ClientAddressMiddleware`)."""
    return _current.get()


class ClientAddressMiddleware:
    """Works out each request's client address once, for every limit that needs it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        forwarded = [
            value.decode("latin-1")
            for name, value in scope["headers"]
            if name == b"x-forwarded-for"
        ]
        token = _current.set(resolve(client[0] if client else None, forwarded))
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)
