"""``hiddenmodel webhook-listen``: a small webhook receiver for a developer's machine.

It listens on a loopback port, checks each POST's Standard Webhooks signature against the
endpoint's secret (:func:`hiddenmodel.webhooks.signing.verify`, the check a real receiver
makes), prints each verified event as one JSON line and answers 204; a message that does not
verify is answered 401 and reported on stderr, so a wrong secret shows at once. In
development the platform may deliver to it over plain http (``HM_WEBHOOK_ALLOW_PRIVATE_URLS``
is on there by default).
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

from hiddenmodel.webhooks.signing import InvalidSignature, verify

MAX_BODY_BYTES = 1 << 20


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], secret: str, out: IO[str], count: int | None
    ) -> None:
        super().__init__(address, _Handler)
        self.secret = secret
        self.out = out
        self.remaining = count
        self.lock = threading.Lock()

    def received(self, event: dict[str, Any], headers: dict[str, str]) -> None:
        line = {"webhook-id": headers.get("webhook-id"), **event}
        with self.lock:
            print(json.dumps(line, separators=(",", ":")), file=self.out, flush=True)
            if self.remaining is not None:
                self.remaining -= 1
                if self.remaining <= 0:
                    # shutdown() waits for serve_forever(), which runs in another thread.
                    threading.Thread(target=self.shutdown, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            self._answer(413, "body too large")
            return
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            verify(self.server.secret, headers, body)
            event = json.loads(body)
        except InvalidSignature as exc:
            print(f"refused {self.path}: {exc}", file=sys.stderr, flush=True)
            self._answer(401, str(exc))
            return
        except ValueError:
            self._answer(400, "the body is not JSON")
            return
        self._answer(204, "")
        self.server.received(event if isinstance(event, dict) else {"data": event}, headers)

    def _answer(self, status: int, text: str) -> None:
        payload = text.encode()
        self.send_response(status)
        if payload:
            self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the events themselves are the output."""


def listen(
    secret: str,
    host: str = "127.0.0.1",
    port: int = 8787,
    count: int | None = None,
    out: IO[str] | None = None,
) -> int:
    """Serve until interrupted, or until ``count`` events have been verified."""
    verify_secret = secret.strip()
    server = _Receiver((host, port), verify_secret, out or sys.stdout, count)
    bound_port = server.server_address[1]
    print(
        f"listening on http://{host}:{bound_port}/ (any path); events print here",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
