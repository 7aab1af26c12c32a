"""What the bundle endpoint serves (svidgate.sources.bundle_documents): pure functions of a bundle."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from svidgate.identity.bundle import parse_spiffe_bundle
from svidgate.identity.keys import KeyType, generate_private_key
from svidgate.sources.bundle_documents import (
    authorities_digest,
    bundle_document,
    jwks_document,
    jwt_algorithm,
    oidc_paths,
    openid_configuration,
)
from tests.support.ca import TestCA


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


def test_the_digest_covers_the_authorities_and_nothing_else(ca: TestCA) -> None:
    digest = authorities_digest(ca.bundle())
    assert authorities_digest(ca.bundle(sequence=7, refresh_hint=60)) == digest
    assert authorities_digest(TestCA("example.org").bundle()) != digest


def test_the_bundle_document_carries_the_served_sequence_and_hint(ca: TestCA) -> None:
    served = parse_spiffe_bundle(ca.trust_domain, bundle_document(ca.bundle(sequence=1), 42, 300))
    assert (served.sequence, served.refresh_hint) == (42, 300)
    assert served.x509_authorities == ca.bundle().x509_authorities
    assert served.jwt_authorities.keys() == {ca.jwt_kid}


@pytest.mark.parametrize(
    ("key_type", "alg"),
    [(KeyType.EC_P256, "ES256"), (KeyType.EC_P384, "ES384"), (KeyType.RSA_2048, "RS256")],
)
def test_each_jwt_key_names_the_algorithm_svidgate_signs_with(key_type: KeyType, alg: str) -> None:
    assert jwt_algorithm(generate_private_key(key_type).public_key()) == alg


def test_an_eddsa_key_is_named_too() -> None:
    assert jwt_algorithm(ed25519.Ed25519PrivateKey.generate().public_key()) == "EdDSA"


def test_the_jwks_lists_each_jwt_key_for_signing(ca: TestCA) -> None:
    (jwk,) = json.loads(jwks_document(ca.bundle()))["keys"]
    assert (jwk["kid"], jwk["use"], jwk["alg"], jwk["kty"]) == (ca.jwt_kid, "sig", "ES256", "EC")


@pytest.mark.parametrize(
    ("issuer", "paths"),
    [
        ("https://oidc.example.org", ("/.well-known/openid-configuration", "/keys")),
        ("https://oidc.example.org/", ("/.well-known/openid-configuration", "/keys")),
        ("https://oidc.example.org/tenant", ("/tenant/.well-known/openid-configuration", "/tenant/keys")),
    ],
)
def test_oidc_documents_sit_under_the_issuer_path(issuer: str, paths: tuple[str, str]) -> None:
    assert oidc_paths(issuer) == paths


def test_the_discovery_document_lists_the_algorithms_of_the_keys_in_the_bundle(ca: TestCA) -> None:
    doc = json.loads(openid_configuration("https://oidc.example.org/tenant/", ca.bundle()))
    assert doc["issuer"] == "https://oidc.example.org/tenant/"
    assert doc["jwks_uri"] == "https://oidc.example.org/tenant/keys"
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
