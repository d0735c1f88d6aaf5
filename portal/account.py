"""Account pages: sign in and out, forgotten password, reset, verification, invitations,
and the list of the user's organizations."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi_users import exceptions as fu_exceptions
from starlette.background import BackgroundTask

from hiddenmodel import authguard
from hiddenmodel.authguard import Action
from hiddenmodel.db import async_global_session, async_tenant_session, commit, rollback
from hiddenmodel.errors import Gone, NotFound, Problem
from hiddenmodel.security import keyed_hashes
from portal.security import (
    PREFIX,
    checked_form,
    new_seed,
    set_seed_cookie,
)
from portal.web import (
    OPERATE,
    form_field,
    org_url,
    problem_message,
    render,
    require_user,
    router,
    see_other,
    user_manager,
)
from tenants import accounts, totp
from tenants import repository as tenants_repository
from tenants import service as tenants_service
from tenants.models import Role, User
from tenants.users import (
    COOKIE_NAME,
    HashedAccessTokenDatabase,
    UserManager,
    cookie_backend,
    count_link_request,
    get_database_strategy,
    mail_link,
)


def _safe_next(value: object) -> str:
    """Only a path inside the portal: never an open redirect."""
    text = value if isinstance(value, str) else ""
    if text.startswith(PREFIX + "/") and not text.startswith("//") and "\\" not in text:
        return text
    return PREFIX + "/"


async def _orgs_of(user: User) -> list[Any]:
    async with async_global_session() as session:
        rows = await tenants_repository.user_organizations(session, user.id)
        await commit(session)
    return list(rows)


# --- sign in and out, account pages -----------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str = "") -> HTMLResponse:
    return render(request, "login.html", {"next": _safe_next(next), "email": ""})


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    form = await checked_form(request)
    email, password = form_field(form, "email"), form.get("password")
    next_url = _safe_next(form.get("next"))
    credentials = _Credentials(email, password if isinstance(password, str) else "")
    async with user_manager() as manager:
        try:
            user = await manager.authenticate(credentials)  # type: ignore[arg-type]
        except totp.TotpRequired as exc:
            # The password was right; the code step opens the session.
            return render(
                request,
                "login.html",
                {"next": next_url, "email": email, "challenge": exc.extra["challenge"]},
            )
        if user is None or not user.is_active:
            return render(
                request,
                "login.html",
                {"next": next_url, "email": email, "error": "Wrong e-mail address or password."},
                status_code=400,
            )
        token = await _open_session(request, manager, user)
    return _signed_in(request, next_url, token)


@router.post("/login/totp", response_class=HTMLResponse)
async def login_totp(request: Request) -> Response:
    """The code step of a sign-in with two-factor on (the challenge comes from the
    password step's page)."""
    form = await checked_form(request)
    challenge, code = form_field(form, "challenge"), form_field(form, "code")
    next_url = _safe_next(form.get("next"))
    async with user_manager() as manager:
        try:
            user = await accounts.complete_totp_sign_in(manager.session, challenge, code)
        except totp.InvalidTotpChallenge as exc:
            return render(
                request,
                "login.html",
                {"next": next_url, "email": "", "error": problem_message(exc)},
                status_code=exc.status,
            )
        except totp.InvalidTotpCode as exc:
            return render(
                request,
                "login.html",
                {
                    "next": next_url,
                    "email": "",
                    "challenge": challenge,
                    "error": problem_message(exc),
                },
                status_code=exc.status,
            )
        token = await _open_session(request, manager, user)
    return _signed_in(request, next_url, token)


async def _open_session(request: Request, manager: UserManager, user: User) -> str:
    strategy = get_database_strategy(HashedAccessTokenDatabase(manager.session))
    # Renewal: a session that existed before sign-in ends, and a new one starts.
    old = request.cookies.get(COOKIE_NAME)
    if old:
        previous = await strategy.read_token(old, manager)
        if previous is not None:
            await strategy.destroy_token(old, previous)
    return await strategy.write_token(user)


def _signed_in(request: Request, next_url: str, token: str) -> Response:
    response = see_other(next_url)
    transport = cookie_backend.transport
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=transport.cookie_max_age,  # type: ignore[attr-defined]
        path="/",
        secure=transport.cookie_secure,  # type: ignore[attr-defined]
        httponly=True,
        samesite="lax",
    )
    _rotate_seed(request, response)
    return response


