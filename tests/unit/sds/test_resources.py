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
    Validation,
    parse_validation,
)
from tests.support.sds import ADMIN, BACKEND, FED_TD, FRONTEND, TD, Identities, unpack


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


def test_istio_compat_rootca_without_federation_is_own_trusted_ca(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot(federated=False), Naming(TD, istio_compat=True))
    secret = unpack(resolve(resolver, "ROOTCA", Subscriber((), "spiffe")).resource)
    roots = x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)
    assert roots == list(ids.ca.bundle().x509_authorities)


def test_istio_compat_rootca_with_federation_binds_each_root_to_its_trust_domain(ids: Identities) -> None:
    # Istio's agent pools every root into ROOTCA's trusted_ca; a partner CA could then sign example.org IDs.
    resolver = SecretResolver(ids.snapshot(), Naming(TD, istio_compat=True))
    config = spiffe_config(resolve(resolver, "ROOTCA", Subscriber((), "spiffe")))
    assert [td.name for td in config.trust_domains] == ["example.org", "partner.test"]
    fed = x509.load_pem_x509_certificates(config.trust_domains[1].trust_bundle.inline_bytes)
    assert fed == list(ids.fed_ca.bundle().x509_authorities)


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


def test_trusted_ca_validation_replaces_the_spiffe_validator_for_one_trust_domain(ids: Identities) -> None:
    resolver = SecretResolver(ids.snapshot(federated=False), Naming(TD))
    secret = unpack(resolve(resolver, "ALL", Subscriber((), "trusted_ca")).resource)
    assert not secret.validation_context.HasField("custom_validator_config")
    assert len(x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)) == 1


OWN = ("example.org",)
FED = ("partner.test",)
BOTH = ("example.org", "partner.test")

#: Every name x validation flavour (config or node metadata: both arrive as Subscriber.validation) x Istio
#: mode x federated or not -> what the builder serves: (flavour, trust domains), or None for "unknown". The
#: rule under test: more than one trust domain's roots are never pooled in one trusted_ca.
BUILDER_TABLE: list[tuple[str, str, bool, bool, tuple[str, tuple[str, ...]] | None]] = [
    # ROOTCA is a trusted_ca of the own trust domain; in Istio mode every trust domain's, so once federated
    # it must become the SPIFFE validator.
    ("ROOTCA", "spiffe", False, False, ("trusted_ca", OWN)),
    ("ROOTCA", "spiffe", False, True, ("trusted_ca", OWN)),
    ("ROOTCA", "spiffe", True, False, ("trusted_ca", OWN)),
    ("ROOTCA", "spiffe", True, True, ("spiffe", BOTH)),
    ("ROOTCA", "trusted_ca", False, False, ("trusted_ca", OWN)),
    ("ROOTCA", "trusted_ca", False, True, ("trusted_ca", OWN)),
    ("ROOTCA", "trusted_ca", True, False, ("trusted_ca", OWN)),
    ("ROOTCA", "trusted_ca", True, True, ("spiffe", BOTH)),
    ("ALL", "spiffe", False, False, ("spiffe", OWN)),
    ("ALL", "spiffe", False, True, ("spiffe", BOTH)),
    ("ALL", "spiffe", True, False, ("spiffe", OWN)),
    ("ALL", "spiffe", True, True, ("spiffe", BOTH)),
    ("ALL", "trusted_ca", False, False, ("trusted_ca", OWN)),
    ("ALL", "trusted_ca", False, True, ("spiffe", BOTH)),
    ("ALL", "trusted_ca", True, False, ("trusted_ca", OWN)),
    ("ALL", "trusted_ca", True, True, ("spiffe", BOTH)),
    ("spiffe://example.org", "spiffe", False, False, ("spiffe", OWN)),
    ("spiffe://example.org", "spiffe", False, True, ("spiffe", OWN)),
    ("spiffe://example.org", "spiffe", True, False, ("spiffe", OWN)),
    ("spiffe://example.org", "spiffe", True, True, ("spiffe", OWN)),
    ("spiffe://example.org", "trusted_ca", False, False, ("trusted_ca", OWN)),
    ("spiffe://example.org", "trusted_ca", False, True, ("trusted_ca", OWN)),
    ("spiffe://example.org", "trusted_ca", True, False, ("trusted_ca", OWN)),
    ("spiffe://example.org", "trusted_ca", True, True, ("trusted_ca", OWN)),
    ("spiffe://partner.test", "spiffe", False, False, None),
    ("spiffe://partner.test", "spiffe", False, True, ("spiffe", FED)),
    ("spiffe://partner.test", "spiffe", True, False, None),
    ("spiffe://partner.test", "spiffe", True, True, ("spiffe", FED)),
    ("spiffe://partner.test", "trusted_ca", False, False, None),
    ("spiffe://partner.test", "trusted_ca", False, True, ("trusted_ca", FED)),
    ("spiffe://partner.test", "trusted_ca", True, False, None),
    ("spiffe://partner.test", "trusted_ca", True, True, ("trusted_ca", FED)),
]


