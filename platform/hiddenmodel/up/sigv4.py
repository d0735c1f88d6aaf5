"""AWS Signature Version 4 checks for the embedded S3 server (:mod:`hiddenmodel.up.s3server`).

Both forms S3 takes: the ``Authorization`` header (``AWS4-HMAC-SHA256 Credential=…,
SignedHeaders=…, Signature=…``) and a presigned URL's query (``X-Amz-Signature`` and friends).
The canonical request is rebuilt from the request exactly as it arrived: the path as sent
(S3 does not normalise it), the query pairs sorted after re-encoding each name and value the
way SigV4 encodes them, and the signed headers' values with their whitespace folded.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_SKEW = timedelta(minutes=15)
MAX_PRESIGNED_EXPIRES = 7 * 24 * 3600


class AuthError(Exception):
    """A request S3 would refuse with 403 and this error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class Verified:
    """A request whose signature checked out; ``payload_hash`` is what the signature covers
    (a hex SHA-256 of the body, ``UNSIGNED-PAYLOAD``, or a streaming marker)."""

    presigned: bool
    region: str  # the region of the credential scope the request was signed for
    payload_hash: str


def query_pairs(raw_query: str) -> list[tuple[str, str]]:
    """The query's name/value pairs, decoded (``+`` stays a plus, as S3 reads it)."""
    pairs = []
    for part in raw_query.split("&") if raw_query else []:
        name, _, value = part.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def _encode(value: str) -> str:
    return quote(value, safe="-_.~")


def canonical_query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v}" for k, v in sorted((_encode(k), _encode(v)) for k, v in pairs))


@lru_cache(maxsize=16)
def signing_key(secret_key: str, day: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _parse_date(value: str) -> datetime:
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise AuthError("AccessDenied", f"X-Amz-Date {value!r} is not a date.") from None


def _check_scope(credential: str, creds: Credentials, amz_date: str) -> tuple[str, str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise AuthError("AuthorizationQueryParametersError", "Malformed credential scope.")
    access_key, day, region, service, _ = parts
    if not hmac.compare_digest(access_key.encode(), creds.access_key.encode()):
        raise AuthError(
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
        )
    if service != "s3" or day != amz_date[:8]:
        raise AuthError("SignatureDoesNotMatch", "The credential scope does not match the date.")
    return access_key, day, region, service


def _check_signature(
    creds: Credentials,
    amz_date: str,
    scope: tuple[str, str, str, str],
    canonical_request: str,
    signature: str,
) -> None:
    expected = _signature(creds, amz_date, scope, canonical_request)
    # As bytes: compare_digest refuses str with characters beyond ASCII.
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise AuthError(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )


def _signature(
    creds: Credentials,
    amz_date: str,
    scope: tuple[str, str, str, str],
    canonical_request: str,
) -> str:
    _, day, region, service = scope
    to_sign = (
        f"{ALGORITHM}\n{amz_date}\n{day}/{region}/{service}/aws4_request\n"
        f"{hashlib.sha256(canonical_request.encode()).hexdigest()}"
    )
    key = signing_key(creds.secret_key, day, region, service)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def _canonical_request(
    method: str,
    raw_path: str,
    pairs: list[tuple[str, str]],
    headers: Mapping[str, str],
    signed_headers: str,
    payload_hash: str,
) -> str:
    names = signed_headers.split(";")
    if "host" not in names:
        raise AuthError("AccessDenied", "The host header must be signed.")
    lines = []
    for name in names:
        value = headers.get(name)
        if value is None:
            raise AuthError("AccessDenied", f"The signed header {name!r} is missing.")
        lines.append(f"{name}:{' '.join(value.split())}\n")
    return "\n".join(
        [method, raw_path, canonical_query(pairs), "".join(lines), signed_headers, payload_hash]
    )


def verify(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    creds: Credentials,
    now: datetime | None = None,
) -> Verified:
    """Check a request's signature; ``headers`` are keyed by lower-case name."""
    now = now or datetime.now(UTC)
    pairs = query_pairs(raw_query)
    query = dict(pairs)
    authorization = headers.get("authorization")
    if authorization is None and "X-Amz-Signature" in query:
        return _verify_presigned(method, raw_path, pairs, query, headers, creds, now)
    if authorization is None:
        raise AuthError("AccessDenied", "Anonymous requests are not accepted.")
    algorithm, _, fields = authorization.partition(" ")
    if algorithm != ALGORITHM:
        raise AuthError("InvalidRequest", f"Only {ALGORITHM} is supported.")
    parsed = {}
    for field in fields.split(","):
        name, _, value = field.strip().partition("=")
        parsed[name] = value
    try:
        credential, signed_headers, signature = (
            parsed["Credential"],
            parsed["SignedHeaders"],
            parsed["Signature"],
        )
    except KeyError:
        raise AuthError(
            "AuthorizationHeaderMalformed", "The authorization header is malformed."
        ) from None
    amz_date = headers.get("x-amz-date", "")
    when = _parse_date(amz_date)
    if abs(now - when) > MAX_SKEW:
        raise AuthError(
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        )
    scope = _check_scope(credential, creds, amz_date)
    payload_hash = headers.get("x-amz-content-sha256")
    if payload_hash is None:
        raise AuthError("InvalidRequest", "Missing required header x-amz-content-sha256.")
    canonical = _canonical_request(method, raw_path, pairs, headers, signed_headers, payload_hash)
    _check_signature(creds, amz_date, scope, canonical, signature)
    return Verified(presigned=False, region=scope[2], payload_hash=payload_hash)


def _verify_presigned(
    method: str,
    raw_path: str,
    pairs: list[tuple[str, str]],
    query: dict[str, str],
    headers: Mapping[str, str],
    creds: Credentials,
    now: datetime,
) -> Verified:
    try:
        algorithm = query["X-Amz-Algorithm"]
        credential = query["X-Amz-Credential"]
        amz_date = query["X-Amz-Date"]
        expires = int(query["X-Amz-Expires"])
        signed_headers = query["X-Amz-SignedHeaders"]
        signature = query["X-Amz-Signature"]
    except (KeyError, ValueError):
        raise AuthError(
            "AuthorizationQueryParametersError", "The presigned URL is missing a parameter."
        ) from None
    if algorithm != ALGORITHM:
        raise AuthError("AuthorizationQueryParametersError", f"Only {ALGORITHM} is supported.")
    if not 0 < expires <= MAX_PRESIGNED_EXPIRES:
        raise AuthError(
            "AuthorizationQueryParametersError", "X-Amz-Expires must be 1 to 604800 seconds."
        )
    when = _parse_date(amz_date)
    if now > when + timedelta(seconds=expires):
        raise AuthError("AccessDenied", "Request has expired")
    if when - now > MAX_SKEW:
        raise AuthError("AccessDenied", "Request is not valid yet")
    scope = _check_scope(credential, creds, amz_date)
    unsigned = [(k, v) for k, v in pairs if k != "X-Amz-Signature"]
    canonical = _canonical_request(
        method, raw_path, unsigned, headers, signed_headers, UNSIGNED_PAYLOAD
    )
    _check_signature(creds, amz_date, scope, canonical, signature)
    return Verified(presigned=True, region=scope[2], payload_hash=UNSIGNED_PAYLOAD)
