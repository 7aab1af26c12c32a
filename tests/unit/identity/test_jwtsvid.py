"""JWT-SVID validation and minting (svidgate.identity.jwtsvid).

Tokens are assembled by hand here (JSON -> base64url -> sign with `cryptography`) so that a test can break
exactly one thing: a duplicate JSON key, a padded part, a signature of the wrong length, a forbidden header.
Every failure case asserts the exact reason code, and that the detail does not contain the token.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from svidgate.errors import JwtSvidError, SvidgateError
from svidgate.identity import jwtsvid
from svidgate.identity.bundle import Bundle
from svidgate.identity.jwtsvid import (
    REASONS,
    JwtSvid,
    jwt_algorithm_for_key,
    mint_jwt_svid,
    parse_jwt_svid_insecure,
    validate_jwt_svid,
)
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

NOW = 1_800_000_000
TD = TrustDomain("example.org")
OTHER_TD = TrustDomain("other.org")
SUB = "spiffe://example.org/web"
AUD = "backend"
KID = "k-p256"


# --- keys and token assembly ----------------------------------------------------------------------


@cache
def key(name: str) -> PrivateKeyTypes:
    """Keys by name, generated once per test session (RSA generation is the slow part of this file)."""
    makers: dict[str, Callable[[], PrivateKeyTypes]] = {
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p256-b": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
        "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
        "rsa1024": lambda: rsa.generate_private_key(65537, 1024),  # noqa: S505 - a weak key to be refused
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }
    return makers[name]()


def ec_key(name: str) -> ec.EllipticCurvePrivateKey:
    private_key = key(name)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    return private_key


def public(name: str) -> PublicKeyTypes:
    return key(name).public_key()


KIDS = {"k-p256": "p256", "k-p384": "p384", "k-p521": "p521", "k-rsa": "rsa2048"}


def bundles(**extra: PublicKeyTypes) -> dict[TrustDomain, Bundle]:
    """example.org trusts KIDS (plus `extra`); other.org has its own key under example.org's P-256 kid."""
    authorities: dict[str, PublicKeyTypes] = {kid: public(name) for kid, name in KIDS.items()}
    authorities.update(extra)
    return {
        TD: Bundle(TD, jwt_authorities=authorities),
        OTHER_TD: Bundle(OTHER_TD, jwt_authorities={KID: public("p256-b")}),
    }


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def js(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sign(alg: str, private_key: PrivateKeyTypes, signing_input: bytes) -> bytes:
    """A JWS signature exactly as RFC 7518 defines it (ES: raw R || S)."""
    hash_alg = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[alg[2:]]
    if alg.startswith("ES"):
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        size = (private_key.curve.key_size + 7) // 8
        r, s = utils.decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hash_alg)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert isinstance(private_key, rsa.RSAPrivateKey)
    if alg.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
        return private_key.sign(signing_input, pss, hash_alg)
    return private_key.sign(signing_input, padding.PKCS1v15(), hash_alg)


def default_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": SUB, "aud": AUD, "exp": NOW + 300, "iat": NOW}
    for name, value in changes.items():
        if value is DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


DROP = object()


@dataclass(frozen=True)
class Tok:
    """How to build one token; every field can be broken on its own."""

    header: Mapping[str, Any] | bytes = field(
        default_factory=lambda: {"alg": "ES256", "kid": KID, "typ": "JWT"}
    )
    claims: Mapping[str, Any] | bytes = field(default_factory=default_claims)
    key: str = "p256"  # which private key signs
    sign_alg: str | None = None  # defaults to the header's alg
    # post-processing of the three base64url parts, after signing
    mangle: Callable[[str, str, str], str] | None = None

    def build(self) -> str:
        header = self.header if isinstance(self.header, bytes) else js(dict(self.header))
        claims = self.claims if isinstance(self.claims, bytes) else js(dict(self.claims))
        h, p = b64(header), b64(claims)
        alg = self.sign_alg
        if alg is None:
            alg = self.header["alg"] if isinstance(self.header, Mapping) else "ES256"
        s = b64(sign(alg, key(self.key), f"{h}.{p}".encode()))
        return self.mangle(h, p, s) if self.mangle else f"{h}.{p}.{s}"


