"""SIP messages (RFC 3261 §7, §20): parse a UDP datagram into a request or response, and build one back.

Only what a user agent server needs: the start line, an ordered case-insensitive header multi-map,
structured access to Via, From/To, CSeq, Call-ID and Contact, and building a response from a request
as §8.2.6 says. Transactions, dialogs and SDP live in their own modules.
"""

from __future__ import annotations

import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Self

from .values import _TOKEN, SIP_VERSION, CSeq, NameAddr, SipParseError, SipUri, Via, _split_commas

# §8.1.1.7: a branch starting with this cookie was built by an RFC 3261 element.
MAGIC_COOKIE = "z9hG4bK"

# §7.3.3 and the IANA registry: compact forms expand to full names on parse.
COMPACT_FORMS = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
}

# Spelling used when writing names we know; unknown headers keep the sender's spelling.
_CANONICAL_NAMES = {
    name.lower(): name
    for name in (
        *COMPACT_FORMS.values(),
        "Accept",
        "Accept-Encoding",
        "Accept-Language",
        "Alert-Info",
        "Allow",
        "Authorization",
        "Call-Info",
        "Content-Disposition",
        "Content-Language",
        "CSeq",
        "Date",
        "Error-Info",
        "Expires",
        "In-Reply-To",
        "Max-Forwards",
        "Min-Expires",
        "MIME-Version",
        "Organization",
        "Priority",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Require",
        "Record-Route",
        "Reply-To",
        "Require",
        "Retry-After",
        "Route",
        "Server",
        "Timestamp",
        "Unsupported",
        "User-Agent",
        "Warning",
        "WWW-Authenticate",
    )
}

# §7.3.1: headers whose grammar is a comma-separated list, so "A, B" means two header lines. Others
# (Date, WWW-Authenticate, Authorization...) carry commas inside one value and are left whole.
_COMMA_SEPARATED = {
    "accept",
    "accept-encoding",
    "accept-language",
    "alert-info",
    "allow",
    "allow-events",
    "call-info",
    "contact",
    "content-encoding",
    "content-language",
    "error-info",
    "in-reply-to",
    "proxy-require",
    "record-route",
    "require",
    "route",
    "supported",
    "unsupported",
    "via",
}

# §8.1.1: a request without these cannot be answered (no Via) or matched to a transaction.
_MANDATORY_HEADERS = ("Via", "From", "To", "Call-ID", "CSeq")
_SINGLE_VALUED = ("From", "To", "Call-ID", "CSeq", "Content-Length")

REASON_PHRASES = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    603: "Decline",
}

_LINE_BREAK = re.compile(r"\r?\n")


def new_tag() -> str:
    """A From/To tag (§19.3): at least 32 bits of randomness."""
    return secrets.token_hex(8)


def new_branch() -> str:
    """A Via branch unique in space and time, with the RFC 3261 magic cookie (§8.1.1.7)."""
    return MAGIC_COOKIE + secrets.token_hex(12)


def canonical_name(name: str) -> str:
    """Full, conventionally spelled header name for `name` (compact forms expanded)."""
    lower = name.lower()
    return COMPACT_FORMS.get(lower) or _CANONICAL_NAMES.get(lower, name)


