"""Imports every module that maps tables, so ``Base.metadata`` knows the whole schema
(checks that must see every org-scoped table start here)."""

from __future__ import annotations

import hiddenmodel.batches.models
import hiddenmodel.billing.models
import hiddenmodel.jobs.models
import hiddenmodel.models
import hiddenmodel.retention.models
import hiddenmodel.usage.models
import hiddenmodel.webhooks.models
import tenants.models

MODEL_MODULES = (
    hiddenmodel.models,
    hiddenmodel.batches.models,
    hiddenmodel.billing.models,
    hiddenmodel.jobs.models,
    hiddenmodel.retention.models,
    hiddenmodel.usage.models,
    hiddenmodel.webhooks.models,
    tenants.models,
)
