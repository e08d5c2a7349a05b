"""Who may call: source allow-list, and digest authentication of INVITEs (RFC 2617 §3.2, RFC 8760)."""

import hashlib

import pytest

from transports.sip.auth import AllowList, DigestAuthenticator, digest_response, parse_digest_credentials
from transports.sip.message import NameAddr, SipRequest, SipResponse

REALM = "agents.example.com"
URI = "sip:agent@agents.example.com"
USERS = {"alice": "wonderland", "bob": "builder"}


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def expected_digest(hash_name, user, realm, password, method, uri, nonce, nc=None, cnonce=None, qop=None):
    """RFC 2617 §3.2.2.1, written out independently of the module under test."""

    def h(text):
        return hashlib.new(hash_name, text.encode()).hexdigest()

    ha1 = h(f"{user}:{realm}:{password}")
    ha2 = h(f"{method}:{uri}")
    if qop is None:
        return h(f"{ha1}:{nonce}:{ha2}")
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def invite(authorization: str | None = None, uri: str = URI) -> SipRequest:
    headers = [
        ("Via", "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds"),
        ("From", "<sip:alice@192.0.2.10>;tag=1928301774"),
        ("To", f"<{URI}>"),
        ("Call-ID", "a84b4c76e66710@192.0.2.10"),
        ("CSeq", "2 INVITE"),
    ]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    return SipRequest("INVITE", uri, headers)


def challenge_params(response: SipResponse) -> dict[str, str]:
    params = parse_digest_credentials(response.header("WWW-Authenticate"))
    assert params is not None
    return params


def authorization(
    auth: DigestAuthenticator,
    user="alice",
    password="wonderland",
    realm=REALM,
    uri=URI,
    nonce=None,
    hash_name="md5",
    algorithm=None,
    qop="auth",
) -> str:
    nonce = nonce or challenge_params(auth.challenge(invite()))["nonce"]
    nc, cnonce = "00000001", "0a4f113b"
    response = expected_digest(hash_name, user, realm, password, "INVITE", uri, nonce, nc, cnonce, qop)
    parts = [f'username="{user}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"']
    if qop is not None:
        parts += [f"qop={qop}", f"nc={nc}", f'cnonce="{cnonce}"']
    parts.append(f'response="{response}"')
    if algorithm is not None:
        parts.append(f"algorithm={algorithm}")
    return "Digest " + ", ".join(parts)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def auth(clock):
    return DigestAuthenticator(REALM, USERS, secret=b"test-secret", clock=clock)


# RFC 2617 §3.5 worked example ----------------------------------------------------------------------

MUFASA = dict(
    username="Mufasa",
    realm="testrealm@host.com",
    password="Circle Of Life",
    method="GET",
    uri="/dir/index.html",
    nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
    nc="00000001",
    cnonce="0a4f113b",
    qop="auth",
)
MUFASA_RESPONSE = "6629fae49393a05397450978507c4ef1"


def test_rfc2617_example_matches_the_independent_formula():
    assert expected_digest("md5", *MUFASA.values()) == MUFASA_RESPONSE


def test_rfc2617_example_matches_the_module():
    assert digest_response("MD5", **MUFASA) == MUFASA_RESPONSE


