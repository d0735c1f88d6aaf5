"""The SMTP sender against a real SMTP server (aiosmtpd on loopback): STARTTLS with login,
implicit TLS, the portal links in each kind of mail, and a relay that refuses connections at
first, retried later from the outbox without losing the message."""

from __future__ import annotations

import datetime as dt
import email
import ipaddress
import ssl
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hiddenmodel import smtp
from hiddenmodel.settings import get_settings
from tests.conftest import PASSWORD, _free_port, db_rows, make_org, unique

USER, SECRET = "relay-user", "relay-password-42"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, Message]] = []

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        raw = envelope.content if isinstance(envelope.content, bytes) else b""
        self.messages.append((envelope, email.message_from_bytes(raw)))
        return "250 OK"

    def wait_for(self, to: str, timeout: float = 20.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for envelope, message in self.messages:
                if to in envelope.rcpt_tos:
                    return message
            time.sleep(0.05)
        raise AssertionError(f"no mail to {to}; got {[e.rcpt_tos for e, _ in self.messages]}")


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        USER.encode(),
        SECRET.encode(),
    )
    return AuthResult(success=ok)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: the relay's, and the CA file the sender trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("smtp-cert")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))
    return context


def _use_smtp(monkeypatch: pytest.MonkeyPatch, port: int, ca: Path, **extra: str) -> None:
    for name, value in {
        "HM_MAIL_SENDER": "smtp",
        "HM_SMTP_HOST": "127.0.0.1",
        "HM_SMTP_PORT": str(port),
        "HM_SMTP_CA_FILE": str(ca),
        "HM_SMTP_TIMEOUT_SECONDS": "5",
        "HM_SMTP_RETRY_BASE_SECONDS": "0",
        **extra,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


@pytest.fixture
def settings_restored() -> Iterator[None]:
    yield
    get_settings.cache_clear()


@pytest.fixture
def starttls_relay(certificate: tuple[Path, Path]) -> Iterator[tuple[Controller, Inbox]]:
    inbox = Inbox()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=_free_port(),
        tls_context=_server_context(certificate),
        require_starttls=True,
        authenticator=_authenticator,
        auth_require_tls=True,
    )
    controller.start()
    try:
        yield controller, inbox
    finally:
        controller.stop()


def _outbox(to: str) -> list[Any]:
    return db_rows(
        "SELECT status, attempts, last_error, kind FROM mail_outbox WHERE to_address = :t", t=to
    )


def _link(message: Message, path: str) -> str:
    body = message.get_payload(decode=True)
    assert isinstance(body, bytes)
    text = body.decode()
    base = get_settings().public_base_url
    found = [word for word in text.split() if word.startswith(f"{base}{path}")]
    assert found, text
    return found[0]


async def test_starttls_with_login_carries_every_kind_of_mail(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    certificate: tuple[Path, Path],
    starttls_relay: tuple[Controller, Inbox],
    settings_restored: None,
) -> None:
    controller, inbox = starttls_relay
    _use_smtp(
        monkeypatch,
        controller.port,
        certificate[0],
        HM_SMTP_SECURITY="starttls",
        HM_SMTP_USERNAME=USER,
        HM_SMTP_PASSWORD=SECRET,
    )
    # Registration mails the verification link.
    address = f"{unique('smtp')}@example.com"
    r = await client.post("/v1/auth/register", json={"email": address, "password": PASSWORD})
    assert r.status_code == 201, r.text
    verify = inbox.wait_for(address)
    assert verify["Subject"] == "Verify your Hidden Model e-mail address"
    assert verify["Message-ID"].endswith("@hiddenmodel.dev>")
    assert "?token=" in _link(verify, "/portal/verify?token=")

    inbox.messages.clear()
    r = await client.post("/v1/auth/forgot-password", json={"email": address})
    assert r.status_code == 202, r.text
    reset = inbox.wait_for(address)
    assert "?token=" in _link(reset, "/portal/reset?token=")

    org = await make_org(client)
    invitee = f"{unique('invitee')}@example.com"
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": invitee, "role": "member"},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    invitation = inbox.wait_for(invitee)
    link = _link(invitation, "/portal/invitations/accept")
    assert link.endswith(f"?token={r.json()['token']}"), link

    assert [tuple(row) for row in _outbox(invitee)] == [("sent", 1, None, "invitation")]
    assert {row[0] for row in _outbox(address)} == {"sent"}
    # Nothing went to the development recorder.
    assert not db_rows("SELECT 1 FROM email_messages WHERE to_address = :t", t=invitee)