def hdr(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": "ES256", "kid": KID, "typ": "JWT"}
    for name, value in changes.items():
        if value is DROP:
            header.pop(name, None)
        else:
            header[name] = value
    return header


def validate(token: str, **kwargs: Any) -> JwtSvid:
    kwargs.setdefault("bundles", bundles())
    kwargs.setdefault("audiences", [AUD])
    kwargs.setdefault("now", float(NOW))
    return validate_jwt_svid(token, **kwargs)


def expect_reason(token: str, reason: str, **kwargs: Any) -> JwtSvidError:
    with pytest.raises(JwtSvidError) as info:
        validate(token, **kwargs)
    err = info.value
    assert err.reason == reason, f"{err.reason}: {err.detail}"
    assert err.reason in REASONS
    if len(token) >= 16:
        # The detail never echoes the token, nor any of its parts.
        for part in [token, *[p for p in token.split(".") if len(p) >= 16]]:
            assert part not in str(err)
    return err


def replace_last(part: str, char: str) -> str:
    return part[:-1] + char


# --- the happy path -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "key_name", "kid"),
    [
        ("ES256", "p256", "k-p256"),
        ("ES384", "p384", "k-p384"),
        ("ES512", "p521", "k-p521"),
        ("RS256", "rsa2048", "k-rsa"),
        ("RS384", "rsa2048", "k-rsa"),
        ("RS512", "rsa2048", "k-rsa"),
        ("PS256", "rsa2048", "k-rsa"),
        ("PS384", "rsa2048", "k-rsa"),
        ("PS512", "rsa2048", "k-rsa"),
    ],
)
def test_every_jwt_svid_algorithm_validates(alg: str, key_name: str, kid: str) -> None:
    token = Tok(header=hdr(alg=alg, kid=kid), key=key_name).build()
    svid = validate(token)
    assert svid.spiffe_id == SpiffeId.parse(SUB)
    assert svid.audience == (AUD,)
    assert svid.expiry == NOW + 300
    assert svid.issued_at == NOW
    assert svid.token == token
    assert svid.claims["sub"] == SUB


