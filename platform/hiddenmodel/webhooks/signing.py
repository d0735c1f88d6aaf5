"""Webhook secrets: generated, encrypted at rest, and used for Standard Webhooks signatures.

A secret reads ``whsec_<base64 of 32 random bytes>``; the HMAC key is the decoded bytes. A
message is signed as ``HMAC-SHA256(key, f"{webhook_id}.{webhook_timestamp}.{body}")`` and sent
as ``webhook-signature: v1,<base64>`` — one entry per active secret, space-separated, so a
receiver keeps verifying while it swaps secrets during a rotation.

At rest a secret is sealed with AES-256-GCM under a key derived from ``HM_SECRET_KEY`` by
HKDF, with the organization and endpoint ids as associated data: a ciphertext copied to
another row or tenant does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hiddenmodel.security import server_keys
from hiddenmodel.settings import get_settings

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
SECRET_BYTES = 32
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 5 * 60

# A version byte before the nonce leaves room to change the sealing key or scheme later.
_SEAL_VERSION = b"\x01"
_NONCE_BYTES = 12
_HKDF_INFO = b"hiddenmodel/webhook-endpoint-secrets/v1"


class InvalidSignature(ValueError):
    """The message is not signed by any of the given secrets, or its timestamp is stale."""


class SecretUnreadable(RuntimeError):
    """A stored secret does not decrypt: a changed HM_SECRET_KEY or a tampered row."""


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (a bare base64 secret is accepted too)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not a webhook secret") from exc


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``body`` as sent with ``message_id`` and ``timestamp``."""
    content = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signature_header(
    active_secrets: Iterable[str], message_id: str, timestamp: int, body: bytes
) -> str:
    return " ".join(sign(s, message_id, timestamp, body) for s in active_secrets)


def webhook_headers(
    active_secrets: Iterable[str], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(active_secrets, message_id, timestamp, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Check a received message as a receiver would; raises :class:`InvalidSignature`.

    Any one matching ``v1`` signature suffices; a timestamp outside the tolerance is refused
    so a captured message cannot be replayed later.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("webhook-id")
    raw_timestamp = lowered.get("webhook-timestamp")
    header = lowered.get("webhook-signature")
    if not message_id or not raw_timestamp or not header:
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(raw_timestamp)
    except ValueError as exc:
        raise InvalidSignature("webhook-timestamp is not an integer") from exc
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise InvalidSignature("webhook-timestamp is outside the tolerance")
    expected = sign(secret, message_id, timestamp, body)
    for candidate in header.split():
        if hmac.compare_digest(candidate.encode(), expected.encode()):
            return
    raise InvalidSignature("no signature matches")


@lru_cache(maxsize=4)
def _sealing_key(server_secret: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
    return hkdf.derive(server_secret.encode())


def _aead() -> AESGCM:
    return AESGCM(_sealing_key(get_settings().secret_key.get_secret_value()))


def _opening_aeads() -> list[AESGCM]:
    """One per server key that verifies: a secret sealed before a key rotation still opens."""
    return [AESGCM(_sealing_key(key)) for key in server_keys()]


def _associated_data(org_id: uuid.UUID, endpoint_id: uuid.UUID) -> bytes:
    return b"webhook-endpoint:" + org_id.bytes + endpoint_id.bytes


def encrypt_secret(secret: str, *, org_id: uuid.UUID, endpoint_id: uuid.UUID) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    sealed = _aead().encrypt(nonce, secret.encode(), _associated_data(org_id, endpoint_id))
    return _SEAL_VERSION + nonce + sealed


def decrypt_secret(blob: bytes, *, org_id: uuid.UUID, endpoint_id: uuid.UUID) -> str:
    if blob[:1] != _SEAL_VERSION:
        raise SecretUnreadable("unknown secret sealing version")
    nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
    for aead in _opening_aeads():
        try:
            plain = aead.decrypt(nonce, sealed, _associated_data(org_id, endpoint_id))
        except InvalidTag:
            continue
        return plain.decode()
    raise SecretUnreadable("the secret does not decrypt with this server key")
