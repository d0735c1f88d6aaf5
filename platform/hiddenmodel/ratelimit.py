"""Request rate limits in Redis (GCRA): per API key and organization, per signed-in user,
and per client address for requests without working credentials.

GCRA keeps one timestamp per limited subject (the "theoretical arrival time"), so a check is
one round trip and memory does not grow with traffic. The answer travels to the client as
``RateLimit-Policy`` / ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers, structured
fields) and, when refused, a 429 problem with ``Retry-After``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from redis.commands.core import AsyncScript
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hiddenmodel.clientip import client_address
from hiddenmodel.errors import Problem
from hiddenmodel.redis import async_redis
from hiddenmodel.settings import get_settings

WINDOW_SECONDS = 60

# All of a request's limits in one atomic step, on Redis' own clock (API processes with skewed
# clocks agree): a request refused by one limit is counted against none.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local refused = false
local new_tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local limit = tonumber(ARGV[2 * i])
  local tau = interval * limit
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tau
  new_tats[i] = new_tat
  if now < allow_at then
    refused = true
    table.insert(out, {0, 0, allow_at - now, tat - now})
  else
    table.insert(out, {1, math.floor((tau - (new_tat - now)) / interval), 0, new_tat - now})
  end
end
if not refused then
  for i, key in ipairs(KEYS) do
    local tau = tonumber(ARGV[2 * i - 1]) * tonumber(ARGV[2 * i])
    redis.call('SET', key, new_tats[i], 'PX', math.ceil(tau))
  end
end
return out
"""


@lru_cache
def _script() -> AsyncScript:
    # EVALSHA: the script travels to Redis once, not with every request.
    return async_redis().register_script(_GCRA)


@dataclass(frozen=True)
class Decision:
    name: str
    limit: int
    allowed: bool
    remaining: int
    retry_after_ms: int
    reset_ms: int


class RateLimited(Problem):
    status, kind, title = 429, "rate-limited", "Too many requests"


_headers: ContextVar[MutableMapping[str, str] | None] = ContextVar(
    "hm_ratelimit_headers", default=None
)


async def enforce(checks: list[tuple[str, str, int | None]]) -> None:
    """Apply every limit (None: unlimited); record headers; raise 429 if any refuses."""
    active = [(name, key, limit) for name, key, limit in checks if limit]
    if not active:
        return
    args: list[float] = []
    for _, _, limit in active:
        args += [WINDOW_SECONDS * 1000 / limit, limit]
    raw = await _script()(
        keys=[f"hm:rl:{key}" for _, key, _ in active], args=args, client=async_redis()
    )
    decisions = [
        Decision(name, limit, bool(r[0]), int(r[1]), int(r[2]), int(r[3]))
        for (name, _, limit), r in zip(active, raw, strict=True)
    ]
    policy = ", ".join(f'"{d.name}";q={d.limit};w={WINDOW_SECONDS}' for d in decisions)
    refused = [d for d in decisions if not d.allowed]
    if refused:
        # The limit that refused, and when the next request would pass: the same number in
        # RateLimit's t and in Retry-After.
        worst = max(refused, key=lambda d: d.retry_after_ms)
        retry = max(1, math.ceil(worst.retry_after_ms / 1000))
        state = f'"{worst.name}";r=0;t={retry}'
    else:
        tightest = min(decisions, key=lambda d: d.remaining)
        state = f'"{tightest.name}";r={tightest.remaining};t={math.ceil(tightest.reset_ms / 1000)}'
    headers = {"RateLimit-Policy": policy, "RateLimit": state}
    holder = _headers.get()
    if holder is not None:
        holder.update(headers)
    if refused:
        raise RateLimited(
            f"The {worst.name.replace('_', ' ')} limit of {worst.limit} requests per minute "
            f"is used up; retry in {retry} s.",
            headers={**headers, "Retry-After": str(retry)},
            limit=worst.limit,
            window_seconds=WINDOW_SECONDS,
            subject=worst.name,
        )


async def enforce_for_user(user_id: uuid.UUID) -> None:
    """Count a request of a signed-in user (login token or session cookie)."""
    await enforce([("user", f"user:{user_id}", get_settings().user_requests_per_minute)])


async def enforce_for_address(address: str | None = None) -> None:
    """Count a request with no credentials, or whose credentials failed, by client address."""
    address = address or client_address()
    await enforce([("address", f"addr:{address}", get_settings().address_requests_per_minute)])


class RateLimitHeadersMiddleware:
    """Gives each request a place for rate-limit headers and adds them to the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        token = _headers.set(holder)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and holder:
                existing: list[Any] = list(message.get("headers", []))
                names = {k for k, _ in existing}
                for name, value in holder.items():
                    raw = name.lower().encode()
                    if raw not in names:
                        existing.append((raw, value.encode()))
                message["headers"] = existing
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _headers.reset(token)
