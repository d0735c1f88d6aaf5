"""``up``'s embedded S3 endpoint (moto's S3 application served on its own) answers every S3
call the platform makes: tagged puts, gets, tags, listings, presigned downloads, batch
deletes and lifecycle rules on the tenant tag."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

from hiddenmodel.processes import free_port, port_open
from hiddenmodel.up.servers import s3_server_command
from hiddenmodel.up.stack import CPU_WORKER_MAX_PROCESSES, cpu_worker_processes, platform_processes


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    port = free_port()
    server = subprocess.Popen(
        s3_server_command(port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            assert server.poll() is None, server.communicate()[0].decode()
            assert time.monotonic() < deadline, "the embedded S3 did not start"
            time.sleep(0.05)
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="up",
            aws_secret_access_key="up-secret",
            config=Config(signature_version="s3v4"),
        )
        client.create_bucket(Bucket="hiddenmodel")
        yield client
    finally:
        server.terminate()
        output = server.communicate(timeout=10)[0].decode()
    # Requests are not logged line by line: at several per job they cost more than they tell.
    assert "PUT /hiddenmodel/" not in output


def test_the_platforms_s3_calls_work(s3: Any) -> None:
    org, job = uuid.uuid4(), uuid.uuid4()
    key = f"orgs/{org}/jobs/{job}/image.png"
    body = bytes(range(256)) * 4096
    s3.put_object(
        Bucket="hiddenmodel",
        Key=key,
        Body=body,
        ContentType="image/png",
        Tagging=f"tenant={org}&job={job}&kind=image",
    )
    got = s3.get_object(Bucket="hiddenmodel", Key=key)
    assert got["Body"].read() == body
    assert got["ContentType"] == "image/png"
    # Headers with underscores in their names come through (werkzeug's own handler drops them).
    s3.put_object(Bucket="hiddenmodel", Key=f"{key}.meta", Body=b"x", Metadata={"source_name": "a"})
    assert s3.head_object(Bucket="hiddenmodel", Key=f"{key}.meta")["Metadata"] == {
        "source_name": "a"
    }
    s3.delete_object(Bucket="hiddenmodel", Key=f"{key}.meta")
    tags = s3.get_object_tagging(Bucket="hiddenmodel", Key=key)["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {
        "tenant": str(org),
        "job": str(job),
        "kind": "image",
    }
    listed = s3.list_objects_v2(Bucket="hiddenmodel", Prefix=f"orgs/{org}/")
    assert [o["Key"] for o in listed["Contents"]] == [key]

    url = s3.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": "hiddenmodel",
            "Key": key,
            "ResponseContentDisposition": 'attachment; filename="image.png"',
        },
        ExpiresIn=60,
    )
    download = httpx.get(url)
    assert download.status_code == 200 and download.content == body
    assert "attachment" in download.headers["content-disposition"]
    tampered = httpx.get(url.replace(str(job), str(uuid.uuid4())))
    assert tampered.status_code in (403, 404)

    s3.put_bucket_lifecycle_configuration(
        Bucket="hiddenmodel",
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": f"retention-{org}",
                    "Status": "Enabled",
                    "Filter": {"Tag": {"Key": "tenant", "Value": str(org)}},
                    "Expiration": {"Days": 31},
                }
            ]
        },
    )
    rules = s3.get_bucket_lifecycle_configuration(Bucket="hiddenmodel")["Rules"]
    assert rules[0]["Filter"]["Tag"] == {"Key": "tenant", "Value": str(org)}

    deleted = s3.delete_objects(Bucket="hiddenmodel", Delete={"Objects": [{"Key": key}]})
    assert [d["Key"] for d in deleted["Deleted"]] == [key]
    assert s3.list_objects_v2(Bucket="hiddenmodel", Prefix=f"orgs/{org}/")["KeyCount"] == 0


def test_the_cpu_worker_runs_a_job_per_core_in_pool_processes(tmp_path: Any) -> None:
    from hiddenmodel.up.model import ModelPlan

    processes = cpu_worker_processes()
    assert 1 <= processes <= CPU_WORKER_MAX_PROCESSES
    worker = platform_processes("127.0.0.1", 8000, tmp_path, ModelPlan(path=None))[0]
    assert worker.name == "worker"
    argv = list(worker.argv)
    assert argv[argv.index("--pool") + 1] == "prefork"
    assert argv[argv.index("--concurrency") + 1] == str(processes)
