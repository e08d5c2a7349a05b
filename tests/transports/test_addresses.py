"""The one phone-number and SIP-URI pattern, as the flow actions and the Twilio transfer both use it."""

import pytest
from pydantic import ValidationError

from flows.actions import TransferCallArgs
from transports.addresses import E164, SIP_URI
from transports.twilio_webhook import transfer_twiml


@pytest.mark.parametrize(
    "uri",
    [
        "sip:agent@pbx.example.com",  # a domain
        "sip:agent@192.0.2.7",  # an IPv4 address
        "sip:agent@127.0.0.1:5060",  # a host with a port
        "sips:agent@pbx.example.com:5061",
        "SIP:Agent@PBX.Example.COM",  # the scheme is case-insensitive
        "sip:pbx.example.com",  # no user part
        "sip:frontdesk@pbx.riverside-dental.example",
        "sip:agent@pbx.example.com;transport=tls",
        "sip:+15551234567;phone-context=example.com@gw.example.com;user=phone",
    ],
)
def test_sip_uris_accepted(uri):
    assert SIP_URI.fullmatch(uri) and SIP_URI.match(uri)
    assert TransferCallArgs(to=uri).to == uri
    assert "<Sip>" in transfer_twiml(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "sip:",  # empty host
        "sip:agent@",  # empty host after a user
        "sip:agent@:5060",  # a port without a host
        "sip:agent@pbx.example.com:",  # a colon without a port
        "sip:agent@pbx.example.com:123456",  # a port of six digits
        "sip:a@b c",  # a space in the host
        "sip:bad host",
        "sip:my agent@pbx.example.com",  # a space in the user part
        "sip:agent@-pbx.example.com",  # a label cannot start with a hyphen
        "sip:agent@pbx..example.com",  # an empty label
        'sip:"agent"@pbx.example.com',
        "sip:agent@pbx.example.com\n",  # a trailing newline
        "tel:+15551234567",
        "agent@pbx.example.com",
        "",
    ],
)
def test_sip_uris_refused(uri):
    assert SIP_URI.match(uri) is None and SIP_URI.fullmatch(uri) is None
    with pytest.raises(ValidationError, match="E.164 number"):
        TransferCallArgs(to=uri)
    with pytest.raises(ValueError, match="neither an E.164 number nor a sip: URI"):
        transfer_twiml(uri)


@pytest.mark.parametrize("number", ["+15551234567", "+442071838750", "+12", "+123456789012345"])
def test_e164_numbers_accepted(number):
    assert E164.fullmatch(number) and E164.match(number)
    assert TransferCallArgs(to=number).to == number
    assert f"<Number>{number}</Number>" in transfer_twiml(number)


@pytest.mark.parametrize(
    "number",
    [
        "15551234567",  # a number without +
        "+05551234567",  # a leading zero
        "+1",  # too short
        "+1234567890123456",  # 16 digits
        "+1 555 123 4567",  # spaces
        "+1-555-123-4567",
        "+15551234567\n",
        "",
    ],
)
def test_e164_numbers_refused(number):
    assert E164.match(number) is None and E164.fullmatch(number) is None
    with pytest.raises(ValidationError):
        TransferCallArgs(to=number)
    with pytest.raises(ValueError):
        transfer_twiml(number)
