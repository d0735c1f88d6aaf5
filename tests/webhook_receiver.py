"""A webhook receiver on loopback for the tests: records every POST and answers each path
from a plan of statuses."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """Records every POST; answers each path from its plan of statuses, then 200."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)
    plans: dict[str, list[int]] = field(default_factory=dict)
    always: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def answer(self, path: str) -> int:
        with self.lock:
            if path in self.always:
                return self.always[path]
            plan = self.plans.get(path)
            return plan.pop(0) if plan else 200

    def record(self, received: Received) -> None:
        with self.lock:
            self.requests.append(received)

    def received(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    async def wait(self, path: str, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received(path)
            if len(got) >= count:
                return got
            await asyncio.sleep(0.05)
        raise AssertionError(f"{path}: {len(self.received(path))} requests, wanted {count}")


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            path = self.path.lstrip("/")
            state.record(Received(path, {k.lower(): v for k, v in self.headers.items()}, body))
            status = state.answer(path)
            reply = b'{"ok": true}' if status < 300 else b"receiver says no"
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("location", f"/trap-{path}")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
