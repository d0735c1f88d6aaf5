"""``up``'s embedded S3 server (:mod:`hiddenmodel.up.s3server`) answers every S3 call the
platform makes, checks what S3 checks (signatures, expiry, digests), keeps its objects on disk
across restarts, and refuses what it does not implement the way S3 does."""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from hiddenmodel.processes import free_port, port_open
from hiddenmodel.up import sigv4
from hiddenmodel.up.objectstore import ALIGN, CHUNK, ObjectStore, open_body, read_body
from hiddenmodel.up.servers import s3_server_command
from hiddenmodel.up.stack import (
    CPU_WORKER_MAX_PROCESSES,
    CPU_WORKER_PREFETCH,
    cpu_worker_processes,
    platform_processes,
)

ACCESS, SECRET, REGION, BUCKET = "up", "up-secret", "us-east-1", "hiddenmodel"


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HM_S3_ACCESS_KEY_ID": ACCESS,
            "HM_S3_SECRET_ACCESS_KEY": SECRET,
            "HM_S3_REGION": REGION,
        }
        self.process = subprocess.Popen(
            s3_server_command(self.port, root),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.port):
            assert self.process.poll() is None, self.process.communicate()[0].decode()
            assert time.monotonic() < deadline, "the embedded S3 did not start"
            time.sleep(0.05)

    def client(self, secret: str = SECRET, access: str = ACCESS, **config: Any) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=config.pop("region", REGION),
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            config=Config(signature_version="s3v4", retries={"max_attempts": 1}, **config),
        )

    def stop(self) -> str:
        self.process.terminate()
        return self.process.communicate(timeout=10)[0].decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("s3"))
    try:
        running.client().create_bucket(Bucket=BUCKET)
        yield running
    finally:
        output = running.stop()
    # Requests are not logged line by line: at several per job they cost more than they tell.
    assert "PUT /hiddenmodel/" not in output
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def s3(server: Server) -> Any:
    return server.client()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def _signed(
    method: str,
    url: str,
    data: bytes = b"",
    headers: dict[str, str] | None = None,
    region: str = REGION,
    send: bytes | None = None,
) -> httpx.Response:
    """A request signed by botocore's own SigV4 signer (``send``: other bytes sent instead)."""
    request = AWSRequest(method=method, url=url, data=data, headers=headers or {})
    S3SigV4Auth(Credentials(ACCESS, SECRET), "s3", region).add_auth(request)
    body = data if send is None else send
    return httpx.request(method, url, content=body, headers=dict(request.headers.items()))


def _blobs(root: Path) -> list[Path]:
    return [p for p in (root / "blobs").glob("*/*")]


def test_the_platforms_s3_calls_work(s3: Any) -> None:
    org, job = uuid.uuid4(), uuid.uuid4()
    key = f"orgs/{org}/jobs/{job}/image.png"
    body = bytes(range(256)) * 4096
    s3.put_object(
        Bucket=BUCKET,
        Key=key,
        Body=body,
        ContentType="image/png",
        ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
        Tagging=f"tenant={org}&job={job}&kind=image",
    )
    got = s3.get_object(Bucket=BUCKET, Key=key)
    assert got["Body"].read() == body
    assert got["ContentType"] == "image/png"
    assert got["ContentLength"] == len(body)
    assert got["TagCount"] == 3
    # User metadata, underscores in names included.
    s3.put_object(Bucket=BUCKET, Key=f"{key}.meta", Body=b"x", Metadata={"source_name": "a"})
    assert s3.head_object(Bucket=BUCKET, Key=f"{key}.meta")["Metadata"] == {"source_name": "a"}
    s3.delete_object(Bucket=BUCKET, Key=f"{key}.meta")
    tags = s3.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {
        "tenant": str(org),
        "job": str(job),
        "kind": "image",
    }
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"orgs/{org}/")
    assert [o["Key"] for o in listed["Contents"]] == [key]
    assert listed["Contents"][0]["Size"] == len(body)

    url = s3.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": BUCKET,
            "Key": key,
            "ResponseContentDisposition": 'attachment; filename="image.png"',
        },
        ExpiresIn=60,
    )
    download = httpx.get(url)
    assert download.status_code == 200 and download.content == body
    assert download.headers["content-disposition"] == 'attachment; filename="image.png"'
    tampered = httpx.get(url.replace(str(job), str(uuid.uuid4())))
    assert tampered.status_code == 403
    assert "<Code>SignatureDoesNotMatch</Code>" in tampered.text

    # Lifecycle rules are not implemented: the answer the retention sweep reads as "this
    # endpoint has none" (it deletes expired outputs itself).
    with pytest.raises(ClientError) as refused:
        s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)
    assert _code(refused) == "NotImplemented"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 501

    deleted = s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": key}]})
    assert [d["Key"] for d in deleted["Deleted"]] == [key]
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"orgs/{org}/")["KeyCount"] == 0


