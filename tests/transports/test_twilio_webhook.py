import base64
import hashlib
import hmac
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs

import pytest

from agent.testing.twilio_cloud import LocalTwilioCloud
from transports.twilio_webhook import (
    StreamTokens,
    connect_twiml,
    hangup_twiml,
    public_url,
    transfer_twiml,
    update_call,
    verify_signature,
)

AUTH_TOKEN = "12345678901234567890123456789012"
ACCOUNT = "AC93b00000000000000000000000000003"
CALL = "CA04de0000000000000000000000000002"
VOICE_URL = "https://example.com/twilio/voice"
FORM = {
    "CallSid": CALL,
    "AccountSid": ACCOUNT,
    "From": "+14155550199",
    "To": "+14155550100",
    "CallStatus": "ringing",
    "Direction": "inbound",
}


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Independent of the twilio library: HMAC-SHA1(token, url + name+value sorted by name), base64."""
    message = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), message.encode(), hashlib.sha1).digest()).decode()


# --- signatures --------------------------------------------------------------------------------------


def test_signature_of_post_form_accepted():
    assert verify_signature(AUTH_TOKEN, VOICE_URL, FORM, twilio_signature(AUTH_TOKEN, VOICE_URL, FORM))


def test_signature_with_query_string_and_websocket_url_accepted():
    url = VOICE_URL + "?tenant=acme&x=1"
    assert verify_signature(AUTH_TOKEN, url, FORM, twilio_signature(AUTH_TOKEN, url, FORM))
    wss = "wss://example.com/twilio/media"
    assert verify_signature(AUTH_TOKEN, wss, {}, twilio_signature(AUTH_TOKEN, wss, {}))


@pytest.mark.parametrize(
    "token, url, params",
    [
        ("0" * 32, VOICE_URL, FORM),  # wrong auth token
        (AUTH_TOKEN, VOICE_URL, {**FORM, "To": "+14155550101"}),  # changed param
        (AUTH_TOKEN, VOICE_URL, {**FORM, "Extra": "1"}),  # added param
        (AUTH_TOKEN, "http://example.com/twilio/voice", FORM),  # scheme changed (proxy view)
        (AUTH_TOKEN, "https://example.com/twilio/voice2", FORM),  # path changed
        (AUTH_TOKEN, VOICE_URL + "?a=1", FORM),  # query added
    ],
)
def test_signature_mismatch_rejected(token, url, params):
    good = twilio_signature(AUTH_TOKEN, VOICE_URL, FORM)
    assert not verify_signature(token, url, params, good)


def test_missing_or_empty_signature_or_token_rejected():
    assert not verify_signature(AUTH_TOKEN, VOICE_URL, FORM, None)
    assert not verify_signature(AUTH_TOKEN, VOICE_URL, FORM, "")
    assert not verify_signature("", VOICE_URL, FORM, twilio_signature("", VOICE_URL, FORM))
    assert not verify_signature(AUTH_TOKEN, VOICE_URL, FORM, "not base64 at all")


@pytest.mark.parametrize(
    "base, path, query, expected",
    [
        ("https://example.com", "/twilio/voice", "", VOICE_URL),
        ("https://example.com/", "/twilio/voice", "", VOICE_URL),
        ("https://example.com/", "twilio/voice", "", VOICE_URL),
        ("https://example.com", "twilio/voice", "", VOICE_URL),
        ("https://example.com/agents/", "/twilio/voice", "", "https://example.com/agents/twilio/voice"),
        ("https://example.com", "/twilio/voice", "b=2&a=%20x", VOICE_URL + "?b=2&a=%20x"),
        ("https://example.com", "/twilio/voice", "?a=1", VOICE_URL + "?a=1"),
        ("wss://example.com:8443", "/twilio/media", "", "wss://example.com:8443/twilio/media"),
    ],
)
def test_public_url_joins(base, path, query, expected):
    assert public_url(base, path, query) == expected


@pytest.mark.parametrize("base", ["example.com", "ftp://example.com", "https://example.com/?a=1", ""])
def test_public_url_rejects_bad_base(base):
    with pytest.raises(ValueError):
        public_url(base, "/twilio/voice")


def test_public_url_round_trips_with_signature():
    url = public_url("https://example.com/", "/twilio/voice", "tenant=acme")
    sig = twilio_signature(AUTH_TOKEN, "https://example.com/twilio/voice?tenant=acme", FORM)
    assert verify_signature(AUTH_TOKEN, url, FORM, sig)


# --- stream tokens -----------------------------------------------------------------------------------

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def test_token_valid_within_ttl_and_url_safe():
    tokens = StreamTokens(SECRET, ttl_secs=60)
    tok = tokens.issue(CALL, "booking", now=NOW)
    assert set(tok) <= set("0123456789.ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_")
    assert tokens.check(tok, CALL, "booking", now=NOW)
    assert tokens.check(tok, CALL, "booking", now=NOW + 59)


def test_token_with_default_clock():
    tokens = StreamTokens(SECRET)
    assert tokens.check(tokens.issue(CALL, "booking"), CALL, "booking")


def test_token_expired():
    tokens = StreamTokens(SECRET, ttl_secs=60)
    tok = tokens.issue(CALL, "booking", now=NOW)
    assert not tokens.check(tok, CALL, "booking", now=NOW + 60)
    assert not tokens.check(tok, CALL, "booking", now=NOW + 3600)


def test_token_wrong_call_agent_or_secret():
    tokens = StreamTokens(SECRET)
    tok = tokens.issue(CALL, "booking", now=NOW)
    assert not tokens.check(tok, CALL[:-1] + "3", "booking", now=NOW)
    assert not tokens.check(tok, CALL, "support", now=NOW)
    assert not StreamTokens(b"t" * 32).check(tok, CALL, "booking", now=NOW)


def test_token_tampered():
    tokens = StreamTokens(SECRET, ttl_secs=60)
    tok = tokens.issue(CALL, "booking", now=NOW)
    expiry, mac = tok.split(".")
    later = str(int(expiry) + 3600)
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    for bad in (
        f"{later}.{mac}",  # expiry pushed out
        f"{expiry}.{flipped}",  # mac changed
        f"0{expiry}.{mac}",  # same number, different text
        f"{expiry}.{mac}=",
        expiry,
        mac,
        "",
        f"{expiry}.é{mac}",
        f"-{expiry}.{mac}",
    ):
        assert not tokens.check(bad, CALL, "booking", now=NOW), bad
    assert not tokens.check(None, CALL, "booking", now=NOW)


def test_token_separator_in_fields_refused():
    tokens = StreamTokens(SECRET)
    with pytest.raises(ValueError):
        tokens.issue("CA1|x", "booking")
    with pytest.raises(ValueError):
        tokens.issue("CA1", "x|booking")
    tok = tokens.issue("CA1", "x", now=NOW)
    assert tokens.check(tok, "CA1", "x", now=NOW)
    assert not tokens.check(tok, "CA1|x", "", now=NOW)


def test_token_redeemed_once_only_within_its_lifetime():
    tokens = StreamTokens(SECRET, ttl_secs=60)
    tok = tokens.issue(CALL, "booking", now=NOW)
    assert tokens.redeem(tok, CALL, "booking", now=NOW + 1)
    # the first call's stream ended; the same token for a new stream, still within its 60 s
    assert not tokens.redeem(tok, CALL, "booking", now=NOW + 30)
    assert not tokens.redeem(tok, CALL, "booking", now=NOW + 61)  # and after it expired, check refuses it
    other = tokens.issue(CALL[:-1] + "3", "booking", now=NOW)
    assert tokens.redeem(other, CALL[:-1] + "3", "booking", now=NOW + 2)  # other calls are not affected
    assert not tokens.redeem(tokens.issue(CALL, "booking", now=NOW)[:-1] + "x", CALL, "booking", now=NOW)


def test_redeemed_tokens_are_forgotten_once_expired_and_their_number_is_capped():
    tokens = StreamTokens(SECRET, ttl_secs=60, max_remembered=3)
    sids = [f"CA{n:032x}" for n in range(4)]
    for sid in sids[:3]:
        assert tokens.redeem(tokens.issue(sid, "booking", now=NOW), sid, "booking", now=NOW)
    # full: an unexpired token is never forgotten to make room (it could be replayed), so refuse
    assert not tokens.redeem(tokens.issue(sids[3], "booking", now=NOW), sids[3], "booking", now=NOW)
    later = NOW + 61  # the first three expired: forgotten on the next redeem, and room again
    assert tokens.redeem(tokens.issue(sids[3], "booking", now=later), sids[3], "booking", now=later)
    assert len(tokens._redeemed) == 1


def test_token_config_checked():
    with pytest.raises(ValueError):
        StreamTokens(b"short")
    with pytest.raises(ValueError):
        StreamTokens(SECRET, ttl_secs=0)


# --- TwiML -------------------------------------------------------------------------------------------


def parse(twiml: str) -> ET.Element:
    root = ET.fromstring(twiml)
    assert root.tag == "Response"
    return root


def test_connect_twiml_structure():
    root = parse(
        connect_twiml("wss://example.com/twilio/media", agent="booking", token="1.abc", call_sid=CALL)
    )
    assert [c.tag for c in root] == ["Connect"]
    connect = root[0]
    assert connect.attrib == {}
    assert [c.tag for c in connect] == ["Stream"]
    stream = connect[0]
    assert stream.attrib == {"url": "wss://example.com/twilio/media"}
    assert [(p.tag, p.attrib) for p in stream] == [
        ("Parameter", {"name": "agent", "value": "booking"}),
        ("Parameter", {"name": "token", "value": "1.abc"}),
    ]


def test_connect_twiml_escapes_and_optional_callbacks():
    root = parse(
        connect_twiml(
            "wss://example.com/twilio/media",
            agent='a&<"b',
            token="t",
            call_sid=CALL,
            action="https://example.com/twilio/after-stream",
            status_callback="https://example.com/twilio/stream-status",
        )
    )
    connect = root.find("Connect")
    assert connect.attrib == {"action": "https://example.com/twilio/after-stream"}
    stream = connect.find("Stream")
    assert stream.get("statusCallback") == "https://example.com/twilio/stream-status"
    assert stream.find("Parameter[@name='agent']").get("value") == 'a&<"b'


def test_connect_twiml_carries_a_checkable_token():
    tokens = StreamTokens(SECRET)
    tok = tokens.issue(CALL, "booking")
    root = parse(connect_twiml("wss://example.com/twilio/media", agent="booking", token=tok, call_sid=CALL))
    params = {p.get("name"): p.get("value") for p in root.iter("Parameter")}
    assert tokens.check(params["token"], CALL, params["agent"])


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/twilio/media",
        "ws://example.com/twilio/media",
        "wss://example.com/twilio/media?agent=x",
        "wss:///twilio/media",
    ],
)
def test_connect_twiml_rejects_bad_stream_url(url):
    with pytest.raises(ValueError):
        connect_twiml(url, agent="booking", token="t", call_sid=CALL)


def test_connect_twiml_rejects_empty_fields():
    with pytest.raises(ValueError):
        connect_twiml("wss://example.com/m", agent="", token="t", call_sid=CALL)
    with pytest.raises(ValueError):
        connect_twiml("wss://example.com/m", agent="a", token="", call_sid=CALL)


def test_hangup_twiml():
    root = parse(hangup_twiml())
    assert [(c.tag, c.attrib, list(c)) for c in root] == [("Hangup", {}, [])]


@pytest.mark.parametrize(
    "target, noun",
    [
        ("+14155550100", "Number"),
        ("sip:agent@pbx.example.com", "Sip"),
        ("sip:agent@pbx.example.com;transport=tls", "Sip"),
        ("sips:agent@pbx.example.com:5061", "Sip"),
    ],
)
def test_transfer_twiml(target, noun):
    root = parse(transfer_twiml(target))
    assert [c.tag for c in root] == ["Dial"]
    dial = root[0]
    assert [(c.tag, c.text) for c in dial] == [(noun, target)]


@pytest.mark.parametrize(
    "target",
    ["14155550100", "+0123", "+1415555010012345", "tel:+14155550100", "sip:", "sip:a@b c", "", "booking"],
)
def test_transfer_twiml_rejects_bad_target(target):
    with pytest.raises(ValueError, match=repr(target).replace("+", r"\+")):
        transfer_twiml(target)


# --- REST (Twilio's cloud replaced by a local HTTP stand-in) ---------------------------------------


@pytest.fixture
def twilio_cloud():
    with LocalTwilioCloud.running(ACCOUNT, AUTH_TOKEN) as cloud:
        yield cloud.client, cloud.requests


def test_update_call_posts_twiml(twilio_cloud):
    client, requests = twilio_cloud
    twiml = transfer_twiml("sip:agent@pbx.example.com;transport=tls")
    call = update_call(client, CALL, twiml)
    assert call.sid == CALL
    assert len(requests) == 1
    req = requests[0]
    assert req["path"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{CALL}.json"
    assert req["headers"]["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert parse_qs(req["body"]) == {"Twiml": [twiml]}
    expected_auth = base64.b64encode(f"{ACCOUNT}:{AUTH_TOKEN}".encode()).decode()
    assert req["headers"]["Authorization"] == f"Basic {expected_auth}"


def test_update_call_hangup(twilio_cloud):
    client, requests = twilio_cloud
    update_call(client, CALL, hangup_twiml())
    assert parse_qs(requests[0]["body"])["Twiml"] == [hangup_twiml()]


@pytest.mark.parametrize("sid", ["CA123", "../Calls", CALL + "/x", "MZ" + CALL[2:], ""])
def test_update_call_rejects_bad_sid_without_request(twilio_cloud, sid):
    client, requests = twilio_cloud
    with pytest.raises(ValueError):
        update_call(client, sid, hangup_twiml())
    assert requests == []
