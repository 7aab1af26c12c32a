"""SPIFFE bundles (SPIFFE_Trust_Domain_and_Bundle.md 4, X509-SVID.md 6, JWT-SVID.md 6) and PEM bundles."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from svidgate.errors import BundleError
from svidgate.identity.bundle import (
    Bundle,
    authority_key_problem,
    bundle_update_rejection,
    parse_pem_bundle,
    parse_spiffe_bundle,
    pem_bundle,
    public_key_from_jwk,
    public_key_to_jwk,
    spiffe_bundle_json,
    x509_authorities_pem,
    x509_authority_problem,
    x509_bundle,
)
from svidgate.identity.keys import KeyType, generate_private_key
from svidgate.identity.spiffe_id import TrustDomain
from tests.support.ca import NOW, TestCA, key_usage

TD = TrustDomain("example.org")
CA = TestCA(TD)
OTHER_CA = TestCA(TD, key_type=KeyType.RSA_2048)


def _doc(bundle: Bundle) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(spiffe_bundle_json(bundle))
    return result


def _parse(doc: object) -> Bundle:
    return parse_spiffe_bundle(TD, json.dumps(doc).encode())


def _same(a: Bundle, b: Bundle) -> bool:
    return (
        a.trust_domain == b.trust_domain
        and a.x509_authorities == b.x509_authorities
        and dict(a.jwt_authorities) == dict(b.jwt_authorities)
        and a.sequence == b.sequence
        and a.refresh_hint == b.refresh_hint
    )


GOOD = Bundle(
    trust_domain=TD,
    x509_authorities=(CA.certificate, OTHER_CA.certificate),
    jwt_authorities={CA.jwt_kid: CA.jwt_key.public_key(), OTHER_CA.jwt_kid: OTHER_CA.jwt_key.public_key()},
    sequence=7,
    refresh_hint=300,
)


# -- writing -----


def test_written_document_is_conformant() -> None:
    doc = _doc(GOOD)
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300
    x509_entries = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_entries = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_entries) == 2
    assert len(jwt_entries) == 2
    for entry in x509_entries:
        assert "kid" not in entry  # X509-SVID.md 6.1
        assert len(entry["x5c"]) == 1
        assert entry["kty"] in ("EC", "RSA")
        base64.b64decode(entry["x5c"][0], validate=True)  # standard base64, RFC 7517 4.7
    assert {e["kid"] for e in jwt_entries} == {CA.jwt_kid, OTHER_CA.jwt_kid}
    ec_entry = next(e for e in x509_entries if e["kty"] == "EC")
    assert ec_entry["crv"] == "P-256"
    assert (
        len(base64.urlsafe_b64decode(ec_entry["x"] + "==")) == 32
    )  # fixed-size coordinates (RFC 7518 6.2.1.2)
    rsa_entry = next(e for e in jwt_entries if e["kty"] == "RSA")
    assert rsa_entry["e"] == "AQAB"


def test_round_trip_and_determinism() -> None:
    data = spiffe_bundle_json(GOOD)
    parsed = parse_spiffe_bundle(TD, data)
    assert _same(parsed, GOOD)
    assert spiffe_bundle_json(parsed) == data
    assert data.endswith(b"\n")


def test_optional_members_are_omitted_when_unset() -> None:
    doc = _doc(Bundle(trust_domain=TD))
    assert doc == {"keys": []}
    parsed = _parse(doc)
    assert parsed.sequence is None
    assert parsed.refresh_hint is None
    assert parsed.x509_authorities == ()


@pytest.mark.parametrize(
    "key",
    [
        generate_private_key(KeyType.EC_P256).public_key(),
        generate_private_key(KeyType.EC_P384).public_key(),
        ec.generate_private_key(ec.SECP521R1()).public_key(),
        generate_private_key(KeyType.RSA_2048).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["P-256", "P-384", "P-521", "RSA", "Ed25519"],
)
def test_jwk_key_round_trip(key: Any) -> None:
    assert public_key_from_jwk(public_key_to_jwk(key)) == key
    bundle = Bundle(trust_domain=TD, jwt_authorities={"k": key})
    parsed = parse_spiffe_bundle(TD, spiffe_bundle_json(bundle))
    if isinstance(key, ed25519.Ed25519PublicKey):
        # Writable as a JWK, but no JWT-SVID algorithm verifies with it: never a JWT authority.
        assert dict(parsed.jwt_authorities) == {}
        assert parsed.rejected_authorities == (
            "keys[0] (jwt-svid 'k'): OKP ('Ed25519') keys have no JWT-SVID algorithm "
            "(JWT-SVID.md 2.1: RS, ES and PS only)",
        )
    else:
        assert dict(parsed.jwt_authorities) == {"k": key}
        assert parsed.rejected_authorities == ()


def test_writing_an_inexpressible_key_is_a_bundle_error() -> None:
    bundle = Bundle(
        trust_domain=TD, jwt_authorities={"k": ec.generate_private_key(ec.SECP256K1()).public_key()}
    )
    with pytest.raises(BundleError, match="unsupported EC curve"):
        spiffe_bundle_json(bundle)


# -- reading: what is ignored -----


def test_unknown_use_kty_and_missing_use_are_ignored() -> None:
    doc = _doc(GOOD)
    doc["keys"] += [
        {"use": "future-svid", "kty": "EC", "whatever": 1},
        {"use": "X509-SVID", "kty": "EC"},  # use values are case-sensitive (4.2.2)
        {"kty": "EC", "crv": "P-256"},  # no use at all
        {"use": "jwt-svid", "kty": "oct", "k": "c2VjcmV0"},  # symmetric keys are not a thing here
        {"use": "x509-svid", "kty": "QUANTUM"},
    ]
    doc["spiffe_future_member"] = {"x": 1}
    assert _same(_parse(doc), GOOD)


def test_duplicate_x509_authorities_are_merged() -> None:
    doc = _doc(GOOD)
    doc["keys"].append(doc["keys"][0])
    assert _parse(doc).x509_authorities == GOOD.x509_authorities


def test_x509_entry_without_key_members_is_accepted() -> None:
    # Only kty and x5c are needed; the key is taken from the certificate.
    der = base64.b64encode(CA.certificate.public_bytes(serialization.Encoding.DER)).decode()
    parsed = _parse({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [der]}]})
    assert parsed.x509_authorities == (CA.certificate,)


# -- reading: what is an error -----


def _mutated(mutate: Any) -> dict[str, Any]:
    doc = _doc(GOOD)
    mutate(doc)
    return doc


def _x509(doc: dict[str, Any]) -> dict[str, Any]:
    return next(k for k in doc["keys"] if k["use"] == "x509-svid")


def _jwt(doc: dict[str, Any]) -> dict[str, Any]:
    return next(k for k in doc["keys"] if k["use"] == "jwt-svid")


CERT_B64 = base64.b64encode(CA.certificate.public_bytes(serialization.Encoding.DER)).decode()
OTHER_CERT_B64 = base64.b64encode(OTHER_CA.certificate.public_bytes(serialization.Encoding.DER)).decode()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a JSON object"),
        ("keys", "must be a JSON object"),
        (None, "must be a JSON object"),
        ({}, "'keys' member is missing"),
        ({"keys": None}, "'keys' must be an array"),
        ({"keys": {}}, "'keys' must be an array"),
        ({"keys": ["x"]}, r"keys\[0\]: must be a JSON object"),
        ({"keys": [{"use": "x509-svid"}]}, "'kty' must be set"),
        ({"keys": [{"use": "jwt-svid", "kty": 1}]}, "'kty' must be set"),
        (_mutated(lambda d: _x509(d).pop("x5c")), "exactly one certificate in 'x5c' \\(got null\\)"),
        (_mutated(lambda d: _x509(d).update(x5c=[])), "exactly one certificate in 'x5c' \\(got 0\\)"),
        (
            _mutated(lambda d: _x509(d).update(x5c=CERT_B64)),
            "exactly one certificate in 'x5c' \\(got a string\\)",
        ),
        (
            {"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [CERT_B64, OTHER_CERT_B64]}]},
            "exactly one certificate in 'x5c' \\(got 2\\)",
        ),
        (_mutated(lambda d: _x509(d).update(x5c=[1])), "x5c\\[0\\] must be a base64 string"),
        (_mutated(lambda d: _x509(d).update(x5c=["not base64!"])), "not a base64 DER certificate"),
        (_mutated(lambda d: _x509(d).update(x5c=["AAAA"])), "not a base64 DER certificate"),
        (_mutated(lambda d: _x509(d).update(kid="k")), "x509-svid entry must not have a 'kid'"),
        (
            {
                "keys": [
                    {"use": "x509-svid", **public_key_to_jwk(OTHER_CA.key.public_key()), "x5c": [CERT_B64]}
                ]
            },
            "does not match the key of its x5c certificate",
        ),
        (_mutated(lambda d: _jwt(d).pop("kid")), "non-empty string 'kid'"),
        (_mutated(lambda d: _jwt(d).update(kid="")), "non-empty string 'kid'"),
        (_mutated(lambda d: _jwt(d).update(kid=7)), "non-empty string 'kid'"),
        (_mutated(lambda d: d["keys"].append(dict(_jwt(d)))), "duplicate 'kid'"),
        (
            {
                "keys": [
                    {"use": "jwt-svid", "kid": "k", "kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}
                ]
            },
            "coordinates must be 32 bytes",
        ),
        (
            {
                "keys": [
                    {"use": "jwt-svid", "kid": "k", "kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43}
                ]
            },
            "not a valid EC public key",  # the point (0, 0) is not on the curve
        ),
        ({"keys": [{"use": "jwt-svid", "kid": "k", "kty": "RSA", "n": "AQAB"}]}, "member 'e'"),
        (
            {"keys": [{"use": "jwt-svid", "kid": "k", "kty": "RSA", "n": "AQAB", "e": "AQAB"}]},
            "not a valid RSA",
        ),
        (
            {"keys": [{"use": "jwt-svid", "kid": "k", "kty": "RSA", "n": "AQ==", "e": "AQAB"}]},
            "unpadded base64url",
        ),
        (
            {"keys": [{"use": "jwt-svid", "kid": "k", "kty": "RSA", "n": "A+/B", "e": "AQAB"}]},
            "unpadded base64url",
        ),
        ({"keys": [], "spiffe_sequence": -1}, "'spiffe_sequence' must be between"),
        ({"keys": [], "spiffe_sequence": 2**64}, "'spiffe_sequence' must be between"),
        ({"keys": [], "spiffe_sequence": 1.5}, "'spiffe_sequence' must be an integer, not a number"),
        ({"keys": [], "spiffe_sequence": True}, "'spiffe_sequence' must be an integer, not a boolean"),
        ({"keys": [], "spiffe_sequence": "1"}, "'spiffe_sequence' must be an integer, not a string"),
        ({"keys": [], "spiffe_refresh_hint": -5}, "'spiffe_refresh_hint' must be between"),
        ({"keys": [], "spiffe_refresh_hint": [1]}, "'spiffe_refresh_hint' must be an integer, not an array"),
    ],
)
def test_malformed_documents(doc: object, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        _parse(doc)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"keys": [], "keys": []}', "duplicate JSON member 'keys'"),
        (b'{"keys": [{"use": "jwt-svid", "kid": "a", "kid": "b"}]}', "duplicate JSON member 'kid'"),
        (b'{"keys": [], "spiffe_sequence": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_undecodable_documents(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        parse_spiffe_bundle(TD, data)


def test_sequence_accepts_full_uint64() -> None:
    assert _parse({"keys": [], "spiffe_sequence": 2**64 - 1}).sequence == 2**64 - 1
    assert _parse({"keys": [], "spiffe_sequence": None}).sequence is None


def test_error_names_the_trust_domain_and_entry() -> None:
    doc = _mutated(lambda d: _jwt(d).pop("kid"))
    with pytest.raises(BundleError) as excinfo:
        _parse(doc)
    assert "example.org" in str(excinfo.value)
    assert "keys[" in str(excinfo.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_property_arbitrary_json_is_a_bundle_or_a_bundle_error(doc: object) -> None:
    with contextlib.suppress(BundleError):
        _parse(doc)


MEMBERS = ["use", "kty", "kid", "x5c", "crv", "x", "y", "n", "e"]


@given(
    st.integers(0, 3),
    st.sampled_from(MEMBERS),
    json_values | st.sampled_from(["x509-svid", "jwt-svid", "EC", "RSA", "P-256", CERT_B64, "AQAB"]),
    st.booleans(),
)
def test_property_mutated_entries_never_escape_the_error_tree(
    index: int, member: str, value: object, delete: bool
) -> None:
    doc = _doc(GOOD)
    entry = doc["keys"][index]
    if delete:
        entry.pop(member, None)
    else:
        entry[member] = value
    with contextlib.suppress(BundleError):
        _parse(doc)


# -- PEM -----


def test_pem_round_trip() -> None:
    data = pem_bundle(GOOD)
    assert data == x509_authorities_pem(GOOD)
    assert data.count(b"-----BEGIN CERTIFICATE-----") == 2
    parsed = parse_pem_bundle(TD, data)
    assert parsed.x509_authorities == GOOD.x509_authorities
    assert dict(parsed.jwt_authorities) == {}
    assert parsed.trust_domain == TD


def test_pem_tolerates_comments_and_crlf_and_merges_duplicates() -> None:
    one = CA.certificate.public_bytes(serialization.Encoding.PEM)
    data = b"# root of example.org\n" + one.replace(b"\n", b"\r\n") + b"\nsubject=...\n" + one
    assert parse_pem_bundle(TD, data).x509_authorities == (CA.certificate,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no PEM CERTIFICATE block"),
        (b"hello", "no PEM CERTIFICATE block"),
        (
            CA.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "is a 'PRIVATE KEY', expected only CERTIFICATE",
        ),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END PRIVATE KEY-----\n", "ends as 'PRIVATE KEY'"),
    ],
)
def test_malformed_pem(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        parse_pem_bundle(TD, data)


def test_bundle_mapping_is_read_only() -> None:
    with pytest.raises(TypeError):
        GOOD.jwt_authorities["x"] = CA.jwt_key.public_key()  # type: ignore[index]


# -- acceptance: per authority (X509-SVID.md 4.1/4.3, the key floor) -----


def _self_signed(
    key: Any, *, basic_constraints: bool = True, usage: x509.KeyUsage | None = None
) -> x509.Certificate:
    """A self-signed certificate over `key` (any key type TestCA cannot make), CA-shaped unless told."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(NOW - 3600, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(NOW + 86400, dt.UTC))
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    builder = builder.add_extension(usage or key_usage(key_cert_sign=True, crl_sign=True), critical=True)
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


