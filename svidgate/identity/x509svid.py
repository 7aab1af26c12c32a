"""X.509-SVIDs: a certificate chain whose leaf carries one SPIFFE ID, and its private key (X509-SVID.md)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from svidgate.identity.spiffe_id import SpiffeId


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
