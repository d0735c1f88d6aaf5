"""Guessing control for everything that checks a secret: passwords, tokens, API keys.

Each attempt is counted, before its outcome is known, against each of its subjects: the
account it names (an e-mail address or a user) and the client address. Counting first means
a burst of parallel guesses is counted as it arrives, not after it has been tried. A subject
past ``free`` attempts waits ``base * 2^k`` seconds between attempts; at ``lock_after`` it is
locked for the lock time, and every failure after that locks it again. A success forgets the
account's failures and takes back the client address's count of that one attempt.

Refusals are 429 with ``Retry-After``, whether or not the account exists: the key is the
keyed hash of what the client sent, so an unknown address is counted exactly like a known one.

State lives in Redis (one hash per subject, one atomic script per attempt). Like the request
rate limits (:mod:`hiddenmodel.ratelimit`), a Redis that cannot be reached is not skipped:
the request fails with 503 and ``Retry-After``, so guessing never gets easier when Redis does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache

from redis.commands.core import AsyncScript

from hiddenmodel.clientip import client_address
from hiddenmodel.errors import Problem
from hiddenmodel.redis import async_redis
from hiddenmodel.security import keyed_hash
from hiddenmodel.settings import get_settings

log = logging.getLogger(__name__)


class Action(StrEnum):
    """What is being guessed; each keeps its own counts."""

    SIGN_IN = "sign_in"
    PASSWORD_RESET_REQUEST = "password_reset_request"  # noqa: S105 - a name
    PASSWORD_RESET = "password_reset"  # noqa: S105 - a name
    VERIFY_REQUEST = "verify_request"
    VERIFY = "verify"
    INVITATION = "invitation"
    # A two-factor code (or recovery code), keyed by the user's id.
    TOTP = "totp"
    # A request whose API key or session token was refused.
    CREDENTIALS = "credentials"


# Actions whose account subject is an e-mail address, and the one keyed by the user's id:
# what an organization's owner sees and clears for a member.
EMAIL_ACTIONS = (Action.SIGN_IN, Action.PASSWORD_RESET_REQUEST, Action.VERIFY_REQUEST)
USER_ACTIONS = (Action.INVITATION, Action.TOTP)

_BEGIN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local lock_ms = tonumber(ARGV[2])
local base = tonumber(ARGV[3])
local out = {}
local refused = false
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'n', 'until', 'locked')
  local n = tonumber(v[1] or 0)
  local wait_until = tonumber(v[2] or 0)
  if wait_until > now then
    refused = true
    out[i] = {1, wait_until - now, tonumber(v[3] or 0), 0, n}
  else
    out[i] = {0, 0, 0, 0, n}
  end
end
if refused then
  return out
end
for i, key in ipairs(KEYS) do
  local free = tonumber(ARGV[2 + 2 * i])
  local lock_after = tonumber(ARGV[3 + 2 * i])
  local n = out[i][5] + 1
  local wait_until = 0
  local locked = 0
  if n >= lock_after then
    wait_until = now + lock_ms
    locked = 1
  elseif n > free then
    wait_until = now + math.min(math.floor(base * 2 ^ (n - free - 1)), lock_ms)
  end
  redis.call('HSET', key, 'n', n, 'until', wait_until, 'locked', locked)
  redis.call('PEXPIRE', key, math.max(window, wait_until - now))
  out[i] = {0, 0, locked, locked, n}
end
return out
"""

# ARGV[i]: "reset" forgets the subject, "refund" takes back one attempt (a lock stays).
_SUCCEED = """
for i, key in ipairs(KEYS) do
  if ARGV[i] == 'reset' then
    redis.call('DEL', key)
  else
    local v = redis.call('HMGET', key, 'n', 'locked')
    if v[1] then
      local n = math.max(tonumber(v[1]) - 1, 0)
      if tonumber(v[2] or 0) == 1 then
        redis.call('HSET', key, 'n', n)
      else
        redis.call('HSET', key, 'n', n, 'until', 0)
      end
    end
  end
end
return 1
"""


@lru_cache
def _begin_script() -> AsyncScript:
    return async_redis().register_script(_BEGIN)


@lru_cache
def _succeed_script() -> AsyncScript:
    return async_redis().register_script(_SUCCEED)


class TooManyAttempts(Problem):
    status, kind, title = 429, "too-many-attempts", "Too many attempts"


@dataclass(frozen=True)
class Subject:
    kind: str  # "account" or "address"
    key: str


@dataclass
class Attempt:
    action: Action
    subjects: list[Subject]
    # Subjects this attempt locks if it fails (it was the one that reached the limit).
    locks: list[Subject] = field(default_factory=list)


