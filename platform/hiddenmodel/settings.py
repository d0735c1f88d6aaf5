"""All configuration, read once from the environment (prefix ``HM_``)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import make_url

# Development only: production refuses to start with it (see hiddenmodel.api.app).
DEV_SECRET_KEY = "hm-dev-secret-key-change-me-in-production-0123456789"  # noqa: S105


class Settings(BaseSettings):
    """Every setting has an embedded default that works on a developer machine."""

    model_config = SettingsConfigDict(env_prefix="HM_", env_file=None, extra="ignore")

    # "production" turns the development conveniences into refusals at startup (see
    # _production_refuses_development_switches); "development" turns some of them on.
    environment: str = "development"
    # "json": one JSON object per log line with the request, organization and job ids
    # (hiddenmodel.logs), for a log pipeline; "text": the human format.
    log_format: Literal["text", "json"] = "text"

    # Databases: the app role (RLS applies), the schema owner (migrations), the ops role
    # (cross-tenant, audited) and an admin that may create roles and databases (bootstrap only).
    database_url: str = "postgresql+psycopg://hm_app:hm_app@127.0.0.1:5432/hiddenmodel"
    # The worker processes' role (the app's rights and the cross-tenant sweeps) and the role
    # that reads password hashes for sign-in only. Unset: ``database_url`` with the role's
    # name in place of ``hm_app`` (same password, host and database).
    database_worker_url: str = ""
    database_auth_url: str = ""
    database_owner_url: str = "postgresql+psycopg://hm_owner:hm_owner@127.0.0.1:5432/hiddenmodel"
    database_ops_url: str = "postgresql+psycopg://hm_ops:hm_ops@127.0.0.1:5432/hiddenmodel"
    database_admin_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    database_pool_size: int = 10
    database_max_overflow: int = 10

    redis_url: str = "redis://127.0.0.1:6379/0"

    s3_endpoint_url: str | None = None
    s3_bucket: str = "hiddenmodel"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = "hiddenmodel"
    s3_secret_access_key: SecretStr = SecretStr("hiddenmodel")
    presigned_url_ttl_seconds: int = 300

    model_dir: Path | None = None
    # Dynamic batching of GPU inpainting: up to this many compatible requests, gathered for
    # at most this long after the first arrives.
    gpu_batch_max_size: int = Field(default=4, ge=1, le=64)
    gpu_batch_window_ms: float = Field(default=50.0, ge=0)
    # A GPU worker that has not loaded its models within this exits instead of reporting ready.
    gpu_model_load_timeout_seconds: float = Field(default=600.0, gt=0)
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    # The key in use before the last rotation: still accepted to verify what it signed
    # (token hashes, sealed webhook secrets, portal CSRF tokens); never used to sign.
    secret_key_previous: SecretStr | None = None
    data_dir: Path = Path("var")

    stripe_api_key: SecretStr | None = None
    stripe_api_base: str | None = None
    stripe_webhook_secret: SecretStr | None = None
    # Usage is sent to the meter named here in whole GPU-milliseconds; the meter's id is
    # what the daily reconciliation reads back.
    stripe_meter_event_name: str = "hm_gpu_milliseconds"
    stripe_meter_id: str | None = None
    stripe_timeout_seconds: float = 20.0
    # The SDK's own retries (connection errors, 409, 5xx), each with the same idempotency key.
    stripe_max_network_retries: int = Field(default=2, ge=0)
    stripe_push_batch_size: int = Field(default=200, ge=1)
    stripe_push_interval_seconds: float = 30.0
    stripe_push_backoff_base_seconds: float = 60.0
    stripe_push_backoff_cap_seconds: float = 6 * 3600.0
    billing_reconcile_interval_seconds: float = 6 * 3600.0

    public_base_url: str = "http://127.0.0.1:8000"
    jwt_lifetime_seconds: int = 3600
    reset_token_lifetime_seconds: int = 3600
    verify_token_lifetime_seconds: int = 86400
    invitation_ttl_hours: int = 72
    # A requested e-mail change waits this long for its confirmation link.
    email_change_token_lifetime_seconds: int = Field(default=86400, ge=60)

    # Proxies (addresses or CIDR networks, comma-separated) whose X-Forwarded-For is believed:
    # the client address is then the last one in that header added by no trusted proxy.
    # Empty: the peer address is the client address, X-Forwarded-For is ignored.
    trusted_proxies: str = ""
    # Requests per minute of one signed-in user (login token or cookie), and of one client
    # address for requests with no credentials or with credentials that fail (API keys have
    # their plan's limits). 0: no limit.
    user_requests_per_minute: int = Field(default=600, ge=0)
    address_requests_per_minute: int = Field(default=120, ge=0)
    # Guessing control on sign-in, password reset, verification, invitations and failed
    # credentials: after this many failures in a row a subject (an account or a client
    # address) waits base * 2^n seconds between attempts, and after the lock count it is
    # locked for the lock time. Failures are forgotten after the window without attempts.
    auth_free_attempts: int = Field(default=5, ge=1)
    auth_lock_after: int = Field(default=10, ge=1)
    auth_address_free_attempts: int = Field(default=20, ge=1)
    auth_address_lock_after: int = Field(default=50, ge=1)
    auth_backoff_base_seconds: float = Field(default=1.0, gt=0)
    auth_lock_seconds: int = Field(default=900, ge=1)
    auth_failure_window_seconds: int = Field(default=3600, ge=1)
    # last_used_at of an API key is written at most once per this many seconds.
    api_key_last_used_resolution_seconds: int = 60
    password_min_length: int = 10
    # argon2 cost: production default; tests lower it to keep thousands of hashes cheap.
    password_hash_time_cost: int = Field(default=3, ge=1)
    password_hash_memory_kib: int = Field(default=65536, ge=8)
    # "database": record mail in email_messages (development, tests); "smtp": send it through
    # the relay below, by way of the mail_outbox table (retried until the relay takes it).
    mail_sender: Literal["database", "smtp"] = "database"
    smtp_host: str = "localhost"
    smtp_port: int = 587
    # starttls: plain connection upgraded by STARTTLS (port 587); tls: implicit TLS from the
    # first byte (port 465); none: no encryption (a relay on the same host only).
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "Hidden Model <no-reply@hiddenmodel.dev>"
    # A CA bundle for a relay with a private certificate; the system's CAs otherwise.
    smtp_ca_file: Path | None = None
    smtp_timeout_seconds: float = 10.0
    smtp_max_attempts: int = Field(default=10, ge=1)
    smtp_retry_base_seconds: float = Field(default=30.0, ge=0)
    smtp_retry_cap_seconds: float = Field(default=3600.0, ge=0)
    # How often the dispatcher sends the outbox sweep (mail.deliver_outbox).
    smtp_sweep_interval_seconds: float = 30.0
    cookie_secure: bool = False

    # Uploads (DESIGN §5).
    max_upload_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_side: int = 6000

    # Batches: items per batch; one request adding items (many files or one ZIP); a ZIP's
    # entries, unpacked total and per-member unpacked/compressed ratio.
    batch_max_items: int = Field(default=5000, ge=1)
    batch_max_upload_bytes: int = 2 * 1024 * 1024 * 1024
    zip_max_entries: int = Field(default=10_000, ge=1)
    zip_max_total_bytes: int = 4 * 1024 * 1024 * 1024
    zip_max_ratio: float = Field(default=200.0, gt=1)

    # Jobs: dispatch, leases and limits.
    idempotency_ttl_hours: int = 24
    dispatch_org_inflight_cap: int = Field(default=4, ge=1)
    dispatch_batch_size: int = 200
    dispatch_poll_seconds: float = 0.5
    reconcile_interval_seconds: float = 5.0
    # Inputs stored by a submit that never committed (the API died between the S3 put and
    # the commit): looked for this often, and deleted once this old.
    orphan_sweep_interval_seconds: float = 900.0
    orphan_grace_seconds: float = 3600.0
    # How often the retention sweep deletes objects past their organization's retention and
    # brings the bucket's lifecycle rules in step (hiddenmodel.retention).
    retention_sweep_interval_seconds: float = 3600.0
    # A running job whose heartbeat is older than this is presumed lost with its worker.
    job_lease_seconds: float = 60.0
    # A dispatched job whose message is in no queue after this long is dispatched again.
    redispatch_grace_seconds: float = 10.0
    job_max_attempts: int = 3
    # Every worker process announces itself this often; one silent for the TTL is gone, and
    # the jobs it received or holds go back to the queue (checked this often).
    worker_heartbeat_seconds: float = Field(default=1.0, gt=0)
    worker_liveness_ttl_seconds: float = Field(default=3.0, gt=0)
    worker_liveness_check_seconds: float = Field(default=1.0, gt=0)
    # How long a client is asked to wait (Retry-After) when the database or Redis is down.
    dependency_retry_after_seconds: int = Field(default=5, ge=1)
    cpu_hard_limit_seconds: float = 120.0
    gpu_hard_limit_seconds: float = 900.0
    # Longer than the longest hard limit, so a slow job is never delivered twice.
    celery_visibility_timeout_seconds: int = 3600
    prefer_wait_max_seconds: int = 60
    progress_db_interval_seconds: float = 0.5

    # Billing.
    billing_past_due_grace_days: float = 7.0

    # Webhooks.
    # Plain http and loopback or private addresses as webhook targets, for a receiver on the
    # developer's own machine (`hiddenmodel webhook-listen`). Unset: on in development only.
    webhook_allow_private_urls: bool = False
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_seconds: float = 5.0
    webhook_backoff_cap_seconds: float = 3600.0
    webhook_secret_rotation_overlap_hours: int = 24

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)  # ValueError names the part
        return value

    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [
            ipaddress.ip_network(p.strip(), strict=False)
            for p in self.trusted_proxies.split(",")
            if p.strip()
        ]

    @model_validator(mode="after")
    def _development_defaults(self) -> Settings:
        if "webhook_allow_private_urls" not in self.model_fields_set:
            self.webhook_allow_private_urls = self.environment == "development"
        if not self.database_worker_url:
            self.database_worker_url = _as_role(self.database_url, "hm_worker")
        if not self.database_auth_url:
            self.database_auth_url = _as_role(self.database_url, "hm_auth")
        return self

    @model_validator(mode="after")
    def _production_refuses_development_switches(self) -> Settings:
        """Switches meant for a developer's machine stop a production process at startup
        instead of quietly weakening it (every process reads its settings first)."""
        if not self.is_production:
            return self
        if self.secret_key.get_secret_value() == DEV_SECRET_KEY:
            raise ValueError(
                "HM_SECRET_KEY must be set in production (the development key is public)"
            )
        if self.webhook_allow_private_urls:
            raise ValueError(
                "HM_WEBHOOK_ALLOW_PRIVATE_URLS is for development only: in production it would "
                "let webhooks reach private and loopback addresses"
            )
        return self


def _as_role(url: str, role: str) -> str:
    """``url`` logging in as ``role`` instead (its password kept)."""
    return make_url(url).set(username=role).render_as_string(hide_password=False)


@lru_cache
def get_settings() -> Settings:
    return Settings()
