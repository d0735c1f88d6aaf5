"""Accounts with fastapi-users: register, login (bearer and cookie), logout, reset, verify."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, OAuth2PasswordBearer, OAuth2PasswordRequestForm
from fastapi_users import (
    BaseUserManager,
    FastAPIUsers,
    InvalidPasswordException,
    UUIDIDMixin,
    exceptions,
)
from fastapi_users.authentication import (
    AuthenticationBackend,
    BearerTransport,
    CookieTransport,
)
from fastapi_users.authentication.strategy.db import DatabaseStrategy
from fastapi_users.jwt import decode_jwt
from fastapi_users.password import PasswordHelper
from fastapi_users_db_sqlalchemy import SQLAlchemyUserDatabase
from jwt import PyJWTError
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import delete, insert, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from hiddenmodel import authguard, ratelimit
from hiddenmodel.authguard import Action
from hiddenmodel.db import async_engine, async_global_session, commit, rollback
from hiddenmodel.mail import Mail, send_mail
from hiddenmodel.security import keyed_hash, keyed_hashes
from hiddenmodel.settings import get_settings
from tenants import totp
from tenants.lockouts import record_account_lock
from tenants.models import AccessToken, User
from tenants.schemas import UserCreate

COOKIE_NAME = "hm_session"
_COMMON_PASSWORDS = frozenset(
    {"password", "password1", "password123", "1234567890", "qwertyuiop", "letmein123", "iloveyou12"}
)


async def get_global_db_session() -> AsyncIterator[AsyncSession]:
    """A request-owned session for tables that belong to no organization."""
    async with async_global_session() as session:
        try:
            yield session
            await commit(session)
        except BaseException:
            await rollback(session)
            raise


# scope="function": the session is committed before the response is sent, so a failed
# commit can never follow a success answer.
GlobalSessionDep = Annotated[AsyncSession, Depends(get_global_db_session, scope="function")]


class UserDatabase(SQLAlchemyUserDatabase[User, uuid.UUID]):
    """fastapi-users' adapter, minus the password hash: the app role may not read it.

    Rows are read without ``hashed_password`` (deferred on the model); writing it is allowed.
    After a write the row is read back without it.
    """

    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session, User)

    async def create(self, create_dict: dict[str, Any]) -> User:
        user = User(**create_dict)
        self.session.add(user)
        await self.session.commit()
        await self.session.refresh(user, attribute_names=_READABLE_USER_COLUMNS)
        return user

    async def update(self, user: User, update_dict: dict[str, Any]) -> User:
        for key, value in update_dict.items():
            setattr(user, key, value)
        self.session.add(user)
        await self.session.commit()
        await self.session.refresh(user, attribute_names=_READABLE_USER_COLUMNS)
        return user


_READABLE_USER_COLUMNS = [c.key for c in User.__table__.c if c.key != "hashed_password"]


async def password_hash_of(user_id: uuid.UUID) -> str | None:
    """A user's stored password hash, read as ``hm_auth`` (``HM_DATABASE_AUTH_URL``): the
    one role that may read it, used by sign-in and password reset only."""
    engine = async_engine(get_settings().database_auth_url)
    async with engine.connect() as conn:
        # Through the driver: SQLAlchemy's engine log, at DEBUG, would print the row.
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None  # a pooled connection that is open
        async with raw.cursor() as cursor:
            await cursor.execute("SELECT hashed_password FROM users WHERE id = %s", (user_id,))
            row = await cursor.fetchone()
    return None if row is None else str(row[0])


async def get_user_db(session: GlobalSessionDep) -> UserDatabase:
    return UserDatabase(session)


@lru_cache
def password_helper() -> PasswordHelper:
    settings = get_settings()
    hasher = Argon2Hasher(
        time_cost=settings.password_hash_time_cost, memory_cost=settings.password_hash_memory_kib
    )
    return PasswordHelper(PasswordHash((hasher,)))


def validate_password_strength(password: str, email: str) -> None:
    """Raise ``ValueError`` naming what is wrong with a password."""
    settings = get_settings()
    if len(password) < settings.password_min_length:
        raise ValueError(f"Password must be at least {settings.password_min_length} characters.")
    if len(password) > 256:
        raise ValueError("Password must be at most 256 characters.")
    lowered = password.lower()
    local = email.split("@", 1)[0].lower()
    if lowered in _COMMON_PASSWORDS or len(set(password)) < 5:
        raise ValueError("Password is too common or too repetitive.")
    if len(local) >= 3 and local in lowered:
        raise ValueError("Password must not contain the e-mail address.")
    classes = sum(
        bool(re.search(p, password)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]")
    )
    if classes < 2:
        raise ValueError("Password must mix letters with digits, capitals or symbols.")


class UserManager(UUIDIDMixin, BaseUserManager[User, uuid.UUID]):
    """fastapi-users' manager; the three steps that compare against the password hash load it
    first through :func:`password_hash_of` (the user rows the app reads lack it)."""

    def __init__(self, user_db: SQLAlchemyUserDatabase[User, uuid.UUID]) -> None:
        super().__init__(user_db, password_helper())
        self.session = user_db.session
        settings = get_settings()
        secret = settings.secret_key.get_secret_value()
        self.reset_password_token_secret = secret
        self.verification_token_secret = secret
        self.reset_password_token_lifetime_seconds = settings.reset_token_lifetime_seconds
        self.verification_token_lifetime_seconds = settings.verify_token_lifetime_seconds

    async def validate_password(self, password: str, user: Any) -> None:
        try:
            validate_password_strength(password, str(user.email))
        except ValueError as exc:
            raise InvalidPasswordException(reason=str(exc)) from exc

    async def _load_password_hash(self, user: User) -> None:
        hashed = await password_hash_of(user.id)
        # In memory only: the hash is not a change to write back.
        set_committed_value(user, "hashed_password", hashed or "")

    async def _check_password(self, credentials: OAuth2PasswordRequestForm) -> User | None:
        """fastapi-users' check, with the hash loaded for the comparison."""
        try:
            user = await self.get_by_email(credentials.username)
        except exceptions.UserNotExists:
            # Hash anyway: an unknown address takes as long to refuse as a wrong password.
            self.password_helper.hash(credentials.password)
            return None
        await self._load_password_hash(user)
        verified, updated_password_hash = self.password_helper.verify_and_update(
            credentials.password, user.hashed_password
        )
        if not verified:
            return None
        if updated_password_hash is not None:
            await self.user_db.update(user, {"hashed_password": updated_password_hash})
        return user

    async def forgot_password(self, user: User, request: Request | None = None) -> None:
        # The reset token carries a fingerprint of the current hash (spent by a new password).
        await self._load_password_hash(user)
        await super().forgot_password(user, request)

    async def _reset_password(
        self, token: str, password: str, request: Request | None = None
    ) -> User:
        # fastapi-users' own steps, with the hash loaded before the fingerprint check.
        try:
            data = decode_jwt(
                token, self.reset_password_token_secret, [self.reset_password_token_audience]
            )
            user_id, fingerprint = data["sub"], data["password_fgpt"]
            parsed_id = self.parse_id(user_id)
        except (PyJWTError, KeyError, exceptions.InvalidID) as exc:
            raise exceptions.InvalidResetPasswordToken() from exc
        user = await self.get(parsed_id)
        await self._load_password_hash(user)
        valid, _ = self.password_helper.verify_and_update(user.hashed_password, fingerprint)
        if not valid:
            raise exceptions.InvalidResetPasswordToken()
        if not user.is_active:
            raise exceptions.UserInactive()
        updated = await self._update(user, {"password": password})
        await self.on_after_reset_password(user, request)
        return updated

    async def on_after_register(self, user: User, request: Request | None = None) -> None:
        if not user.is_verified:
            await self.request_verify(user, request)

    async def _send(self, mail: Mail) -> None:
        # Nothing is pending here (the token is signed, not stored): end the request's read
        # transaction first, so its connection is back in the pool before the sender takes
        # one (holding one while waiting for a second can starve a busy pool).
        await commit(self.session)
        await send_mail(mail)

    async def on_after_request_verify(
        self, user: User, token: str, request: Request | None = None
    ) -> None:
        base = get_settings().public_base_url
        await self._send(
            Mail(
                to=user.email,
                subject="Verify your Hidden Model e-mail address",
                body=(
                    "Confirm this address by sending the token below to POST /v1/auth/verify, "
                    f"or open {base}/portal/verify?token={token}\n\ntoken: {token}\n"
                ),
                kind="verify",
            )
        )

    async def on_after_forgot_password(
        self, user: User, token: str, request: Request | None = None
    ) -> None:
        base = get_settings().public_base_url
        await self._send(
            Mail(
                to=user.email,
                subject="Reset your Hidden Model password",
                body=(
                    "Choose a new password by sending this token with it to "
                    f"POST /v1/auth/reset-password, or open {base}/portal/reset?token={token}"
                    f"\n\ntoken: {token}\n"
                ),
                kind="reset_password",
            )
        )

    async def authenticate(self, credentials: OAuth2PasswordRequestForm) -> User | None:
        """fastapi-users' check of e-mail and password, under guessing control: the account
        and the client address wait, then lock, after repeated failures (429), known
        account or not; the unknown address costs the same password hash as a known one.
        An account with two-factor sign-in on gets 401 ``totp-required`` with a challenge
        for the code step instead of a user (so no session)."""
        attempt = await authguard.begin(Action.SIGN_IN, account=credentials.username)
        user = await self._check_password(credentials)
        if user is not None and user.is_active:
            await authguard.succeeded(attempt)
        elif await authguard.failed(attempt):
            await commit(self.session)
            await record_account_lock(Action.SIGN_IN, credentials.username)
        if user is not None and user.is_active and await totp.has_totp(self.session, user.id):
            # The password alone opens no session: the code step does (tenants.totp).
            raise totp.totp_required(user.id)
        return user

    async def reset_password(
        self, token: str, password: str, request: Request | None = None
    ) -> User:
        attempt = await authguard.begin(Action.PASSWORD_RESET)
        try:
            user = await self._reset_password(token, password, request)
        except (exceptions.InvalidResetPasswordToken, exceptions.UserInactive):
            await authguard.failed(attempt)
            raise
        except exceptions.InvalidPasswordException:
            await authguard.succeeded(attempt)  # a real token with a weak password: no guess
            raise
        await authguard.succeeded(attempt)
        return user

    async def verify(self, token: str, request: Request | None = None) -> User:
        attempt = await authguard.begin(Action.VERIFY)
        try:
            user = await super().verify(token, request)
        except (exceptions.InvalidVerifyToken, exceptions.UserNotExists):
            await authguard.failed(attempt)
            raise
        except exceptions.UserAlreadyVerified:
            await authguard.succeeded(attempt)
            raise
        await authguard.succeeded(attempt)
        return user

    async def on_after_reset_password(self, user: User, request: Request | None = None) -> None:
        # A new password ends every session opened with the old one.
        await self.session.execute(delete(AccessToken).where(AccessToken.user_id == user.id))


