"""Secrets the server must read back later (not just compare), sealed at rest.

AES-GCM under a key derived (HKDF-SHA256) from ``HM_SECRET_KEY`` with a purpose label, the
same scheme as webhook endpoint secrets (:mod:`hiddenmodel.webhooks.signing`). The
associated data ties a sealed value to the row it belongs to, so a copied blob does not
open elsewhere. A value sealed before a key rotation still opens while the previous key is
configured (``HM_SECRET_KEY_PREVIOUS``).
"""

from __future__ import annotations

import os
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hiddenmodel.security import server_keys
from hiddenmodel.settings import get_settings

_SEAL_VERSION = b"\x01"
_NONCE_BYTES = 12


class SealedValueUnreadable(Exception):
    """No configured server key opens the value (rotated away, or tampered with)."""


@lru_cache(maxsize=16)
def _key(server_secret: str, purpose: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose)
    return hkdf.derive(server_secret.encode())


def seal(plain: bytes, *, purpose: bytes, associated: bytes) -> bytes:
    """Seal ``plain`` with the current server key."""
    nonce = os.urandom(_NONCE_BYTES)
    aead = AESGCM(_key(get_settings().secret_key.get_secret_value(), purpose))
    return _SEAL_VERSION + nonce + aead.encrypt(nonce, plain, associated)


def unseal(blob: bytes, *, purpose: bytes, associated: bytes) -> bytes:
    """Open a value sealed by :func:`seal` with the current or the previous server key."""
    return open_sealed(blob, purpose=purpose, associated=associated)[0]


def open_sealed(blob: bytes, *, purpose: bytes, associated: bytes) -> tuple[bytes, bool]:
    """:func:`unseal`, and whether the current key sealed it (False: seal it again while the
    previous key still opens it)."""
    if blob[:1] != _SEAL_VERSION:
        raise SealedValueUnreadable("unknown sealing version")
    nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
    for index, server_secret in enumerate(server_keys()):
        try:
            plain = AESGCM(_key(server_secret, purpose)).decrypt(nonce, sealed, associated)
        except InvalidTag:
            continue
        return plain, index == 0
    raise SealedValueUnreadable("the value does not open with a configured server key")
