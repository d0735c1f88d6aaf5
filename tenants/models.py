"""Identity and access tables. Every table with ``organization_id`` is under RLS."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastapi_users_db_sqlalchemy import SQLAlchemyBaseUserTableUUID
from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from hiddenmodel.db import Base
from hiddenmodel.models import created_at_column, org_id_column, uuid_pk


class Role(enum.StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    BILLING = "billing"


class Scope(enum.StrEnum):
    JOBS_WRITE = "jobs:write"
    JOBS_READ = "jobs:read"
    USAGE_READ = "usage:read"
    ADMIN = "admin"


class User(SQLAlchemyBaseUserTableUUID, Base):
    """A person. Platform operators are superusers."""

    __tablename__ = "users"

    # The app role may not read it (column privileges): never loaded with the row. Sign-in
    # reads it as hm_auth (tenants.users.password_hash_of).
    if TYPE_CHECKING:  # as fastapi-users declares it, for its UserProtocol
        hashed_password: str
    else:
        hashed_password: Mapped[str] = mapped_column(
            String(length=1024), nullable=False, deferred=True, deferred_raiseload=True
        )

    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = created_at_column()


class Organization(Base):
    """A tenant. Its row is visible only inside its own context (policy on ``id``)."""

    __tablename__ = "organizations"

    id: Mapped[uuid.UUID] = uuid_pk()
    slug: Mapped[str] = mapped_column(String(63), nullable=False, unique=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = created_at_column()
    # Set by a platform operator: members and API keys are refused, queued jobs wait.
    suspended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set by an owner: members who sign in with a session must have two-factor sign-in on.
    require_two_factor: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default="false"
    )


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (
        UniqueConstraint("organization_id", "user_id", name="uq_memberships_org_user"),
        Index("ix_memberships_org_created", "organization_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    role: Mapped[str] = mapped_column(String(20), nullable=False)
    created_at: Mapped[datetime] = created_at_column()


class Invitation(Base):
    __tablename__ = "invitations"
    __table_args__ = (
        UniqueConstraint("organization_id", "token_hash", name="uq_invitations_org_token"),
        Index("ix_invitations_org_created", "organization_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    email: Mapped[str] = mapped_column(String(320), nullable=False)
    role: Mapped[str] = mapped_column(String(20), nullable=False)
    # Unreadable to the app role: found through hm_invitation_by_token, never loaded.
    token_hash: Mapped[str] = mapped_column(
        String(64), nullable=False, deferred=True, deferred_raiseload=True
    )
    invited_by_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    accepted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    accepted_by_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("organization_id", "key_hash", name="uq_api_keys_org_hash"),
        Index("ix_api_keys_org_created", "organization_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    # The first characters of the token, shown in listings so a person can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(32), nullable=False)
    # Unreadable to the app role: found through hm_api_key_for_request, never loaded.
    key_hash: Mapped[str] = mapped_column(
        String(64), nullable=False, deferred=True, deferred_raiseload=True
    )
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(32)), nullable=False)
    created_by_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()


class AuditEvent(Base):
    """Who changed what in an organization (memberships, roles, keys, invitations)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_org_created", "organization_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    actor_user_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    actor_api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target_type: Mapped[str] = mapped_column(String(32), nullable=False)
    target_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = created_at_column()


class AccessToken(Base):
    """A login session (bearer or cookie); only the keyed hash of the token is stored.

    The app role may write rows but not read ``token_hash``: lookups and sign-out go through
    ``hm_access_token_user`` and ``hm_access_token_delete``."""

    __tablename__ = "access_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    created_at: Mapped[datetime] = created_at_column()


class EmailChange(Base):
    """A requested change of a user's e-mail address, waiting for its confirmation link.

    Belongs to no organization. Only the keyed hash of the link's token is stored; confirming
    sets ``confirmed_at`` by compare-and-set, so a link works once.
    """

    __tablename__ = "email_changes"
    __table_args__ = (
        UniqueConstraint("token_hash", name="uq_email_changes_token_hash"),
        Index("ix_email_changes_user_id", "user_id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    new_email: Mapped[str] = mapped_column(String(320), nullable=False)
    # Written, never read back by the app (hm_email_change_by_token finds a change by it).
    token_hash: Mapped[str] = mapped_column(
        String(64), nullable=False, deferred=True, deferred_raiseload=True
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()


class UserTotp(Base):
    """A person's TOTP authenticator: active once ``confirmed_at`` is set.

    The app role may write the sealed secret but not read it (column privileges): never
    loaded with the row; sign-in reads it as hm_auth (``tenants.totp``).
    """

    __tablename__ = "user_totp"

    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    secret_ciphertext: Mapped[bytes] = mapped_column(
        LargeBinary, nullable=False, deferred=True, deferred_raiseload=True
    )
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = created_at_column()


class TotpRecoveryCode(Base):
    """A one-time code that stands in for a TOTP code; stored by keyed hash only."""

    __tablename__ = "totp_recovery_codes"
    __table_args__ = (
        UniqueConstraint("user_id", "code_hash", name="uq_totp_recovery_codes_user_hash"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    code_hash: Mapped[str] = mapped_column(
        String(64), nullable=False, deferred=True, deferred_raiseload=True
    )
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()