LEAF, _ = CA.create_x509_certificate("spiffe://example.org/leaf")

#: Certificates that can never be X.509 trust anchors, with the reason the bundle records.
NOT_ANCHORS = [
    ("leaf", LEAF, "not a CA certificate: basicConstraints cA is false (X509-SVID.md 4.1)"),
    (
        "no basicConstraints",
        _self_signed(ec.generate_private_key(ec.SECP256R1()), basic_constraints=False),
        "not a CA certificate: it has no basicConstraints extension (X509-SVID.md 4.1)",
    ),
    (
        "no keyUsage",
        TestCA(TD, usage=None).certificate,
        "not a signing certificate: it has no keyUsage extension (X509-SVID.md 4.3: keyCertSign)",
    ),
    (
        "keyUsage without keyCertSign",
        TestCA(TD, usage=key_usage(digital_signature=True)).certificate,
        "not a signing certificate: keyUsage lacks keyCertSign (X509-SVID.md 4.3)",
    ),
    (
        "RSA-1024 CA",
        _self_signed(rsa.generate_private_key(65537, 1024)),  # noqa: S505 - the weak key under test
        "RSA key of 1024 bits is below the 2048-bit floor",
    ),
    (
        "secp256k1 CA",
        _self_signed(ec.generate_private_key(ec.SECP256K1())),
        "EC curve secp256k1 is not accepted (P-256, P-384 and P-521 are)",
    ),
    (
        "Ed25519 CA",
        _self_signed(ed25519.Ed25519PrivateKey.generate()),
        "Ed25519 keys are not accepted (RSA of at least 2048 bits and EC P-256/P-384/P-521 are)",
    ),
]