class _Credentials:
    """What ``BaseUserManager.authenticate`` reads from a login form."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password


def _rotate_seed(request: Request, response: Response) -> None:
    request.state.csrf_seed_rotated = True
    set_seed_cookie(response.headers, new_seed())


@router.post("/logout")
async def logout(request: Request) -> Response:
    await checked_form(request)
    token = request.cookies.get(COOKIE_NAME)
    if token:
        async with user_manager() as manager:
            strategy = get_database_strategy(HashedAccessTokenDatabase(manager.session))
            user = await strategy.read_token(token, manager)
            if user is not None:
                await strategy.destroy_token(token, user)
    response = see_other(f"{PREFIX}/login")
    response.delete_cookie(COOKIE_NAME, path="/")
    _rotate_seed(request, response)
    return response


@router.get("/forgot", response_class=HTMLResponse)
async def forgot_page(request: Request) -> HTMLResponse:
    return render(request, "forgot.html", {})


@router.post("/forgot", response_class=HTMLResponse)
async def forgot(request: Request) -> HTMLResponse:
    form = await checked_form(request)
    email = form_field(form, "email")
    await count_link_request(Action.PASSWORD_RESET_REQUEST, email)
    response = render(request, "forgot.html", {"sent": True})
    # After the page is sent: the same answer, at the same speed, whoever has an account.
    response.background = BackgroundTask(mail_link, Action.PASSWORD_RESET_REQUEST, email)
    return response


@router.get("/reset", response_class=HTMLResponse)
async def reset_page(request: Request, token: str = "") -> HTMLResponse:
    return render(request, "reset.html", {"token": token})


@router.post("/reset", response_class=HTMLResponse)
async def reset(request: Request) -> HTMLResponse:
    form = await checked_form(request)
    token, password = form_field(form, "token"), form.get("password")
    error: str | None = None
    async with user_manager() as manager:
        try:
            await manager.reset_password(token, password if isinstance(password, str) else "")
        except (fu_exceptions.InvalidResetPasswordToken, fu_exceptions.UserInactive):
            error = "This reset link is invalid or has expired. Ask for a new one."
        except fu_exceptions.InvalidPasswordException as exc:
            error = str(exc.reason)
    if error:
        return render(request, "reset.html", {"token": token, "error": error}, status_code=400)
    return render(request, "reset.html", {"done": True})


@router.get("/verify", response_class=HTMLResponse)
async def verify_page(request: Request, token: str = "") -> HTMLResponse:
    # Confirmed with a button: a mail scanner following the link verifies nothing.
    return render(request, "verify.html", {"token": token})


@router.post("/verify", response_class=HTMLResponse)
async def verify(request: Request) -> HTMLResponse:
    form = await checked_form(request)
    token = form_field(form, "token")
    async with user_manager() as manager:
        try:
            await manager.verify(token, request)
        except fu_exceptions.UserAlreadyVerified:
            pass
        except (fu_exceptions.InvalidVerifyToken, fu_exceptions.UserNotExists):
            return render(
                request,
                "verify.html",
                {"token": token, "error": "This link is invalid or has expired."},
                status_code=400,
            )
    return render(request, "verify.html", {"done": True})


@router.get("/confirm-email", response_class=HTMLResponse)
async def confirm_email_page(request: Request, token: str = "") -> HTMLResponse:
    # Confirmed with a button, like verification: a mail scanner changes nothing.
    return render(request, "confirm_email.html", {"token": token})


@router.post("/confirm-email", response_class=HTMLResponse)
async def confirm_email(request: Request) -> HTMLResponse:
    form = await checked_form(request)
    token = form_field(form, "token")
    try:
        async with async_global_session() as session:
            try:
                user = await accounts.confirm_email_change(session, token)
                email = user.email
                await commit(session)
            except BaseException:
                await rollback(session)
                raise
    except Problem as exc:
        return render(
            request,
            "confirm_email.html",
            {"token": token, "error": problem_message(exc)},
            status_code=exc.status,
        )
    return render(request, "confirm_email.html", {"done": True, "email": email})


@router.get("/invitations/accept", response_class=HTMLResponse)
async def invitation_page(request: Request, token: str = "") -> HTMLResponse:
    user = await require_user(request)
    return render(
        request,
        "accept.html",
        {"token": token, "user": user, "invitation": await _invitation_for(user, token)},
    )


async def _invitation_for(user: User, token: str) -> dict[str, str] | None:
    """What the invitation offers, when it is one for this user's address."""
    try:
        org_id = tenants_service.invitation_org_id(token)
    except Problem:
        return None
    async with async_tenant_session(org_id) as session:
        invitation = await tenants_repository.get_invitation_by_hash(session, keyed_hashes(token))
        org = await tenants_repository.get_organization(session, org_id)
        found = (
            None
            if invitation is None or org is None or invitation.email.lower() != user.email.lower()
            else {
                "org": org.name,
                "role": invitation.role,
                "status": tenants_service.invitation_status(invitation),
            }
        )
        await rollback(session)  # read only
    return found


