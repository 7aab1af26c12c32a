"""py-spiffe (the Python reference library) as a peer for JWT-SVIDs.

1. Tokens svidgate mints are accepted by py-spiffe's `JwtSvid.parse_and_validate` with the same sub/aud/exp,
   and tokens minted by pyjwt the way SPIRE shapes them are accepted by svidgate.
2. `DELIBERATE_STRICTNESS` lists every token py-spiffe accepts but svidgate rejects, with the reason; one test
   asserts both halves, so this list stays the honest record of where svidgate is stricter than the reference.

py-spiffe checks `exp` against the wall clock, so these tokens are minted around `time.time()`; nothing here
measures time or sleeps.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from spiffe import JwtBundle as PyJwtBundle
from spiffe import JwtSvid as PyJwtSvid
from spiffe import TrustDomain as PyTrustDomain

from svidgate.errors import JwtSvidError
from svidgate.identity.bundle import Bundle
from svidgate.identity.jwtsvid import mint_jwt_svid, validate_jwt_svid
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
SUB = "spiffe://example.org/web"
AUD = "backend"
NOW = int(time.time())


@cache
def key(name: str) -> PrivateKeyTypes:
    makers: dict[str, Callable[[], PrivateKeyTypes]] = {
        "k-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "k-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "k-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "k-rsa": lambda: rsa.generate_private_key(65537, 2048),
        "k-rsa1024": lambda: rsa.generate_private_key(65537, 1024),  # noqa: S505 - a weak key to be refused
    }
    return makers[name]()


KIDS = ("k-p256", "k-p384", "k-p521", "k-rsa", "k-rsa1024")


def ours() -> dict[TrustDomain, Bundle]:
    return {TD: Bundle(TD, jwt_authorities={kid: key(kid).public_key() for kid in KIDS})}


def theirs() -> PyJwtBundle:
    authorities: dict[str, Any] = {kid: key(kid).public_key() for kid in KIDS}
    return PyJwtBundle(PyTrustDomain("example.org"), authorities)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def craft(header: dict[str, Any] | bytes, claims: dict[str, Any] | bytes, kid: str = "k-p256") -> str:
    """A correctly signed ES256/RS256 token with hand-written JSON (so duplicates and odd numbers survive)."""
    h = b64(header if isinstance(header, bytes) else json.dumps(header).encode())
    p = b64(claims if isinstance(claims, bytes) else json.dumps(claims).encode())
    signing_input = f"{h}.{p}".encode()
    private_key = key(kid)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        r, s = utils.decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        assert isinstance(private_key, rsa.RSAPrivateKey)
        from cryptography.hazmat.primitives.asymmetric import padding

        signature = private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{h}.{p}.{b64(signature)}"


def header(**extra: Any) -> dict[str, Any]:
    return {"alg": "ES256", "kid": "k-p256", "typ": "JWT", **extra}


def claims(**changes: Any) -> dict[str, Any]:
    return {"sub": SUB, "aud": AUD, "exp": NOW + 600, "iat": NOW, **changes}


def raw_claims(extra_json: str) -> bytes:
    """The default claims with raw JSON text appended inside the object (for duplicates, NaN, 1.0 ...)."""
    return json.dumps(claims()).encode()[:-1] + b"," + extra_json.encode() + b"}"


def raw_claims_without_exp(extra_json: str) -> bytes:
    base = claims()
    del base["exp"]
    return json.dumps(base).encode()[:-1] + b"," + extra_json.encode() + b"}"


def py_spiffe_accepts(token: str) -> PyJwtSvid:
    return PyJwtSvid.parse_and_validate(token, theirs(), {AUD})


def svidgate_validates(token: str) -> Any:
    return validate_jwt_svid(token, ours(), [AUD], now=float(NOW))


@pytest.mark.parametrize(
    ("kid", "audience"),
    [
        ("k-p256", [AUD]),
        ("k-p384", [AUD]),
        ("k-p521", [AUD]),
        ("k-rsa", [AUD]),
        ("k-p256", [AUD, "other"]),
    ],
)
def test_py_spiffe_accepts_what_svidgate_mints(kid: str, audience: list[str]) -> None:
    token = mint_jwt_svid(SpiffeId.parse(SUB), audience, key(kid), kid, ttl=600, now=NOW)
    theirs_svid = py_spiffe_accepts(token)
    ours_svid = svidgate_validates(token)
    assert str(theirs_svid.spiffe_id) == str(ours_svid.spiffe_id) == SUB
    assert theirs_svid.audience == set(ours_svid.audience) == set(audience)
    assert theirs_svid.expiry == ours_svid.expiry == NOW + 600
    assert theirs_svid.token == ours_svid.token == token


@pytest.mark.parametrize(("alg", "kid"), [("ES256", "k-p256"), ("ES384", "k-p384"), ("RS256", "k-rsa")])
def test_svidgate_accepts_tokens_signed_by_pyjwt(alg: str, kid: str) -> None:
    token = pyjwt.encode(claims(), key(kid), algorithm=alg, headers={"kid": kid})  # type: ignore[arg-type]
    py_spiffe_accepts(token)
    assert str(svidgate_validates(token).spiffe_id) == SUB


def _padded(token: str) -> str:
    return token + "=" * (-len(token.rsplit(".", 1)[1]) % 4)


# (what, token factory, svidgate's reason). Each entry: py-spiffe 0.2.x (with pyjwt 2.15) ACCEPTS the token,
# svidgate REJECTS it with this reason, on purpose. If py-spiffe starts rejecting one, drop it from the list.
DELIBERATE_STRICTNESS: list[tuple[str, Callable[[], str], str]] = [
    # Two parsers taking different duplicates see two different tokens (RFC 7515 5.2 allows rejecting).
    (
        "duplicate claim: a second sub",
        lambda: craft(header(), raw_claims('"sub":"spiffe://example.org/admin"')),
        "malformed",
    ),
    (
        "duplicate header member",
        lambda: craft(b'{"alg":"ES256","kid":"nope","kid":"k-p256"}', claims()),
        "malformed",
    ),
    # RFC 7515 2: base64url "with all trailing '=' characters omitted".
    ("padded signature", lambda: _padded(craft(header(), claims())), "malformed"),
    ("NaN in a claim (not JSON)", lambda: craft(header(), raw_claims('"x":NaN')), "malformed"),
    # JWT-SVID.md 2: "Any header not described here, registered or private, MUST NOT be included".
    ("x5c header", lambda: craft(header(x5c=["MIIB"]), claims()), "forbidden_header"),
    ("jku header", lambda: craft(header(jku="https://evil.example/jwks"), claims()), "forbidden_header"),
    ("jwk header", lambda: craft(header(jwk={"kty": "EC"}), claims()), "forbidden_header"),
    ("x5u header", lambda: craft(header(x5u="https://evil.example/c"), claims()), "forbidden_header"),
    ("cty header", lambda: craft(header(cty="JWT"), claims()), "forbidden_header"),
    ("private header", lambda: craft(header(foo="bar"), claims()), "forbidden_header"),
    # JWT-SVID.md 2.3: typ, if set, is JWT or JOSE; null is set and is neither.
    ("typ null", lambda: craft(header(typ=None), claims()), "bad_type"),
    # SPIFFE-ID.md: trust domains are lower case; no trailing newline.
    (
        "sub with upper-case trust domain",
        lambda: craft(header(), claims(sub="spiffe://Example.org/web")),
        "bad_subject",
    ),
    ("sub with trailing newline", lambda: craft(header(), claims(sub=SUB + "\n")), "bad_subject"),
    # JWT-SVID.md 3.1: sub is the workload's SPIFFE ID; a trust domain ID names no workload (and X.509 leaves
    # refuse it too).
    ("sub a bare trust domain", lambda: craft(header(), claims(sub="spiffe://example.org")), "bad_subject"),
    # NumericDates are integers here; py-spiffe takes floats and even numeric strings.
    ("exp with a fraction", lambda: craft(header(), claims(exp=NOW + 600.5)), "bad_claim"),
    (
        "exp written as 1.0",
        lambda: craft(header(), raw_claims_without_exp(f'"exp":{NOW + 600}.0')),
        "bad_claim",
    ),
    ("exp as a numeric string", lambda: craft(header(), claims(exp=str(NOW + 600))), "bad_claim"),
    ("nbf with a fraction", lambda: craft(header(), claims(nbf=NOW - 0.5)), "bad_claim"),
    ("iat as a string", lambda: craft(header(), claims(iat="now")), "bad_claim"),
    # An empty audience names no recipient (JWT-SVID.md 3.2).
    ("aud containing an empty string", lambda: craft(header(), claims(aud=[AUD, ""])), "bad_claim"),
    # py-spiffe turns iat verification off.
    ("iat an hour in the future", lambda: craft(header(), claims(iat=NOW + 3600)), "issued_in_future"),
    # pyjwt only warns (InsecureKeyLengthWarning) about RSA under 2048 bits.
    (
        "RSA-1024 authority",
        lambda: craft(header(alg="RS256", kid="k-rsa1024"), claims(), kid="k-rsa1024"),
        "bad_signature",
    ),
]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize(
    ("what", "make", "reason"), DELIBERATE_STRICTNESS, ids=[entry[0] for entry in DELIBERATE_STRICTNESS]
)
def test_deliberate_strictness_over_py_spiffe(what: str, make: Callable[[], str], reason: str) -> None:
    token = make()
    py_spiffe_accepts(token)  # if this raises, py-spiffe got stricter: remove the entry
    with pytest.raises(JwtSvidError) as info:
        svidgate_validates(token)
    assert info.value.reason == reason, info.value.detail
