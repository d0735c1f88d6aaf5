"""Secrets handed to clients: prefixed, checksummed, org-bound, stored only as keyed hashes.

A token reads ``<prefix>_<org>_<secret><check>``:

* ``prefix`` names the kind (``hmk`` API key, ``hmi`` invitation) so a leaked token is
  recognisable by secret scanners;
* ``org`` is the organization id in base32, so the lookup runs inside that tenant's RLS
  context and needs no cross-tenant read;
* ``check`` is a CRC32 of everything before it, so a mistyped token is refused without a
  database round trip.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
import uuid
import zlib
from dataclasses import dataclass

from hiddenmodel.settings import get_settings

_ALPHABET = string.digits + string.ascii_letters
_SECRET_LEN = 32
_CHECK_LEN = 6


class InvalidToken(ValueError):
    pass


@dataclass(frozen=True)
class ParsedToken:
    prefix: str
    org_id: uuid.UUID
    token: str


def server_keys() -> list[str]:
    """The server secrets that verify, the signing one first: ``HM_SECRET_KEY``, then
    ``HM_SECRET_KEY_PREVIOUS`` while a rotation is under way (docs/SECURITY.md)."""
    settings = get_settings()
    keys = [settings.secret_key.get_secret_value()]
    if settings.secret_key_previous is not None:
        keys.append(settings.secret_key_previous.get_secret_value())
    return keys


def _hmac(key: str, value: str) -> str:
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()


def keyed_hash(value: str) -> str:
    """HMAC-SHA256 under the server secret: a stolen table yields no usable tokens."""
    return _hmac(server_keys()[0], value)


def keyed_hashes(value: str) -> list[str]:
    """``value``'s hash under each key that verifies, for lookups: a token stored before a
    rotation is still found."""
    return [_hmac(key, value) for key in server_keys()]


def _base62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def _org_part(org_id: uuid.UUID) -> str:
    return base64.b32encode(org_id.bytes).decode().rstrip("=").lower()


def generate_token(prefix: str, org_id: uuid.UUID) -> str:
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(_SECRET_LEN))
    body = f"{prefix}_{_org_part(org_id)}_{secret}"
    return body + _checksum(body)


def parse_token(token: str, prefix: str) -> ParsedToken:
    parts = token.split("_")
    if len(parts) != 3 or parts[0] != prefix:
        raise InvalidToken("not a token of this kind")
    org_part, tail = parts[1], parts[2]
    if len(org_part) != 26 or len(tail) != _SECRET_LEN + _CHECK_LEN:
        raise InvalidToken("malformed token")
    body = token[:-_CHECK_LEN]
    if not hmac.compare_digest(_checksum(body), token[-_CHECK_LEN:]):
        raise InvalidToken("checksum mismatch")
    try:
        org_id = uuid.UUID(bytes=base64.b32decode(org_part.upper() + "======"))
    except (ValueError, TypeError) as exc:
        raise InvalidToken("malformed organization part") from exc
    return ParsedToken(prefix=prefix, org_id=org_id, token=token)


def display_prefix(token: str) -> str:
    """What listings show of a token: enough to tell keys apart, useless to an attacker."""
    prefix, org_part, tail = token.split("_")
    return f"{prefix}_{org_part[:6]}…{tail[:4]}"
