"""X.509-SVIDs: a certificate chain whose leaf carries one SPIFFE ID, and its private key (X509-SVID.md).

`parse_x509_svid` checks the structural rules of the spec (section 2, 3, 4); `verify_x509_svid` adds path
validation (section 5) against the bundle of the leaf's own trust domain, and nothing else.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509 import verification

from svidgate.errors import SpiffeIdError, X509SvidError
from svidgate.identity.bundle import Bundle
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


@dataclass(frozen=True, slots=True, eq=False)
class X509Svid:
    """An X.509-SVID with its private key.

    Attributes:
        spiffe_id: the one URI SAN of the leaf.
        cert_chain: leaf first, then intermediates (never the root).
        private_key: the leaf's private key.
        hint: an operator-chosen label (Workload API `hint`), empty when none.
    """

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: CertificateIssuerPrivateKeyTypes
    hint: str = ""

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def expires_at(self) -> float:
        """The leaf's notAfter as seconds since the epoch."""
        return self.leaf.not_valid_after_utc.timestamp()

    def cert_chain_pem(self) -> bytes:
        """The chain (leaf first) as concatenated PEM ``CERTIFICATE`` blocks."""
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.cert_chain)

    def cert_chain_der(self) -> bytes:
        """The chain (leaf first) as concatenated DER, as the Workload API's `x509_svid` field carries it."""
        return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in self.cert_chain)

    def private_key_pem(self) -> bytes:
        """The private key as an unencrypted PKCS#8 PEM ``PRIVATE KEY`` block. A secret: never log it."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def private_key_der(self) -> bytes:
        """The private key as unencrypted PKCS#8 DER (Workload API `x509_svid_key`). Never log it."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


# ----------------------------------------------------------------------------------------------------
# Parsing


def parse_x509_svid(chain_pem_or_der: bytes, key_pem_or_der: bytes, hint: str = "") -> X509Svid:
    """Parse an X.509-SVID and its private key, checking the leaf and signing-certificate rules.

    The chain is PEM ``CERTIFICATE`` blocks or concatenated DER, leaf first. The key is PEM or DER; PKCS#8 is
    what SPIFFE specifies, SEC1 (``EC PRIVATE KEY``) and PKCS#1 (``RSA PRIVATE KEY``) are accepted too because
    cert-manager and OpenSSL write them. Validity periods and signatures are not checked here (see
    `verify_x509_svid`): a files source needs to load an SVID to report that it expired.

    Args:
        chain_pem_or_der: the certificate chain.
        key_pem_or_der: the leaf's private key, unencrypted.
        hint: the Workload API hint to attach.

    Returns:
        The SVID.

    Raises:
        X509SvidError: the chain or key does not parse, the leaf breaks a rule of section 2-4 or 5.2, a
            signing certificate is not a CA with keyCertSign, the chain is out of order, or the key does not
            belong to the leaf.
    """
    chain = load_certificates(chain_pem_or_der)
    spiffe_id = check_leaf(chain[0])
    for index, cert in enumerate(chain[1:], start=1):
        _check_signing_certificate(cert, f"chain certificate {index}")
        if chain[index - 1].issuer != cert.subject:
            raise X509SvidError(
                f"chain certificate {index} ({cert.subject.rfc4514_string() or 'empty subject'}) is not the "
                f"issuer of certificate {index - 1}: the chain must be ordered leaf first"
            )
    private_key = load_private_key(key_pem_or_der)
    if private_key.public_key() != chain[0].public_key():
        raise X509SvidError("the private key does not match the leaf certificate's public key")
    return X509Svid(spiffe_id=spiffe_id, cert_chain=chain, private_key=private_key, hint=hint)


def load_certificates(data: bytes) -> tuple[x509.Certificate, ...]:
    """Load one or more certificates from PEM blocks or concatenated DER.

    Raises:
        X509SvidError: nothing parses, or a PEM block is not a certificate.
    """
    if not isinstance(data, bytes) or not data:
        raise X509SvidError("the certificate chain is empty")
    if b"-----BEGIN" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise X509SvidError(f"the certificate chain is not valid PEM: {exc}") from None
        if data.count(b"-----BEGIN") != len(certs):
            raise X509SvidError("the certificate chain contains a PEM block that is not a CERTIFICATE")
        return tuple(certs)
    certs = []
    for index, der in enumerate(_split_der(data)):
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            raise X509SvidError(f"chain certificate {index} is not a valid DER certificate: {exc}") from None
    return tuple(certs)


