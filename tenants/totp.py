"""Two-factor sign-in with TOTP (RFC 6238): secrets, codes, recovery codes, sign-in challenges.

A secret is sealed at rest (:mod:`hiddenmodel.sealing`) and its column is not readable by the
app role: codes are checked here, as ``hm_auth`` (``HM_DATABASE_AUTH_URL``), the sign-in
role, which reads the sealed secret and records the last time step a code was accepted for,
so a code is accepted once only. Recovery codes are stored by keyed hash and spent as
``hm_auth`` too. Every check of a code counts in :mod:`hiddenmodel.authguard` (waits, then a
lock, after repeated failures), keyed by the account.

A password sign-in of an account with TOTP on answers 401 ``totp-required`` with a signed
challenge that names the account for a few minutes; the challenge and a code open the
session (``POST /v1/auth/totp`` or ``/v1/auth/cookie/totp``, and the portal's code step).
No HTTP here and no commit of the caller's session.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
import uuid
from datetime import UTC, datetime

import pyotp
from fastapi_users.jwt import decode_jwt, generate_jwt
from jwt import PyJWTError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel import authguard
from hiddenmodel.authguard import Action
from hiddenmodel.db import async_engine
from hiddenmodel.errors import Forbidden, Problem
from hiddenmodel.sealing import SealedValueUnreadable, open_sealed, seal
from hiddenmodel.security import keyed_hash, keyed_hashes, server_keys
from hiddenmodel.settings import get_settings
from tenants.lockouts import record_account_lock
from tenants.models import UserTotp

log = logging.getLogger(__name__)

ISSUER = "Hidden Model"
STEP_SECONDS = 30
# Codes of the previous and the next step are accepted too (clock drift, typing time).
WINDOW_STEPS = 1
RECOVERY_CODE_COUNT = 10
CHALLENGE_AUDIENCE = "hiddenmodel:totp-challenge"
CHALLENGE_LIFETIME_SECONDS = 300
_PURPOSE = b"hiddenmodel/totp-secrets/v1"
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


class TotpRequired(Problem):
    status, kind, title = 401, "totp-required", "Two-factor code required"


class InvalidTotpCode(Problem):
    status, kind, title = 400, "invalid-totp-code", "Wrong two-factor code"


class InvalidTotpChallenge(Problem):
    status, kind, title = 401, "invalid-totp-challenge", "Sign-in challenge invalid or expired"


class TwoFactorRequired(Forbidden):
    kind, title = "two-factor-required", "Two-factor sign-in required"


def _associated(user_id: uuid.UUID) -> bytes:
    return b"user-totp:" + user_id.bytes


def new_secret() -> str:
    return pyotp.random_base32()


def seal_secret(secret: str, user_id: uuid.UUID) -> bytes:
    return seal(secret.encode(), purpose=_PURPOSE, associated=_associated(user_id))


def unseal_secret(blob: bytes, user_id: uuid.UUID) -> str:
    """The secret sealed by :func:`seal_secret` (current or previous server key)."""
    return open_sealed(blob, purpose=_PURPOSE, associated=_associated(user_id))[0].decode()


def provisioning_uri(secret: str, email: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads (as text or a QR code)."""
    return pyotp.TOTP(secret, interval=STEP_SECONDS).provisioning_uri(
        name=email, issuer_name=ISSUER
    )


def new_recovery_codes() -> list[str]:
    """Codes like ``k3m9p-x7qrt``: ~50 bits each, typed once in an emergency."""
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(10))
        codes.append(f"{raw[:5]}-{raw[5:]}")
    return codes


def _normalized_recovery_code(code: str) -> str:
    return code.strip().lower().replace("-", "").replace(" ", "")


def recovery_code_hash(code: str) -> str:
    return keyed_hash("totp-recovery:" + _normalized_recovery_code(code))


def _is_totp_code(code: str) -> bool:
    stripped = code.strip().replace(" ", "")
    return len(stripped) == 6 and stripped.isdigit()


