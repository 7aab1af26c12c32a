"""SDS resources: requested names resolved against an identity snapshot into Envoy `Secret` protos.

Pure (protobuf only, no gRPC, no I/O). Names, as in SPIRE's and Istio's agents (the first three configurable
under `sds:`):

- ``default``: the caller's first entitled X.509-SVID (`tls_certificate`);
- a SPIFFE ID (``spiffe://td/path``): that X.509-SVID, if the caller is entitled to it;
- ``ROOTCA``: the own trust domain's bundle as a `validation_context` with `trusted_ca` (in Istio-compatible
  mode: the X.509 authorities of every known trust domain, what Istio's agent serves under that name);
- ``spiffe://<td>``: that trust domain's bundle;
- ``ALL``: Envoy's SPIFFE certificate validator (`envoy.tls.cert_validator.spiffe`) with one entry per trust
  domain, federated ones included, so that a peer's certificate is only ever checked against the bundle of the
  trust domain in its own SPIFFE ID (SPIFFE_Trust_Domain_and_Bundle.md 4.2).

With validation ``trusted_ca`` (config `sds.validation`, or per node through node metadata
``svidgate.validation``), ``spiffe://<td>`` and ``ALL`` become plain `trusted_ca` contexts instead of the
SPIFFE validator: for Envoys built without the extension, or operators who want plain chains only.

One rule holds for every name, in `SecretResolver._bundles`: a validation context that would hold the roots of
**more than one** trust domain is always served with the SPIFFE validator, whatever the name, the validation
flavour or Istio mode ask for. A `trusted_ca` is one pool in which any root vouches for any name, so the CA of
a federated trust domain could issue a certificate naming ``spiffe://<own td>/...`` and Envoy would accept it
(measured with a real Envoy: 200, the backend saw the forged ID). Only the explicit, loudly named
`sds.pool_trust_domain_roots_unsafe` brings the pooled `trusted_ca` back (for Envoys without the extension).

Every resource carries a content-hash version (SHA-256 of its deterministic serialisation), so that the
stream state machines never re-send unchanged content. A `SecretResolver` is built once per snapshot and
shared by all streams: with 10k Envoys subscribed to the same few names, each `Secret` is built once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from google.protobuf import any_pb2

from svidgate.errors import SpiffeIdError
from svidgate.identity.bundle import Bundle
from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid

#: The xDS type URL of every SDS resource.
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
#: The name of Envoy's SPIFFE certificate validator extension.
SPIFFE_VALIDATOR_NAME = "envoy.tls.cert_validator.spiffe"
#: Node metadata key that selects the validation flavour for one Envoy (``spiffe`` or ``trusted_ca``).
VALIDATION_METADATA_KEY = "svidgate.validation"

Validation = Literal["spiffe", "trusted_ca"]
RejectReason = Literal["unknown", "not_entitled", "unavailable"]
SecretKind = Literal["tls_certificate", "validation_context"]


@dataclass(frozen=True, slots=True)
class Naming:
    """How resource names map to secrets (from `SdsConfig` and the own trust domain).

    Attributes:
        trust_domain: svidgate's own trust domain (``ROOTCA``).
        default_svid_name: the name of the caller's default SVID.
        own_bundle_name: the name of the own bundle.
        all_bundles_name: the name of the SPIFFE validator over all bundles.
        validation: the default validation flavour (a node may override it through its metadata).
        istio_compat: ``ROOTCA`` means all bundles (Istio's agent semantics).
        pool_trust_domain_roots: serve several trust domains' roots as one `trusted_ca` when `trusted_ca`
            is asked for, instead of the SPIFFE validator (config `sds.pool_trust_domain_roots_unsafe`:
            lets any federated CA impersonate any trust domain).
    """

    trust_domain: TrustDomain
    default_svid_name: str = "default"
    own_bundle_name: str = "ROOTCA"
    all_bundles_name: str = "ALL"
    validation: Validation = "spiffe"
    istio_compat: bool = False
    pool_trust_domain_roots: bool = False


@dataclass(frozen=True, slots=True)
class Subscriber:
    """What resolution needs to know about one caller.

    Attributes:
        entitled: the SPIFFE IDs the caller may receive, the default first (`entitled_ids`).
        validation: the validation flavour for this caller.
    """

    entitled: tuple[SpiffeId, ...]
    validation: Validation


@dataclass(frozen=True, slots=True, eq=False)
class SecretResource:
    """One resolved SDS resource.

    Attributes:
        name: the resource name as requested (``default``, ``ROOTCA``, a SPIFFE ID...).
        version: a content hash; equal versions mean byte-identical secrets.
        kind: what the secret carries.
        resource: the `Secret`, packed.
        source: what it was built from (a SPIFFE ID or trust domains), for logs; never key material.
    """

    name: str
    version: str
    kind: SecretKind
    resource: any_pb2.Any
    source: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """A requested name that cannot be served to this caller.

    Attributes:
        name: the requested name.
        reason: ``unknown`` (no such name or trust domain), ``not_entitled`` (the caller's selectors do
            not grant it) or ``unavailable`` (entitled, but the source has not delivered it yet).
        detail: a sentence for the log line.
    """

    name: str
    reason: RejectReason
    detail: str


Resolution = SecretResource | Rejection


def parse_validation(value: str | None, default: Validation) -> Validation:
    """The validation flavour a node asks for through its metadata, or `default`.

    Args:
        value: the metadata value (``spiffe``/``trusted_ca``), or None when the node does not set it.
        default: the configured flavour.

    Returns:
        The flavour to use; an unrecognised value falls back to `default` (the servicer logs it).
    """
    if value == "spiffe":
        return "spiffe"
    if value == "trusted_ca":
        return "trusted_ca"
    return default


def _certs_pem(bundle: Bundle) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in bundle.x509_authorities)


def _pack(secret: secret_pb2.Secret) -> tuple[any_pb2.Any, str]:
    # Deterministic serialisation: the same content hashes to the same version, in every process.
    payload = secret.SerializeToString(deterministic=True)
    packed = any_pb2.Any(type_url=SECRET_TYPE_URL, value=payload)
    return packed, hashlib.sha256(payload).hexdigest()[:20]


def tls_certificate_secret(name: str, svid: X509Svid) -> secret_pb2.Secret:
    """An SDS `tls_certificate` secret: the SVID's chain (leaf first) and its PKCS#8 key, both PEM, inline.

    Args:
        name: the resource name.
        svid: the X.509-SVID.

    Returns:
        The `Secret`.
    """
    chain = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in svid.cert_chain)
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=chain),
            private_key=base_pb2.DataSource(inline_bytes=key),
        ),
    )


def trusted_ca_secret(name: str, bundles: Iterable[Bundle]) -> secret_pb2.Secret:
    """An SDS `validation_context` secret with the X.509 authorities of `bundles` as `trusted_ca`.

    Args:
        name: the resource name.
        bundles: the bundles whose X.509 authorities Envoy should trust.

    Returns:
        The `Secret`.
    """
    pem = b"".join(_certs_pem(b) for b in bundles)
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=pem)
        ),
    )


def spiffe_validator_secret(name: str, bundles: Iterable[Bundle]) -> secret_pb2.Secret:
    """An SDS `validation_context` secret using Envoy's SPIFFE certificate validator.

    Args:
        name: the resource name.
        bundles: one `trust_domains` entry per bundle, sorted by trust domain (a stable order keeps the
            content hash stable).

    Returns:
        The `Secret`.
    """
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(
        trust_domains=[
            tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                name=bundle.trust_domain.name,
                trust_bundle=base_pb2.DataSource(inline_bytes=_certs_pem(bundle)),
            )
            for bundle in sorted(bundles, key=lambda b: b.trust_domain.name)
        ]
    )
    typed_config = any_pb2.Any()
    typed_config.Pack(config)
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            custom_validator_config=extension_pb2.TypedExtensionConfig(
                name=SPIFFE_VALIDATOR_NAME, typed_config=typed_config
            )
        ),
    )


class SecretResolver:
    """Resolves resource names against one snapshot, building each distinct secret once.

    Shared by every stream while its snapshot is current (the servicer keeps one per snapshot), so a rotation
    that reaches 10k streams builds and hashes each secret once, not 10k times.

    Args:
        snapshot: the identity snapshot to serve.
        naming: the naming rules.
    """

    def __init__(self, snapshot: IdentitySnapshot, naming: Naming) -> None:
        self.snapshot = snapshot
        self.naming = naming
        self._memo: dict[tuple[object, ...], SecretResource] = {}

    def resolve(self, name: str, subscriber: Subscriber) -> Resolution:
        """Resolve one requested name for one caller.

        Args:
            name: the requested resource name.
            subscriber: the caller's entitlement and validation flavour.

        Returns:
            The resource, or why it cannot be served.
        """
        naming = self.naming
        if name == naming.default_svid_name:
            if not subscriber.entitled:
                return Rejection(name, "not_entitled", "the caller is entitled to no SVID")
            return self._svid(name, subscriber.entitled[0])
        if name == naming.own_bundle_name:
            if naming.istio_compat:
                return self._bundles(name, tuple(self.snapshot.bundles), "trusted_ca")
            return self._bundles(name, (naming.trust_domain,), "trusted_ca")
        if name == naming.all_bundles_name:
            return self._bundles(name, tuple(self.snapshot.bundles), subscriber.validation)
        if name.startswith("spiffe://"):
            try:
                spiffe_id = SpiffeId.parse(name)
            except SpiffeIdError as err:
                return Rejection(name, "unknown", f"not a valid SPIFFE ID: {err}")
            if not spiffe_id.path:
                if spiffe_id.trust_domain not in self.snapshot.bundles:
                    return Rejection(name, "unknown", "no bundle for this trust domain")
                return self._bundles(name, (spiffe_id.trust_domain,), subscriber.validation)
            if spiffe_id not in subscriber.entitled:
                return Rejection(name, "not_entitled", "the caller's selectors do not grant this SPIFFE ID")
            return self._svid(name, spiffe_id)
        return Rejection(name, "unknown", "not a SPIFFE ID and not one of the configured names")

    def wildcard_names(self, subscriber: Subscriber) -> tuple[str, ...]:
        """The names a wildcard subscription (no names at all) gets: every entitled SVID and every bundle."""
        names = [str(i) for i in subscriber.entitled if i in self.snapshot.svids]
        names.extend(str(td.id) for td in sorted(self.snapshot.bundles, key=lambda td: td.name))
        return tuple(names)

    def _svid(self, name: str, spiffe_id: SpiffeId) -> Resolution:
        key = ("svid", name, spiffe_id)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        svid = self.snapshot.svids.get(spiffe_id)
        if svid is None:
            return Rejection(name, "unavailable", f"no X.509-SVID for {spiffe_id} in the current snapshot")
        packed, version = _pack(tls_certificate_secret(name, svid))
        resource = SecretResource(name, version, "tls_certificate", packed, str(spiffe_id))
        self._memo[key] = resource
        return resource

    def _bundles(
        self, name: str, trust_domains: tuple[TrustDomain, ...], validation: Validation
    ) -> Resolution:
        key = ("bundles", name, trust_domains, validation)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        bundles = [self.snapshot.bundles[td] for td in trust_domains if td in self.snapshot.bundles]
        bundles = [b for b in bundles if b.x509_authorities]
        if not bundles:
            # An empty trusted_ca would make Envoy reject every peer (or the secret itself); wait for content.
            return Rejection(name, "unavailable", "no X.509 authorities for the trust domain(s) yet")
        if validation == "trusted_ca" and len(bundles) > 1 and not self.naming.pool_trust_domain_roots:
            # A trusted_ca pool lets every root vouch for every SPIFFE ID: a partner CA's certificate for
            # spiffe://<own td>/... would pass. The SPIFFE validator binds each root to its trust domain
            # (SPIFFE_Trust_Domain_and_Bundle.md 4.2), so it is the only safe way to serve several.
            validation = "spiffe"
        secret = (
            trusted_ca_secret(name, bundles)
            if validation == "trusted_ca"
            else spiffe_validator_secret(name, bundles)
        )
        packed, version = _pack(secret)
        source = ",".join(sorted(b.trust_domain.name for b in bundles))
        resource = SecretResource(name, version, "validation_context", packed, source)
        self._memo[key] = resource
        return resource
