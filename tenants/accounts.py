"""Rules of a person's own account: registration, profile, password and e-mail changes.

A login token alone must not be enough to take an account over: changing the password or
the e-mail address needs the current password; a new address takes effect only once a link
mailed to it is used (the old address is told); a new password ends every other session.
Registration answers the same whether or not the address has an account, so it cannot be
used to find out who is a customer. No HTTP here and no commit: the session's owner commits.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta

from fastapi_users import exceptions
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel import authguard
from hiddenmodel.authguard import Action
from hiddenmodel.db import after_commit
from hiddenmodel.errors import Conflict, NotFound, Problem
from hiddenmodel.mail import Mail, send_mail
from hiddenmodel.security import keyed_hash
from hiddenmodel.settings import get_settings
from tenants import repository, totp
from tenants.lockouts import record_account_lock
from tenants.models import EmailChange, TotpRecoveryCode, User, UserTotp
from tenants.schemas import AccountUpdate, UserCreate, UserRead
from tenants.users import UserManager, password_hash_of

EMAIL_CHANGE_PREFIX = "hme_"


class CurrentPasswordRequired(Problem):
    status, kind, title = 400, "current-password-required", "Current password required"


class InvalidCurrentPassword(Problem):
    status, kind, title = 400, "invalid-current-password", "Wrong current password"


class InvalidEmailChangeToken(Problem):
    status, kind, title = 400, "email-change-bad-token", "Invalid confirmation link"


def _send_after_commit(session: AsyncSession, mail: Mail) -> None:
    async def _send() -> None:
        await send_mail(mail)

    after_commit(session, _send)


async def answer_existing_registration(manager: UserManager, data: UserCreate) -> UserRead:
    """A registration for an address that has an account: the answer a new account gets (an
    id that names nothing), the same password hashing cost, and a mail to the owner."""
    manager.password_helper.hash(data.password)
    base = get_settings().public_base_url
    await send_mail(
        Mail(
            to=str(data.email),
            subject="Someone tried to register with your Hidden Model address",
            body=(
                "Someone asked for a new Hidden Model account with this e-mail address, which "
                "already has one. Nothing was changed.\n"
                f"If it was you, sign in at {base}/portal/login, or choose a new password at "
                f"{base}/portal/forgot.\nIf it was not you, you can ignore this message.\n"
            ),
            kind="register_existing",
        )
    )
    return UserRead(
        id=uuid.uuid4(),
        email=data.email,
        is_active=True,
        is_superuser=False,
        is_verified=False,
        name=data.name,
    )


async def check_current_password(
    manager: UserManager, user: User, current_password: str | None
) -> None:
    if not current_password:
        raise CurrentPasswordRequired(
            "Changing the e-mail address, the password or two-factor sign-in needs the "
            "current password (current_password)."
        )
    # The same guessing control as sign-in: a stolen login token cannot try passwords.
    attempt = await authguard.begin(Action.SIGN_IN, account=user.email)
    # Loaded as the sign-in role just for this comparison: the app's user rows lack it.
    hashed = await password_hash_of(user.id)
    verified, _ = manager.password_helper.verify_and_update(current_password, hashed or "")
    if verified:
        await authguard.succeeded(attempt)
        return
    if await authguard.failed(attempt):
        await record_account_lock(Action.SIGN_IN, user.email)
    raise InvalidCurrentPassword("The current password is wrong.")


async def update_account(
    session: AsyncSession,
    manager: UserManager,
    user_id: uuid.UUID,
    data: AccountUpdate,
    current_token: str | None,
) -> User:
    """Apply a change of the caller's own account.

    The name changes at once. A new password (with the current one) is set at once and ends
    every session but the caller's. A new e-mail address (with the current password) is
    mailed a confirmation link and the old address a notice; the address changes only when
    the link is used (:func:`confirm_email_change`).
    """
    user = await session.get(User, user_id)
    assert user is not None  # the caller's own, just authenticated
    wants_email = data.email is not None and str(data.email).lower() != user.email.lower()
    if data.password is not None or wants_email:
        await check_current_password(manager, user, data.current_password)
    if "name" in data.model_fields_set:
        user.name = data.name
    settings = get_settings()
    base = settings.public_base_url
    if data.password is not None:
        try:
            await manager.validate_password(data.password, user)
        except exceptions.InvalidPasswordException as exc:
            raise Problem(
                str(exc.reason),
                status=400,
                kind="update-user-invalid-password",
                title="Invalid password",
            ) from exc
        user.hashed_password = manager.password_helper.hash(data.password)
        keep = keyed_hash(current_token) if current_token else None
        await repository.end_other_sessions(session, user.id, keep)
        _send_after_commit(
            session,
            Mail(
                to=user.email,
                subject="Your Hidden Model password was changed",
                body=(
                    "The password of your Hidden Model account was just changed, and every "
                    "other session was signed out.\nIf this was not you, choose a new password "
                    f"at once at {base}/portal/forgot and tell your organization's owner.\n"
                ),
                kind="password_changed",
            ),
        )
    if wants_email:
        assert data.email is not None
        await _request_email_change(session, user, str(data.email).lower())
    await session.flush()
    return user


async def _request_email_change(session: AsyncSession, user: User, new_email: str) -> None:
    settings = get_settings()
    base = settings.public_base_url
    taken = await repository.user_by_email(session, new_email)
    if taken is not None:
        # The same answer to the caller; the owner of the address hears of it instead.
        _send_after_commit(
            session,
            Mail(
                to=new_email,
                subject="Someone tried to move a Hidden Model account to your address",
                body=(
                    "Another Hidden Model account asked to use this e-mail address, which "
                    "already has an account. Nothing was changed; you can ignore this message.\n"
                ),
                kind="email_change_existing",
            ),
        )
    else:
        token = EMAIL_CHANGE_PREFIX + secrets.token_urlsafe(32)
        expires_at = datetime.now(UTC) + timedelta(
            seconds=settings.email_change_token_lifetime_seconds
        )
        await repository.add_email_change(
            session,
            EmailChange(
                user_id=user.id,
                new_email=new_email,
                token_hash=keyed_hash(token),
                expires_at=expires_at,
            ),
        )
        _send_after_commit(
            session,
            Mail(
                to=new_email,
                subject="Confirm your new Hidden Model e-mail address",
                body=(
                    "Confirm that this address should replace the one of your Hidden Model "
                    f"account: open {base}/portal/confirm-email?token={token} or send the "
                    f"token to POST /v1/auth/confirm-email.\n\ntoken: {token}\n"
                    f"The link works once, until {expires_at.isoformat()}.\n"
                ),
                kind="email_change",
            ),
        )
    _send_after_commit(
        session,
        Mail(
            to=user.email,
            subject="A change of your Hidden Model e-mail address was requested",
            body=(
                f"Someone signed in to your account asked to change its e-mail address to "
                f"{new_email}. It changes only if the link sent there is used.\nIf this was "
                f"not you, change your password at once at {base}/portal/forgot.\n"
            ),
            kind="email_change_notice",
        ),
    )


async def confirm_email_change(session: AsyncSession, token: str) -> User:
    """Use a confirmation link: once, before it expires, while the address is still free."""
    attempt = await authguard.begin(Action.VERIFY)
    change = await repository.get_email_change(session, keyed_hash(token))
    now = datetime.now(UTC)
    if change is None or not await repository.consume_email_change(session, change.id, now):
        await authguard.failed(attempt)
        raise InvalidEmailChangeToken("This confirmation link is invalid, already used or expired.")
    await authguard.succeeded(attempt)
    user = await session.get(User, change.user_id)
    assert user is not None  # the change is deleted with its user
    if await repository.user_by_email(session, change.new_email) is not None:
        raise Conflict("This address now belongs to another account.", kind="email-taken")
    user.email = change.new_email
    user.is_verified = True  # the link proved the mailbox
    try:
        await session.flush()
    except IntegrityError as exc:  # taken between the check and the write
        raise Conflict("This address now belongs to another account.", kind="email-taken") from exc
    return user


# --- two-factor sign-in (TOTP) ------------------------------------------------------------


class TotpAlreadyEnabled(Conflict):
    kind, title = "totp-already-enabled", "Two-factor sign-in already on"


class TotpNotPending(Conflict):
    kind, title = "totp-not-enrolled", "No authenticator to confirm"


async def enroll_totp(
    session: AsyncSession, manager: UserManager, user: User, current_password: str
) -> tuple[str, str]:
    """A new secret for the caller (with the current password): returned once with its
    ``otpauth://`` URI, stored sealed, and not active until a code confirms it. A pending
    secret from an earlier enrollment is replaced; an active one must be turned off first."""
    await check_current_password(manager, user, current_password)
    existing = await session.scalar(
        select(UserTotp.confirmed_at).where(UserTotp.user_id == user.id)
    )
    if existing is not None:
        raise TotpAlreadyEnabled(
            "Two-factor sign-in is already on; turn it off first to enroll a new authenticator."
        )
    await session.execute(delete(UserTotp).where(UserTotp.user_id == user.id))
    secret = totp.new_secret()
    session.add(UserTotp(user_id=user.id, secret_ciphertext=totp.seal_secret(secret, user.id)))
    await session.flush()
    return secret, totp.provisioning_uri(secret, user.email)


async def confirm_totp(session: AsyncSession, user: User, code: str) -> list[str]:
    """Activate the pending secret with a code from the app; answer new recovery codes
    (stored by keyed hash, shown this once). Other sessions stay open: the caller proved
    the password at enrollment."""
    pending = await session.scalar(
        select(UserTotp.confirmed_at.is_(None)).where(UserTotp.user_id == user.id)
    )
    if not pending:
        raise TotpNotPending("Enroll first (POST /v1/users/me/totp); then confirm with a code.")
    # The code is checked (and its step recorded) as hm_auth, in a transaction of its own.
    await totp.check_code(user.id, user.email, code, confirmed=False, allow_recovery=False)
    codes = totp.new_recovery_codes()
    await session.execute(delete(TotpRecoveryCode).where(TotpRecoveryCode.user_id == user.id))
    session.add_all(
        TotpRecoveryCode(user_id=user.id, code_hash=totp.recovery_code_hash(c)) for c in codes
    )
    row = await session.get(UserTotp, user.id)
    assert row is not None  # checked above, and only its owner deletes it
    row.confirmed_at = datetime.now(UTC)
    await session.flush()
    _send_after_commit(
        session,
        Mail(
            to=user.email,
            subject="Two-factor sign-in is on for your Hidden Model account",
            body=(
                "Signing in to your Hidden Model account now also asks for a code from your "
                "authenticator app. Keep your recovery codes somewhere safe.\nIf this was not "
                f"you, change your password at once at {get_settings().public_base_url}"
                "/portal/forgot.\n"
            ),
            kind="totp_enabled",
        ),
    )
    return codes


async def disable_totp(
    session: AsyncSession, manager: UserManager, user: User, current_password: str, code: str
) -> None:
    """Turn two-factor sign-in off: needs the current password and a code (or an unused
    recovery code), so neither a stolen session nor a stolen password is enough."""
    await check_current_password(manager, user, current_password)
    if not await totp.has_totp(session, user.id):
        raise NotFound("Two-factor sign-in is not on for this account.", kind="totp-not-enabled")
    await totp.check_code(user.id, user.email, code)
    await session.execute(delete(TotpRecoveryCode).where(TotpRecoveryCode.user_id == user.id))
    await session.execute(delete(UserTotp).where(UserTotp.user_id == user.id))
    _send_after_commit(
        session,
        Mail(
            to=user.email,
            subject="Two-factor sign-in is off for your Hidden Model account",
            body=(
                "Signing in to your Hidden Model account no longer asks for a code.\nIf this "
                "was not you, change your password at once at "
                f"{get_settings().public_base_url}/portal/forgot.\n"
            ),
            kind="totp_disabled",
        ),
    )


async def complete_totp_sign_in(session: AsyncSession, challenge: str, code: str) -> User:
    """The code step of a sign-in: the account the challenge names, once a code (or a
    recovery code) of it is accepted."""
    user_id = totp.read_challenge(challenge)
    user = await session.get(User, user_id)
    if user is None or not user.is_active or not await totp.has_totp(session, user_id):
        raise totp.InvalidTotpChallenge("Sign in with your password again.")
    await totp.check_code(user.id, user.email, code)
    return user
