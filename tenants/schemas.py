"""Request and response bodies of the identity and access API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from fastapi_users import schemas as fu_schemas
from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator

from hiddenmodel.inputs import Name, RequestModel, Slug
from tenants.models import Role, Scope

SLUG_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])$"


class UserRead(fu_schemas.BaseUser[uuid.UUID]):
    name: str | None = None


class UserCreate(RequestModel, fu_schemas.BaseUserCreate):
    name: Name | None = Field(default=None, max_length=200)


class UserUpdate(RequestModel, fu_schemas.BaseUserUpdate):
    name: Name | None = Field(default=None, max_length=200)


class AccountUpdate(RequestModel):
    """A change of the caller's own account. A new ``email`` or ``password`` needs
    ``current_password``; the e-mail address changes once the link mailed to it is used."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"password": "A-new-strong-password-9", "current_password": "…"}]
        },
    )

    name: Name | None = Field(default=None, max_length=200)
    email: EmailStr | None = Field(
        default=None, description="Takes effect when the link mailed to it is used."
    )
    password: str | None = Field(default=None, max_length=256)
    current_password: str | None = Field(default=None, max_length=256)

    @field_validator("email", "password", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Leaving a field out keeps it; null would mean "no e-mail address / no password".
        if value is None:
            raise ValueError("may be left out, but not null")
        return value


class EmailChangeConfirm(RequestModel):
    token: str = Field(min_length=1, max_length=200)


class SignInLockRead(BaseModel):
    user_id: uuid.UUID
    email: str
    action: str = Field(
        description="What was guessed: sign_in, password_reset_request, invitation."
    )
    failures: int
    locked_until: datetime


class OrganizationCreate(RequestModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"slug": "acme-studio", "name": "Acme Studio"}]}
    )

    slug: Slug = Field(
        pattern=SLUG_PATTERN,
        description="Lowercase letters, digits and dashes; a few names of the platform's own "
        "pages (`admin`, `api`, `portal`, `www`, ...) are reserved.",
    )
    name: Name = Field(min_length=1, max_length=200)


class OrganizationUpdate(RequestModel):
    name: Name | None = Field(default=None, min_length=1, max_length=200)
    require_two_factor: bool | None = Field(
        default=None,
        description=(
            "Owners only: members signing in with a session must have two-factor sign-in on "
            "to act in this organization (API keys are not affected)."
        ),
    )


class OrganizationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    slug: str
    name: str
    created_at: datetime
    require_two_factor: bool = False


class MyOrganization(BaseModel):
    id: uuid.UUID
    slug: str
    name: str
    role: Role


class MembershipRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    user_id: uuid.UUID
    email: str | None = Field(
        description="Shown to owners and admins, and to API keys with the admin scope."
    )
    name: str | None
    role: Role
    created_at: datetime
    two_factor: bool | None = Field(
        default=None,
        description="Whether the member signs in with two-factor; shown to owners and admins.",
    )


class MembershipUpdate(RequestModel):
    role: Role


class InvitationCreate(RequestModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"email": "ana@example.com", "role": "member"}]}
    )

    email: EmailStr
    role: Role = Role.MEMBER


class InvitationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    role: Role
    expires_at: datetime
    accepted_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    status: Literal["pending", "accepted", "revoked", "expired"]


class InvitationCreated(InvitationRead):
    token: str = Field(description="Shown once; also sent to the invitee by e-mail.")


class InvitationAccept(RequestModel):
    token: str = Field(min_length=1, max_length=200)


class ApiKeyCreate(RequestModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "catalog sync", "scopes": ["jobs:write", "jobs:read"]}]
        }
    )

    name: Name = Field(min_length=1, max_length=100)
    scopes: list[Scope] = Field(min_length=1)
    expires_at: datetime | None = None

    @field_validator("scopes")
    @classmethod
    def _unique(cls, scopes: list[Scope]) -> list[Scope]:
        return sorted(set(scopes))

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("expires_at must carry a time zone")
        return value


class ApiKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[Scope]
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The secret. Shown once: store it now.")


class AuditEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    actor_user_id: uuid.UUID | None
    actor_api_key_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str | None
    data: dict[str, object]
    created_at: datetime


class MeRead(BaseModel):
    kind: Literal["user", "api_key"]
    user: UserRead | None = None
    organizations: list[MyOrganization] = []
    api_key: ApiKeyRead | None = None
    organization: OrganizationRead | None = None


class TotpPassword(RequestModel):
    current_password: str = Field(max_length=256)


class TotpEnrollment(BaseModel):
    """A new authenticator secret: add it to an app (the URI as a QR code or text), then
    confirm with a code. It is not active until confirmed."""

    secret: str
    otpauth_uri: str


class TotpCode(RequestModel):
    code: str = Field(min_length=1, max_length=32, description="A 6-digit code")


class TotpRecoveryCodes(BaseModel):
    """Shown once: each code signs in once in place of a TOTP code."""

    recovery_codes: list[str]


class TotpDisable(RequestModel):
    current_password: str = Field(max_length=256)
    code: str = Field(
        min_length=1, max_length=32, description="A TOTP code or an unused recovery code"
    )


class TotpSignIn(RequestModel):
    challenge: str = Field(min_length=1, max_length=2048)
    code: str = Field(
        min_length=1, max_length=32, description="A TOTP code or an unused recovery code"
    )