def test_the_platforms_storage_module_works_against_it(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hiddenmodel import storage
    from hiddenmodel.settings import get_settings

    for name, value in {
        "HM_S3_ENDPOINT_URL": server.endpoint,
        "HM_S3_ACCESS_KEY_ID": ACCESS,
        "HM_S3_SECRET_ACCESS_KEY": SECRET,
        "HM_S3_REGION": REGION,
        "HM_S3_BUCKET": BUCKET,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    storage.s3_client.cache_clear()
    try:
        org, job = uuid.uuid4(), uuid.uuid4()
        key = storage.object_key(org, job, "output", "png")
        # Whole-object puts and gets go by the module's own signed requests, which this
        # server checks as strictly as it checks botocore's.
        assert storage._direct_client() is not None
        storage.put_object(key, b"\x89PNG data", "image/png", org_id=org, job_id=job, kind="output")
        assert storage.get_object(key) == b"\x89PNG data"
        with pytest.raises(ClientError) as missing:
            storage.get_object(f"{key}.missing")
        assert _code(missing) == "NoSuchKey" and storage.is_missing(missing.value)
        assert b"".join(storage.iter_object(key, chunk_size=3)) == b"\x89PNG data"
        assert storage.object_exists(key)
        assert storage.object_tags(key) == {"tenant": str(org), "job": str(job), "kind": "output"}
        assert storage.list_keys(storage.org_prefix(org)) == [key]
        page = storage.list_page(storage.org_prefix(org), start_after=None, max_keys=10)
        assert [k for k, _ in page.objects] == [key] and not page.truncated
        url = storage.presigned_get_url(key, org, filename="out.png")
        assert httpx.get(url).content == b"\x89PNG data"
        # A digest that is not the body's: refused, as AWS S3 refuses it.
        with pytest.raises(ClientError) as refused:
            storage.put_object(
                key, b"other", "image/png", org_id=org, job_id=job, kind="output", sha256=b"0" * 32
            )
        assert _code(refused) == "BadDigest"
        assert storage.get_object(key) == b"\x89PNG data"
        assert storage.delete_objects([key, f"{key}.missing"]) == set()
        assert not storage.object_exists(key)
    finally:
        get_settings.cache_clear()
        storage.s3_client.cache_clear()


def test_wrong_credentials_and_anonymous_requests_are_refused(server: Server) -> None:
    with pytest.raises(ClientError) as wrong_secret:
        server.client(secret="not-the-secret").list_objects_v2(Bucket=BUCKET)
    assert _code(wrong_secret) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as unknown:
        server.client(access="someone").head_object(Bucket=BUCKET, Key="k")
    assert wrong_secret.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert unknown.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # Signed for another region: refused with the region to use (boto3 follows that hint).
    other_region = _signed("GET", f"{server.endpoint}/{BUCKET}?list-type=2", region="eu-west-1")
    assert other_region.status_code == 400
    assert "AuthorizationHeaderMalformed" in other_region.text
    assert f"<Region>{REGION}</Region>" in other_region.text
    anonymous = httpx.get(f"{server.endpoint}/{BUCKET}?list-type=2")
    assert anonymous.status_code == 403 and "<Code>AccessDenied</Code>" in anonymous.text
    # An error to a request without a body keeps the connection; one whose body was not
    # read closes it.
    with httpx.Client() as kept:
        assert kept.get(f"{server.endpoint}/{BUCKET}/k").status_code == 403
        assert kept.get(f"{server.endpoint}/{BUCKET}/k").headers.get("connection") != "close"
        refused = kept.put(f"{server.endpoint}/{BUCKET}/k", content=b"x" * 1000)
        assert refused.status_code == 403 and refused.headers["connection"] == "close"
    # A presigned URL reads; it does not write.
    url = server.client().generate_presigned_url(
        "put_object", Params={"Bucket": BUCKET, "Key": "presigned-put"}, ExpiresIn=60
    )
    assert httpx.put(url, content=b"x").status_code == 403


def test_presigned_urls_expire() -> None:
    creds = sigv4.Credentials(ACCESS, SECRET)
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name=REGION,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        config=Config(signature_version="s3v4"),
    )
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "a b/ü.png"}, ExpiresIn=60
    )
    path, _, query = url.split("127.0.0.1:9", 1)[1].partition("?")
    headers = {"host": "127.0.0.1:9"}
    assert sigv4.verify("GET", path, query, headers, creds).presigned
    later = datetime.now(UTC) + timedelta(seconds=61)
    with pytest.raises(sigv4.AuthError, match="expired"):
        sigv4.verify("GET", path, query, headers, creds, now=later)
    with pytest.raises(sigv4.AuthError) as other_host:
        sigv4.verify("GET", path, query, {"host": "example.com"}, creds)
    assert other_host.value.code == "SignatureDoesNotMatch"