@pytest.mark.parametrize(
    ("cert", "reason"), [(c, r) for _, c, r in NOT_ANCHORS], ids=[n for n, _, _ in NOT_ANCHORS]
)
def test_x509_entry_that_is_no_anchor_is_left_out_with_its_reason(
    cert: x509.Certificate, reason: str
) -> None:
    assert x509_authority_problem(cert) == reason
    der = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    doc = _doc(GOOD)
    doc["keys"].insert(1, {"use": "x509-svid", "kty": "EC", "x5c": [der]})
    parsed = _parse(doc)
    # The other authorities are untouched: one unusable entry does not sink the bundle (4.2.2 in spirit).
    assert parsed.x509_authorities == GOOD.x509_authorities
    assert dict(parsed.jwt_authorities) == dict(GOOD.jwt_authorities)
    assert parsed.rejected_authorities == (f"keys[1] (x509-svid): {reason}",)
    # The same rule for PEM bundles (files source, federation files) and DER lists (Workload API).
    pem = pem_bundle(GOOD) + cert.public_bytes(serialization.Encoding.PEM)
    from_pem = parse_pem_bundle(TD, pem)
    assert from_pem.x509_authorities == GOOD.x509_authorities
    assert from_pem.rejected_authorities == (f"certificate 2: {reason}",)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (
            rsa.generate_private_key(65537, 1024).public_key(),  # noqa: S505 - the weak key under test
            "RSA key of 1024 bits is below the 2048-bit floor",
        ),
        (rsa.generate_private_key(65537, 2048).public_key(), None),
        (rsa.generate_private_key(65537, 3072).public_key(), None),
        (ec.generate_private_key(ec.SECP256R1()).public_key(), None),
        (ec.generate_private_key(ec.SECP384R1()).public_key(), None),
        (ec.generate_private_key(ec.SECP521R1()).public_key(), None),
        (
            ec.generate_private_key(ec.SECP256K1()).public_key(),
            "EC curve secp256k1 is not accepted (P-256, P-384 and P-521 are)",
        ),
        (
            ed25519.Ed25519PrivateKey.generate().public_key(),
            "Ed25519 keys are not accepted (RSA of at least 2048 bits and EC P-256/P-384/P-521 are)",
        ),
    ],
    ids=["RSA-1024", "RSA-2048", "RSA-3072", "P-256", "P-384", "P-521", "secp256k1", "Ed25519"],
)
def test_authority_key_floor(key: Any, reason: str | None) -> None:
    assert authority_key_problem(key) == reason


