"""X.509-SVID parsing and verification against X509-SVID.md, with go-spiffe's x509svid failure cases."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from svidgate.errors import X509SvidError
from svidgate.identity.bundle import Bundle
from svidgate.identity.keys import KeyType, generate_private_key
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid, parse_x509_svid, verify_x509_svid
from tests.support.ca import NOW, TestCA, key_usage

TD = TrustDomain("example.org")
ID = "spiffe://example.org/workload"
CA = TestCA(TD)
INTERMEDIATE = CA.child_ca()


def _pem(svid: X509Svid) -> tuple[bytes, bytes]:
    return svid.cert_chain_pem(), svid.private_key_pem()


# -- serialisation -----


def test_pem_and_der_round_trip_with_intermediate() -> None:
    svid = INTERMEDIATE.create_x509_svid(ID, dns_names=["web.example.org"], hint="internal")
    assert len(svid.cert_chain) == 2
    for chain, key in (
        (svid.cert_chain_pem(), svid.private_key_pem()),
        (svid.cert_chain_der(), svid.private_key_der()),
    ):
        parsed = parse_x509_svid(chain, key, hint="internal")
        assert parsed.spiffe_id == SpiffeId.parse(ID)
        assert parsed.cert_chain == svid.cert_chain
        assert parsed.private_key.public_key() == svid.private_key.public_key()
        assert parsed.hint == "internal"
    assert svid.private_key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert svid.cert_chain_der() == b"".join(
        c.public_bytes(serialization.Encoding.DER) for c in svid.cert_chain
    )
    assert svid.expires_at == svid.leaf.not_valid_after_utc.timestamp()


@pytest.mark.parametrize("key_type", list(KeyType))
def test_key_formats(key_type: KeyType) -> None:
    svid = CA.create_x509_svid(ID, key_type=key_type)
    key = svid.private_key
    traditional = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )  # SEC1 "EC PRIVATE KEY" / PKCS#1 "RSA PRIVATE KEY", as cert-manager writes them
    for key_bytes in (svid.private_key_pem(), svid.private_key_der(), traditional):
        assert parse_x509_svid(svid.cert_chain_pem(), key_bytes).private_key.public_key() == key.public_key()


def test_chain_and_key_may_share_one_pem_file() -> None:
    svid = CA.create_x509_svid(ID)
    combined = svid.cert_chain_pem() + svid.private_key_pem()
    with pytest.raises(X509SvidError, match="not a CERTIFICATE"):
        parse_x509_svid(combined, svid.private_key_pem())
    # ...but the key half of a combined file is found.
    assert parse_x509_svid(svid.cert_chain_pem(), combined).spiffe_id == SpiffeId.parse(ID)


GOOD = CA.create_x509_svid(ID)
GOOD_CHAIN, GOOD_KEY = _pem(GOOD)
OTHER_KEY = generate_private_key().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
ENCRYPTED_KEY = GOOD.private_key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(b"pw"),
)
LEAF_DER = GOOD.leaf.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("chain", "key", "message"),
    [
        (b"", GOOD_KEY, "chain is empty"),
        (b"garbage", GOOD_KEY, "neither PEM nor DER"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", GOOD_KEY, "not valid PEM"),
        (LEAF_DER[:-10], GOOD_KEY, "truncated"),
        (LEAF_DER + b"\x30", GOOD_KEY, "truncated"),
        (LEAF_DER + b"\x30\x80", GOOD_KEY, "invalid DER length"),
        (b"\x30\x03abc", GOOD_KEY, "not a valid DER certificate"),
        (GOOD_CHAIN, b"", "private key is empty"),
        (GOOD_CHAIN, b"not a key", "does not parse"),
        (GOOD_CHAIN, OTHER_KEY, "does not match the leaf"),
        (GOOD_CHAIN, ENCRYPTED_KEY, "encrypted"),
    ],
)
def test_unparseable_input(chain: bytes, key: bytes, message: str) -> None:
    with pytest.raises(X509SvidError, match=message):
        parse_x509_svid(chain, key)


# -- leaf and signing-certificate rules -----

LEAF_RULES: list[tuple[str, dict[str, Any], str]] = [
    ("no SAN extension", {"omit_san": True}, "no subjectAltName extension"),
    ("DNS SAN only", {"uris": [], "dns_names": ["web.example.org"]}, "no URI SAN"),
    (
        "two URI SANs",
        {"uris": [ID, "spiffe://example.org/other"]},
        "2 URI SANs; an X.509-SVID must have exactly one",
    ),
    ("SPIFFE and https URI", {"uris": [ID, "https://example.org"]}, "2 URI SANs"),
    ("non-SPIFFE URI", {"uris": ["https://example.org/workload"]}, "not a valid SPIFFE ID"),
    ("upper-case trust domain", {"uris": ["spiffe://Example.org/workload"]}, "not a valid SPIFFE ID"),
    ("trailing slash", {"uris": ["spiffe://example.org/workload/"]}, "not a valid SPIFFE ID"),
    ("trust domain ID", {"uris": ["spiffe://example.org"]}, "has no path"),
    ("CA leaf", {"is_ca": True}, "leaf certificate is a CA"),
    ("no keyUsage", {"usage": None}, "no keyUsage extension"),
    ("no digitalSignature", {"usage": key_usage(key_encipherment=True)}, "lacks digitalSignature"),
    (
        "keyCertSign",
        {"usage": key_usage(digital_signature=True, key_cert_sign=True)},
        "keyUsage has keyCertSign",
    ),
    ("cRLSign", {"usage": key_usage(digital_signature=True, crl_sign=True)}, "keyUsage has cRLSign"),
]


@pytest.mark.parametrize(("case", "options", "message"), LEAF_RULES, ids=[c[0] for c in LEAF_RULES])
def test_leaf_rules_on_parse_and_verify(case: str, options: dict[str, Any], message: str) -> None:
    svid = CA.create_x509_svid(ID, **options)
    with pytest.raises(X509SvidError, match=message):
        parse_x509_svid(*_pem(svid))
    with pytest.raises(X509SvidError, match=message):
        verify_x509_svid(svid.cert_chain, CA.bundles(), NOW)


@pytest.mark.parametrize(
    "options",
    [
        {"omit_basic_constraints": True},  # cA defaults to false (RFC 5280 4.2.1.9)
        {"eku": None},  # EKU is a SHOULD for issuers; go-spiffe accepts any
        {"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]},
        {"usage": key_usage(digital_signature=True, key_encipherment=True, key_agreement=True)},
        {"dns_names": ["a.example.org", "b.example.org"]},
        {"subject": x509.Name([]), "san_critical": True},  # 3.1: no subject, critical SAN
    ],
    ids=["no basicConstraints", "no EKU", "clientAuth only", "RSA-style usage", "DNS SANs", "empty subject"],
)
def test_leaves_the_spec_allows(options: dict[str, Any]) -> None:
    svid = CA.create_x509_svid(ID, **options)
    assert parse_x509_svid(*_pem(svid)).spiffe_id == SpiffeId.parse(ID)
    assert verify_x509_svid(svid.cert_chain, CA.bundles(), NOW) == SpiffeId.parse(ID)


@pytest.mark.parametrize(
    ("intermediate_options", "message"),
    [
        ({"is_ca": False}, "chain certificate 1 is not a CA"),
        ({"usage": key_usage(digital_signature=True)}, "chain certificate 1 keyUsage lacks keyCertSign"),
        ({"usage": None}, "chain certificate 1 keyUsage lacks keyCertSign"),
        ({"uris": ["spiffe://example.org/ca"]}, "with a path; a signing certificate's must have none"),
    ],
)
def test_signing_certificate_rules(intermediate_options: dict[str, Any], message: str) -> None:
    svid = CA.child_ca(**intermediate_options).create_x509_svid(ID)
    with pytest.raises(X509SvidError, match=message):
        parse_x509_svid(*_pem(svid))
    with pytest.raises(X509SvidError, match=message):
        verify_x509_svid(svid.cert_chain, CA.bundles(), NOW)


def test_signing_certificate_need_not_be_an_svid() -> None:
    svid = CA.child_ca(uris=[]).create_x509_svid(ID)
    assert parse_x509_svid(*_pem(svid)).spiffe_id == SpiffeId.parse(ID)


def test_chain_out_of_order() -> None:
    deeper = INTERMEDIATE.child_ca()
    svid = deeper.create_x509_svid(ID)
    leaf, first, second = svid.cert_chain
    swapped = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, second, first))
    with pytest.raises(X509SvidError, match="is not the issuer of certificate 0"):
        parse_x509_svid(swapped, svid.private_key_pem())


# -- verification -----


@pytest.mark.parametrize("key_type", list(KeyType))
def test_verify_root_issued(key_type: KeyType) -> None:
    ca = TestCA(TD, key_type=key_type)
    svid = ca.create_x509_svid(ID, key_type=key_type)
    assert verify_x509_svid(svid.cert_chain, ca.bundles(), NOW) == SpiffeId.parse(ID)


def test_verify_through_two_intermediates() -> None:
    svid = INTERMEDIATE.child_ca().create_x509_svid(ID)
    assert len(svid.cert_chain) == 3
    assert verify_x509_svid(svid.cert_chain, CA.bundles(), NOW) == SpiffeId.parse(ID)


def test_verify_with_several_roots_in_the_bundle() -> None:
    other = TestCA(TD)
    bundle = Bundle(TD, x509_authorities=(other.certificate, CA.certificate))
    assert verify_x509_svid(GOOD.cert_chain, {TD: bundle}, NOW) == SpiffeId.parse(ID)


@pytest.mark.parametrize(
    ("options", "now", "message"),
    [
        ({"not_after": NOW - 1}, NOW, "leaf certificate expired at"),
        ({"not_before": NOW + 60}, NOW, "leaf certificate is not valid before"),
        ({}, NOW + 2 * 3600, "leaf certificate expired at"),
    ],
)
def test_validity_period(options: dict[str, Any], now: float, message: str) -> None:
    svid = CA.create_x509_svid(ID, **options)
    with pytest.raises(X509SvidError, match=message):
        verify_x509_svid(svid.cert_chain, CA.bundles(), now)


def test_expired_intermediate_and_root() -> None:
    expired_intermediate = CA.child_ca(not_after=NOW - 10)
    svid = expired_intermediate.create_x509_svid(ID)
    with pytest.raises(X509SvidError, match=r"no valid path to an X\.509 authority of example\.org"):
        verify_x509_svid(svid.cert_chain, CA.bundles(), NOW)
    expired_root = TestCA(TD, not_after=NOW - 10)
    with pytest.raises(X509SvidError, match="no valid path"):
        verify_x509_svid(expired_root.create_x509_svid(ID).cert_chain, expired_root.bundles(), NOW)


def test_only_the_leafs_own_trust_domain_bundle_is_used() -> None:
    # A CA of other.org signs a leaf claiming example.org: other.org's root is trusted, but not for this ID.
    other = TestCA("other.org")
    forged = other.create_x509_svid(ID)
    with pytest.raises(X509SvidError, match=r"no trust bundle for trust domain example\.org"):
        verify_x509_svid(forged.cert_chain, other.bundles(), NOW)
    both = {**other.bundles(), **CA.bundles()}
    with pytest.raises(X509SvidError, match=r"no valid path to an X\.509 authority of example\.org"):
        verify_x509_svid(forged.cert_chain, both, NOW)
    # A bundle filed under the wrong key is not used either.
    with pytest.raises(X509SvidError, match="no trust bundle"):
        verify_x509_svid(GOOD.cert_chain, {TD: other.bundle()}, NOW)


def test_bad_signature() -> None:
    svid = CA.create_x509_svid(ID, signer=generate_private_key())
    with pytest.raises(X509SvidError, match="no valid path"):
        verify_x509_svid(svid.cert_chain, CA.bundles(), NOW)


def test_missing_intermediate() -> None:
    svid = INTERMEDIATE.create_x509_svid(ID)
    with pytest.raises(X509SvidError, match="no valid path"):
        verify_x509_svid(svid.cert_chain[:1], CA.bundles(), NOW)


def test_path_length_constraint() -> None:
    root = TestCA(TD, path_length=0)
    svid = root.child_ca().create_x509_svid(ID)
    with pytest.raises(X509SvidError, match="no valid path"):
        verify_x509_svid(svid.cert_chain, root.bundles(), NOW)
    assert verify_x509_svid(root.create_x509_svid(ID).cert_chain, root.bundles(), NOW) == SpiffeId.parse(ID)


def test_uri_name_constraints_are_rejected_not_ignored() -> None:
    # X509-SVID.md 4.2: libraries without URI name constraint support reject such chains. Rejecting is the
    # safe side; ignoring a constraint would let a constrained intermediate sign outside its subtree.
    constrained = CA.child_ca(
        name_constraints=x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier("example.org")], excluded_subtrees=None
        )
    )
    with pytest.raises(X509SvidError, match="name constraint"):
        verify_x509_svid(constrained.create_x509_svid(ID).cert_chain, CA.bundles(), NOW)


def test_empty_chain_and_empty_bundle() -> None:
    with pytest.raises(X509SvidError, match="chain is empty"):
        verify_x509_svid([], CA.bundles(), NOW)
    with pytest.raises(X509SvidError, match=r"has no X\.509 authorities"):
        verify_x509_svid(GOOD.cert_chain, {TD: Bundle(TD, jwt_authorities=CA.bundle().jwt_authorities)}, NOW)


def test_leaf_used_as_its_own_root_is_rejected() -> None:
    # A self-signed leaf put in the bundle is not a CA; path validation must not accept it.
    with pytest.raises(X509SvidError, match="the leaf is itself in the bundle"):
        verify_x509_svid(GOOD.cert_chain, {TD: Bundle(TD, x509_authorities=(GOOD.leaf,))}, NOW)


def test_root_that_is_not_a_ca_cannot_sign() -> None:
    not_a_ca = TestCA(TD, is_ca=False)
    with pytest.raises(X509SvidError, match="no valid path"):
        verify_x509_svid(not_a_ca.create_x509_svid(ID).cert_chain, not_a_ca.bundles(), NOW)
