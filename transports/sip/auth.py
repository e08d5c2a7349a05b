"""Who may call: a source-address allow-list and SIP digest authentication (RFC 3261 §22, RFC 2617,
RFC 8760 for SHA-256).

The server is stateless: a nonce carries its own issue time and an HMAC of it under a server secret,
so any nonce we issued can be checked without remembering it, and an old one is answered `stale=true`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from transports.sip.message import SipRequest, SipResponse, new_tag

ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
QOP_AUTH = "auth"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowList:
    """Source addresses allowed to send requests: IPv4/IPv6 addresses and CIDR networks.

    An empty list allows everyone. A network with host bits set ("10.0.0.5/8") is refused as a
    likely typo rather than silently widened.
    """

    def __init__(self, entries: Iterable[str]):
        self.networks: list[IpNetwork] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip()))
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(
                    f"allow-list entry {entry!r} is not an IP address or network: {exc}"
                ) from None

    def allows(self, host: str) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host.strip().removeprefix("[").removesuffix("]"))
        except ValueError:
            return False
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; match them against IPv4 entries.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return f"AllowList({[str(n) for n in self.networks]!r})"


# auth-param = token "=" ( token / quoted-string ), separated by commas (RFC 2617 §1.2, RFC 3261 §25.1).
_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9\-_.]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))\s*(?:,|$)', re.S)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)


def parse_digest_credentials(value: str) -> dict[str, str] | None:
    """`Digest username="a", nc=00000001, ...` → {"username": "a", "nc": "00000001", ...}.

    Parameter names are lower-cased; quoted values are unescaped. Anything not of that shape, a
    scheme other than Digest, or a repeated parameter gives None.
    """
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    pos, rest = 0, rest.strip()
    while pos < len(rest):
        match = _AUTH_PARAM.match(rest, pos)
        if not match or match.end() == pos:
            return None
        name, quoted, token = match.groups()
        name = name.lower()
        if name in params:
            return None
        params[name] = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else token
        pos = match.end()
    return params


def digest_response(
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str | None = None,
    cnonce: str | None = None,
    qop: str | None = None,
) -> str:
    """The request-digest of RFC 2617 §3.2.2.1 as lower-case hex; without qop, the RFC 2069 form."""
    hash_ = ALGORITHMS[algorithm]

    def h(text: str) -> str:
        return hash_(text.encode()).hexdigest()

    ha1 = h(f"{username}:{realm}:{password}")
    ha2 = h(f"{method}:{uri}")
    if qop is None:
        return h(f"{ha1}:{nonce}:{ha2}")
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class _Outcome:
    user: str | None = None
    # The digest was right but the nonce had expired: the client should retry with a fresh one.
    stale: bool = False


class DigestAuthenticator:
    """Challenges requests with 401 and checks the `Authorization` that comes back.

    Nonce counts are not remembered (the server keeps no per-nonce state), so a captured
    Authorization can be replayed against the same Request-URI until its nonce expires; `nonce_ttl`
    bounds that window.
    """

    def __init__(
        self,
        realm: str,
        users: Mapping[str, str],
        *,
        algorithm: str = "MD5",
        nonce_ttl: float = 300,
        secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"digest algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        if nonce_ttl <= 0:
            raise ValueError(f"nonce_ttl {nonce_ttl!r} must be positive")
        self.realm = realm
        self.users = dict(users)
        self.algorithm = algorithm
        self.nonce_ttl = nonce_ttl
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._clock = clock

    # Nonces ------------------------------------------------------------------------------------

    def _nonce_mac(self, issued: str, salt: str) -> str:
        message = f"{issued}:{salt}:{self.realm}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def new_nonce(self) -> str:
        """`<issue time, hex>.<salt>.<HMAC>`: opaque to the client, checkable here without state."""
        issued, salt = f"{int(self._clock()):x}", secrets.token_hex(4)
        return f"{issued}.{salt}.{self._nonce_mac(issued, salt)}"

    def _nonce_age(self, nonce: str) -> float | None:
        """Seconds since we issued `nonce`, or None if we did not issue it."""
        parts = nonce.split(".")
        if len(parts) != 3:
            return None
        issued, salt, mac = parts
        if not hmac.compare_digest(mac.encode(), self._nonce_mac(issued, salt).encode()):
            return None
        try:
            age = self._clock() - int(issued, 16)
        except ValueError:
            return None
        # A little slack for clock steps; a nonce from the far future was not made by this clock.
        return age if age >= -5 else None

    # Challenge and verification ----------------------------------------------------------------

    def challenge(self, request: SipRequest) -> SipResponse:
        """A 401 carrying a fresh nonce; `stale=true` when the request's credentials were right but
        their nonce had expired (RFC 2617 §3.2.1), so the client retries without asking the user."""
        params = [
            f"realm={_quote(self.realm)}",
            f"nonce={_quote(self.new_nonce())}",
            f"algorithm={self.algorithm}",
            f"qop={_quote(QOP_AUTH)}",
        ]
        if self._check(request).stale:
            params.append("stale=true")
        value = "Digest " + ", ".join(params)
        # message.REASON_PHRASES has no 401, so the phrase is given here.
        return request.response(401, "Unauthorized", to_tag=new_tag(), headers=[("WWW-Authenticate", value)])

    def verify(self, request: SipRequest) -> str | None:
        """The user whose credentials in `request` are valid for this realm, else None."""
        return self._check(request).user

    def _check(self, request: SipRequest) -> _Outcome:
        outcome = _Outcome()
        for value in request.headers.get_all("Authorization"):
            try:
                result = self._check_credentials(request, value)
            except (ValueError, TypeError, KeyError, UnicodeError):
                continue
            if result.user is not None:
                return result
            if result.stale:
                outcome = result
        return outcome

    def _check_credentials(self, request: SipRequest, value: str) -> _Outcome:
        params = parse_digest_credentials(value)
        if params is None:
            return _Outcome()
        username, realm, nonce = params.get("username"), params.get("realm"), params.get("nonce")
        uri, response = params.get("uri"), params.get("response")
        if username is None or nonce is None or uri is None or response is None or realm != self.realm:
            return _Outcome()
        if params.get("algorithm", "MD5").upper() != self.algorithm:
            return _Outcome()
        password = self.users.get(username)
        if password is None:
            return _Outcome()
        # The uri must name what this request addresses, or the digest could be lifted from another.
        if uri != request.uri:
            return _Outcome()
        qop, nc, cnonce = params.get("qop"), params.get("nc"), params.get("cnonce")
        if qop is not None:
            if qop.lower() != QOP_AUTH or nc is None or cnonce is None:
                return _Outcome()
            if len(nc) != 8 or not all(c in "0123456789abcdefABCDEF" for c in nc):
                return _Outcome()
            qop = QOP_AUTH
        age = self._nonce_age(nonce)
        if age is None:
            return _Outcome()
        expected = digest_response(
            self.algorithm, username, self.realm, password, request.method, uri, nonce, nc, cnonce, qop
        )
        if not hmac.compare_digest(expected.encode(), response.lower().encode()):
            return _Outcome()
        if age > self.nonce_ttl:
            return _Outcome(stale=True)
        return _Outcome(user=username)
