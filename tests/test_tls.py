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
import pytest
from twisted.internet import protocol, reactor, ssl
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol, serverFromString
from twisted.internet.task import deferLater
from twisted.web import resource, server
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from audiosocket.dialer import DialFailed, HttpDialer
from audiosocket.store import RedisStore, StoreUnavailable
from test_dialer import request
from test_service import config_for, free_ports, started, stopped
from test_store import ext, redis_command


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


# -- Redis over TLS (rediss://) ------------------------------------------------------------------


class _Pipe(protocol.Protocol):
    """One side of the TLS terminator: bytes in, to the peer; the peer closing closes us."""

    peer = None

    def dataReceived(self, data):
        if self.peer is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Terminator(protocol.Protocol):
    """A TLS front for a redis-server on a unix socket, as a managed Redis's proxy would be."""

    def connectionMade(self):
        self.transport.pauseProducing()
        self.backend = _Pipe()
        self.backend.peer = self
        d = connectProtocol(UNIXClientEndpoint(reactor, self.factory.path), self.backend)
        d.addCallbacks(lambda _: self.transport.resumeProducing(), lambda f: self.transport.loseConnection())

    def dataReceived(self, data):
        self.backend.transport.write(data)

    def connectionLost(self, reason):
        if self.backend.transport is not None:
            self.backend.transport.loseConnection()


async def tls_front(redis_server, tmp_path):
    key, cert = self_signed(tmp_path)
    factory = protocol.Factory.forProtocol(_Terminator)
    factory.path = redis_server.path
    port = await serverFromString(
        reactor, "ssl:0:interface=127.0.0.1:privateKey={}:certKey={}".format(key, cert)
    ).listen(factory)
    return port, cert


@pytest_twisted.ensureDeferred
async def test_rediss_with_the_servers_ca_works(redis_server, tmp_path):
    """rediss://localhost with ca_file = the server's CA: commands and pub/sub go over TLS."""
    port, cert = await tls_front(redis_server, tmp_path)
    store = RedisStore(
        "rediss://localhost:{}/0".format(port.getHost().port), ca_file=str(cert), timeout_s=2.0
    )
    store.startService()
    try:
        await store.whenSubscribed().addTimeout(10, reactor)
        await store.save_extension(ext(10)).addTimeout(10, reactor)
        assert await store.load_extensions().addTimeout(10, reactor) == [ext(10)]
        assert "rediss://" in store.describe_address()
    finally:
        await store.stopService()
        await port.stopListening()
        await deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_rediss_with_an_unverifiable_certificate_never_talks(redis_server, tmp_path):
    """The server's certificate does not chain to ca_file: no command ever reaches Redis."""
    port, _ = await tls_front(redis_server, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_ca = self_signed(other)
    store = RedisStore(
        "rediss://localhost:{}/0".format(port.getHost().port), ca_file=str(other_ca), timeout_s=0.5
    )
    store.startService()
    try:
        with pytest.raises(StoreUnavailable):
            await store.save_extension(ext(10)).addTimeout(10, reactor)
        assert redis_command(redis_server.path, b"KEYS", b"*") == b"*0\r\n"
    finally:
        await store.stopService()
        await port.stopListening()
        await deferLater(reactor, 0.1, lambda: None)


def test_rediss_url_is_accepted_by_the_config(tmp_path):
    """[redis] url = "rediss://..." is valid; a ca_file must exist."""
    from test_config import CONDOMINIUM, error, load, write

    config = load(tmp_path, '[redis]\nurl = "rediss://redis.example:6380/0"\n' + CONDOMINIUM)
    assert config.redis.url == "rediss://redis.example:6380/0" and config.redis.ca_file is None
    path = write(tmp_path, '[redis]\nurl = "rediss://r:6380"\nca_file = "missing.pem"\n' + CONDOMINIUM)
    assert error(path).key == "redis.ca_file"
