"""A local stand-in for the few Stripe endpoints billing uses, for tests with the real SDK.

It checks paths, methods, authentication and form bodies the way Stripe would reject them,
records every request (with its ``Idempotency-Key``), replays answers for a repeated
idempotency key, keeps meter events deduplicated by ``identifier`` and sums them for the
event-summaries endpoint. ``fail_next`` makes the next matching requests answer 500 or drop
the connection, as an outage would.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

METER_WINDOW_SECONDS = 35 * 86400
FUTURE_TOLERANCE_SECONDS = 300


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    headers: dict[str, str]
    status: int | None  # None: the connection was dropped

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass
class _Failure:
    remaining: int
    mode: str
    when: Callable[[Recorded], bool]


@dataclass(frozen=True)
class MeterEvent:
    event_name: str
    customer: str
    value: int
    identifier: str
    timestamp: int


class StripeError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


@dataclass
class StripeRecorder:
    """State of the fake Stripe: what was asked, what was accepted."""

    api_key: str
    meters: dict[str, str] = field(default_factory=dict)  # meter id -> event name
    requests: list[Recorded] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_events: dict[str, MeterEvent] = field(default_factory=dict)
    duplicate_identifiers: list[str] = field(default_factory=list)
    _failures: list[_Failure] = field(default_factory=list)
    _idempotent: dict[str, tuple[str, dict[str, str], int, dict[str, Any]]] = field(
        default_factory=dict
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail_next(
        self, count: int, mode: str = "500", when: Callable[[Recorded], bool] | None = None
    ) -> None:
        """The next ``count`` requests that match ``when`` answer 500 (``mode="500"``), lose
        their connection before being handled (``"close"``) or after (``"close_after"``)."""
        assert mode in ("500", "close", "close_after")
        with self._lock:
            self._failures.append(_Failure(count, mode, when or (lambda _: True)))

    def calls(self, method: str, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    def meter_event_calls(self, identifier: str) -> list[Recorded]:
        return [
            r
            for r in self.calls("POST", "/v1/billing/meter_events")
            if r.form.get("identifier") == identifier
        ]

    def plant_meter_event(self, event: MeterEvent) -> None:
        """An event Stripe holds that we never sent (for reconciliation tests)."""
        with self._lock:
            self.meter_events[event.identifier] = event

    # --- request handling (server threads) ----------------------------------------------

    def _take_failure(self, request: Recorded) -> str | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and failure.when(request):
                    failure.remaining -= 1
                    return failure.mode
        return None

    def handle(self, request: Recorded) -> tuple[int, dict[str, Any]] | None:
        mode = self._take_failure(request)
        if mode == "close":
            self._record(request, None)
            return None
        if mode == "close_after":
            # Done, but the answer is lost on the way back.
            self._answer(request)
            self._record(request, None)
            return None
        if mode == "500":
            self._record(request, 500)
            return 500, _error_body(500, "An unknown error occurred", "api_error")
        status, body = self._answer(request)
        self._record(request, status)
        return status, body

    def _record(self, request: Recorded, status: int | None) -> None:
        with self._lock:
            self.requests.append(
                Recorded(
                    request.method,
                    request.path,
                    request.query,
                    request.form,
                    request.headers,
                    status,
                )
            )

    def _answer(self, request: Recorded) -> tuple[int, dict[str, Any]]:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, _error_body(401, "Invalid API Key provided", "invalid_request_error")
        key = request.idempotency_key
        if request.method == "POST":
            if not key:
                return 400, _error_body(400, "Idempotency-Key expected from the SDK")
            with self._lock:
                earlier = self._idempotent.get(key)
            if earlier is not None:
                path, form, status, body = earlier
                if (path, form) != (request.path, request.form):
                    return 400, _error_body(
                        400,
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with.",
                        "idempotency_error",
                    )
                return status, body
        try:
            status, body = 200, self._route(request)
        except StripeError as exc:
            status, body = exc.status, _error_body(exc.status, exc.message, exc.type)
        if request.method == "POST" and key:
            with self._lock:
                self._idempotent[key] = (request.path, request.form, status, body)
        return status, body

    def _route(self, r: Recorded) -> dict[str, Any]:
        routes: list[tuple[str, str, Callable[..., dict[str, Any]]]] = [
            ("POST", r"/v1/customers", self._create_customer),
            ("POST", r"/v1/checkout/sessions", self._create_checkout_session),
            ("POST", r"/v1/billing_portal/sessions", self._create_portal_session),
            ("POST", r"/v1/billing/meter_events", self._create_meter_event),
            ("GET", r"/v1/billing/meters/(?P<meter>[^/]+)/event_summaries", self._summaries),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, r.path)
            if match:
                if method != r.method:
                    raise StripeError(405, f"Unsupported method {r.method} for {r.path}")
                return handler(r, **match.groupdict())
        raise StripeError(404, f"Unrecognized request URL ({r.method}: {r.path})")

    @staticmethod
    def _require(form: dict[str, str], *names: str) -> None:
        for name in names:
            if not form.get(name):
                raise StripeError(400, f"Missing required param: {name}.")

    def _known_customer(self, customer: str) -> None:
        with self._lock:
            if customer not in self.customers:
                raise StripeError(400, f"No such customer: '{customer}'")

    def _create_customer(self, r: Recorded) -> dict[str, Any]:
        customer_id = f"cus_{uuid.uuid4().hex[:14]}"
        customer: dict[str, Any] = {
            "id": customer_id,
            "object": "customer",
            "name": r.form.get("name"),
            "metadata": _nested(r.form, "metadata"),
            "livemode": False,
            "created": int(time.time()),
        }
        with self._lock:
            self.customers[customer_id] = customer
        return customer

    def _create_checkout_session(self, r: Recorded) -> dict[str, Any]:
        self._require(
            r.form, "mode", "customer", "line_items[0][price]", "success_url", "cancel_url"
        )
        if r.form["mode"] != "subscription":
            raise StripeError(400, "Invalid mode")
        if "line_items[0][quantity]" in r.form:
            raise StripeError(400, "Quantity must not be specified for usage-based prices.")
        self._known_customer(r.form["customer"])
        session_id = f"cs_test_{uuid.uuid4().hex}"
        return {
            "id": session_id,
            "object": "checkout.session",
            "mode": "subscription",
            "customer": r.form["customer"],
            "client_reference_id": r.form.get("client_reference_id"),
            "metadata": _nested(r.form, "metadata"),
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            "livemode": False,
        }

    def _create_portal_session(self, r: Recorded) -> dict[str, Any]:
        self._require(r.form, "customer")
        self._known_customer(r.form["customer"])
        session_id = f"bps_{uuid.uuid4().hex[:14]}"
        return {
            "id": session_id,
            "object": "billing_portal.session",
            "customer": r.form["customer"],
            "return_url": r.form.get("return_url"),
            "url": f"https://billing.stripe.com/p/session/test_{session_id}",
            "livemode": False,
        }

    def _create_meter_event(self, r: Recorded) -> dict[str, Any]:
        self._require(
            r.form, "event_name", "payload[stripe_customer_id]", "payload[value]", "identifier"
        )
        value = r.form["payload[value]"]
        if not re.fullmatch(r"-?\d+", value):
            raise StripeError(400, "The value in the event payload must be a whole number.")
        now = int(time.time())
        timestamp = int(r.form.get("timestamp") or now)
        if timestamp < now - METER_WINDOW_SECONDS or timestamp > now + FUTURE_TOLERANCE_SECONDS:
            raise StripeError(400, "Timestamp must be within the past 35 days.")
        event = MeterEvent(
            event_name=r.form["event_name"],
            customer=r.form["payload[stripe_customer_id]"],
            value=int(value),
            identifier=r.form["identifier"],
            timestamp=timestamp,
        )
        with self._lock:
            if event.identifier in self.meter_events:
                self.duplicate_identifiers.append(event.identifier)
            else:
                self.meter_events[event.identifier] = event
        return {
            "object": "billing.meter_event",
            "created": now,
            "event_name": event.event_name,
            "identifier": event.identifier,
            "livemode": False,
            "payload": _nested(r.form, "payload"),
            "timestamp": timestamp,
        }

    def _summaries(self, r: Recorded, meter: str) -> dict[str, Any]:
        self._require(r.query, "customer", "start_time", "end_time")
        if meter not in self.meters:
            raise StripeError(404, f"No such billing meter: '{meter}'")
        start, end = int(r.query["start_time"]), int(r.query["end_time"])
        if start % 60 or end % 60:
            raise StripeError(400, "start_time and end_time must align with minute boundaries.")
        event_name = self.meters[meter]
        with self._lock:
            total = sum(
                e.value
                for e in self.meter_events.values()
                if e.event_name == event_name
                and e.customer == r.query["customer"]
                and start <= e.timestamp < end
            )
        return {
            "object": "list",
            "url": r.path,
            "has_more": False,
            "data": [
                {
                    "id": f"mtrusg_{uuid.uuid4().hex[:14]}",
                    "object": "billing.meter_event_summary",
                    "aggregated_value": float(total),
                    "start_time": start,
                    "end_time": end,
                    "livemode": False,
                    "meter": meter,
                }
            ],
        }

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> StripeRecorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                request = Recorded(
                    method=self.command,
                    path=parts.path,
                    query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                    form=dict(parse_qsl(body, keep_blank_values=True)),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    status=None,
                )
                answer = recorder.handle(request)
                if answer is None:
                    self.close_connection = True
                    return
                status, payload = answer
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("Request-Id", f"req_{uuid.uuid4().hex[:14]}")
                if status >= 500:
                    self.send_header("Stripe-Should-Retry", "true")
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _nested(form: dict[str, str], name: str) -> dict[str, str]:
    prefix = name + "["
    return {k[len(prefix) : -1]: v for k, v in form.items() if k.startswith(prefix)}


def _error_body(status: int, message: str, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "status": status}}