async def count_link_request(action: Action, email: str) -> None:
    """Count a request that may mail a link to ``email`` (reset, verification) against the
    address and the client: each one can send a mail, so each one counts; 429 past the limit,
    for an unknown address exactly as for a known one."""
    await authguard.failed(await authguard.begin(action, account=email))


async def mail_link(action: Action, email: str) -> None:
    """Mail a password reset (or verification) link when ``email`` has an active (unverified)
    account, in a session of its own. Run after the answer is sent, so neither the answer nor
    its timing says whether the address has an account."""
    async with async_global_session() as session:
        manager = UserManager(UserDatabase(session))
        try:
            user = await manager.get_by_email(email)
            if action == Action.PASSWORD_RESET_REQUEST:
                await manager.forgot_password(user)
            else:
                await manager.request_verify(user)
            await commit(session)
        except (
            exceptions.UserNotExists,
            exceptions.UserInactive,
            exceptions.UserAlreadyVerified,
        ):
            await rollback(session)


async def get_user_manager(
    user_db: Annotated[SQLAlchemyUserDatabase[User, uuid.UUID], Depends(get_user_db)],
) -> UserManager:
    return UserManager(user_db)


@dataclass
class IssuedAccessToken:
    """What the strategy sees: the raw token (returned once) and its user."""

    token: str
    user_id: uuid.UUID
    created_at: datetime