def load_private_key(data: bytes) -> CertificateIssuerPrivateKeyTypes:
    """Load an unencrypted private key from PEM or DER.

    Raises:
        X509SvidError: the bytes are not an unencrypted private key of a type that can sign.
    """
    if not isinstance(data, bytes) or not data:
        raise X509SvidError("the private key is empty")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        # cryptography signals "this key is encrypted and no password was given" with TypeError.
        raise X509SvidError("the private key is encrypted; svidgate needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise X509SvidError(f"the private key does not parse: {exc}") from None
    # DSA is deliberately absent: no TLS stack svidgate serves (Envoy's BoringSSL) can use a DSA certificate.
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
    ):
        raise X509SvidError(f"unsupported private key type {type(key).__name__}")
    return key


def _split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER SEQUENCEs (X.509 certificates) without interpreting them."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        start = pos
        if data[pos] != 0x30:
            raise X509SvidError(f"chain certificate {len(out)} is neither PEM nor DER (no ASN.1 SEQUENCE)")
        if pos + 2 > len(data):
            raise X509SvidError(f"chain certificate {len(out)} is truncated")
        first = data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            # Certificates never need more than 4 length octets; 0x80 (indefinite) is not DER.
            if count == 0 or count > 4 or pos + count > len(data):
                raise X509SvidError(f"chain certificate {len(out)} has an invalid DER length")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise X509SvidError(f"chain certificate {len(out)} is truncated")
        pos += length
        out.append(data[start:pos])
    return out


# ----------------------------------------------------------------------------------------------------
# Certificate rules


