"""The S3 requests of one job, against ``up``'s embedded S3 server and against moto.

A resize job makes four S3 requests: the submit's put of the input (a 1024x1024 photo PNG of
about 1.67 MB), the worker's get of it, the worker's put of the output (about 400 KB) and
the client's presigned get of the output. Each server is started as ``up`` (or the tests)
start it (moto: its S3 application behind werkzeug, as ``up`` served it before it had its
own), on a free loopback port; each request is made ``--rounds`` times with boto3
configured as the platform's storage module configures it, and the server process's CPU
time, the client's and the wall time per request are printed. moto is only measured when it
is installed (the ``dev`` extra).

    python bench/s3_requests.py
    python bench/s3_requests.py --rounds 300 --out /tmp/s3.json

It prints one ``SUMMARY s3_requests:`` line; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _harness as h
import boto3
import httpx
import psutil
from botocore.config import Config

from hiddenmodel.processes import free_port, port_open
from hiddenmodel.up.servers import s3_server_command

BUCKET = "hiddenmodel"


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


# moto's S3 application alone behind werkzeug, as ``up`` served it before it had its own.
MOTO_S3 = """
import logging, sys
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple
logging.getLogger("werkzeug").setLevel(logging.WARNING)
run_simple("127.0.0.1", int(sys.argv[1]), create_backend_app("s3"), threaded=True,
           request_handler=MotoRequestHandler)
"""


def measure_server(name: str, argv: list[str], port: int, rounds: int) -> dict[str, Any]:
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.05)
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="hiddenmodel",
            aws_secret_access_key="hiddenmodel",
            config=Config(
                signature_version="s3v4",
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"payload_signing_enabled": False},
            ),
        )
        client.create_bucket(Bucket=BUCKET)
        photo = h.photo_png(1024, 1024, seed=1)
        output = h.photo_png(512, 512, seed=2)

        def put(key: str, body: bytes) -> Callable[[], Any]:
            digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
            return lambda: client.put_object(
                Bucket=BUCKET,
                Key=key,
                Body=body,
                ContentType="image/png",
                ChecksumSHA256=digest,
                Tagging="tenant=t&job=j&kind=input",
            )

        put("orgs/t/input.png", photo)()
        put("orgs/t/output.png", output)()
        url = client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": BUCKET,
                "Key": "orgs/t/output.png",
                "ResponseContentDisposition": 'attachment; filename="output.png"',
            },
        )
        downloads = httpx.Client()
        requests: dict[str, Callable[[], Any]] = {
            "put_input": put("orgs/t/input.png", photo),
            "get_input": lambda: client.get_object(Bucket=BUCKET, Key="orgs/t/input.png")[
                "Body"
            ].read(),
            "put_output": put("orgs/t/output.png", output),
            "presigned_get_output": lambda: downloads.get(url).content,
        }
        process = psutil.Process(server.pid)
        results: dict[str, Any] = {}
        for request, call in requests.items():
            for _ in range(5):
                call()
            server0, client0, wall0 = _cpu(process), time.process_time(), time.perf_counter()
            for _ in range(rounds):
                call()
            results[request] = {
                "server_cpu_ms": round(1000 * (_cpu(process) - server0) / rounds, 3),
                "client_cpu_ms": round(1000 * (time.process_time() - client0) / rounds, 3),
                "wall_ms": round(1000 * (time.perf_counter() - wall0) / rounds, 3),
            }
        results["job"] = {
            k: round(sum(results[r][k] for r in requests), 3)
            for k in ("server_cpu_ms", "client_cpu_ms", "wall_ms")
        }
        return results
    finally:
        server.terminate()
        server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    result: dict[str, Any] = {"rounds": args.rounds, "machine": h.machine()}
    with tempfile.TemporaryDirectory(prefix="hm-s3-bench-") as root:
        port = free_port()
        result["embedded"] = measure_server(
            "embedded", s3_server_command(port, Path(root)), port, args.rounds
        )
    if importlib.util.find_spec("moto") is not None:
        port = free_port()
        result["moto"] = measure_server(
            "moto", [sys.executable, "-c", MOTO_S3, str(port)], port, args.rounds
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    parts = [
        f"{name}: server {r['job']['server_cpu_ms']:.1f} ms client {r['job']['client_cpu_ms']:.1f} "
        f"ms wall {r['job']['wall_ms']:.1f} ms per job"
        for name, r in result.items()
        if name in ("embedded", "moto")
    ]
    print("SUMMARY s3_requests: " + "; ".join(parts))
    print(json.dumps(result, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