async def has_totp(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """Whether the user has a confirmed authenticator (sign-in asks for a code)."""
    confirmed = await session.scalar(
        select(UserTotp.confirmed_at).where(UserTotp.user_id == user_id)
    )
    return confirmed is not None


async def users_with_totp(session: AsyncSession, user_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    if not user_ids:
        return set()
    rows = await session.scalars(
        select(UserTotp.user_id).where(
            UserTotp.user_id.in_(user_ids), UserTotp.confirmed_at.is_not(None)
        )
    )
    return set(rows)


async def _accept_totp_code(user_id: uuid.UUID, code: str, *, confirmed: bool) -> bool:
    """Check ``code`` against the user's (confirmed, or pending) secret, as ``hm_auth``; on
    a match record its time step, so neither it nor an earlier code is accepted again."""
    engine = async_engine(get_settings().database_auth_url)
    now_step = int(time.time()) // STEP_SECONDS
    async with engine.begin() as conn:
        # Through the driver: SQLAlchemy's engine log, at DEBUG, would print the row.
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None  # a pooled connection that is open
        async with raw.cursor() as cursor:
            await cursor.execute(
                "SELECT secret_ciphertext, confirmed_at, last_used_step FROM user_totp "
                "WHERE user_id = %s FOR UPDATE",
                (user_id,),
            )
            row = await cursor.fetchone()
            if row is None or (row[1] is not None) != confirmed:
                return False
            try:
                plain, current = open_sealed(
                    bytes(row[0]), purpose=_PURPOSE, associated=_associated(user_id)
                )
            except SealedValueUnreadable:
                # Sealed under a key no longer configured (docs/SECURITY.md): no code can match.
                log.error("a TOTP secret does not open with the server keys: user=%s", user_id)
                return False
            secret = plain.decode()
            totp = pyotp.TOTP(secret, interval=STEP_SECONDS)
            last_step = row[2]
            given = code.strip().replace(" ", "")
            matched: int | None = None
            for step in range(now_step - WINDOW_STEPS, now_step + WINDOW_STEPS + 1):
                expected = totp.at(step * STEP_SECONDS)
                if hmac.compare_digest(expected, given) and (last_step is None or step > last_step):
                    matched = step
            if matched is None:
                return False
            await cursor.execute(
                "UPDATE user_totp SET last_used_step = %s WHERE user_id = %s",
                (matched, user_id),
            )
            if not current:
                # Sealed under the previous key (a rotation is under way): seal it again
                # under the current one, so it outlives HM_SECRET_KEY_PREVIOUS.
                await cursor.execute(
                    "UPDATE user_totp SET secret_ciphertext = %s WHERE user_id = %s",
                    (seal_secret(secret, user_id), user_id),
                )
    return True


async def _spend_recovery_code(user_id: uuid.UUID, code: str) -> bool:
    """Mark an unused recovery code of the user used, as ``hm_auth``; False if none matches."""
    # The previous server key's hash too while a key rotation is under way.
    hashes = keyed_hashes("totp-recovery:" + _normalized_recovery_code(code))
    engine = async_engine(get_settings().database_auth_url)
    async with engine.begin() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        async with raw.cursor() as cursor:
            await cursor.execute(
                "UPDATE totp_recovery_codes SET used_at = %s WHERE id = ("
                "SELECT id FROM totp_recovery_codes WHERE user_id = %s "
                "AND code_hash = ANY(%s) AND used_at IS NULL LIMIT 1 FOR UPDATE) RETURNING id",
                (datetime.now(UTC), user_id, hashes),
            )
            return await cursor.fetchone() is not None


async def check_code(
    user_id: uuid.UUID,
    email: str,
    code: str,
    *,
    confirmed: bool = True,
    allow_recovery: bool = True,
) -> None:
    """Accept a TOTP code (or, where allowed, an unused recovery code) of the user, under
    guessing control; raise :class:`InvalidTotpCode` (or 429 when the account must wait)."""
    attempt = await authguard.begin(Action.TOTP, account=str(user_id))
    if _is_totp_code(code):
        ok = await _accept_totp_code(user_id, code, confirmed=confirmed)
    elif allow_recovery and confirmed and code.strip():
        ok = await _spend_recovery_code(user_id, code)
    else:
        ok = False
    if ok:
        await authguard.succeeded(attempt)
        return
    if await authguard.failed(attempt):
        await record_account_lock(Action.TOTP, email)
    raise InvalidTotpCode(
        "The code is wrong, expired or already used."
        + (" A recovery code works in its place." if allow_recovery and confirmed else "")
    )


def issue_challenge(user_id: uuid.UUID) -> str:
    """A signed, short-lived token saying the password step of ``user_id`` succeeded."""
    return generate_jwt(
        {"sub": str(user_id), "aud": CHALLENGE_AUDIENCE},
        get_settings().secret_key.get_secret_value(),
        CHALLENGE_LIFETIME_SECONDS,
    )


def read_challenge(token: str) -> uuid.UUID:
    """The account a challenge names; :class:`InvalidTotpChallenge` if none valid."""
    for key in server_keys():
        try:
            data = decode_jwt(token, key, [CHALLENGE_AUDIENCE])
            return uuid.UUID(str(data["sub"]))
        except (PyJWTError, KeyError, ValueError):
            continue
    raise InvalidTotpChallenge("Sign in with your password again: the challenge has expired.")


def totp_required(user_id: uuid.UUID) -> TotpRequired:
    return TotpRequired(
        "This account signs in with a two-factor code: send the challenge with a code from "
        "your authenticator app (or a recovery code) to POST /v1/auth/totp "
        "(or /v1/auth/cookie/totp).",
        challenge=issue_challenge(user_id),
        expires_in=CHALLENGE_LIFETIME_SECONDS,
    )


def two_factor_required() -> TwoFactorRequired:
    base = get_settings().public_base_url
    return TwoFactorRequired(
        "This organization requires two-factor sign-in: turn it on for your account "
        f"(POST /v1/users/me/totp, or {base}/portal/account) to act in it.",
        enroll_url=f"{base}/portal/account",
    )