def test_a_body_that_does_not_match_its_digests_is_refused_and_leaves_nothing(
    server: Server, s3: Any
) -> None:
    key = f"digests/{uuid.uuid4()}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"first")
    before = len(_blobs(server.root))
    for extra in (
        {"ChecksumSHA256": base64.b64encode(hashlib.sha256(b"else").digest()).decode()},
        {"ContentMD5": base64.b64encode(hashlib.md5(b"else").digest()).decode()},
    ):
        with pytest.raises(ClientError) as refused:
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"second", **extra)
        assert _code(refused) == "BadDigest"
    # A signed payload hash that is not the body's: signed for other bytes of the same length.
    sent = _signed("PUT", f"{server.endpoint}/{BUCKET}/{key}", b"other!", send=b"second")
    assert sent.status_code == 400 and "XAmzContentSHA256Mismatch" in sent.text
    # The object is as it was, and no body file was left behind.
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"first"
    assert len(_blobs(server.root)) == before
    assert not list((server.root / "blobs").glob("*/.*.tmp"))
    # The matching digests pass.
    s3.put_object(
        Bucket=BUCKET,
        Key=key,
        Body=b"second",
        ChecksumSHA256=base64.b64encode(hashlib.sha256(b"second").digest()).decode(),
        ChecksumAlgorithm="SHA256",
    )
    crc = server.client(request_checksum_calculation="when_supported")
    crc.put_object(Bucket=BUCKET, Key=key, Body=b"third", ChecksumAlgorithm="CRC32")
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"third"
    # Overwrites replace the body file: one per object.
    assert len(_blobs(server.root)) == before


def test_a_body_cut_short_leaves_nothing_and_the_server_goes_on(server: Server, s3: Any) -> None:
    key = f"cut/{uuid.uuid4()}"
    request = AWSRequest(
        method="PUT",
        url=f"{server.endpoint}/{BUCKET}/{key}",
        data=b"x" * 100,
        headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"},
    )
    S3SigV4Auth(Credentials(ACCESS, SECRET), "s3", REGION).add_auth(request)
    head = f"PUT /{BUCKET}/{key} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in request.headers.items()
    )
    head += "Content-Length: 100\r\n\r\n"
    before = len(_blobs(server.root))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + b"x" * 10)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(4096):  # the server closes: the rest of the body never came
            answer += chunk
    assert b"400" in answer.split(b"\r\n")[0] and b"IncompleteBody" in answer
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=BUCKET, Key=key)
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert len(_blobs(server.root)) == before
    assert not list((server.root / "blobs").glob("*/.*.tmp"))


