"""HTTP of a person's own account, in place of fastapi-users' register, forgot-password,
request-verify-token and ``/users/me`` routes (same paths and operation names): their rules live in
``tenants.accounts`` and the guessing control of ``hiddenmodel.authguard``."""

from __future__ import annotations

from typing import Annotated

from fastapi import (
    APIRouter,
    BackgroundTasks,
    Body,
    Depends,
    HTTPException,
    Request,
    Response,
    status,
)
from fastapi_users import exceptions
from fastapi_users.router.common import ErrorCode
from pydantic import EmailStr

from hiddenmodel.authguard import Action
from tenants import accounts
from tenants.auth import CurrentUser, cookie_csrf, request_token
from tenants.schemas import (
    AccountUpdate,
    EmailChangeConfirm,
    TotpCode,
    TotpDisable,
    TotpEnrollment,
    TotpPassword,
    TotpRecoveryCodes,
    TotpSignIn,
    UserCreate,
    UserRead,
)
from tenants.users import (
    GlobalSessionDep,
    HashedAccessTokenDatabase,
    UserManager,
    bearer_backend,
    cookie_backend,
    count_link_request,
    get_database_strategy,
    get_user_manager,
    mail_link,
)

router = APIRouter(prefix="/v1")

UserManagerDep = Annotated[UserManager, Depends(get_user_manager)]


@router.post(
    "/auth/register",
    tags=["auth"],
    name="register:register",
    status_code=status.HTTP_201_CREATED,
    response_model=UserRead,
)
async def register(request: Request, data: UserCreate, manager: UserManagerDep) -> UserRead:
    """Create an account; a verification link is mailed. An address that already has an
    account gets the same answer, and its owner a mail instead."""
    try:
        user = await manager.create(data, safe=True, request=request)
    except exceptions.InvalidPasswordException as exc:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail={"code": ErrorCode.REGISTER_INVALID_PASSWORD, "reason": exc.reason},
        ) from exc
    except exceptions.UserAlreadyExists:
        return await accounts.answer_existing_registration(manager, data)
    return UserRead.model_validate(user, from_attributes=True)


@router.post(
    "/auth/forgot-password",
    tags=["auth"],
    name="reset:forgot_password",
    status_code=status.HTTP_202_ACCEPTED,
)
async def forgot_password(
    email: Annotated[EmailStr, Body(embed=True)], background: BackgroundTasks
) -> None:
    """Mail a password reset link, if the address has an account (the answer is the same)."""
    await count_link_request(Action.PASSWORD_RESET_REQUEST, str(email))
    background.add_task(mail_link, Action.PASSWORD_RESET_REQUEST, str(email))


@router.post(
    "/auth/request-verify-token",
    tags=["auth"],
    name="verify:request-token",
    status_code=status.HTTP_202_ACCEPTED,
)
async def request_verify_token(
    email: Annotated[EmailStr, Body(embed=True)], background: BackgroundTasks
) -> None:
    """Mail a new verification link, if the address has an unverified account (the answer
    is the same)."""
    await count_link_request(Action.VERIFY_REQUEST, str(email))
    background.add_task(mail_link, Action.VERIFY_REQUEST, str(email))


@router.post(
    "/auth/confirm-email",
    tags=["auth"],
    name="account:confirm_email",
    response_model=UserRead,
)
async def confirm_email(data: EmailChangeConfirm, session: GlobalSessionDep) -> UserRead:
    """Use the link mailed to a new address: the account's e-mail address becomes it."""
    user = await accounts.confirm_email_change(session, data.token)
    return UserRead.model_validate(user, from_attributes=True)


# The session cookie authenticates these: the same cross-site check as every cookie route.
@router.get(
    "/users/me",
    tags=["users"],
    name="users:current_user",
    response_model=UserRead,
    dependencies=[Depends(cookie_csrf)],
)
async def current_user(user: CurrentUser) -> UserRead:
    return UserRead.model_validate(user, from_attributes=True)


@router.patch("/users/me", tags=["users"], name="users:patch_current_user", response_model=UserRead)
async def patch_current_user(
    request: Request,
    data: AccountUpdate,
    user: CurrentUser,
    session: GlobalSessionDep,
    manager: UserManagerDep,
) -> UserRead:
    """Change your name at once; your password or e-mail address with ``current_password``
    (a new password signs out every other session; a new address is confirmed by mail)."""
    updated = await accounts.update_account(session, manager, user.id, data, request_token(request))
    return UserRead.model_validate(updated, from_attributes=True)


# --- two-factor sign-in -------------------------------------------------------------------


@router.post(
    "/users/me/totp",
    tags=["users"],
    name="users:enroll_totp",
    response_model=TotpEnrollment,
    dependencies=[Depends(cookie_csrf)],
)
async def enroll_totp(
    data: TotpPassword, user: CurrentUser, session: GlobalSessionDep, manager: UserManagerDep
) -> TotpEnrollment:
    """Start two-factor sign-in: a new secret and its ``otpauth://`` URI for an
    authenticator app. Not active until confirmed with a code (``/users/me/totp/confirm``)."""
    secret, uri = await accounts.enroll_totp(session, manager, user, data.current_password)
    return TotpEnrollment(secret=secret, otpauth_uri=uri)


@router.post(
    "/users/me/totp/confirm",
    tags=["users"],
    name="users:confirm_totp",
    response_model=TotpRecoveryCodes,
    dependencies=[Depends(cookie_csrf)],
)
async def confirm_totp(
    data: TotpCode, user: CurrentUser, session: GlobalSessionDep
) -> TotpRecoveryCodes:
    """Turn two-factor sign-in on with a code from the app; answers the recovery codes,
    shown this once."""
    return TotpRecoveryCodes(recovery_codes=await accounts.confirm_totp(session, user, data.code))


@router.delete(
    "/users/me/totp",
    tags=["users"],
    name="users:disable_totp",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(cookie_csrf)],
)
async def disable_totp(
    data: TotpDisable, user: CurrentUser, session: GlobalSessionDep, manager: UserManagerDep
) -> None:
    """Turn two-factor sign-in off (current password and a code or recovery code)."""
    await accounts.disable_totp(session, manager, user, data.current_password, data.code)


@router.post("/auth/totp", tags=["auth"], name="auth:bearer.totp")
async def totp_login(data: TotpSignIn, session: GlobalSessionDep) -> Response:
    """The code step of a sign-in that answered 401 ``totp-required``: the challenge and a
    TOTP code (or an unused recovery code) return the session token, like ``/auth/login``."""
    user = await accounts.complete_totp_sign_in(session, data.challenge, data.code)
    strategy = get_database_strategy(HashedAccessTokenDatabase(session))
    return await bearer_backend.login(strategy, user)


@router.post(
    "/auth/cookie/totp",
    tags=["auth"],
    name="auth:cookie.totp",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def totp_cookie_login(data: TotpSignIn, session: GlobalSessionDep) -> Response:
    """The code step of ``/auth/cookie/login``: sets the session cookie."""
    user = await accounts.complete_totp_sign_in(session, data.challenge, data.code)
    strategy = get_database_strategy(HashedAccessTokenDatabase(session))
    return await cookie_backend.login(strategy, user)