class HashedAccessTokenDatabase:
    """Login sessions stored by keyed hash: a leaked table cannot be replayed."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # The app role may write token_hash but not read it: lookups and sign-out go through
    # definer functions that take the hash and answer with a verdict.
    async def get_by_token(
        self, token: str, max_age: datetime | None = None
    ) -> IssuedAccessToken | None:
        row = None
        for token_hash in keyed_hashes(token):  # the old key's hash while a rotation is on
            row = (
                await self.session.execute(
                    text("SELECT out_user, out_created FROM hm_access_token_user(:h, :not_before)"),
                    {"h": token_hash, "not_before": max_age},
                )
            ).one_or_none()
            if row is not None:
                break
        if row is None:
            return None
        return IssuedAccessToken(token=token, user_id=row.out_user, created_at=row.out_created)

    async def create(self, create_dict: dict[str, Any]) -> IssuedAccessToken:
        token = str(create_dict["token"])
        user_id = create_dict["user_id"]
        created = await self.session.scalar(
            insert(AccessToken)
            .values(token_hash=keyed_hash(token), user_id=user_id)
            .returning(AccessToken.created_at)
        )
        assert created is not None  # RETURNING of the row just inserted
        return IssuedAccessToken(token=token, user_id=user_id, created_at=created)

    async def update(
        self, access_token: IssuedAccessToken, update_dict: dict[str, Any]
    ) -> IssuedAccessToken:
        return access_token

    async def delete(self, access_token: IssuedAccessToken) -> None:
        for token_hash in keyed_hashes(access_token.token):
            await self.session.execute(text("SELECT hm_access_token_delete(:h)"), {"h": token_hash})


def get_access_token_db(session: GlobalSessionDep) -> HashedAccessTokenDatabase:
    return HashedAccessTokenDatabase(session)


def get_database_strategy(
    access_token_db: Annotated[HashedAccessTokenDatabase, Depends(get_access_token_db)],
) -> DatabaseStrategy[User, uuid.UUID, Any]:
    return DatabaseStrategy(access_token_db, lifetime_seconds=get_settings().jwt_lifetime_seconds)


# Names of the session schemes in the OpenAPI document (``components.securitySchemes``).
SESSION_SCHEME = "session"
SESSION_COOKIE_SCHEME = "sessionCookie"


class SessionBearerTransport(BearerTransport):
    """fastapi-users' bearer transport, under a stable scheme name and with a description."""

    def __init__(self, tokenUrl: str) -> None:
        super().__init__(tokenUrl)
        self.scheme = OAuth2PasswordBearer(
            tokenUrl,
            auto_error=False,
            scheme_name=SESSION_SCHEME,
            description=(
                "A user's session token: `POST /v1/auth/login` with the email as `username` "
                "and the password returns `access_token`; send it as "
                "`Authorization: Bearer <token>`. A member acts with the permissions of their "
                "role in each organization."
            ),
        )