def test_ranges_listings_and_odd_keys(s3: Any) -> None:
    base = f"list-{uuid.uuid4()}/"
    names = ["a/1", "a/2", "b", "c d/ü", "c d/x+y", "e%20f"]
    for name in names:
        s3.put_object(Bucket=BUCKET, Key=base + name, Body=name.encode())
    assert s3.get_object(Bucket=BUCKET, Key=base + "c d/x+y")["Body"].read() == b"c d/x+y"
    got = s3.get_object(Bucket=BUCKET, Key=base + "c d/ü", Range="bytes=2-3")
    assert got["Body"].read() == "c d/ü".encode()[2:4]
    assert got["ContentRange"] == f"bytes 2-3/{len('c d/ü'.encode())}"
    tail = s3.get_object(Bucket=BUCKET, Key=base + "b", Range="bytes=-5")
    assert tail["Body"].read() == b"b"
    with pytest.raises(ClientError) as beyond:
        s3.get_object(Bucket=BUCKET, Key=base + "b", Range="bytes=10-20")
    assert _code(beyond) == "InvalidRange"

    everything = s3.list_objects_v2(Bucket=BUCKET, Prefix=base)
    assert [o["Key"] for o in everything["Contents"]] == sorted(base + n for n in names)
    pages, token = [], None
    while True:
        kwargs: dict[str, str] = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=BUCKET, Prefix=base, MaxKeys=4, **kwargs)
        pages.append([o["Key"] for o in page.get("Contents", [])])
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert pages == [sorted(base + n for n in names)[:4], sorted(base + n for n in names)[4:]]
    after = s3.list_objects_v2(Bucket=BUCKET, Prefix=base, StartAfter=base + "b")
    assert [o["Key"] for o in after["Contents"]] == sorted(base + n for n in names)[3:]
    folders = s3.list_objects_v2(Bucket=BUCKET, Prefix=base, Delimiter="/")
    assert [p["Prefix"] for p in folders["CommonPrefixes"]] == [base + "a/", base + "c d/"]
    assert [o["Key"] for o in folders["Contents"]] == [base + "b", base + "e%20f"]
    paged = s3.list_objects_v2(Bucket=BUCKET, Prefix=base, Delimiter="/", MaxKeys=1)
    assert paged["IsTruncated"] and [p["Prefix"] for p in paged["CommonPrefixes"]] == [base + "a/"]
    rest = s3.list_objects_v2(
        Bucket=BUCKET, Prefix=base, Delimiter="/", ContinuationToken=paged["NextContinuationToken"]
    )
    assert [o["Key"] for o in rest["Contents"]] == [base + "b", base + "e%20f"]
    v1 = s3.list_objects(Bucket=BUCKET, Prefix=base, Marker=base + "c d/x+y")
    assert [o["Key"] for o in v1["Contents"]] == [base + "c d/ü", base + "e%20f"]

    quiet = s3.delete_objects(
        Bucket=BUCKET,
        Delete={"Objects": [{"Key": base + n} for n in names], "Quiet": True},
    )
    assert "Deleted" not in quiet and "Errors" not in quiet
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=base)["KeyCount"] == 0


def test_tags_buckets_and_what_is_not_implemented(s3: Any) -> None:
    key = f"tags/{uuid.uuid4()}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"x", Tagging="kind=input")
    s3.put_object_tagging(
        Bucket=BUCKET, Key=key, Tagging={"TagSet": [{"Key": "tenant", "Value": "t & <u>"}]}
    )
    tags = s3.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"]
    assert tags == [{"Key": "tenant", "Value": "t & <u>"}]
    with pytest.raises(ClientError) as too_many:
        s3.put_object(
            Bucket=BUCKET, Key=key, Body=b"x", Tagging="&".join(f"k{i}=v" for i in range(11))
        )
    assert too_many.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as no_key:
        s3.get_object_tagging(Bucket=BUCKET, Key=f"{key}-missing")
    assert _code(no_key) == "NoSuchKey"

    with pytest.raises(ClientError) as no_bucket:
        s3.get_object(Bucket="no-such-bucket", Key=key)
    assert _code(no_bucket) == "NoSuchBucket"
    with pytest.raises(ClientError) as owned:
        s3.create_bucket(Bucket=BUCKET)
    assert _code(owned) == "BucketAlreadyOwnedByYou"
    other = f"b-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=other)
    assert other in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.put_object(Bucket=other, Key="k", Body=b"x")
    with pytest.raises(ClientError) as not_empty:
        s3.delete_bucket(Bucket=other)
    assert _code(not_empty) == "BucketNotEmpty"
    s3.delete_object(Bucket=other, Key="k")
    s3.delete_bucket(Bucket=other)
    assert other not in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    with pytest.raises(ClientError) as multipart:
        s3.create_multipart_upload(Bucket=BUCKET, Key=key)
    assert _code(multipart) == "NotImplemented"
    with pytest.raises(ClientError) as copy:
        s3.copy_object(Bucket=BUCKET, Key=f"{key}-copy", CopySource=f"{BUCKET}/{key}")
    assert _code(copy) == "NotImplemented"


