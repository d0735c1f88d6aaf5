"""An organization's own retention setting (shorter than its plan's)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Integer
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from hiddenmodel.db import Base
from hiddenmodel.models import created_at_column


class OrgRetention(Base):
    __tablename__ = "org_retention"
    __table_args__ = (CheckConstraint("days > 0", name="ck_org_retention_days"),)

    organization_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    days: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = created_at_column()
