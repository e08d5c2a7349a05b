"""The HTTP side of a Twilio phone number, as pure functions: check X-Twilio-Signature, issue and check
per-call stream tokens, build the TwiML that opens a Media Stream, hangs up or transfers, and push new
TwiML to a live call over Twilio's REST API.

No web framework here; the routes call these. Facts used: shared docs, telephony facts 2.1, 2.6 and 2.7.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import re
import time
from typing import Any
from urllib.parse import urlsplit

from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

from .addresses import E164, SIP_URI

__all__ = [
    "StreamTokens",
    "connect_twiml",
    "hangup_twiml",
    "public_url",
    "transfer_twiml",
    "update_call",
    "verify_signature",
]

# Call SIDs are "CA" followed by 32 hex digits; checked before the SID goes into a REST path.
_CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")


# --- X-Twilio-Signature ------------------------------------------------------------------------------


def public_url(base_url: str, path: str, query: str = "") -> str:
    """The URL Twilio requested, rebuilt from the configured public base URL (what Twilio signed).

    Behind a proxy or TLS terminator the server's own view of the URL (scheme, host, port) differs from
    the one Twilio used, and a signature made for ``https://...`` fails against ``http://...``. Exactly
    one slash joins ``base_url`` (which may carry a path prefix) and ``path``; ``query`` (with or without
    its leading ``?``) is appended unchanged, since Twilio signs it byte for byte.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise ValueError(f"public base URL must be absolute http(s) or ws(s): {base_url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"public base URL must not carry a query or fragment: {base_url!r}")
    url = base_url.rstrip("/") + "/" + path.lstrip("/")
    if query.startswith("?"):
        query = query[1:]
    return f"{url}?{query}" if query else url


def verify_signature(auth_token: str, url: str, params: dict[str, str], signature: str | None) -> bool:
    """True when ``signature`` (the X-Twilio-Signature header) is Twilio's for this URL and form.

    ``url`` is the public URL (see `public_url`); ``params`` the POST form fields (empty for GET
    requests and for the Media Stream WebSocket upgrade, whose URL is signed as written in the TwiML).
    The comparison is constant-time (twilio's `RequestValidator`). A missing or empty signature, or an
    empty auth token, is never valid.
    """
    if not signature or not auth_token:
        return False
    return bool(RequestValidator(auth_token).validate(url, params, signature))


# --- Per-call stream tokens ------------------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class StreamTokens:
    """Short-lived tokens binding a Media Stream to the call and agent the voice webhook chose.

    The WebSocket signature does not cover the stream's custom parameters (facts 2.7), so the webhook
    puts a token in a ``<Parameter>`` and the stream handler checks it on ``start``. A token is
    ``"<expiry>.<mac>"``: expiry in Unix seconds, and the URL-safe base64 (unpadded) of
    HMAC-SHA256(secret, ``call_sid|agent|expiry``). Call SID and agent travel separately and must match.

    `redeem` opens one stream per token, once: a redeemed token is remembered until it expires (after
    that `check` refuses it anyway). Only tokens we issued and that check are remembered, so the
    memory is bounded by the calls the webhook answers in one lifetime; `max_remembered` caps it.
    """

    def __init__(self, secret: bytes, ttl_secs: float = 60, *, max_remembered: int = 100_000) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) < 16:
            raise ValueError("stream token secret must be at least 16 bytes")
        if ttl_secs <= 0:
            raise ValueError(f"ttl_secs must be positive, got {ttl_secs!r}")
        self._secret = bytes(secret)
        self.ttl_secs = ttl_secs
        self.max_remembered = max_remembered
        self._redeemed: set[str] = set()
        self._expiries: list[tuple[int, str]] = []  # heap of (expiry, token) over _redeemed

    def _mac(self, call_sid: str, agent: str, expiry: int) -> str:
        message = f"{call_sid}|{agent}|{expiry}".encode()
        return _b64url(hmac.new(self._secret, message, hashlib.sha256).digest())

    @staticmethod
    def _usable(call_sid: str, agent: str) -> bool:
        # "|" separates the signed fields; allowing it would let ("a|b", "c") and ("a", "b|c") collide.
        return all(isinstance(v, str) and v and "|" not in v for v in (call_sid, agent))

    def issue(self, call_sid: str, agent: str, *, now: float | None = None) -> str:
        """A token for this call and agent, valid for ``ttl_secs`` from ``now`` (default: the clock)."""
        if not self._usable(call_sid, agent):
            raise ValueError(f"call_sid and agent must be non-empty and free of '|': {call_sid!r}, {agent!r}")
        expiry = int((time.time() if now is None else now) + self.ttl_secs)
        return f"{expiry}.{self._mac(call_sid, agent, expiry)}"

    def check(self, token: str | None, call_sid: str, agent: str, now: float | None = None) -> bool:
        """True only for an unexpired, untampered token issued for exactly this call and agent."""
        if not isinstance(token, str) or not self._usable(call_sid, agent):
            return False
        expiry_text, dot, mac = token.partition(".")
        if not dot or not expiry_text.isascii() or not expiry_text.isdigit() or len(expiry_text) > 12:
            return False
        expiry = int(expiry_text)
        if str(expiry) != expiry_text:  # no leading zeros: one token text per signed expiry
            return False
        if (time.time() if now is None else now) >= expiry:
            return False
        try:
            given = mac.encode("ascii")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(given, self._mac(call_sid, agent, expiry).encode("ascii"))

    def redeem(self, token: str | None, call_sid: str, agent: str, now: float | None = None) -> bool:
        """`check`, and True only the first time: the token is used up."""
        now = time.time() if now is None else now
        if not self.check(token, call_sid, agent, now):
            return False
        while self._expiries and self._expiries[0][0] <= now:
            self._redeemed.discard(heapq.heappop(self._expiries)[1])
        if token in self._redeemed:
            return False
        if len(self._redeemed) >= self.max_remembered:
            # Forgetting one unexpired token would let it be replayed: refuse instead (calls at a rate
            # no server of ours takes).
            return False
        self._redeemed.add(token)
        heapq.heappush(self._expiries, (int(token.partition(".")[0]), token))
        return True


