# -*- test-case-name: tests.test_dashboard,tests.test_api -*-
"""
Dashboard logins: the API token, given once on the login page, buys a session cookie.

C{POST /login}, authorized like any request by C{Authorization: Bearer <token>}, answers
with a cookie (L{SESSION_COOKIE}: C{HttpOnly}, C{SameSite=Strict}, C{Path=/}, C{Secure} when
the request came over TLS). The cookie then stands for the token (see
L{audiosocket.api.Api.credentials}), but on a state-changing method only together with the
login's CSRF token in an C{X-CSRF-Token} header, which the pages carry in a C{<meta>} tag
and a page of another site cannot read.

The cookie is C{<id>.<expiry>.<signature>}: a random id (the operating system's CSPRNG), its
expiry (Unix seconds, C{ttl} after the login) and an HMAC-SHA256 of both under a key derived
from the token; the CSRF token is an HMAC of the id under the same key. Nothing is stored
per login, so a login survives a restart of the server (an open page reconnects its event
stream and goes on), and every login made with a token is void as soon as the token changes
(its environment variable). A logout voids its id in memory until its expiry (and the
browser drops the cookie); that list is bounded (C{max_revoked}, the oldest first) and does
not survive a restart.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import secrets

from attrs import define
from twisted.web.http_headers import Headers

SESSION_COOKIE = b"audiosocket_session"
CSRF_HEADER = b"X-CSRF-Token"
LOGIN_TTL_S = 12 * 3600
MAX_REVOKED = 4096
_CONTEXT = b"audiosocket dashboard login v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _key(token: str) -> bytes:
    return hmac.new(token.encode("utf-8"), _CONTEXT, hashlib.sha256).digest()


def _mac(key: bytes, *parts: str) -> str:
    return _b64(hmac.new(key, "|".join(parts).encode("ascii"), hashlib.sha256).digest())


@define
class Login:
    id: str
    csrf: str
    expires_at: int
    cookie: str


def cookie_value(headers: Headers, name: bytes) -> bytes | None:
    """The value of cookie C{name} in a request's C{Cookie} headers (the last one wins)."""
    found = None
    for header in headers.getRawHeaders(b"cookie") or ():
        for part in header.split(b";"):
            key, sep, value = part.strip().partition(b"=")
            if sep and key == name:
                found = value.strip().strip(b'"')
    return found


class BrowserLogins:
    """Makes and checks login cookies (see the module docstring)."""

    def __init__(self, reactor, ttl: float = LOGIN_TTL_S, max_revoked: int = MAX_REVOKED):
        self._reactor = reactor
        self.ttl = ttl
        self.max_revoked = max_revoked
        self._revoked: collections.OrderedDict[str, int] = collections.OrderedDict()

    def _login(self, key: bytes, login_id: str, expires_at: int) -> Login:
        expiry = str(expires_at)
        signature = _mac(key, "cookie", login_id, expiry)
        return Login(
            id=login_id,
            csrf=_mac(key, "csrf", login_id),
            expires_at=expires_at,
            cookie="{}.{}.{}".format(login_id, expiry, signature),
        )

    def create(self, token: str) -> Login:
        expires_at = int(self._reactor.seconds() + self.ttl)
        return self._login(_key(token), secrets.token_urlsafe(24), expires_at)

    def find(self, value: bytes | None, token: str) -> Login | None:
        """The login a cookie value names, if it is in force for C{token}."""
        if not value or len(value) > 200:
            return None
        try:
            login_id, expiry, signature = value.decode("ascii").split(".")
            expires_at = int(expiry)
        except (UnicodeDecodeError, ValueError):
            return None
        login = self._login(_key(token), login_id, expires_at)
        if not hmac.compare_digest(login.cookie.encode(), value):
            return None
        if expires_at <= self._reactor.seconds() or login_id in self._revoked:
            return None
        return login

    def remove(self, login: Login) -> None:
        """Log out: the login's cookie is refused from now on (until it expires)."""
        now = self._reactor.seconds()
        for old, expires_at in list(self._revoked.items()):
            if expires_at <= now:
                del self._revoked[old]
        while len(self._revoked) >= self.max_revoked:
            self._revoked.popitem(last=False)
        self._revoked[login.id] = login.expires_at
