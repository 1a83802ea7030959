"""
TLS both ways: the API served on an C{ssl:} endpoint, and outbound HTTPS (here the HTTP
dialer's webhook) refusing a certificate it cannot verify — service-identity checks names.
"""

from __future__ import annotations

import datetime
import ipaddress

import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.web import resource, server
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from audiosocket.dialer import DialFailed, HttpDialer
from test_dialer import request
from test_service import config_for, free_ports, started, stopped


def self_signed(tmp_path):
    """A certificate for "localhost" and its key, written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def trusting(cert_path) -> Agent:
    """An HTTPS client that trusts exactly this certificate (and still checks the name)."""
    root = ssl.Certificate.loadPEM(cert_path.read_bytes())
    return Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=root))


@pytest_twisted.ensureDeferred
async def test_api_over_tls(redis_server, tmp_path):
    """With an ssl: endpoint the API answers over HTTPS to a client that trusts its certificate."""
    key_path, cert_path = self_signed(tmp_path)
    ai, ret = free_ports(2)
    endpoint = "ssl:0:interface=127.0.0.1:privateKey={}:certKey={}".format(key_path, cert_path)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret, api={"endpoint": endpoint}))
    try:
        port = svc.api_port.getHost().port
        client = treq.client.HTTPClient(trusting(cert_path))
        response = await client.get("https://localhost:{}/healthz".format(port))
        body = await response.json()
    finally:
        await stopped(svc)
    assert response.code == 200 and body == {"status": "ok"}


class Hook(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.posts = 0

    def render_POST(self, request):
        self.posts += 1
        return b"{}"


@pytest_twisted.ensureDeferred
async def test_https_webhook_with_unverifiable_certificate_is_refused(tmp_path):
    """
    The HTTP dialer verifies certificates: a webhook whose certificate no trusted authority
    signed fails the attempt, and the request never reaches it.
    """
    key_path, cert_path = self_signed(tmp_path)
    hook = Hook()
    listening = await serverFromString(
        reactor,
        "ssl:0:interface=127.0.0.1:privateKey={}:certKey={}".format(key_path, cert_path),
    ).listen(server.Site(hook))
    dialer = HttpDialer("https://localhost:{}/dial".format(listening.getHost().port), timeout_s=5)
    try:
        failure = None
        try:
            await dialer.dial(request())
        except DialFailed as e:
            failure = e
        # The client dropped the handshake; let the server side see it before tear-down.
        port = listening.getHost().port
        for _ in range(100):
            if not [r for r in reactor.getReaders() if "on {}".format(port) in repr(r)]:
                break
            await deferLater(reactor, 0.02, lambda: None)
    finally:
        await listening.stopListening()
    assert failure is not None and "certificate verify failed" in str(failure)
    assert hook.posts == 0
