"""The fake Stripe as pytest fixtures (registered in tests/conftest.py): the recording server
for the session, and per module the settings that point the SDK and workers at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hiddenmodel.billing import gateway
from hiddenmodel.settings import get_settings
from tests.conftest import db_rows
from tests.stripe_recorder import StripeRecorder

API_KEY = "sk_test_hm_recorder_0123456789"
WEBHOOK_SECRET = "whsec_test_0123456789abcdef"
METER_ID = "mtr_test_gpu_ms"
EVENT_NAME = "hm_gpu_milliseconds"
PRO_PRICE = "price_test_pro_metered"


@pytest.fixture(scope="session")
def stripe_server() -> Iterator[StripeRecorder]:
    # Up for the whole session: workers that inherited its address keep reaching it.
    fake = StripeRecorder(api_key=API_KEY, meters={METER_ID: EVENT_NAME}).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def recorder(stripe_server: StripeRecorder) -> Iterator[StripeRecorder]:
    """The fake Stripe, and the settings that point the SDK at it (workers started from
    now on inherit them)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "HM_STRIPE_API_KEY": API_KEY,
            "HM_STRIPE_API_BASE": stripe_server.url,
            "HM_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "HM_STRIPE_METER_ID": METER_ID,
            "HM_STRIPE_METER_EVENT_NAME": EVENT_NAME,
            "HM_STRIPE_MAX_NETWORK_RETRIES": "2",
            "HM_STRIPE_TIMEOUT_SECONDS": "5",
        }.items():
            mp.setenv(name, value)
        get_settings.cache_clear()
        gateway.stripe_client.cache_clear()
        db_rows("UPDATE plans SET stripe_price_id = :p WHERE code = 'pro'", p=PRO_PRICE)
        yield stripe_server
    get_settings.cache_clear()
    gateway.stripe_client.cache_clear()