def spiffe_id_of(cert: x509.Certificate, what: str = "leaf certificate") -> SpiffeId:
    """The SPIFFE ID in the one URI SAN of `cert` (X509-SVID.md section 2).

    Raises:
        X509SvidError: no SAN extension, no URI SAN, more than one URI SAN, or a URI SAN that is not a valid
            SPIFFE ID.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise X509SvidError(f"{what} has no subjectAltName extension, so no SPIFFE ID") from None
    except ValueError as exc:  # a malformed extension surfaces on first access
        raise X509SvidError(f"{what} has malformed extensions: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise X509SvidError(f"{what} has no URI SAN, so no SPIFFE ID")
    if len(uris) > 1:
        raise X509SvidError(f"{what} has {len(uris)} URI SANs; an X.509-SVID must have exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise X509SvidError(f"{what}'s URI SAN is not a valid SPIFFE ID: {exc}") from None


def check_leaf(leaf: x509.Certificate) -> SpiffeId:
    """Check the leaf rules of X509-SVID.md (sections 2, 3.1, 4.1, 4.3 and 5.2) and return its SPIFFE ID.

    Extended key usage is not checked: the spec makes it a SHOULD for issuers, and go-spiffe accepts any.

    Raises:
        X509SvidError: naming the rule the leaf breaks.
    """
    spiffe_id = spiffe_id_of(leaf)
    if not spiffe_id.path:
        raise X509SvidError(f"leaf SPIFFE ID {spiffe_id} has no path; a leaf must not be a trust domain ID")
    constraints = _extension(leaf, x509.BasicConstraints, "leaf certificate")
    if constraints is not None and constraints.ca:
        raise X509SvidError("leaf certificate is a CA (basicConstraints cA is true)")
    usage = _extension(leaf, x509.KeyUsage, "leaf certificate")
    if usage is None:
        raise X509SvidError("leaf certificate has no keyUsage extension (X509-SVID.md 4.3 requires it)")
    if not usage.digital_signature:
        raise X509SvidError("leaf certificate keyUsage lacks digitalSignature")
    if usage.key_cert_sign:
        raise X509SvidError("leaf certificate keyUsage has keyCertSign; only signing certificates may")
    if usage.crl_sign:
        raise X509SvidError("leaf certificate keyUsage has cRLSign; only signing certificates may")
    return spiffe_id


def _check_signing_certificate(cert: x509.Certificate, what: str) -> None:
    constraints = _extension(cert, x509.BasicConstraints, what)
    if constraints is None or not constraints.ca:
        raise X509SvidError(
            f"{what} is not a CA (basicConstraints cA must be true for a signing certificate)"
        )
    usage = _extension(cert, x509.KeyUsage, what)
    if usage is None or not usage.key_cert_sign:
        raise X509SvidError(f"{what} keyUsage lacks keyCertSign, so it cannot sign certificates")
    try:
        signer_id = spiffe_id_of(cert, what)
    except X509SvidError:
        return  # 3.2: a signing certificate SHOULD (not MUST) be an SVID
    if signer_id.path:
        raise X509SvidError(
            f"{what} has SPIFFE ID {signer_id} with a path; a signing certificate's must have none"
        )


def _extension(cert: x509.Certificate, kind: type[_Ext], what: str) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise X509SvidError(f"{what} has malformed extensions: {exc}") from None


# ----------------------------------------------------------------------------------------------------
# Verification

# Which CA-certificate extensions to enforce: cryptography's Web PKI defaults (RFC 5280 plus CA/B forum
# profile for CA certificates: basicConstraints critical, keyUsage keyCertSign, AKI on non-roots), which every
# SPIFFE CA meets. The leaf's rules are SPIFFE's, not the Web PKI's (no DNS SAN, EKU or subject needed), so
# the leaf policy permits everything and `check_leaf` enforces X509-SVID.md instead.
_CA_POLICY = verification.ExtensionPolicy.webpki_defaults_ca()
_LEAF_POLICY = verification.ExtensionPolicy.permit_all()


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    bundles: Mapping[TrustDomain, Bundle],
    now: float,
) -> SpiffeId:
    """Verify an X.509-SVID chain (leaf first) and return the leaf's SPIFFE ID.

    Path validation (RFC 5280, via `cryptography.x509.verification`) uses only the X.509 authorities of the
    bundle of the leaf's own trust domain: an authority of another trust domain never vouches for this ID,
    even when it signed it (SPIFFE_Trust_Domain_and_Bundle.md section 3). URI name constraints are not
    supported by the verifier, so a chain with them is rejected (X509-SVID.md 4.2 anticipates exactly that).

    Args:
        chain: the leaf, then any intermediates, as presented by the peer.
        bundles: trust bundles by trust domain.
        now: the time to check validity at, seconds since the epoch.

    Returns:
        The leaf's SPIFFE ID.

    Raises:
        X509SvidError: naming the rule broken (leaf rules, unknown trust domain, expiry) or the
            verifier's reason.
    """
    if not chain:
        raise X509SvidError("the certificate chain is empty")
    leaf = chain[0]
    spiffe_id = check_leaf(leaf)
    for index, cert in enumerate(chain[1:], start=1):
        _check_signing_certificate(cert, f"chain certificate {index}")
    trust_domain = spiffe_id.trust_domain
    bundle = bundles.get(trust_domain)
    if bundle is None or bundle.trust_domain != trust_domain:
        raise X509SvidError(f"no trust bundle for trust domain {trust_domain} (of {spiffe_id})")
    if not bundle.x509_authorities:
        raise X509SvidError(f"the bundle of trust domain {trust_domain} has no X.509 authorities")
    at = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    if at < leaf.not_valid_before_utc:
        raise X509SvidError(f"leaf certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
    if at > leaf.not_valid_after_utc:
        raise X509SvidError(f"leaf certificate expired at {leaf.not_valid_after_utc.isoformat()}")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(bundle.x509_authorities)))
        .time(at)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_LEAF_POLICY)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(chain[1:]))
    except verification.VerificationError as exc:
        raise X509SvidError(
            f"{spiffe_id}: no valid path to an X.509 authority of {trust_domain}: {_verifier_reason(exc)}"
        ) from None
    if len(verified.chain) < 2:
        # The leaf itself is in the bundle: RFC 5280 trusts it directly, SPIFFE does not -- a bundle holds
        # signing authorities, and an SVID is only valid when signed by one (SPIFFE-ID.md 3).
        raise X509SvidError(
            f"{spiffe_id}: the leaf is itself in the bundle; it must be signed by an authority"
        )
    return spiffe_id


def _verifier_reason(exc: verification.VerificationError) -> str:
    text = str(exc)
    # cryptography prefixes every failure with "validation failed: "; the rest is the useful part.
    return text.removeprefix("validation failed: ")