def test_weak_jwt_keys_are_left_out_with_their_reason() -> None:
    weak = rsa.generate_private_key(65537, 1024).public_key()  # noqa: S505 - the weak key under test
    doc = _doc(GOOD)
    doc["keys"] += [
        {"use": "jwt-svid", "kid": "weak", **public_key_to_jwk(weak)},
        {"use": "jwt-svid", "kid": "k1", "kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"},
        {"use": "jwt-svid", "kid": "x", "kty": "OKP", "crv": "X25519", "x": "AA"},
    ]
    parsed = _parse(doc)
    assert dict(parsed.jwt_authorities) == dict(GOOD.jwt_authorities)
    assert parsed.rejected_authorities == (
        "keys[4] (jwt-svid 'weak'): RSA key of 1024 bits is below the 2048-bit floor",
        "keys[5] (jwt-svid 'k1'): EC curve 'secp256k1' is not accepted (P-256, P-384 and P-521 are)",
        "keys[6] (jwt-svid 'x'): OKP ('X25519') keys have no JWT-SVID algorithm "
        "(JWT-SVID.md 2.1: RS, ES and PS only)",
    )
    # A rejected key still holds its kid: a second entry with it is as ambiguous as before.
    doc["keys"].append({"use": "jwt-svid", "kid": "weak", **public_key_to_jwk(CA.jwt_key.public_key())})
    with pytest.raises(BundleError, match="duplicate 'kid' 'weak'"):
        _parse(doc)