async def test_wrong_credentials_are_retried_not_lost(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    certificate: tuple[Path, Path],
    starttls_relay: tuple[Controller, Inbox],
    settings_restored: None,
) -> None:
    controller, inbox = starttls_relay
    _use_smtp(
        monkeypatch,
        controller.port,
        certificate[0],
        HM_SMTP_USERNAME=USER,
        HM_SMTP_PASSWORD="wrong-password",
    )
    address = f"{unique('cred')}@example.com"
    r = await client.post("/v1/auth/register", json={"email": address, "password": PASSWORD})
    assert r.status_code == 201, r.text
    [(status, attempts, error, _)] = _outbox(address)
    assert (status, attempts) == ("pending", 1) and error, error
    assert not inbox.messages
    monkeypatch.setenv("HM_SMTP_PASSWORD", SECRET)
    get_settings.cache_clear()
    assert smtp.deliver_due()["sent"] >= 1
    inbox.wait_for(address)


async def test_implicit_tls(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    certificate: tuple[Path, Path],
    settings_restored: None,
) -> None:
    inbox = Inbox()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=_free_port(), ssl_context=_server_context(certificate)
    )
    controller.start()
    try:
        _use_smtp(monkeypatch, controller.port, certificate[0], HM_SMTP_SECURITY="tls")
        address = f"{unique('tls')}@example.com"
        r = await client.post("/v1/auth/register", json={"email": address, "password": PASSWORD})
        assert r.status_code == 201, r.text
        inbox.wait_for(address)
        assert [row[0] for row in _outbox(address)] == ["sent"]
    finally:
        controller.stop()


async def test_an_untrusted_relay_certificate_is_refused(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    certificate: tuple[Path, Path],
    starttls_relay: tuple[Controller, Inbox],
    settings_restored: None,
    tmp_path: Path,
) -> None:
    controller, inbox = starttls_relay
    _use_smtp(monkeypatch, controller.port, certificate[0])
    monkeypatch.delenv("HM_SMTP_CA_FILE")
    get_settings.cache_clear()
    address = f"{unique('untrusted')}@example.com"
    r = await client.post("/v1/auth/register", json={"email": address, "password": PASSWORD})
    assert r.status_code == 201, r.text
    [(status, _, error, _)] = _outbox(address)
    assert status == "pending" and "CERTIFICATE_VERIFY_FAILED" in error, error
    assert not inbox.messages


async def test_a_refused_connection_is_retried_later_from_the_outbox(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    certificate: tuple[Path, Path],
    settings_restored: None,
) -> None:
    port = _free_port()  # nothing listens there yet
    _use_smtp(monkeypatch, port, certificate[0], HM_SMTP_SECURITY="starttls")
    org = await make_org(client)
    invitee = f"{unique('later')}@example.com"
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": invitee, "role": "admin"},
        headers=org.owner.headers,
    )
    # The request succeeds: the mail waits in the outbox.
    assert r.status_code == 201, r.text
    [(status, attempts, error, kind)] = _outbox(invitee)
    assert (status, attempts, kind) == ("pending", 1, "invitation")
    assert "Connection refused" in error or "ConnectionRefused" in error, error
    # Still refused: a second try counts, the message stays.
    assert smtp.deliver_due()["pending"] >= 1
    assert _outbox(invitee)[0][:2] == ("pending", 2)

    inbox = Inbox()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=_server_context(certificate),
        require_starttls=True,
    )
    controller.start()
    try:
        assert smtp.deliver_due()["sent"] >= 1
        message = inbox.wait_for(invitee)
        assert _link(message, "/portal/invitations/accept").endswith(r.json()["token"])
        assert [tuple(row) for row in _outbox(invitee)] == [("sent", 3, None, "invitation")]
        # Sent once: a later sweep finds nothing to do for it.
        smtp.deliver_due()
        assert len([e for e, _ in inbox.messages if invitee in e.rcpt_tos]) == 1
    finally:
        controller.stop()


def test_the_last_attempt_fails_the_message(
    monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path], settings_restored: None
) -> None:
    _use_smtp(monkeypatch, _free_port(), certificate[0], HM_SMTP_MAX_ATTEMPTS="2")
    to = f"{unique('gone')}@example.com"
    db_rows(
        "INSERT INTO mail_outbox (id, to_address, subject, body, kind) "
        "VALUES (gen_random_uuid(), :t, 's', 'b', 'verify')",
        t=to,
    )
    smtp.deliver_due()
    smtp.deliver_due()
    assert _outbox(to)[0][:2] == ("failed", 2)
    smtp.deliver_due()
    assert _outbox(to)[0][:2] == ("failed", 2)
