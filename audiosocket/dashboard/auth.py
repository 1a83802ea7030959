# -*- test-case-name: tests.test_dashboard,tests.test_api -*-
"""
Dashboard logins: the API token, given once on the login page, buys a session cookie.

C{POST /login}, authorized like any request by C{Authorization: Bearer <token>}, answers
with a cookie (L{SESSION_COOKIE}: C{HttpOnly}, C{SameSite=Strict}, C{Path=/}, C{Secure} when
the request came over TLS) naming a L{Login}: a random id and a random CSRF token, both
from the operating system's CSPRNG. The cookie then stands for the token (see
L{audiosocket.api.Api.credentials}), but on a state-changing method only together with the
login's CSRF token in an C{X-CSRF-Token} header, which the pages carry in a C{<meta>} tag
and a cross-site page cannot read.

Logins live in memory (a restart logs everyone out), expire after C{ttl} seconds, are at most
C{cap} (the oldest goes first), and are bound to the token they were made with: when the
token changes (its environment variable), every login made with the old one is void.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets

from attrs import define
from twisted.web.http_headers import Headers

SESSION_COOKIE = b"audiosocket_session"
CSRF_HEADER = b"X-CSRF-Token"
LOGIN_TTL_S = 12 * 3600
MAX_LOGINS = 256


def _fingerprint(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@define
class Login:
    id: str
    csrf: str
    token_fingerprint: bytes
    expires_at: float


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
    """The logins in force, by cookie value."""

    def __init__(self, reactor, ttl: float = LOGIN_TTL_S, cap: int = MAX_LOGINS):
        self._reactor = reactor
        self.ttl = ttl
        self.cap = cap
        self._logins: collections.OrderedDict[str, Login] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._logins)

    def create(self, token: str) -> Login:
        while len(self._logins) >= self.cap:
            self._logins.popitem(last=False)
        login = Login(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            token_fingerprint=_fingerprint(token),
            expires_at=self._reactor.seconds() + self.ttl,
        )
        self._logins[login.id] = login
        return login

    def find(self, value: bytes | None, token: str) -> Login | None:
        """The login a cookie value names, if it is in force for C{token}."""
        if not value:
            return None
        try:
            key = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        login = self._logins.get(key)
        if login is None:
            return None
        if login.expires_at <= self._reactor.seconds() or not hmac.compare_digest(
            login.token_fingerprint, _fingerprint(token)
        ):
            del self._logins[key]
            return None
        return login

    def remove(self, login: Login) -> None:
        self._logins.pop(login.id, None)
