"""py-spiffe as a peer: on valid SPIFFE IDs, X.509-SVIDs and bundles both libraries agree.

Where svidgate deliberately differs, `STRICTER` and `LOOSER` list every case, and the tests assert that
py-spiffe really does accept (or reject) them -- so the lists stay honest when either library changes. The JWT
side lives in test_pyspiffe_peer_jwt.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from spiffe import JwtBundle as PyJwtBundle
from spiffe import SpiffeId as PySpiffeId
from spiffe import TrustDomain as PyTrustDomain
from spiffe import X509Bundle as PyX509Bundle
from spiffe import X509Svid as PyX509Svid
from spiffe.errors import PySpiffeError

from svidgate.errors import SvidgateError
from svidgate.identity.bundle import (
    Bundle,
    parse_pem_bundle,
    parse_spiffe_bundle,
    pem_bundle,
    spiffe_bundle_json,
)
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid, parse_x509_svid
from tests.support.ca import TestCA, key_usage
from tests.unit.identity.test_spiffe_id import paths, trust_domain_names

TD = TrustDomain("example.org")
ID = "spiffe://example.org/workload"
CA = TestCA(TD)
INTERMEDIATE = CA.child_ca()


def _pem(svid: X509Svid) -> tuple[bytes, bytes]:
    return svid.cert_chain_pem(), svid.private_key_pem()


# -- agreement on valid input -----


@given(trust_domain_names, paths)
def test_valid_ids_agree(name: str, path: str) -> None:
    text = f"spiffe://{name}{path}"
    ours = SpiffeId.parse(text)
    theirs = PySpiffeId(text)
    assert str(theirs) == str(ours) == text
    assert theirs.trust_domain.name == ours.trust_domain.name
    assert theirs.path == ours.path
    assert PyTrustDomain(name).name == TrustDomain.parse(name).name


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://example.org/p%41th",
        "spiffe://example.org//a",
        "spiffe://example.org/a/",
        "spiffe://example.org/./a",
        "spiffe://example.org/pa:th",
        "spiffe://example.org:80/a",
        "spiffe://user@example.org/a",
        "spiffe://example.org/a?q",
        "spiffe://example.org/a#f",
        "spiffe:///a",
        "http://example.org/a",
        "spiffe://ex ample.org/a",
    ],
)
def test_invalid_ids_both_reject(text: str) -> None:
    with pytest.raises(SvidgateError):
        SpiffeId.parse(text)
    with pytest.raises(PySpiffeError):
        PySpiffeId(text)


def _svids() -> list[X509Svid]:
    clock = FakeClock()
    svids = [
        CA.create_x509_svid(ID),
        CA.create_x509_svid(ID, key_type=KeyType.EC_P384, dns_names=["web.example.org"]),
        INTERMEDIATE.create_x509_svid(ID),
        INTERMEDIATE.child_ca().create_x509_svid(ID),
        TestCA(TD, key_type=KeyType.RSA_2048).create_x509_svid(
            ID, key_type=KeyType.RSA_2048, usage=key_usage(digital_signature=True, key_encipherment=True)
        ),
    ]
    builtin = BuiltinCa.in_memory(TD, KeyType.EC_P256, clock)
    svids.append(builtin.mint_x509_svid(SpiffeId.parse(ID), 600, ["web"]))
    return svids


@pytest.mark.parametrize(
    "svid", _svids(), ids=["root", "p384", "intermediate", "two-intermediates", "rsa", "builtin"]
)
def test_valid_x509_svids_agree(svid: X509Svid) -> None:
    theirs = PyX509Svid.parse(*_pem(svid))
    ours = parse_x509_svid(*_pem(svid))
    assert str(theirs.spiffe_id) == str(ours.spiffe_id) == ID
    assert list(theirs.cert_chain) == list(ours.cert_chain)
    theirs_raw = PyX509Svid.parse_raw(svid.cert_chain_der(), svid.private_key_der())
    ours_raw = parse_x509_svid(svid.cert_chain_der(), svid.private_key_der())
    assert str(theirs_raw.spiffe_id) == str(ours_raw.spiffe_id)
    assert list(theirs_raw.cert_chain) == list(ours_raw.cert_chain)


@pytest.mark.parametrize(
    "options",
    [
        {"is_ca": True},
        {"usage": key_usage(key_encipherment=True)},
        {"usage": key_usage(digital_signature=True, key_cert_sign=True)},
        {"usage": key_usage(digital_signature=True, crl_sign=True)},
        {"usage": None},
        {"uris": [ID, "spiffe://example.org/other"]},
        {"uris": []},
        {"uris": ["spiffe://example.org"]},
    ],
    ids=[
        "ca-leaf",
        "no-digitalSignature",
        "keyCertSign",
        "cRLSign",
        "no-keyUsage",
        "two-uris",
        "no-uri",
        "root-id",
    ],
)
def test_invalid_x509_svids_both_reject(options: dict[str, Any]) -> None:
    svid = CA.create_x509_svid(ID, **options)
    with pytest.raises(SvidgateError):
        parse_x509_svid(*_pem(svid))
    with pytest.raises(PySpiffeError):
        PyX509Svid.parse(*_pem(svid))


@pytest.mark.parametrize(
    "options",
    [{"is_ca": False}, {"usage": key_usage(digital_signature=True)}],
    ids=["intermediate-not-ca", "intermediate-no-keyCertSign"],
)
def test_invalid_signing_certificates_both_reject(options: dict[str, Any]) -> None:
    svid = CA.child_ca(**options).create_x509_svid(ID)
    with pytest.raises(SvidgateError):
        parse_x509_svid(*_pem(svid))
    with pytest.raises(PySpiffeError):
        PyX509Svid.parse(*_pem(svid))


def test_bundles_agree() -> None:
    other = TestCA(TD, key_type=KeyType.RSA_2048)
    bundle = Bundle(
        TD,
        x509_authorities=(CA.certificate, other.certificate),
        jwt_authorities={CA.jwt_kid: CA.jwt_key.public_key(), other.jwt_kid: other.jwt_key.public_key()},
    )
    py_td = PyTrustDomain(TD.name)
    # PEM: what Envoy and most TLS stacks consume.
    theirs_x509 = PyX509Bundle.parse(py_td, pem_bundle(bundle))
    assert theirs_x509.x509_authorities == set(bundle.x509_authorities)
    assert set(parse_pem_bundle(TD, pem_bundle(bundle)).x509_authorities) == theirs_x509.x509_authorities
    # JWKS of JWT authorities (the Workload API's JWT bundle): py-spiffe reads what svidgate writes...
    jwt_only = spiffe_bundle_json(Bundle(TD, jwt_authorities=bundle.jwt_authorities))
    theirs_jwt = PyJwtBundle.parse(py_td, jwt_only)
    assert theirs_jwt.jwt_authorities == dict(bundle.jwt_authorities)
    # ...and svidgate reads the full SPIFFE bundle back to the same keys.
    ours = parse_spiffe_bundle(TD, spiffe_bundle_json(bundle))
    assert dict(ours.jwt_authorities) == theirs_jwt.jwt_authorities
    assert set(ours.x509_authorities) == theirs_x509.x509_authorities


def test_builtin_ca_bundle_is_readable_by_py_spiffe() -> None:
    ca = BuiltinCa.in_memory(TD, KeyType.EC_P256, FakeClock())
    bundle = ca.bundle()
    py_td = PyTrustDomain(TD.name)
    assert PyX509Bundle.parse(py_td, pem_bundle(bundle)).x509_authorities == set(bundle.x509_authorities)
    jwt_only = spiffe_bundle_json(Bundle(TD, jwt_authorities=bundle.jwt_authorities))
    assert PyJwtBundle.parse(py_td, jwt_only).jwt_authorities == dict(bundle.jwt_authorities)


# -- where svidgate differs, on purpose -----


def _id(text: str) -> Callable[[], object]:
    return lambda: PySpiffeId(text)


def _chain_out_of_order() -> tuple[bytes, bytes]:
    svid = INTERMEDIATE.child_ca().create_x509_svid(ID)
    leaf, first, second = svid.cert_chain
    return b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (leaf, second, first)
    ), svid.private_key_pem()


def _key_of_another_leaf() -> tuple[bytes, bytes]:
    return CA.create_x509_svid(ID).cert_chain_pem(), CA.create_x509_svid(ID).private_key_pem()


def _signing_cert_with_path() -> tuple[bytes, bytes]:
    return _pem(CA.child_ca(uris=["spiffe://example.org/ca"]).create_x509_svid(ID))


def _duplicate_kid() -> bytes:
    doc = json.loads(spiffe_bundle_json(Bundle(TD, jwt_authorities={"k": CA.jwt_key.public_key()})))
    other = json.loads(
        spiffe_bundle_json(Bundle(TD, jwt_authorities={"k": INTERMEDIATE.jwt_key.public_key()}))
    )
    doc["keys"] += other["keys"]
    return json.dumps(doc).encode()


LONG_ID = "spiffe://example.org/" + "a" * 2100
LONG_TD_ID = "spiffe://" + "a" * 256 + "/x"

# (what, svidgate's check, py-spiffe's check): svidgate raises, py-spiffe returns.
STRICTER: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
    ("trailing newline in the path", lambda: SpiffeId.parse(ID + "\n"), _id(ID + "\n")),
    (
        "trailing newline in the trust domain",
        lambda: SpiffeId.parse("spiffe://example.org\n"),
        _id("spiffe://example.org\n"),
    ),
    (
        "trailing newline in a trust domain name",
        lambda: TrustDomain.parse("example.org\n"),
        lambda: PyTrustDomain("example.org\n"),
    ),
    (
        "upper-case trust domain (SPIFFE-ID.md 2.1: MUST be lowercase; py-spiffe lower-cases it)",
        lambda: SpiffeId.parse("spiffe://Example.org/workload"),
        _id("spiffe://Example.org/workload"),
    ),
    (
        "upper-case scheme (go-spiffe rejects it too)",
        lambda: SpiffeId.parse("SPIFFE://example.org/workload"),
        _id("SPIFFE://example.org/workload"),
    ),
    ("SPIFFE ID over 2048 bytes (2.3)", lambda: SpiffeId.parse(LONG_ID), _id(LONG_ID)),
    ("trust domain over 255 bytes (2.3)", lambda: SpiffeId.parse(LONG_TD_ID), _id(LONG_TD_ID)),
    (
        "X.509-SVID whose private key belongs to another certificate",
        lambda: parse_x509_svid(*_key_of_another_leaf()),
        lambda: PyX509Svid.parse(*_key_of_another_leaf()),
    ),
    (
        "X.509-SVID chain not ordered leaf-first-then-issuers",
        lambda: parse_x509_svid(*_chain_out_of_order()),
        lambda: PyX509Svid.parse(*_chain_out_of_order()),
    ),
    (
        "signing certificate whose SPIFFE ID has a path (X509-SVID.md 3.2: MUST NOT)",
        lambda: parse_x509_svid(*_signing_cert_with_path()),
        lambda: PyX509Svid.parse(*_signing_cert_with_path()),
    ),
    (
        "JWT bundle with two keys under one kid",
        lambda: parse_spiffe_bundle(TD, _duplicate_kid()),
        lambda: PyJwtBundle.parse(PyTrustDomain(TD.name), _duplicate_kid()),
    ),
    (
        "JWKS with a duplicate JSON member",
        lambda: parse_spiffe_bundle(TD, b'{"keys": [], "keys": []}'),
        lambda: PyJwtBundle.parse(PyTrustDomain(TD.name), b'{"keys": [], "keys": []}'),
    ),
]


@pytest.mark.parametrize(("what", "ours", "theirs"), STRICTER, ids=[s[0] for s in STRICTER])
def test_svidgate_is_stricter(what: str, ours: Callable[[], object], theirs: Callable[[], object]) -> None:
    # py-spiffe accepts; if this starts raising, py-spiffe caught up: move the case to the agreement tests.
    theirs()
    with pytest.raises(SvidgateError):
        ours()


# (what, svidgate's check, py-spiffe's check): svidgate returns, py-spiffe raises.
LOOSER: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
    (
        # RFC 5280 4.2.1.9: an absent basicConstraints means "not a CA", which is what a leaf must be;
        # go-spiffe and Go's crypto/x509 accept such leaves, and certificates from older PKIs lack it.
        "leaf without basicConstraints",
        lambda: parse_x509_svid(*_pem(CA.create_x509_svid(ID, omit_basic_constraints=True))),
        lambda: PyX509Svid.parse(*_pem(CA.create_x509_svid(ID, omit_basic_constraints=True))),
    ),
    (
        # SPIFFE_Trust_Domain_and_Bundle.md 4.1.3: x509-svid entries have no kid; a JWKS reader must not
        # choke on them. py-spiffe's JwtBundle.parse rejects a full SPIFFE bundle.
        "SPIFFE bundle with x509-svid entries, read for its JWT keys",
        lambda: parse_spiffe_bundle(TD, spiffe_bundle_json(CA.bundle())),
        lambda: PyJwtBundle.parse(PyTrustDomain(TD.name), spiffe_bundle_json(CA.bundle())),
    ),
]


@pytest.mark.parametrize(("what", "ours", "theirs"), LOOSER, ids=[s[0] for s in LOOSER])
def test_svidgate_is_looser(what: str, ours: Callable[[], object], theirs: Callable[[], object]) -> None:
    ours()
    with pytest.raises(PySpiffeError):
        theirs()


@given(st.text(max_size=40))
def test_arbitrary_text_either_library_rejects_or_both_agree(text: str) -> None:
    try:
        ours = SpiffeId.parse(text)
    except SvidgateError:
        return  # stricter cases are enumerated above
    assert str(PySpiffeId(text)) == str(ours)
