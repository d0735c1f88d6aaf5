"""Presigned download URLs: the fast signer gives botocore's URL byte for byte, or stands aside.

A listing signs one URL per output, so ``hiddenmodel.storage`` signs them itself (SigV4 query
auth) instead of through botocore's request pipeline per URL; it takes where URLs start from one
URL botocore signs and is used only when it signs that one identically.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.auth
import pytest
from botocore.config import Config

from hiddenmodel import storage

ACCESS, SECRET = "AKIDEXAMPLE", "wJalr/XUtnFEMI+K7MDENG=bPxRfiCY"
AT = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
KEYS = [
    ("orgs/0b0c/jobs/1d2e/output.png", 'attachment; filename="1d2e-output.png"'),
    ("orgs/0b0c/jobs/1d2e/debug layer~1.webp", 'attachment; filename="a;b=c ~d.webp"'),
    ("orgs/0b0c/jobs/1d2e/input.jpg", None),
]


def _client(endpoint: str | None, region: str, **s3: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        config=Config(signature_version="s3v4", s3=s3 or None),
    )


@pytest.mark.parametrize(
    ("endpoint", "region", "s3"),
    [
        ("http://127.0.0.1:9000", "us-east-1", {}),
        (None, "us-east-1", {}),
        (None, "eu-west-1", {}),
        ("https://minio.example.com:9443", "eu-central-1", {}),
        ("https://s3.example.com", "us-east-1", {"addressing_style": "virtual"}),
    ],
)
def test_the_fast_signer_gives_botocores_url(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None, region: str, s3: dict[str, str]
) -> None:
    client = _client(endpoint, region, **s3)
    signer = storage._presigner(client, "hm-bucket", ACCESS, SECRET)
    assert signer is not None, "the signer stood aside for a configuration it should sign"
    assert SECRET not in repr(signer)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: AT.replace(tzinfo=None))
    for key, disposition in KEYS:
        params = {"Bucket": "hm-bucket", "Key": key}
        if disposition:
            params["ResponseContentDisposition"] = disposition
        expected = client.generate_presigned_url("get_object", Params=params, ExpiresIn=300)
        assert signer.url(key, disposition, 300, AT) == expected


def test_the_fast_signer_stands_aside_when_it_signs_differently() -> None:
    """Keys other than the client's sign the probe differently: botocore keeps signing."""
    client = _client("http://127.0.0.1:9000", "us-east-1")
    assert storage._presigner(client, "hm-bucket", ACCESS, "another-secret") is None
    assert storage._presigner(client, "hm-bucket", ACCESS, SECRET) is not None


def test_a_presigned_url_still_refuses_another_organizations_key() -> None:
    org = uuid.uuid4()
    with pytest.raises(PermissionError):
        storage.presigned_get_url(f"orgs/{uuid.uuid4()}/jobs/x/output.png", org)