def test_concurrent_puts_and_gets_each_see_whole_bodies(server: Server) -> None:
    s3 = server.client(max_pool_connections=16)
    key = f"race/{uuid.uuid4()}"
    bodies = [bytes([i]) * (256 * 1024 + i) for i in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                s3.put_object(Bucket=BUCKET, Key=key, Body=bodies[i])
                got = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                assert got in bodies, "a torn body"
                s3.put_object(Bucket=BUCKET, Key=f"{key}-{i}", Body=bodies[i])
                assert s3.get_object(Bucket=BUCKET, Key=f"{key}-{i}")["Body"].read() == bodies[i]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=key)
    assert listed["KeyCount"] == 9


def test_objects_outlive_a_restart_and_stray_files_are_swept(tmp_path: Path) -> None:
    first = Server(tmp_path)
    try:
        s3 = first.client()
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="kept", Body=b"still here", Tagging="tenant=t")
    finally:
        assert "Traceback" not in first.stop()
    assert first.process.returncode == 0
    # Stopped cleanly (SIGTERM, as up stops it): the index is checkpointed and closed.
    assert not (tmp_path / "index.sqlite3-wal").exists()
    stray = tmp_path / "blobs" / "00" / "00stray"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"a body no index row names")
    second = Server(tmp_path)
    try:
        s3 = second.client()
        assert s3.get_object(Bucket=BUCKET, Key="kept")["Body"].read() == b"still here"
        assert s3.get_object_tagging(Bucket=BUCKET, Key="kept")["TagSet"] == [
            {"Key": "tenant", "Value": "t"}
        ]
        assert not stray.exists()
    finally:
        second.stop()