class Headers:
    """Ordered, case-insensitive multi-map of header lines; names stored in their canonical spelling."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()):
        self._items: list[tuple[str, str]] = []
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        self._items.append((canonical_name(name), value))

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of `name`."""
        key = canonical_name(name).lower()
        return next((v for n, v in self._items if n.lower() == key), default)

    def get_all(self, name: str) -> list[str]:
        key = canonical_name(name).lower()
        return [v for n, v in self._items if n.lower() == key]

    def set(self, name: str, value: str) -> None:
        """Replace every `name` line by one, at the place of the first (or at the end)."""
        name = canonical_name(name)
        key, out, placed = name.lower(), [], False
        for n, v in self._items:
            if n.lower() != key:
                out.append((n, v))
            elif not placed:
                out.append((name, value))
                placed = True
        if not placed:
            out.append((name, value))
        self._items = out

    def remove(self, name: str) -> None:
        key = canonical_name(name).lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class SipMessage(ABC):
    """What requests and responses share: headers, body, the typed header accessors, and the wire form."""

    def __init__(self, headers: Headers | Iterable[tuple[str, str]] = (), body: bytes = b""):
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.body = body

    # Header access ---------------------------------------------------------------------------

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def headers_all(self, name: str) -> list[str]:
        return self.headers.get_all(name)

    def _required(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise SipParseError(f"no {name} header")
        return value

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.headers.get_all("Via")]

    @property
    def via(self) -> Via:
        """The top Via: where a UAS sends its responses (§18.2.2)."""
        return Via.parse(self._required("Via"))

    @property
    def from_(self) -> NameAddr:
        return NameAddr.parse(self._required("From"))

    @property
    def to(self) -> NameAddr:
        return NameAddr.parse(self._required("To"))

    @property
    def call_id(self) -> str:
        return self._required("Call-ID")

    @property
    def cseq(self) -> CSeq:
        return CSeq.parse(self._required("CSeq"))

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values; the `*` of a REGISTER is left out."""
        return [NameAddr.parse(v) for v in self.headers.get_all("Contact") if v.strip() != "*"]

    @property
    def contact_uri(self) -> SipUri | None:
        contacts = self.contacts
        return contacts[0].sip_uri if contacts else None

    # Wire form ---------------------------------------------------------------------------------

    @abstractmethod
    def _start_line(self) -> str:
        """The request line or status line, without CRLF."""

    def __bytes__(self) -> bytes:
        lines = [self._start_line()]
        wrote_length = False
        for name, value in self.headers:
            if name == "Content-Length":
                if wrote_length:
                    continue
                value, wrote_length = str(len(self.body)), True
            lines.append(f"{name}: {value}")
        if not wrote_length:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Parse one UDP datagram. `SipMessage.parse` returns a SipRequest or SipResponse; the
        subclasses' `parse` also insist on their kind."""
        message = _parse(data)
        if not isinstance(message, cls):
            raise SipParseError(f"expected a {cls.__name__}, got a {type(message).__name__}")
        return message


class SipRequest(SipMessage):
    """`INVITE sip:agent@host SIP/2.0`. The Request-URI stays text; `sip_uri` parses it."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Headers | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ):
        super().__init__(headers, body)
        self.method = method
        self.uri = uri

    @property
    def sip_uri(self) -> SipUri:
        return SipUri.parse(self.uri)

    def _start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"

    def response(
        self,
        status: int,
        reason: str | None = None,
        *,
        to_tag: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> SipResponse:
        """A response to this request, copying Via (all, in order), From, To, Call-ID and CSeq
        (§8.2.6.2); `to_tag` is added to To unless the request's To already has one."""
        if not 100 <= status <= 699:
            raise ValueError(f"status {status} is not in 100..699")
        out = Headers()
        for via in self.headers.get_all("Via"):
            out.add("Via", via)
        out.add("From", self._required("From"))
        to = self._required("To")
        if to_tag is not None:
            address = NameAddr.parse(to)
            if address.tag is None:
                address.params["tag"] = to_tag
                to = str(address)
        out.add("To", to)
        out.add("Call-ID", self._required("Call-ID"))
        out.add("CSeq", self._required("CSeq"))
        timestamp = self.headers.get("Timestamp")
        if status == 100 and timestamp is not None:
            out.add("Timestamp", timestamp)  # §8.2.6.1
        for name, value in headers:
            out.add(name, value)
        return SipResponse(status, REASON_PHRASES.get(status, "") if reason is None else reason, out, body)

    def __repr__(self) -> str:
        return (
            f"SipRequest({self.method} {self.uri}, {len(self.headers)} headers, {len(self.body)} body bytes)"
        )