def _account_key(action: Action, identifier: str) -> str:
    # A keyed hash: Redis holds no e-mail address, and one cannot be guessed from a key.
    return f"hm:ag:{action.value}:a:{keyed_hash(f'{action.value}:{identifier.strip().lower()}')}"


def _address_key(action: Action, address: str) -> str:
    return f"hm:ag:{action.value}:ip:{address}"


async def begin(
    action: Action, *, account: str | None = None, address: str | None = None
) -> Attempt:
    """Count an attempt at ``action`` for ``account`` (an e-mail address or user id) and the
    client address; raise :class:`TooManyAttempts` if either must wait, counting nothing."""
    settings = get_settings()
    address = address or client_address()
    subjects: list[Subject] = []
    args: list[float] = [
        settings.auth_failure_window_seconds * 1000,
        settings.auth_lock_seconds * 1000,
        math.ceil(settings.auth_backoff_base_seconds * 1000),
    ]
    if account:
        subjects.append(Subject("account", _account_key(action, account)))
        args += [settings.auth_free_attempts, settings.auth_lock_after]
    subjects.append(Subject("address", _address_key(action, address)))
    args += [settings.auth_address_free_attempts, settings.auth_address_lock_after]
    raw = await _begin_script()(keys=[s.key for s in subjects], args=args, client=async_redis())
    waits = [int(r[1]) for r in raw if int(r[0])]
    if waits:
        retry = max(1, math.ceil(max(waits) / 1000))
        locked = any(int(r[0]) and int(r[2]) for r in raw)
        raise TooManyAttempts(
            ("Locked after too many failed attempts" if locked else "Too many failed attempts")
            + f"; retry in {retry} s.",
            headers={"Retry-After": str(retry)},
        )
    return Attempt(
        action,
        subjects,
        [s for s, r in zip(subjects, raw, strict=True) if int(r[3])],
    )


async def failed(attempt: Attempt) -> bool:
    """The attempt failed (it is already counted). True when it locked its account."""
    for subject in attempt.locks:
        log.warning(
            "locked after repeated failures: action=%s subject=%s address=%s",
            attempt.action.value,
            subject.kind,
            client_address(),
        )
    return any(s.kind == "account" for s in attempt.locks)


async def succeeded(attempt: Attempt) -> None:
    """Forget the account's failures; take back the address's count of this attempt."""
    await _succeed_script()(
        keys=[s.key for s in attempt.subjects],
        args=["reset" if s.kind == "account" else "refund" for s in attempt.subjects],
        client=async_redis(),
    )


async def refuse_credentials() -> None:
    """A request's API key or session token was refused: count it against the client
    address, and answer 429 instead of 401 once that address must wait."""
    await failed(await begin(Action.CREDENTIALS))


@dataclass(frozen=True)
class Lock:
    action: Action
    failures: int
    locked_until: datetime


async def account_locks(emails: Sequence[str], user_ids: Sequence[str]) -> list[list[Lock]]:
    """The locks in force on each account, given as pairs ``emails[i]``, ``user_ids[i]``."""
    keys: list[tuple[int, Action, str]] = []
    for i, (email, user_id) in enumerate(zip(emails, user_ids, strict=True)):
        keys += [(i, a, _account_key(a, email)) for a in EMAIL_ACTIONS]
        keys += [(i, a, _account_key(a, user_id)) for a in USER_ACTIONS]
    out: list[list[Lock]] = [[] for _ in emails]
    if not keys:
        return out
    pipe = async_redis().pipeline(transaction=False)
    for _, _, key in keys:
        pipe.hmget(key, ["n", "until", "locked"])
    values = await pipe.execute()
    now = datetime.now(UTC)
    for (i, action, _), (n, until, locked) in zip(keys, values, strict=True):
        if locked is None or int(locked) != 1 or until is None:
            continue
        ends = datetime.fromtimestamp(int(until) / 1000, UTC)
        if ends > now:
            out[i].append(Lock(action, int(n or 0), ends))
    return out


async def clear_account(email: str, user_id: str) -> bool:
    """Forget every failure and lock of an account. True if there was anything to clear."""
    keys = [_account_key(a, email) for a in EMAIL_ACTIONS]
    keys += [_account_key(a, user_id) for a in USER_ACTIONS]
    return bool(await async_redis().delete(*keys))


def lock_duration() -> timedelta:
    return timedelta(seconds=get_settings().auth_lock_seconds)


@asynccontextmanager
async def guarded(
    action: Action, account: str | None, failures: tuple[type[Exception], ...]
) -> AsyncIterator[Attempt]:
    """An attempt around a block: the exceptions in ``failures`` are failed guesses; any
    other outcome takes the attempt back."""
    attempt = await begin(action, account=account)
    try:
        yield attempt
    except failures:
        await failed(attempt)
        raise
    except Exception:
        await succeeded(attempt)
        raise
    await succeeded(attempt)