def test_the_store_lists_past_common_prefixes_in_key_order(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    store.create_bucket("bucket")
    keys = ["p/a", "p/a/b", "p/a\U0010ffff", "p/b", "p/\ud7ff/x", "p/\ue000", "q"]
    for key in keys:
        written = store.write_body(io.BytesIO(key.encode()), len(key.encode()))
        store.commit_object("bucket", key, written, content_type="text/plain", metadata={}, tags={})
    objects, prefixes, truncated, _ = store.list(
        "bucket", prefix="p/", after="", limit=100, delimiter="/"
    )
    assert [o.key for o in objects] == ["p/a", "p/a\U0010ffff", "p/b", "p/\ue000"]
    assert prefixes == ["p/a/", "p/\ud7ff/"]
    assert not truncated
    objects, _, _, _ = store.list("bucket", prefix="", after="p/b", limit=100)
    assert [o.key for o in objects] == sorted(k for k in keys if k > "p/b")
    store.close()


_SIZES = (0, 1, ALIGN - 1, ALIGN, ALIGN + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 4097)


class _Trickle(io.RawIOBase):
    """A source that hands out at most 1,000 bytes a read, as a socket may."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self.data), 1000)
        buffer[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


def _read(body: Any, start: int, end: int) -> bytes:
    # Each view lives until the next is asked for: copied one by one, as the server sends them.
    return b"".join(bytes(view) for view in read_body(body, start, end))


def _store_and_read_back(store: ObjectStore, data: bytes) -> None:
    written = store.write_body(_Trickle(data), len(data), want_md5=True)
    assert written.sha256 == hashlib.sha256(data).digest()
    assert written.md5 == hashlib.md5(data).digest()
    path = store.blobs / written.blob
    assert path.stat().st_size == len(data)
    assert path.read_bytes() == data
    n = len(data)
    with open_body(path) as body:
        assert _read(body, 0, n) == data
        for start, end in ((1, 2), (ALIGN - 1, ALIGN + 2), (7, n - 3), (CHUNK + 5, n), (n, n)):
            if 0 <= start <= end <= n:
                assert _read(body, start, end) == data[start:end]
    store.discard(written)


def _takes_direct_io(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    (folder / "probe").unlink()
    return True


def test_bodies_of_every_size_and_range_round_trip_with_direct_io(tmp_path: Path) -> None:
    """Direct I/O wherever the folder's file system takes it. The temporary folder may be a
    tmpfs that does not: the checkout's ``var/`` (on the disk the project sits on) is tried
    next, and on a machine with neither the bodies go through the page cache, as the next
    test checks of every way a file system can refuse."""
    folder = tmp_path
    if not _takes_direct_io(folder):
        folder = Path(__file__).resolve().parent.parent / "var" / f"test-direct-{uuid.uuid4()}"
        folder.mkdir(parents=True)
    store = ObjectStore(folder)
    try:
        direct = _takes_direct_io(folder)
        for size in _SIZES:
            _store_and_read_back(store, os.urandom(size))
        written = store.write_body(io.BytesIO(b"x" * 10), 10)
        with open_body(store.blobs / written.blob) as body:
            assert bool(fcntl.fcntl(body.fileno(), fcntl.F_GETFL) & os.O_DIRECT) == direct
    finally:
        store.close()
        if folder != tmp_path:
            shutil.rmtree(folder)


def test_a_file_system_without_direct_io_gets_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refuse_direct_open(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    store = ObjectStore(tmp_path)
    try:
        # Refused when opening (tmpfs on older kernels).
        monkeypatch.setattr(os, "open", refuse_direct_open)
        for size in _SIZES:
            _store_and_read_back(store, os.urandom(size))
        monkeypatch.setattr(os, "open", real_open)

        # Opened, then refused at a write or read (a file system that checks late), after
        # part of a block went out directly: the block is written whole again, plainly.
        real_pwrite = os.pwrite

        def refuse_direct_write(fd: int, data: Any, offset: int) -> int:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                if len(data) > ALIGN and offset % CHUNK == 0:
                    return real_pwrite(fd, data[:ALIGN], offset)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", refuse_direct_write)
        real_preadv = os.preadv

        def refuse_direct_read(fd: int, buffers: Any, offset: int) -> int:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", refuse_direct_read)
        for size in _SIZES:
            _store_and_read_back(store, os.urandom(size))
    finally:
        store.close()


def test_the_cpu_worker_runs_a_job_per_core_in_pool_processes(tmp_path: Any) -> None:
    from hiddenmodel.up.model import ModelPlan

    processes = cpu_worker_processes()
    assert 1 <= processes <= CPU_WORKER_MAX_PROCESSES
    worker = platform_processes("127.0.0.1", 8000, tmp_path, ModelPlan(path=None))[0]
    assert worker.name == "worker"
    argv = list(worker.argv)
    assert argv[argv.index("--pool") + 1] == "prefork"
    assert argv[argv.index("--concurrency") + 1] == str(processes)
    # Short jobs: each pool process holds the next one; the GPU worker's long jobs, one.
    assert argv[argv.index("--prefetch-multiplier") + 1] == str(CPU_WORKER_PREFETCH) == "2"
    with_model = platform_processes("127.0.0.1", 8000, tmp_path, ModelPlan(path=tmp_path))
    (gpu,) = [c for c in with_model if c.name == "worker-gpu"]
    assert "--prefetch-multiplier" not in gpu.argv


def test_the_server_module_runs_as_a_script() -> None:
    helped = subprocess.run(
        [sys.executable, "-m", "hiddenmodel.up.s3server", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert helped.returncode == 0 and "--root" in helped.stdout


def test_listings_page_past_common_prefixes_to_the_end(s3: Any) -> None:
    base = f"pages-{uuid.uuid4()}/"
    for name in ("a/1", "a/2", "b", "c/1", "c/2/x", "d"):
        s3.put_object(Bucket=BUCKET, Key=base + name, Body=b"x")
    seen: list[str] = []
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=base, Delimiter="/", PaginationConfig={"PageSize": 1}
    )
    for page in pages:
        seen += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        seen += [o["Key"] for o in page.get("Contents", [])]
        assert len(seen) <= 4, seen
    assert seen == [base + "a/", base + "b", base + "c/", base + "d"]
    v1: list[str] = []
    for page in s3.get_paginator("list_objects").paginate(
        Bucket=BUCKET, Prefix=base, Delimiter="/", PaginationConfig={"PageSize": 1}
    ):
        v1 += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        v1 += [o["Key"] for o in page.get("Contents", [])]
        assert len(v1) <= 4, v1
    assert v1 == seen


def _raw(server: Server, request: bytes) -> bytes:
    """Send bytes as they are; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        sock.settimeout(5)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            answer += b"<still open>"
    return answer


def _signed_head(server: Server, method: str, path: str, extra: str = "") -> str:
    request = AWSRequest(
        method=method,
        url=f"{server.endpoint}{path}",
        headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"},
    )
    S3SigV4Auth(Credentials(ACCESS, SECRET), "s3", REGION).add_auth(request)
    lines = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{lines}{extra}"


def test_request_framing_cannot_smuggle_a_second_request(server: Server, s3: Any) -> None:
    key = f"smuggle/{uuid.uuid4()}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    hidden = f"GET /{BUCKET}/{key} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    # A body nobody reads is not parsed as the next request: the connection closes.
    answer = _raw(
        server,
        _signed_head(
            server, "DELETE", f"/{BUCKET}/{key}", f"Content-Length: {len(hidden)}\r\n"
        ).encode()
        + b"\r\n"
        + hidden,
    )
    assert answer.startswith(b"HTTP/1.1 204") and answer.count(b"HTTP/1.1") == 1, answer
    assert b"<still open>" not in answer
    # Two lengths, or a length and chunks: refused, and closed.
    for framing in (
        "Content-Length: 0\r\nContent-Length: 5\r\n",
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: \u00b2\r\n",
    ):
        answer = _raw(
            server, (_signed_head(server, "GET", f"/{BUCKET}/{key}", framing) + "\r\n").encode()
        )
        assert answer.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request", (framing, answer)
        assert b"<still open>" not in answer


def test_odd_values_are_client_errors_not_server_errors(server: Server, s3: Any) -> None:
    key = f"odd/{uuid.uuid4()}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"0123456789")
    for disposition in ('attachment; filename="\u20ac.png"', "attachment\r\nSet-Cookie: a=b"):
        url = s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": BUCKET, "Key": key, "ResponseContentDisposition": disposition},
        )
        answer = httpx.get(url)
        assert answer.status_code == 400 and "InvalidArgument" in answer.text
        assert "set-cookie" not in answer.headers
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key})
    forged = url.rsplit("=", 1)[0] + "=%C3%A9"
    assert httpx.get(forged).status_code == 403
    # A backwards range is ignored, as HTTP says: the whole object.
    whole = s3.get_object(Bucket=BUCKET, Key=key, Range="bytes=5-3")
    assert whole["Body"].read() == b"0123456789"
    # Request documents are UTF-8: another encoding cannot hide a DTD.
    document = (
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE d [<!ENTITY e "x">]>'
        "<Delete><Object><Key>&e;</Key></Object></Delete>"
    ).encode("utf-16")
    md5 = base64.b64encode(hashlib.md5(document).digest()).decode()
    refused = _signed("POST", f"{server.endpoint}/{BUCKET}?delete", document, {"Content-MD5": md5})
    assert refused.status_code == 400 and "MalformedXML" in refused.text


def test_a_body_lost_after_a_crash_is_a_missing_object(server: Server, s3: Any) -> None:
    key = f"lost/{uuid.uuid4()}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"x" * 5000)
    newest = max(_blobs(server.root), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"x" * 100)  # what a power loss can leave
    with pytest.raises(ClientError) as short:
        s3.get_object(Bucket=BUCKET, Key=key)
    assert _code(short) == "NoSuchKey"
    newest.unlink()
    with pytest.raises(ClientError) as gone:
        s3.get_object(Bucket=BUCKET, Key=key)
    assert _code(gone) == "NoSuchKey"


def test_one_server_per_folder(server: Server) -> None:
    second = subprocess.run(
        s3_server_command(free_port(), server.root),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "another S3 server keeps its objects in" in second.stderr
    assert server.client().head_bucket(Bucket=BUCKET)  # the first one lost nothing
