"""Where a call can go: a phone number in E.164 form or a SIP URI, each written once for every transport.

    E164.fullmatch("+15551234567")                       # a phone number
    SIP_URI.fullmatch("sip:agent@pbx.example.com:5061")  # a SIP address: optional user, host, port, ;params

Both are anchored at the ends (`\\A`, `\\Z`), so `match` and `fullmatch` agree and a trailing newline is refused.
"""

from __future__ import annotations

import re

# E.164: "+", a non-zero leading digit, at most 15 digits in all.
E164 = re.compile(r"\A\+[1-9][0-9]{1,14}\Z")

# One DNS label: letters, digits and inner hyphens (an IPv4 address is four all-digit labels).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# A SIP or SIPS URI: optional user part (with its own ;params, e.g. a phone-context), a host name or IPv4
# address, an optional port and optional ;params (e.g. ;transport=tls). No spaces, quotes or angle
# brackets anywhere: the URI goes into TwiML and SIP headers as it is.
SIP_URI = re.compile(
    rf"\Asips?:(?:[^@\s<>\"]+@)?{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?(?:;[^\s<>\"]*)?\Z", re.IGNORECASE
)