# --- TwiML -------------------------------------------------------------------------------------------


def connect_twiml(
    stream_url: str,
    *,
    agent: str,
    token: str,
    call_sid: str,
    caller: str = "",
    action: str | None = None,
    status_callback: str | None = None,
) -> str:
    """``<Connect><Stream>`` (bidirectional) to ``stream_url``, with ``agent`` and ``token`` parameters.

    Twilio only connects to ``wss://`` and drops a query string from the stream URL, so per-call data
    goes in ``<Parameter>`` children (they arrive in ``start.customParameters``). ``call_sid`` is the
    call the token was issued for; it is not sent, since Twilio reports it in ``start.callSid``.
    ``action`` is fetched when the stream ends (e.g. to return a ``<Dial>``); without it the call ends.
    ``caller``: the caller's number (the webhook's ``From``), handed to the call's flow.
    """
    parts = urlsplit(stream_url)
    if parts.scheme != "wss" or not parts.netloc:
        raise ValueError(f"stream URL must be wss:// with a host: {stream_url!r}")
    if parts.query or parts.fragment or "?" in stream_url or "#" in stream_url:
        raise ValueError(f"stream URL must not carry a query string (Twilio drops it): {stream_url!r}")
    for name, value in (("agent", agent), ("token", token), ("call_sid", call_sid)):
        if not value:
            raise ValueError(f"{name} must not be empty")
    connect = Connect(action=action) if action else Connect()
    stream = connect.stream(url=stream_url, status_callback=status_callback)
    stream.parameter(name="agent", value=agent)
    stream.parameter(name="token", value=token)
    if caller:
        stream.parameter(name="caller", value=caller)
    response = VoiceResponse()
    response.append(connect)
    return str(response)


def hangup_twiml() -> str:
    """``<Response><Hangup/></Response>``."""
    response = VoiceResponse()
    response.hangup()
    return str(response)


def transfer_twiml(target: str) -> str:
    """``<Dial>`` an E.164 number (``+14155550100``) or a SIP URI (``sip:agent@pbx.example.com``).

    Anything else raises ValueError naming the target.
    """
    if not isinstance(target, str):
        raise ValueError(f"transfer target must be a string: {target!r}")
    dial = Dial()
    if E164.fullmatch(target):
        dial.number(target)
    elif SIP_URI.fullmatch(target):
        dial.sip(target)
    else:
        raise ValueError(f"transfer target is neither an E.164 number nor a sip: URI: {target!r}")
    response = VoiceResponse()
    response.append(dial)
    return str(response)


# --- REST ----------------------------------------------------------------------------------------


def update_call(client: Any, call_sid: str, twiml: str) -> Any:
    """Replace a live call's TwiML (``POST .../Calls/{call_sid}.json`` with ``Twiml=...``).

    ``client`` is a ``twilio.rest.Client``. The current ``<Connect><Stream>`` ends (Twilio sends
    ``stop`` and closes the socket) and ``twiml`` runs instead. Returns the updated call resource;
    Twilio's errors propagate as ``twilio.base.exceptions.TwilioRestException``.
    """
    if not isinstance(call_sid, str) or not _CALL_SID.fullmatch(call_sid):
        raise ValueError(f"not a Twilio call SID: {call_sid!r}")
    if not twiml:
        raise ValueError("twiml must not be empty")
    return client.calls(call_sid).update(twiml=twiml)