class SessionCookieTransport(CookieTransport):
    """fastapi-users' cookie transport, under a stable scheme name and with a description."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scheme = APIKeyCookie(
            name=self.cookie_name,
            auto_error=False,
            scheme_name=SESSION_COOKIE_SCHEME,
            description=(
                f"The `{self.cookie_name}` cookie set by `POST /v1/auth/cookie/login`, for "
                "pages of this site: it acts as the user's session token. A request with "
                "another method than GET, HEAD or OPTIONS must also send an `Origin` of this "
                "site or the `X-Requested-With` header (403 `csrf-check-failed` otherwise)."
            ),
        )


bearer_backend: AuthenticationBackend[User, uuid.UUID] = AuthenticationBackend(
    name="bearer",
    transport=SessionBearerTransport(tokenUrl="/v1/auth/login"),
    get_strategy=get_database_strategy,
)
cookie_backend: AuthenticationBackend[User, uuid.UUID] = AuthenticationBackend(
    name="cookie",
    transport=SessionCookieTransport(
        cookie_name=COOKIE_NAME,
        cookie_max_age=get_settings().jwt_lifetime_seconds,
        cookie_secure=get_settings().cookie_secure,
        cookie_samesite="lax",
    ),
    get_strategy=get_database_strategy,
)

fastapi_users = FastAPIUsers[User, uuid.UUID](get_user_manager, [bearer_backend, cookie_backend])

current_active_user = fastapi_users.current_user(active=True)
current_superuser = fastapi_users.current_user(active=True, superuser=True)


async def limit_signed_in_user(user: Annotated[User, Depends(current_active_user)]) -> None:
    """The per-user rate limit, for fastapi-users' own routes that take a session."""
    await ratelimit.enforce_for_user(user.id)


async def create_user(
    email: str,
    password: str,
    *,
    name: str | None = None,
    is_superuser: bool = False,
    is_verified: bool = False,
) -> User:
    """Create a user outside a request (CLI, demo data), with the same password rules."""
    # The fastapi-users adapter commits by itself.
    async with async_global_session() as session:
        manager = UserManager(UserDatabase(session))
        user = await manager.create(
            UserCreate(
                email=email,
                password=password,
                name=name,
                is_superuser=is_superuser,
                is_verified=is_verified,
            ),
            safe=False,
        )
        return user