@router.post("/invitations/accept", response_class=HTMLResponse)
async def accept_invitation(request: Request) -> Response:
    user = await require_user(request)
    form = await checked_form(request)
    token = form_field(form, "token")
    try:
        async with authguard.guarded(Action.INVITATION, str(user.id), (NotFound, Gone)):
            org_id = tenants_service.invitation_org_id(token)
            async with async_tenant_session(org_id) as session:
                try:
                    await tenants_service.accept_invitation(session, user, token)
                    await commit(session)
                except BaseException:
                    await rollback(session)
                    raise
    except Problem as exc:
        return render(
            request,
            "accept.html",
            {
                "token": token,
                "user": user,
                "invitation": await _invitation_for(user, token),
                "error": problem_message(exc),
            },
            status_code=exc.status,
        )
    return see_other(org_url(org_id))


@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    user = await require_user(request)
    orgs = await _orgs_of(user)
    if len(orgs) == 1 and not user.is_superuser:
        return see_other(_home_of(orgs[0]))
    return render(request, "home.html", {"user": user, "orgs": [(o, _home_of(o)) for o in orgs]})


def _home_of(row: Any) -> str:
    if Role(row.role) in OPERATE.roles:
        return org_url(row.organization_id)
    return org_url(row.organization_id, "billing")


# --- the account page: two-factor sign-in ------------------------------------------------


async def _account_page(
    request: Request, user: User, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    async with async_global_session() as session:
        enabled = await totp.has_totp(session, user.id)
        await commit(session)
    return render(
        request,
        "account.html",
        {"user": user, "totp_enabled": enabled, **extra},
        status_code=status_code,
    )


@router.get("/account", response_class=HTMLResponse)
async def account_page(request: Request) -> Response:
    return await _account_page(request, await require_user(request))


@router.post("/account/totp", response_class=HTMLResponse)
async def account_totp_enroll(request: Request) -> Response:
    """A new secret, shown as its ``otpauth://`` URI (and the secret to type by hand)."""
    user = await require_user(request)
    form = await checked_form(request)
    try:
        async with user_manager() as manager:
            secret, uri = await accounts.enroll_totp(
                manager.session, manager, user, _raw(form.get("current_password"))
            )
    except Problem as exc:
        return await _account_page(request, user, exc.status, error=problem_message(exc))
    return await _account_page(request, user, enrollment={"secret": secret, "uri": uri})


@router.post("/account/totp/confirm", response_class=HTMLResponse)
async def account_totp_confirm(request: Request) -> Response:
    """Turn two-factor on with a code; the recovery codes are shown on this page, once."""
    user = await require_user(request)
    form = await checked_form(request)
    try:
        async with user_manager() as manager:
            codes = await accounts.confirm_totp(manager.session, user, form_field(form, "code"))
    except Problem as exc:
        return await _account_page(request, user, exc.status, error=problem_message(exc))
    return await _account_page(request, user, recovery_codes=codes)


@router.post("/account/totp/disable", response_class=HTMLResponse)
async def account_totp_disable(request: Request) -> Response:
    user = await require_user(request)
    form = await checked_form(request)
    try:
        async with user_manager() as manager:
            await accounts.disable_totp(
                manager.session,
                manager,
                user,
                _raw(form.get("current_password")),
                form_field(form, "code"),
            )
    except Problem as exc:
        return await _account_page(request, user, exc.status, error=problem_message(exc))
    return await _account_page(request, user, notice="Two-factor sign-in is off.")


def _raw(value: object) -> str:
    """A password field as typed (spaces are part of it)."""
    return value if isinstance(value, str) else ""