def served(ids: Identities, resource: SecretResource) -> tuple[str, tuple[str, ...]]:
    """(flavour, trust domains whose roots the validation context holds) of a bundle resource."""
    context = unpack(resource.resource).validation_context
    if context.HasField("custom_validator_config"):
        config = spiffe_config(resource)
        return "spiffe", tuple(td.name for td in config.trust_domains)
    roots = set(x509.load_pem_x509_certificates(context.trusted_ca.inline_bytes))
    owners = {
        TD.name: set(ids.ca.bundle().x509_authorities),
        FED_TD.name: set(ids.fed_ca.bundle().x509_authorities),
    }
    held = tuple(sorted(td for td, certs in owners.items() if certs & roots))
    assert roots == set().union(*(owners[td] for td in held))  # nothing but whole bundles
    return "trusted_ca", held


@pytest.mark.parametrize(
    ("name", "validation", "istio", "federated", "expected"),
    BUILDER_TABLE,
    ids=[f"{n}-{v}-{'istio' if i else 'plain'}-{'fed' if f else 'alone'}" for n, v, i, f, _ in BUILDER_TABLE],
)
def test_builders_never_pool_trust_domain_roots(
    ids: Identities,
    name: str,
    validation: Validation,
    istio: bool,
    federated: bool,
    expected: tuple[str, tuple[str, ...]] | None,
) -> None:
    resolver = SecretResolver(ids.snapshot(federated=federated), Naming(TD, istio_compat=istio))
    result = resolver.resolve(name, Subscriber((), validation))
    if expected is None:
        assert isinstance(result, Rejection)
        assert result.reason == "unknown"
        return
    assert isinstance(result, SecretResource), result
    assert served(ids, result) == expected


@pytest.mark.parametrize(
    ("name", "validation", "istio", "expected"),
    [
        ("ROOTCA", "spiffe", True, ("trusted_ca", BOTH)),
        ("ALL", "trusted_ca", False, ("trusted_ca", BOTH)),
        ("ALL", "trusted_ca", True, ("trusted_ca", BOTH)),
        # The opt-in only brings back what trusted_ca asked for; it never downgrades the SPIFFE validator.
        ("ALL", "spiffe", False, ("spiffe", BOTH)),
        ("ROOTCA", "spiffe", False, ("trusted_ca", OWN)),
    ],
)
def test_pooling_only_with_the_unsafe_opt_in(
    ids: Identities, name: str, validation: Validation, istio: bool, expected: tuple[str, tuple[str, ...]]
) -> None:
    naming = Naming(TD, istio_compat=istio, pool_trust_domain_roots=True)
    resolver = SecretResolver(ids.snapshot(), naming)
    assert served(ids, resolve(resolver, name, Subscriber((), validation))) == expected


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
