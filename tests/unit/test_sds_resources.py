"""SDS resource resolution: names -> Envoy Secret protos, content-hash versions, rejections."""

from __future__ import annotations

import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2

from svidgate.sds.resources import (
    SPIFFE_VALIDATOR_NAME,
    Naming,
    Rejection,
    SecretResolver,
    SecretResource,
    Subscriber,
    parse_validation,
)
from tests.component.sds_fixtures import ADMIN, BACKEND, FED_TD, FRONTEND, TD, Identities, unpack


@pytest.fixture(scope="module")
def ids() -> Identities:
    return Identities.create()


def resolve(resolver: SecretResolver, name: str, sub: Subscriber) -> SecretResource:
    result = resolver.resolve(name, sub)
    assert isinstance(result, SecretResource), result
    return result


def spiffe_config(resource: SecretResource) -> tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig:
    secret = unpack(resource.resource)
    custom = secret.validation_context.custom_validator_config
    assert custom.name == SPIFFE_VALIDATOR_NAME
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert custom.typed_config.Unpack(config)
    return config


def test_default_is_first_entitled_svid(ids: Identities) -> None:
    snap = ids.snapshot()
    resolver = SecretResolver(snap, Naming(TD))
    resource = resolve(resolver, "default", Subscriber((BACKEND, ADMIN), "spiffe"))
    secret = unpack(resource.resource)
    assert secret.name == "default"
    assert resource.kind == "tls_certificate"
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    assert chain[0] == snap.svids[BACKEND].leaf
    assert b"BEGIN PRIVATE KEY" in secret.tls_certificate.private_key.inline_bytes  # PKCS#8
    assert resource.source == str(BACKEND)


def test_spiffe_id_name_needs_entitlement(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot(), Naming(TD))
    sub = Subscriber((FRONTEND,), "spiffe")
    assert unpack(resolve(resolver, str(FRONTEND), sub).resource).name == str(FRONTEND)
    rejected = resolver.resolve(str(BACKEND), sub)
    assert isinstance(rejected, Rejection)
    assert rejected.reason == "not_entitled"


@pytest.mark.parametrize(
    ("name", "entitled", "reason"),
    [
        ("default", (), "not_entitled"),
        ("nope", (FRONTEND,), "unknown"),
        ("spiffe://unknown.test", (FRONTEND,), "unknown"),
        ("spiffe://Bad..ID", (FRONTEND,), "unknown"),
        ("spiffe://example.org/backend", (FRONTEND,), "not_entitled"),
    ],
)
def test_rejections(ids: Identities, name: str, entitled: tuple[object, ...], reason: str) -> None:
    resolver = SecretResolver(ids.snapshot(), Naming(TD))
    result = resolver.resolve(name, Subscriber(entitled, "spiffe"))  # type: ignore[arg-type]
    assert isinstance(result, Rejection)
    assert result.reason == reason


def test_entitled_but_not_minted_is_unavailable(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot([FRONTEND]), Naming(TD))
    result = resolver.resolve("default", Subscriber((BACKEND,), "spiffe"))
    assert isinstance(result, Rejection)
    assert result.reason == "unavailable"


def test_rootca_is_own_bundle_as_trusted_ca(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot(), Naming(TD))
    secret = unpack(resolve(resolver, "ROOTCA", Subscriber((), "spiffe")).resource)
    roots = x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)
    assert roots == list(ids.ca.bundle().x509_authorities)


def test_istio_compat_rootca_is_all_bundles(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot(), Naming(TD, istio_compat=True))
    secret = unpack(resolve(resolver, "ROOTCA", Subscriber((), "spiffe")).resource)
    roots = x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)
    assert set(roots) == set(ids.ca.bundle().x509_authorities) | set(ids.fed_ca.bundle().x509_authorities)


def test_all_is_spiffe_validator_with_every_trust_domain(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot(), Naming(TD))
    config = spiffe_config(resolve(resolver, "ALL", Subscriber((), "spiffe")))
    assert [td.name for td in config.trust_domains] == ["example.org", "partner.test"]
    fed = x509.load_pem_x509_certificates(config.trust_domains[1].trust_bundle.inline_bytes)
    assert fed == list(ids.fed_ca.bundle().x509_authorities)


def test_trust_domain_name_is_that_bundle(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot(), Naming(TD))
    config = spiffe_config(resolve(resolver, "spiffe://partner.test", Subscriber((), "spiffe")))
    assert [td.name for td in config.trust_domains] == [FED_TD.name]


def test_trusted_ca_validation_replaces_the_spiffe_validator(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot(), Naming(TD))
    secret = unpack(resolve(resolver, "ALL", Subscriber((), "trusted_ca")).resource)
    assert not secret.validation_context.HasField("custom_validator_config")
    assert len(x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)) == 2


def test_configurable_names(ids: Identities) -> None:
    naming = Naming(TD, default_svid_name="my-cert", own_bundle_name="my-ca", all_bundles_name="everyone")
    resolver = SecretResolver(ids.snapshot(), naming)
    sub = Subscriber((FRONTEND,), "spiffe")
    for name in ("my-cert", "my-ca", "everyone"):
        assert resolve(resolver, name, sub).name == name
    assert isinstance(resolver.resolve("default", sub), Rejection)


def test_versions_are_content_hashes_and_built_once(ids: Identities) -> None:
    snap = ids.snapshot()
    sub = Subscriber((FRONTEND,), "spiffe")
    first = SecretResolver(snap, Naming(TD))
    again = SecretResolver(snap, Naming(TD))
    # Same content, separate resolvers (e.g. another process): same version.
    assert resolve(first, "default", sub).version == resolve(again, "default", sub).version
    assert resolve(first, "ALL", sub).version == resolve(again, "ALL", sub).version
    # One resolver shares one object per distinct secret across streams.
    assert resolve(first, "default", sub) is resolve(
        first, "default", Subscriber((FRONTEND, BACKEND), "spiffe")
    )
    # New SVIDs: new versions for certs, bundles unchanged.
    rotated = SecretResolver(ids.snapshot(), Naming(TD))
    assert resolve(rotated, "default", sub).version != resolve(first, "default", sub).version
    assert resolve(rotated, "ROOTCA", sub).version == resolve(first, "ROOTCA", sub).version


def test_wildcard_names(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot([FRONTEND]), Naming(TD))
    names = resolver.wildcard_names(Subscriber((FRONTEND, BACKEND), "spiffe"))
    assert names == (str(FRONTEND), "spiffe://example.org", "spiffe://partner.test")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "spiffe"), ("trusted_ca", "trusted_ca"), ("spiffe", "spiffe"), ("bogus", "spiffe")],
)
def test_parse_validation(value: str | None, expected: str) -> None:
    assert parse_validation(value, "spiffe") == expected