def test_x509_bundle_from_certificates() -> None:
    bundle = x509_bundle(TD, [CA.certificate, LEAF, CA.certificate], "bundle certificate")
    assert bundle.x509_authorities == (CA.certificate,)
    assert bundle.rejected_authorities == (
        "bundle certificate 1: not a CA certificate: basicConstraints cA is false (X509-SVID.md 4.1)",
    )


# -- acceptance: per update -----


def _bundle(
    *, x509_: bool = True, jwt: bool = True, sequence: int | None = None, rejected: tuple[str, ...] = ()
) -> Bundle:
    return Bundle(
        TD,
        x509_authorities=(CA.certificate,) if x509_ else (),
        jwt_authorities={CA.jwt_kid: CA.jwt_key.public_key()} if jwt else {},
        sequence=sequence,
        rejected_authorities=rejected,
    )


@pytest.mark.parametrize(
    ("current", "candidate", "reason"),
    [
        (None, _bundle(), None),
        (None, _bundle(jwt=False), None),
        (None, _bundle(x509_=False), None),
        (None, _bundle(x509_=False, jwt=False), "no_usable_authority"),
        (_bundle(), _bundle(), None),
        (_bundle(jwt=False), _bundle(), None),  # gaining a use is fine
        (_bundle(), _bundle(jwt=False), "no_usable_jwt_authority"),
        (_bundle(), _bundle(x509_=False), "no_usable_x509_authority"),
        (_bundle(jwt=False), _bundle(x509_=False), "no_usable_x509_authority"),
        (_bundle(x509_=False), _bundle(jwt=False), "no_usable_jwt_authority"),
        (_bundle(), _bundle(x509_=False, jwt=False), "no_usable_authority"),
        (_bundle(sequence=5), _bundle(sequence=4), "sequence_regressed"),
        (_bundle(sequence=5), _bundle(sequence=5), None),
        (_bundle(sequence=5), _bundle(sequence=None), None),
        (_bundle(sequence=None), _bundle(sequence=1), None),
    ],
)
def test_bundle_update_rules(current: Bundle | None, candidate: Bundle, reason: str | None) -> None:
    rejection = bundle_update_rejection(current, candidate)
    assert (rejection.reason if rejection is not None else None) == reason


def test_update_rejection_detail_names_what_parsing_left_out() -> None:
    candidate = _bundle(
        jwt=False, rejected=("keys[1] (jwt-svid 'k'): RSA key of 1024 bits is below the 2048-bit floor",)
    )
    rejection = bundle_update_rejection(_bundle(), candidate)
    assert rejection is not None
    assert rejection.detail == (
        "the bundle would leave no usable JWT authority where there were 1 "
        "(keys[1] (jwt-svid 'k'): RSA key of 1024 bits is below the 2048-bit floor)"
    )
