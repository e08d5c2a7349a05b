"""Structured SIP header values (RFC 3261 §19.1, §20, §25.1): URIs, name-addr (From/To/Contact), Via
and CSeq, each parsed from and written back to its text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SIP_VERSION = "SIP/2.0"

_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_VIA = re.compile(r"SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s+([^;\s]+)\s*((?:;.*)?)", re.S)


class SipParseError(ValueError):
    """A datagram or header value that is not valid SIP; the message says what is wrong."""


def _split_params(text: str) -> dict[str, str | None]:
    """`;a=1;b` → {"a": "1", "b": None}; names are lower-cased (parameter names are case-insensitive)."""
    params: dict[str, str | None] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not name:
            raise SipParseError(f"parameter {part!r} has no name")
        params[name] = value.strip() if eq else None
    return params


def _join_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _split_commas(value: str) -> list[str]:
    """Split a header value at commas that are outside quotes and angle brackets (§7.3.1)."""
    parts, start, quoted, angle, i = [], 0, False, False, 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            angle = True
        elif ch == ">":
            angle = False
        elif ch == "," and not angle:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def _parse_port(text: str, where: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise SipParseError(f"{where}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def _split_hostport(text: str, where: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` → (host without brackets, port)."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"{where}: IPv6 reference {text!r} has no closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise SipParseError(f"{where}: junk {rest!r} after IPv6 reference")
        port = rest[1:] if rest else None
    else:
        host, colon, port = text.partition(":")
        port = port if colon else None
    if not host or any(c.isspace() for c in host):
        raise SipParseError(f"{where}: bad host {text!r}")
    return host, (_parse_port(port, where) if port is not None else None)


def _format_host(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


@dataclass
class SipUri:
    """`sip:user:password@host:port;uri-params?headers` (§19.1).

    `sips:` parses with `scheme == "sips"` (`secure` is True): a UDP server should answer 416 or
    refuse it rather than treat it as plain sip. `tel:` and other schemes raise SipParseError, which
    is why a request keeps its Request-URI as text: the request still parses and can be answered 416.
    """

    host: str
    user: str | None = None
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    password: str | None = None
    headers: str = ""
    scheme: str = "sip"

    @property
    def secure(self) -> bool:
        return self.scheme == "sips"

    @classmethod
    def parse(cls, text: str) -> SipUri:
        text = text.strip()
        scheme, colon, rest = text.partition(":")
        scheme = scheme.lower()
        if not colon:
            raise SipParseError(f"URI {text!r} has no scheme")
        if scheme not in ("sip", "sips"):
            raise SipParseError(f"URI scheme {scheme!r} is not supported, only sip: and sips: ({text!r})")
        rest, _, headers = rest.partition("?")
        # The user part may itself contain ';' (tel-style users), but never an unescaped '@'.
        userinfo, at, hostpart = rest.rpartition("@")
        user = password = None
        if at:
            user, pcolon, pw = userinfo.partition(":")
            password = pw if pcolon else None
            if not user:
                raise SipParseError(f"URI {text!r} has an empty user part")
        hostport, _, params = hostpart.partition(";")
        host, port = _split_hostport(hostport, f"URI {text!r}")
        return cls(
            host=host,
            user=user,
            port=port,
            params=_split_params(params),
            password=password,
            headers=headers,
            scheme=scheme,
        )

    def __str__(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = self.user + (f":{self.password}" if self.password is not None else "") + "@"
        headers = f"?{self.headers}" if self.headers else ""
        return f"{self.scheme}:{userinfo}{_format_host(self.host, self.port)}{_join_params(self.params)}{headers}"


@dataclass
class NameAddr:
    """A From, To or Contact value: optional display name, URI (kept as text), header parameters."""

    uri: str
    display_name: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def sip_uri(self) -> SipUri:
        return SipUri.parse(self.uri)

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        text = text.strip()
        display: str | None = None
        if text.startswith('"'):
            i, chars = 1, []
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text):
                    i += 1
                chars.append(text[i])
                i += 1
            if i >= len(text):
                raise SipParseError(f"display name in {text!r} has no closing quote")
            display, rest = "".join(chars), text[i + 1 :].lstrip()
            if not rest.startswith("<"):
                raise SipParseError(f"quoted display name in {text!r} is not followed by <uri>")
        else:
            lt = text.find("<")
            rest = text
            if lt >= 0:
                display, rest = text[:lt].strip() or None, text[lt:]
        if rest.startswith("<"):
            end = rest.find(">")
            if end < 0:
                raise SipParseError(f"address {text!r} has no closing '>'")
            uri, params = rest[1:end].strip(), rest[end + 1 :].strip()
            if params and not params.startswith(";"):
                raise SipParseError(f"junk {params!r} after '>' in {text!r}")
        else:
            # §20.10: without angle brackets, everything after ';' is a header parameter.
            uri, _, params = rest.partition(";")
            uri = uri.strip()
        if not uri or ":" not in uri:
            raise SipParseError(f"address {text!r} has no URI with a scheme")
        return cls(uri=uri, display_name=display, params=_split_params(params))

    def __str__(self) -> str:
        name = ""
        if self.display_name is not None:
            name = '"' + self.display_name.replace("\\", "\\\\").replace('"', '\\"') + '" '
        return f"{name}<{self.uri}>{_join_params(self.params)}"


@dataclass
class Via:
    """One Via value, `SIP/2.0/UDP host:port;branch=...;received=...;rport` (§20.42, RFC 3581)."""

    host: str
    port: int | None = None
    transport: str = "UDP"
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport_requested(self) -> bool:
        return "rport" in self.params

    @property
    def rport(self) -> int | None:
        """The filled-in rport value, if a server wrote one (RFC 3581 §4)."""
        value = self.params.get("rport")
        return _parse_port(value, "Via rport") if value else None

    @classmethod
    def parse(cls, text: str) -> Via:
        match = _VIA.fullmatch(text.strip())
        if not match:
            raise SipParseError(f"Via {text!r} is not 'SIP/2.0/<transport> <host>[:port][;params]'")
        transport, sent_by, params = match.groups()
        host, port = _split_hostport(sent_by, f"Via {text!r}")
        via = cls(host=host, port=port, transport=transport.upper(), params=_split_params(params))
        _ = via.rport  # a filled-in rport must be a port number
        return via

    def __str__(self) -> str:
        return (
            f"{SIP_VERSION}/{self.transport} {_format_host(self.host, self.port)}{_join_params(self.params)}"
        )


@dataclass(frozen=True)
class CSeq:
    """`CSeq: 4711 INVITE` (§20.16)."""

    number: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        parts = text.split()
        if len(parts) != 2 or not parts[0].isascii() or not parts[0].isdigit():
            raise SipParseError(f"CSeq {text!r} is not '<number> <method>'")
        number = int(parts[0])
        if number >= 2**31:
            raise SipParseError(f"CSeq number {number} is not below 2**31")
        if not _TOKEN.fullmatch(parts[1]):
            raise SipParseError(f"CSeq method {parts[1]!r} is not a token")
        return cls(number, parts[1])

    def __str__(self) -> str:
        return f"{self.number} {self.method}"