@pytest.mark.parametrize(
    ("name", "tok", "audiences"),
    [
        ("typ absent", Tok(header=hdr(typ=DROP)), [AUD]),
        ("typ JOSE", Tok(header=hdr(typ="JOSE")), [AUD]),
        ("aud array", Tok(claims=default_claims(aud=["x", AUD])), [AUD]),
        ("one of several expected audiences", Tok(), ["other", AUD]),
        ("empty audiences skip the check", Tok(claims=default_claims(aud="anything")), []),
        ("no iat", Tok(claims=default_claims(iat=DROP)), [AUD]),
        ("nbf in the past", Tok(claims=default_claims(nbf=NOW - 10)), [AUD]),
        ("extra claims", Tok(claims=default_claims(iss="me", jti="1", x={"a": [1, None]})), [AUD]),
        ("exp far beyond float range", Tok(claims=default_claims(exp=10**400)), [AUD]),
        ("JSON whitespace", Tok(header=b' { "alg" : "ES256" , "kid" : "k-p256" } \n'), [AUD]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_valid_variants(name: str, tok: Tok, audiences: list[str]) -> None:
    validate(tok.build(), audiences=audiences)


def test_a_plain_string_audience_is_one_audience_not_characters() -> None:
    token = Tok(claims=default_claims(aud="b")).build()
    expect_reason(token, "audience_mismatch", audiences="backend")
    assert validate(Tok().build(), audiences="backend").audience == (AUD,)


def test_jwtsvid_value_keeps_the_token_out_of_repr_and_claims_read_only() -> None:
    token = Tok().build()
    svid = validate(token)
    assert token not in repr(svid)
    with pytest.raises(TypeError):
        svid.claims["sub"] = "x"  # type: ignore[index]
    assert hash(svid) == hash(validate(token))
    assert svid == validate(token)


# --- one case per failure rule --------------------------------------------------------------------


def _pad(h: str, p: str, s: str) -> str:
    return f"{h}.{p}.{s}" + "=" * (-len(s) % 4 or 4)


def _flip_unused_bits(part: str) -> str:
    # With len % 4 == 2 the last character carries 4 unused bits, with 3 it carries 2; set the lowest one.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(part) % 4 in (2, 3)
    return replace_last(part, alphabet[alphabet.index(part[-1]) | 1])


def _header_needing_unused_bits() -> dict[str, Any]:
    # Pad the kid until the header's base64url length is not a multiple of 4.
    for extra in range(3):
        header = hdr(kid=KID + "x" * extra)
        if len(b64(js(header))) % 4 in (2, 3):
            return header
    raise AssertionError("unreachable")


NONCANONICAL_HEADER = _header_needing_unused_bits()

CASES: list[tuple[str, Callable[[], str], str]] = [
    # structure
    ("empty token", lambda: "", "malformed"),
    ("one part", lambda: "abc", "malformed"),
    ("two parts", lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}").build(), "malformed"),
    ("four parts", lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.{s}.{s}").build(), "malformed"),
    ("JWE (five parts)", lambda: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", "malformed"),
    ("JWS JSON serialization", lambda: '{"payload":"e30","signatures":[]}', "malformed"),
    ("empty header part", lambda: Tok(mangle=lambda h, p, s: f".{p}.{s}").build(), "malformed"),
    ("empty payload part", lambda: Tok(mangle=lambda h, p, s: f"{h}..{s}").build(), "malformed"),
    ("padding on the signature", lambda: Tok(mangle=_pad).build(), "malformed"),
    ("padding on the header", lambda: Tok(mangle=lambda h, p, s: f"{h}==.{p}.{s}").build(), "malformed"),
    (
        "standard base64 alphabet",
        lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.+/{s[2:]}").build(),
        "malformed",
    ),
    (
        "whitespace inside",
        lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.{s[:10]} {s[10:]}").build(),
        "malformed",
    ),
    ("trailing newline", lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.{s}\n").build(), "malformed"),
    ("leading space", lambda: Tok(mangle=lambda h, p, s: f" {h}.{p}.{s}").build(), "malformed"),
    ("impossible base64 length", lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.{s}AAA").build(), "malformed"),
    (
        "non-canonical signature (unused bits set)",
        lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.{_flip_unused_bits(s)}").build(),
        "malformed",
    ),
    (
        "non-canonical header (unused bits set)",
        lambda: Tok(
            header=NONCANONICAL_HEADER, mangle=lambda h, p, s: f"{_flip_unused_bits(h)}.{p}.{s}"
        ).build(),
        "malformed",
    ),
    ("non-ASCII character", lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.{s}é").build(), "malformed"),
    ("header not JSON", lambda: Tok(header=b"not json").build(), "malformed"),
    ("header a JSON array", lambda: Tok(header=b'["alg","ES256"]').build(), "malformed"),
    ("header not UTF-8", lambda: Tok(header=b'{"alg":"ES256","kid":"\xff"}').build(), "malformed"),
    ("header JSON with trailing data", lambda: Tok(header=js(hdr()) + b"{}").build(), "malformed"),
    (
        "duplicate key in header",
        lambda: Tok(header=b'{"alg":"ES256","kid":"k-p256","kid":"k-p384"}').build(),
        "malformed",
    ),
    ("claims a JSON string", lambda: Tok(claims=b'"spiffe://example.org/web"').build(), "malformed"),
    (
        "duplicate key in claims",
        lambda: Tok(claims=js(default_claims())[:-1] + b',"sub":"spiffe://example.org/admin"}').build(),
        "malformed",
    ),
    ("NaN in claims", lambda: Tok(claims=js(default_claims())[:-1] + b',"x":NaN}').build(), "malformed"),
    (
        "Infinity as exp",
        lambda: Tok(claims=js(default_claims(exp=DROP))[:-1] + b',"exp":Infinity}').build(),
        "malformed",
    ),
    (
        "claims nested 3000 deep",
        lambda: Tok(claims=b'{"x":' + b"[" * 3000 + b"]" * 3000 + b"}").build(),
        "malformed",
    ),
    (
        "integer with 5000 digits",
        lambda: Tok(claims=js(default_claims(exp=DROP))[:-1] + b',"exp":' + b"9" * 5000 + b"}").build(),
        "malformed",
    ),
    # size
    ("longer than the cap", lambda: "a" * 8193, "too_large"),
    (
        "cap checked before decoding",
        lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.{s}" + "!" * 9000).build(),
        "too_large",
    ),
    ("big claims", lambda: Tok(claims=default_claims(pad="x" * 7000)).build(), "too_large"),
    ("non-ASCII bytes over the cap", lambda: "é" * 5000, "too_large"),
    # alg
    ("alg none", lambda: Tok(header=hdr(alg="none"), sign_alg="ES256").build(), "unsupported_algorithm"),
    (
        "alg none, empty signature",
        lambda: Tok(header=hdr(alg="none"), sign_alg="ES256", mangle=lambda h, p, s: f"{h}.{p}.").build(),
        "unsupported_algorithm",
    ),
    ("alg HS256", lambda: Tok(header=hdr(alg="HS256"), sign_alg="ES256").build(), "unsupported_algorithm"),
    ("alg EdDSA", lambda: Tok(header=hdr(alg="EdDSA"), sign_alg="ES256").build(), "unsupported_algorithm"),
    (
        "alg lower case",
        lambda: Tok(header=hdr(alg="es256"), sign_alg="ES256").build(),
        "unsupported_algorithm",
    ),
    ("alg missing", lambda: Tok(header=hdr(alg=DROP), sign_alg="ES256").build(), "unsupported_algorithm"),
    (
        "alg not a string",
        lambda: Tok(header=hdr(alg=["ES256"]), sign_alg="ES256").build(),
        "unsupported_algorithm",
    ),
    # forbidden headers
    ("jku header", lambda: Tok(header=hdr(jku="https://evil.example/jwks")).build(), "forbidden_header"),
    ("x5u header", lambda: Tok(header=hdr(x5u="https://evil.example/cert")).build(), "forbidden_header"),
    ("jwk header", lambda: Tok(header=hdr(jwk={"kty": "EC"})).build(), "forbidden_header"),
    ("x5c header", lambda: Tok(header=hdr(x5c=["MIIB"])).build(), "forbidden_header"),
    ("crit header", lambda: Tok(header=hdr(crit=["exp"])).build(), "forbidden_header"),
    ("b64 header", lambda: Tok(header=hdr(b64=False)).build(), "forbidden_header"),
    ("cty header", lambda: Tok(header=hdr(cty="JWT")).build(), "forbidden_header"),
    ("private header", lambda: Tok(header=hdr(foo="bar")).build(), "forbidden_header"),
    # typ
    ("typ lower case", lambda: Tok(header=hdr(typ="jwt")).build(), "bad_type"),
    ("typ at+jwt", lambda: Tok(header=hdr(typ="at+jwt")).build(), "bad_type"),
    ("typ a number", lambda: Tok(header=hdr(typ=1)).build(), "bad_type"),
    ("typ null", lambda: Tok(header=hdr(typ=None)).build(), "bad_type"),
    # kid
    ("kid missing", lambda: Tok(header=hdr(kid=DROP)).build(), "missing_key_id"),
    ("kid empty", lambda: Tok(header=hdr(kid="")).build(), "missing_key_id"),
    ("kid a number", lambda: Tok(header=hdr(kid=1)).build(), "missing_key_id"),
    ("kid null", lambda: Tok(header=hdr(kid=None)).build(), "missing_key_id"),
    # sub
    ("sub missing", lambda: Tok(claims=default_claims(sub=DROP)).build(), "missing_claim"),
    ("sub a number", lambda: Tok(claims=default_claims(sub=1)).build(), "bad_subject"),
    ("sub null", lambda: Tok(claims=default_claims(sub=None)).build(), "bad_subject"),
    (
        "sub not a SPIFFE ID",
        lambda: Tok(claims=default_claims(sub="https://example.org/web")).build(),
        "bad_subject",
    ),
    (
        "sub upper-case trust domain",
        lambda: Tok(claims=default_claims(sub="spiffe://Example.org/web")).build(),
        "bad_subject",
    ),
    ("sub trailing newline", lambda: Tok(claims=default_claims(sub=SUB + "\n")).build(), "bad_subject"),
    ("sub empty", lambda: Tok(claims=default_claims(sub="")).build(), "bad_subject"),
    # A JWT-SVID names a workload; the trust domain's own ID is refused as an X.509 leaf is.
    (
        "sub a bare trust domain",
        lambda: Tok(claims=default_claims(sub="spiffe://example.org")).build(),
        "bad_subject",
    ),
    # key selection
    (
        "trust domain without bundle",
        lambda: Tok(claims=default_claims(sub="spiffe://unknown.org/web")).build(),
        "unknown_trust_domain",
    ),
    ("kid not in the bundle", lambda: Tok(header=hdr(kid="nope")).build(), "unknown_key"),
    (
        "kid of trust domain A, sub in B whose bundle lacks it",
        lambda: Tok(
            header=hdr(kid="k-p384", alg="ES384"),
            key="p384",
            claims=default_claims(sub="spiffe://other.org/x"),
        ).build(),
        "unknown_key",
    ),
    # signature
    (
        "signed by A's key, sub in B whose bundle has the same kid",
        lambda: Tok(claims=default_claims(sub="spiffe://other.org/web")).build(),
        "bad_signature",
    ),
    ("signed by another P-256 key", lambda: Tok(key="p256-b").build(), "bad_signature"),
    (
        "claims changed after signing",
        lambda: Tok(
            mangle=lambda h, p, s: f"{h}.{b64(js(default_claims(sub='spiffe://example.org/admin')))}.{s}"
        ).build(),
        "bad_signature",
    ),
    ("empty signature", lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.").build(), "bad_signature"),
    (
        "ES256 signature one byte short",
        lambda: Tok(mangle=lambda h, p, s: f"{h}.{p}.{b64(base64.urlsafe_b64decode(s + '==')[:-1])}").build(),
        "bad_signature",
    ),
    (
        "ES256 signature in DER instead of R||S",
        lambda: Tok(
            mangle=lambda h, p, s: (
                f"{h}.{p}.{b64(ec_key('p256').sign(f'{h}.{p}'.encode(), ec.ECDSA(hashes.SHA256())))}"
            )
        ).build(),
        "bad_signature",
    ),
    (
        "alg ES256 with an RSA kid",
        lambda: Tok(header=hdr(kid="k-rsa"), key="rsa2048", sign_alg="RS256").build(),
        "bad_signature",
    ),
    (
        "alg ES256 with a P-384 kid",
        lambda: Tok(header=hdr(kid="k-p384"), key="p384", sign_alg="ES384").build(),
        "bad_signature",
    ),
    (
        "alg ES384 with a P-256 kid",
        lambda: Tok(header=hdr(alg="ES384"), sign_alg="ES256").build(),
        "bad_signature",
    ),
    (
        "alg RS256 with an EC kid",
        lambda: Tok(header=hdr(alg="RS256"), sign_alg="ES256").build(),
        "bad_signature",
    ),
    (
        "alg RS256 but PSS signature",
        lambda: Tok(header=hdr(alg="RS256", kid="k-rsa"), key="rsa2048", sign_alg="PS256").build(),
        "bad_signature",
    ),
    (
        "alg PS256 but PKCS1 signature",
        lambda: Tok(header=hdr(alg="PS256", kid="k-rsa"), key="rsa2048", sign_alg="RS256").build(),
        "bad_signature",
    ),
    (
        "alg RS384 but RS256 signature",
        lambda: Tok(header=hdr(alg="RS384", kid="k-rsa"), key="rsa2048", sign_alg="RS256").build(),
        "bad_signature",
    ),
    (
        "RSA signature truncated",
        lambda: Tok(
            header=hdr(alg="RS256", kid="k-rsa"),
            key="rsa2048",
            mangle=lambda h, p, s: f"{h}.{p}.{b64(base64.urlsafe_b64decode(s + '==')[:-3])}",
        ).build(),
        "bad_signature",
    ),
    (
        "RSA-1024 authority",
        lambda: Tok(header=hdr(alg="RS256", kid="k-rsa1024"), key="rsa1024").build(),
        "bad_signature",
    ),
    ("Ed25519 authority", lambda: Tok(header=hdr(kid="k-ed25519")).build(), "bad_signature"),
    (
        "secp256k1 authority for ES256",
        lambda: Tok(header=hdr(kid="k-secp256k1"), key="secp256k1").build(),
        "bad_signature",
    ),
    # claims (all after the signature)
    ("aud missing", lambda: Tok(claims=default_claims(aud=DROP)).build(), "missing_claim"),
    ("aud a number", lambda: Tok(claims=default_claims(aud=1)).build(), "bad_claim"),
    ("aud null", lambda: Tok(claims=default_claims(aud=None)).build(), "bad_claim"),
    ("aud an object", lambda: Tok(claims=default_claims(aud={"a": AUD})).build(), "bad_claim"),
    ("aud empty array", lambda: Tok(claims=default_claims(aud=[])).build(), "bad_claim"),
    ("aud array with a number", lambda: Tok(claims=default_claims(aud=[AUD, 1])).build(), "bad_claim"),
    ("aud empty string", lambda: Tok(claims=default_claims(aud="")).build(), "bad_claim"),
    (
        "aud array with an empty string",
        lambda: Tok(claims=default_claims(aud=[AUD, ""])).build(),
        "bad_claim",
    ),
    ("aud does not match", lambda: Tok(claims=default_claims(aud="frontend")).build(), "audience_mismatch"),
    ("aud match is exact", lambda: Tok(claims=default_claims(aud="Backend")).build(), "audience_mismatch"),
    ("exp missing", lambda: Tok(claims=default_claims(exp=DROP)).build(), "missing_claim"),
    ("exp a string", lambda: Tok(claims=default_claims(exp=str(NOW + 300))).build(), "bad_claim"),
    ("exp a fraction", lambda: Tok(claims=default_claims(exp=NOW + 300.5)).build(), "bad_claim"),
    (
        "exp 1.0 is not an integer",
        lambda: Tok(claims=js(default_claims(exp=DROP))[:-1] + b',"exp":1900000000.0}').build(),
        "bad_claim",
    ),
    (
        "exp in exponent notation",
        lambda: Tok(claims=js(default_claims(exp=DROP))[:-1] + b',"exp":1.9e9}').build(),
        "bad_claim",
    ),
    ("exp a boolean", lambda: Tok(claims=default_claims(exp=True)).build(), "bad_claim"),
    ("exp null", lambda: Tok(claims=default_claims(exp=None)).build(), "bad_claim"),
    ("nbf a string", lambda: Tok(claims=default_claims(nbf="0")).build(), "bad_claim"),
    ("nbf a fraction", lambda: Tok(claims=default_claims(nbf=1.5)).build(), "bad_claim"),
    ("iat a boolean", lambda: Tok(claims=default_claims(iat=False)).build(), "bad_claim"),
    ("iat null", lambda: Tok(claims=default_claims(iat=None)).build(), "bad_claim"),
    ("expired", lambda: Tok(claims=default_claims(exp=NOW - 31)).build(), "expired"),
    ("exp hugely negative", lambda: Tok(claims=default_claims(exp=-(10**400))).build(), "expired"),
    ("not yet valid", lambda: Tok(claims=default_claims(nbf=NOW + 31)).build(), "not_yet_valid"),
    ("nbf far beyond float range", lambda: Tok(claims=default_claims(nbf=10**400)).build(), "not_yet_valid"),
    ("issued in the future", lambda: Tok(claims=default_claims(iat=NOW + 31)).build(), "issued_in_future"),
    (
        "iat far beyond float range",
        lambda: Tok(claims=default_claims(iat=10**400)).build(),
        "issued_in_future",
    ),
    # order: the signature is checked before any claim other than sub decides anything
    (
        "forged token without exp",
        lambda: Tok(key="p256-b", claims=default_claims(exp=DROP)).build(),
        "bad_signature",
    ),
    (
        "forged expired token",
        lambda: Tok(key="p256-b", claims=default_claims(exp=NOW - 999)).build(),
        "bad_signature",
    ),
    (
        "forged token for another audience",
        lambda: Tok(key="p256-b", claims=default_claims(aud="x")).build(),
        "bad_signature",
    ),
    (
        "alg checked before headers",
        lambda: Tok(header=hdr(alg="none", x5c=["MIIB"]), sign_alg="ES256").build(),
        "unsupported_algorithm",
    ),
    (
        "expired checked after audience",
        lambda: Tok(claims=default_claims(aud="x", exp=NOW - 999)).build(),
        "audience_mismatch",
    ),
]


def _bundles_with_odd_keys() -> dict[TrustDomain, Bundle]:
    return bundles(
        **{"k-rsa1024": public("rsa1024"), "k-ed25519": public("ed25519"), "k-secp256k1": public("secp256k1")}
    )


@pytest.mark.parametrize(("name", "make", "reason"), CASES, ids=[case[0] for case in CASES])
def test_each_rule_fails_with_its_exact_reason(name: str, make: Callable[[], str], reason: str) -> None:
    expect_reason(make(), reason, bundles=_bundles_with_odd_keys())


def test_every_reason_code_has_a_case() -> None:
    assert {reason for _, _, reason in CASES} == set(REASONS)


def test_non_string_token_is_malformed() -> None:
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(b"a.b.c", bundles(), [AUD], NOW)  # type: ignore[arg-type]
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(("now", "leeway"), [(float("nan"), 30.0), (float("inf"), 30.0), (NOW, float("nan"))])
def test_non_finite_clock_is_refused_not_failed_open(now: float, leeway: float) -> None:
    # With NaN every `now > exp` comparison is False: the token would pass forever.
    with pytest.raises(ValueError, match="finite"):
        validate(Tok(claims=default_claims(exp=NOW - 9999)).build(), now=now, leeway=leeway)


def test_max_token_bytes_is_configurable() -> None:
    token = Tok().build()
    expect_reason(token, "too_large", max_token_bytes=len(token) - 1)
    validate(token, max_token_bytes=len(token))


def test_cross_trust_domain_key_never_verifies_even_when_kid_and_key_match() -> None:
    # other.org's bundle holds example.org's very key under the same kid: only then may it verify a token of
    # other.org -- the key is selected by the subject's trust domain, never found by searching all bundles.
    token = Tok(claims=default_claims(sub="spiffe://other.org/web")).build()
    expect_reason(token, "bad_signature")
    shared = bundles()
    shared[OTHER_TD] = Bundle(OTHER_TD, jwt_authorities={KID: public("p256")})
    assert validate(token, bundles=shared).spiffe_id.trust_domain == OTHER_TD
    # A bundle for other.org alone does not let an example.org token through.
    only_other = {OTHER_TD: Bundle(OTHER_TD, jwt_authorities={KID: public("p256")})}
    expect_reason(Tok().build(), "unknown_trust_domain", bundles=only_other)


# --- time and leeway edges (injected now) ---------------------------------------------------------


EXP, NBF, IAT = NOW + 300, NOW - 100, NOW - 100


@pytest.mark.parametrize(
    ("now", "leeway", "reason"),
    [
        (EXP, 30.0, None),
        (EXP + 30, 30.0, None),  # now == exp + leeway is still valid (RFC 7519 4.1.4: "on or after" expires)
        (EXP + 30.001, 30.0, "expired"),
        (EXP + 0.5, 0.0, "expired"),
        (EXP, 0.0, None),
        (NBF - 30, 30.0, None),  # now + leeway == nbf is valid
        (NBF - 30.001, 30.0, "not_yet_valid"),
        (NBF - 0.001, 0.0, "not_yet_valid"),
        (IAT - 30, 30.0, None),  # iat == now + leeway is valid
        (IAT - 30.5, 30.0, "not_yet_valid"),  # nbf == iat here, nbf is checked first
    ],
)
def test_leeway_edges(now: float, leeway: float, reason: str | None) -> None:
    token = Tok(claims=default_claims(exp=EXP, nbf=NBF, iat=IAT)).build()
    if reason is None:
        assert validate(token, now=now, leeway=leeway).expiry == EXP
    else:
        expect_reason(token, reason, now=now, leeway=leeway)


@pytest.mark.parametrize(("now", "reason"), [(IAT - 30, None), (IAT - 30.001, "issued_in_future")])
def test_iat_edge_without_nbf(now: float, reason: str | None) -> None:
    token = Tok(claims=default_claims(exp=EXP, iat=IAT)).build()
    if reason is None:
        validate(token, now=now)
    else:
        expect_reason(token, reason, now=now)


# --- parse_jwt_svid_insecure ----------------------------------------------------------------------


def test_insecure_parse_skips_signature_audience_and_time_only() -> None:
    token = Tok(key="p256-b", claims=default_claims(aud="x", exp=NOW - 999, iat=NOW + 999)).build()
    svid = parse_jwt_svid_insecure(token)
    assert (svid.spiffe_id, svid.audience, svid.expiry, svid.issued_at) == (
        SpiffeId.parse(SUB),
        ("x",),
        NOW - 999,
        NOW + 999,
    )


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        case
        for case in CASES
        # A forged token fails only at the signature, which the insecure parse does not check.
        if "forged" not in case[0]
        and case[2]
        in {
            "malformed",
            "too_large",
            "unsupported_algorithm",
            "forbidden_header",
            "bad_type",
            "missing_key_id",
            "bad_subject",
            "missing_claim",
            "bad_claim",
        }
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_insecure_parse_keeps_the_structural_rules(name: str, make: Callable[[], str], reason: str) -> None:
    with pytest.raises(JwtSvidError) as info:
        parse_jwt_svid_insecure(make())
    assert info.value.reason == reason


# --- minting --------------------------------------------------------------------------------------


def _decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    h, p, _ = token.split(".")
    return (json.loads(base64.urlsafe_b64decode(h + "==")), json.loads(base64.urlsafe_b64decode(p + "==")))


@pytest.mark.parametrize(
    ("key_name", "kid", "alg"),
    [
        ("p256", "k-p256", "ES256"),
        ("p384", "k-p384", "ES384"),
        ("p521", "k-p521", "ES512"),
        ("rsa2048", "k-rsa", "RS256"),
    ],
)
def test_mint_header_and_claims_and_round_trip(key_name: str, kid: str, alg: str) -> None:
    spiffe_id = SpiffeId.parse(SUB)
    token = mint_jwt_svid(spiffe_id, [AUD], key(key_name), kid, ttl=300.9, now=NOW + 0.7)
    header, claims = _decode(token)
    assert header == {"alg": alg, "kid": kid, "typ": "JWT"}
    assert claims == {"sub": SUB, "aud": AUD, "exp": int(NOW + 0.7 + 300.9), "iat": NOW}
    assert jwt_algorithm_for_key(key(key_name)) == alg
    svid = validate(token, now=NOW + 10)
    assert (svid.spiffe_id, svid.audience, svid.expiry, svid.issued_at) == (spiffe_id, (AUD,), NOW + 301, NOW)


def test_mint_several_audiences_is_an_array_and_a_string_is_one_audience() -> None:
    spiffe_id = SpiffeId.parse(SUB)
    _, claims = _decode(mint_jwt_svid(spiffe_id, ["a", "b"], key("p256"), KID, 60, NOW))
    assert claims["aud"] == ["a", "b"]
    _, claims = _decode(mint_jwt_svid(spiffe_id, "backend", key("p256"), KID, 60, NOW))
    assert claims["aud"] == "backend"


@pytest.mark.parametrize(
    ("name", "kwargs", "reason"),
    [
        ("no audience", {"audience": []}, "bad_claim"),
        ("empty audience", {"audience": [""]}, "bad_claim"),
        ("zero ttl", {"ttl": 0}, "bad_claim"),
        ("negative ttl", {"ttl": -1}, "bad_claim"),
        ("NaN ttl", {"ttl": float("nan")}, "bad_claim"),
        ("infinite ttl", {"ttl": float("inf")}, "bad_claim"),
        ("infinite now", {"now": float("inf")}, "bad_claim"),
        ("empty kid", {"kid": ""}, "missing_key_id"),
        ("trust domain subject", {"spiffe_id": SpiffeId.parse("spiffe://example.org")}, "bad_subject"),
        ("RSA-1024 key", {"private_key": key("rsa1024")}, "unsupported_algorithm"),
        ("Ed25519 key", {"private_key": key("ed25519")}, "unsupported_algorithm"),
        ("secp256k1 key", {"private_key": key("secp256k1")}, "unsupported_algorithm"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_mint_refuses_bad_input(name: str, kwargs: dict[str, Any], reason: str) -> None:
    args: dict[str, Any] = {
        "spiffe_id": SpiffeId.parse(SUB),
        "audience": [AUD],
        "private_key": key("p256"),
        "kid": KID,
        "ttl": 60,
        "now": NOW,
    }
    args.update(kwargs)
    with pytest.raises(JwtSvidError) as info:
        mint_jwt_svid(**args)
    assert info.value.reason == reason


# --- fuzzing: only JwtSvidError, never another exception ------------------------------------------


def _only_jwt_svid_error(token: Any) -> JwtSvid | None:
    reason = None
    try:
        return validate_jwt_svid(token, _FUZZ_BUNDLES, [AUD], float(NOW))
    except JwtSvidError as err:
        reason = err.reason
    assert reason in REASONS
    return None


_FUZZ_BUNDLES = bundles()
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@_FUZZ
@given(st.text(max_size=400))
def test_fuzz_random_text(text: str) -> None:
    _only_jwt_svid_error(text)


@_FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_as_text(raw: bytes) -> None:
    _only_jwt_svid_error(raw.decode("latin-1"))


@_FUZZ
@given(st.lists(st.text(alphabet=_B64_ALPHABET + "=.", max_size=60), min_size=3, max_size=3))
def test_fuzz_three_base64ish_parts(parts: list[str]) -> None:
    _only_jwt_svid_error(".".join(parts))


@_FUZZ
@given(st.lists(st.binary(max_size=80), min_size=3, max_size=3))
def test_fuzz_three_base64url_encoded_blobs(parts: list[bytes]) -> None:
    _only_jwt_svid_error(".".join(b64(p) for p in parts))


_VALID_TOKEN = Tok().build()


@_FUZZ
@given(
    st.integers(min_value=0, max_value=len(_VALID_TOKEN) - 1),
    st.sampled_from(["replace", "insert", "delete"]),
    st.characters(codec="utf-8"),
)
def test_fuzz_mutated_valid_token(position: int, operation: str, char: str) -> None:
    if operation == "replace":
        mutated = _VALID_TOKEN[:position] + char + _VALID_TOKEN[position + 1 :]
    elif operation == "insert":
        mutated = _VALID_TOKEN[:position] + char + _VALID_TOKEN[position:]
    else:
        mutated = _VALID_TOKEN[:position] + _VALID_TOKEN[position + 1 :]
    svid = _only_jwt_svid_error(mutated)
    if svid is not None:
        # Canonical base64url and a signed header.payload: the only mutation that passes is no mutation.
        assert mutated == _VALID_TOKEN


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
_claim_values = {
    "sub": st.sampled_from([SUB, "spiffe://other.org/x", "spiffe://unknown.org/x", "spiffe://x/"])
    | _json_values,
    "aud": st.sampled_from([AUD, [AUD], [AUD, "x"], [], ""]) | _json_values,
    "exp": st.integers(min_value=NOW - 100, max_value=NOW + 100) | _json_values,
    "nbf": st.integers(min_value=NOW - 100, max_value=NOW + 100) | _json_values,
    "iat": st.integers(min_value=NOW - 100, max_value=NOW + 100) | _json_values,
}
_header_values = {
    "alg": st.sampled_from(["ES256", "ES384", "RS256", "none", "HS256"]) | _json_values,
    "kid": st.sampled_from([KID, "k-rsa", "k-p384", "nope", ""]) | _json_values,
    "typ": st.sampled_from(["JWT", "JOSE", "jwt"]) | _json_values,
    "x5c": _json_values,
}


def _subset(
    values: dict[str, st.SearchStrategy[Any]], required: set[str]
) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {name: strategy for name, strategy in values.items() if name in required},
        optional={name: strategy for name, strategy in values.items() if name not in required},
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_subset(_header_values, {"alg", "kid"}), _subset(_claim_values, {"sub", "aud", "exp"}))
def test_fuzz_signed_tokens_with_arbitrary_json(header: dict[str, Any], claims: dict[str, Any]) -> None:
    # Signed with the real P-256 key so the fuzz reaches the checks after the signature.
    token = Tok(header=header, claims=claims, sign_alg="ES256").build()
    svid = _only_jwt_svid_error(token)
    if svid is not None:
        assert header["alg"] == "ES256"
        assert header["kid"] == KID
        assert claims["sub"] == SUB


@_FUZZ
@given(st.text(alphabet=_B64_ALPHABET, max_size=40))
def test_base64url_accepts_exactly_the_canonical_encodings(part: str) -> None:
    assume(len(part) % 4 != 1)
    canonical = b64(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) == part
    if canonical:
        assert b64(jwtsvid._b64url_decode(part, "part")) == part
    else:
        with pytest.raises(JwtSvidError, match=r"^malformed: part is not canonical"):
            jwtsvid._b64url_decode(part, "part")


def test_errors_are_in_the_svidgate_tree() -> None:
    assert issubclass(JwtSvidError, SvidgateError)