def test_rfc2617_example_header_parses():
    header = (
        'Digest username="Mufasa",\r\n realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",'
        ' uri="/dir/index.html", qop=auth, nc=00000001, cnonce="0a4f113b",'
        ' response="6629fae49393a05397450978507c4ef1", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    )
    params = parse_digest_credentials(header)
    assert params["username"] == "Mufasa"
    assert params["qop"] == "auth" and params["nc"] == "00000001"
    assert params["response"] == MUFASA_RESPONSE


# Challenge ---------------------------------------------------------------------------------------------


def test_challenge_is_401_with_digest_parameters(auth):
    response = auth.challenge(invite())
    assert response.status == 401
    assert response.to.tag  # §8.2.6.2: a final response carries a To tag
    header = response.header("WWW-Authenticate")
    assert header.startswith(f'Digest realm="{REALM}", nonce="')
    params = challenge_params(response)
    assert params["algorithm"] == "MD5" and params["qop"] == "auth"
    assert "stale" not in params
    assert bytes(SipResponse.parse(bytes(response))).startswith(b"SIP/2.0 401 Unauthorized\r\n")


def test_each_challenge_has_a_fresh_nonce(auth):
    first, second = (challenge_params(auth.challenge(invite()))["nonce"] for _ in range(2))
    assert first != second


# Verification --------------------------------------------------------------------------------------------


def test_correct_credentials_are_accepted(auth):
    assert auth.verify(invite(authorization(auth))) == "alice"
    assert auth.verify(invite(authorization(auth, user="bob", password="builder"))) == "bob"


def test_explicit_md5_algorithm_and_unquoted_values(auth):
    header = authorization(auth, algorithm="MD5").replace('cnonce="0a4f113b"', "cnonce=0a4f113b")
    assert auth.verify(invite(header)) == "alice"


def test_comma_inside_quoted_value_and_escapes():
    users = {'o"neil, jr': "pw"}
    clock = FakeClock()
    auth = DigestAuthenticator(REALM, users, secret=b"s", clock=clock)
    nonce = challenge_params(auth.challenge(invite()))["nonce"]
    digest = expected_digest("md5", 'o"neil, jr', REALM, "pw", "INVITE", URI, nonce, "00000001", "c", "auth")
    header = (
        f'Digest username="o\\"neil, jr", realm="{REALM}", nonce="{nonce}", uri="{URI}", '
        f'response="{digest}", qop="auth", nc=00000001, cnonce="c"'
    )
    assert auth.verify(invite(header)) == 'o"neil, jr'


def test_rfc2069_form_without_qop(auth):
    assert auth.verify(invite(authorization(auth, qop=None))) == "alice"


def test_response_hex_case_is_ignored(auth):
    header = authorization(auth)
    digest = parse_digest_credentials(header)["response"]
    assert auth.verify(invite(header.replace(digest, digest.upper()))) == "alice"


def test_wrong_password_is_rejected(auth):
    assert auth.verify(invite(authorization(auth, password="guess"))) is None


def test_wrong_realm_is_rejected(auth):
    assert auth.verify(invite(authorization(auth, realm="other.example.com"))) is None


def test_uri_must_match_the_request_uri(auth):
    header = authorization(auth, uri="sip:other@agents.example.com")
    assert auth.verify(invite(header)) is None
    # The same credentials are fine on a request that really is for that URI.
    assert auth.verify(invite(header, uri="sip:other@agents.example.com")) == "alice"


def test_unknown_user_is_rejected(auth):
    assert auth.verify(invite(authorization(auth, user="mallory", password="x"))) is None


def test_no_authorization_header(auth):
    assert auth.verify(invite()) is None


def test_tampered_nonce_is_rejected(auth):
    nonce = challenge_params(auth.challenge(invite()))["nonce"]
    issued, salt, mac = nonce.split(".")
    later = f"{int(issued, 16) + 10_000:x}.{salt}.{mac}"
    assert auth.verify(invite(authorization(auth, nonce=later))) is None
    assert auth.verify(invite(authorization(auth, nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093"))) is None
    assert "stale" not in challenge_params(auth.challenge(invite(authorization(auth, nonce=later))))


def test_nonce_from_another_secret_is_rejected(auth, clock):
    other = DigestAuthenticator(REALM, USERS, secret=b"other-secret", clock=clock)
    assert auth.verify(invite(authorization(other))) is None


def test_expired_nonce_is_rejected_and_challenged_stale(auth, clock):
    header = authorization(auth)
    clock.now += 299
    assert auth.verify(invite(header)) == "alice"
    clock.now += 2
    assert auth.verify(invite(header)) is None
    params = challenge_params(auth.challenge(invite(header)))
    assert params["stale"] == "true"
    # A fresh nonce from that challenge works again.
    assert auth.verify(invite(authorization(auth, nonce=params["nonce"]))) == "alice"


def test_expired_nonce_with_wrong_password_is_not_stale(auth, clock):
    header = authorization(auth, password="guess")
    clock.now += 1000
    assert "stale" not in challenge_params(auth.challenge(invite(header)))


def test_algorithm_must_match_the_negotiated_one(auth):
    header = authorization(auth, hash_name="sha256", algorithm="SHA-256")
    assert auth.verify(invite(header)) is None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Digest",
        "Basic YWxpY2U6d29uZGVybGFuZA==",
        'Digest username="alice',
        "Digest username=alice realm=x",
        'Digest username="alice", username="bob"',
        "Digest ,,,===",
        'Digest username="alice", realm="agents.example.com"',
        'Digest username="alice", realm="agents.example.com", nonce="1.2.3", uri="sip:x", response="00"',
        'Digest username="alice", realm="agents.example.com", nonce="zz.zz.zz", uri="sip:x", response="é"',
        "\x00\xff garbage \udcff",
    ],
)
def test_garbage_headers_are_rejected_without_raising(auth, header):
    assert auth.verify(invite(header)) is None
    assert auth.challenge(invite(header)).status == 401


def test_qop_without_nc_or_with_bad_nc_is_rejected(auth):
    header = authorization(auth)
    assert auth.verify(invite(header.replace("nc=00000001, ", ""))) is None
    assert auth.verify(invite(header.replace("nc=00000001", "nc=1"))) is None
    assert auth.verify(invite(header.replace("qop=auth", "qop=auth-int"))) is None


def test_one_good_header_among_several(auth):
    request = invite("Digest garbage")
    request.headers.add("Authorization", authorization(auth))
    assert auth.verify(request) == "alice"


def test_sha256_variant(clock):
    auth = DigestAuthenticator(REALM, USERS, algorithm="SHA-256", secret=b"s", clock=clock)
    params = challenge_params(auth.challenge(invite()))
    assert params["algorithm"] == "SHA-256"
    good = authorization(auth, hash_name="sha256", algorithm="SHA-256")
    assert len(parse_digest_credentials(good)["response"]) == 64
    assert auth.verify(invite(good)) == "alice"
    wrong = authorization(auth, hash_name="sha256", algorithm="SHA-256", password="x")
    assert auth.verify(invite(wrong)) is None
    # An MD5 digest (or no algorithm, which means MD5) is not accepted when SHA-256 was offered.
    assert auth.verify(invite(authorization(auth))) is None


def test_bad_algorithm_is_refused():
    with pytest.raises(ValueError, match="SHA-512"):
        DigestAuthenticator(REALM, USERS, algorithm="SHA-512")


def test_realm_is_quoted_in_the_challenge(clock):
    auth = DigestAuthenticator('say "hi"', USERS, clock=clock)
    assert challenge_params(auth.challenge(invite()))["realm"] == 'say "hi"'


def test_challenge_keeps_an_existing_to_tag(auth):
    request = invite()
    request.headers.set("To", f"<{URI}>;tag=abc")
    assert NameAddr.parse(auth.challenge(request).header("To")).tag == "abc"


# Allow-list ----------------------------------------------------------------------------------------------


def test_empty_allow_list_allows_everyone():
    allow = AllowList([])
    assert allow.allows("203.0.113.9") and allow.allows("::1") and allow.allows("not-an-ip")


def test_single_addresses():
    allow = AllowList(["192.0.2.10", "2001:db8::1"])
    assert allow.allows("192.0.2.10")
    assert not allow.allows("192.0.2.11")
    assert allow.allows("2001:db8::1") and allow.allows("2001:DB8:0::1") and allow.allows("[2001:db8::1]")
    assert not allow.allows("2001:db8::2")


def test_cidr_networks():
    allow = AllowList(["10.0.0.0/8", "198.51.100.0/24", "2001:db8:abcd::/48"])
    assert allow.allows("10.200.3.4") and allow.allows("198.51.100.255")
    assert not allow.allows("198.51.101.1") and not allow.allows("11.0.0.1")
    assert allow.allows("2001:db8:abcd:12::7")
    assert not allow.allows("2001:db8:abce::1")


def test_ipv4_mapped_ipv6_peer_matches_ipv4_entry():
    assert AllowList(["192.0.2.0/24"]).allows("::ffff:192.0.2.7")


def test_non_addresses_are_not_allowed():
    allow = AllowList(["0.0.0.0/0"])
    assert allow.allows("8.8.8.8")
    assert not allow.allows("example.com") and not allow.allows("")


@pytest.mark.parametrize("entry", ["example.com", "10.0.0.5/8", "300.1.1.1", "10.0.0.0/33", "2001:db8::g"])
def test_bad_entry_is_named(entry):
    with pytest.raises(ValueError, match=entry.replace(".", r"\.")):
        AllowList(["192.0.2.1", entry])