class SipResponse(SipMessage):
    """`SIP/2.0 200 OK`."""

    def __init__(
        self,
        status: int,
        reason: str = "",
        headers: Headers | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ):
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def _start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"SipResponse({self.status} {self.reason}, {len(self.headers)} headers, {len(self.body)} body bytes)"


def _parse(data: bytes) -> SipRequest | SipResponse:
    # §7.5: empty lines before the start line are ignored (they are also the CRLF keep-alive).
    data = data.lstrip(b"\r\n")
    if not data:
        raise SipParseError("empty datagram (or only CRLF keep-alive)")
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    if not ends:
        raise SipParseError("no blank line after the headers (truncated message?)")
    end, sep_len = min(ends)
    try:
        head = data[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError(
            f"header bytes are not UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r})"
        ) from None
    rest = data[end + sep_len :]

    lines = _LINE_BREAK.split(head)
    start_line, header_lines = lines[0], lines[1:]
    message = _parse_start_line(start_line)

    # §7.3.1: a line starting with whitespace continues the previous one.
    unfolded: list[str] = []
    for line in header_lines:
        if line[:1] in (" ", "\t"):
            if not unfolded:
                raise SipParseError(f"continuation line {line!r} before any header")
            unfolded[-1] = unfolded[-1].rstrip() + " " + line.strip()
        else:
            unfolded.append(line)
    for line in unfolded:
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _TOKEN.fullmatch(name):
            raise SipParseError(f"header line {line!r} is not 'Name: value'")
        name, value = canonical_name(name), value.strip()
        if name.lower() in _COMMA_SEPARATED:
            for part in _split_commas(value):
                message.headers.add(name, part)
        else:
            message.headers.add(name, value)

    for name in _MANDATORY_HEADERS:
        if name not in message.headers:
            raise SipParseError(f"no {name} header")
    for name in _SINGLE_VALUED:
        if len(message.headers.get_all(name)) > 1:
            raise SipParseError(f"more than one {name} header")
    # Parse the headers a UAS relies on now, so a bad one is a parse error rather than a surprise later.
    _ = message.vias, message.from_, message.to
    cseq = message.cseq
    if isinstance(message, SipRequest) and cseq.method != message.method:
        raise SipParseError(f"CSeq method {cseq.method} does not match request method {message.method}")

    length_text = message.headers.get("Content-Length")
    if length_text is None:
        # Over UDP the datagram ends the message (§18.3), so the body is whatever is left.
        message.body = rest
    else:
        if not length_text.isascii() or not length_text.isdigit():
            raise SipParseError(f"Content-Length {length_text!r} is not a number")
        length = int(length_text)
        if length > len(rest):
            raise SipParseError(f"Content-Length {length} but {len(rest)} bytes of body")
        message.body = rest[:length]  # §18.3: extra bytes after Content-Length are discarded
    return message


def _parse_start_line(line: str) -> SipRequest | SipResponse:
    if line.startswith("SIP/"):
        version, _, rest = line.partition(" ")
        if version != SIP_VERSION:
            raise SipParseError(f"status line {line!r} is not {SIP_VERSION}")
        code, _, reason = rest.partition(" ")
        if len(code) != 3 or not code.isascii() or not code.isdigit() or not 100 <= int(code) <= 699:
            raise SipParseError(f"status line {line!r} has no three-digit status code")
        return SipResponse(int(code), reason.strip())
    parts = line.split(" ")
    if not parts[-1].startswith("SIP/"):
        raise SipParseError(f"request line {line!r} has no SIP version")
    if len(parts) != 3:
        raise SipParseError(f"request line {line!r} is not 'Method Request-URI SIP/2.0'")
    method, uri, version = parts
    if version != SIP_VERSION:
        raise SipParseError(f"request line {line!r} is not {SIP_VERSION}")
    if not _TOKEN.fullmatch(method):
        raise SipParseError(f"request line {line!r}: method {method!r} is not a token")
    if ":" not in uri:
        raise SipParseError(f"request line {line!r}: Request-URI {uri!r} has no scheme")
    return SipRequest(method, uri)
