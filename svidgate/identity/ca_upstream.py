"""`ca.upstream`: a shared root CA under which the built-in CA issues its intermediates (one per node).

As SPIRE's ``disk`` UpstreamAuthority: the root's certificate and key are read from files and validated
completely before any intermediate is signed with them (`UpstreamAuthority.load`); `svidgate.identity.ca`
uses the result. Only a self-signed root is accepted: it is what the bundle publishes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from svidgate.errors import CaError, SvidgateError
from svidgate.identity.ca_state import signing_key
from svidgate.identity.keys import SigningKey


@dataclass(frozen=True, slots=True, eq=False)
class UpstreamAuthority:
    """A shared root CA that signs this node's intermediates (``ca.upstream``).

    Construct with `load`, which validates it completely. Only a self-signed root is accepted (SPIRE's disk
    plugin without a bundle file does the same): it is what the bundle publishes.
    """

    certificate: x509.Certificate
    key: SigningKey

    def __repr__(self) -> str:  # never the key
        return f"UpstreamAuthority(subject={self.certificate.subject.rfc4514_string()!r})"

    @property
    def not_before(self) -> float:
        return self.certificate.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    @classmethod
    def load(cls, cert_file: Path, key_file: Path, now: float) -> UpstreamAuthority:
        """Read and validate the upstream root and its private key.

        Args:
            cert_file: PEM with exactly one certificate: a self-signed CA that may sign CAs.
            key_file: its private key (PEM, PKCS#8 or traditional, unencrypted).
            now: the current time (the root must be valid now).

        Returns:
            The upstream authority.

        Raises:
            CaError: a file cannot be read or parsed, the certificate is not a CA root that may sign an
                intermediate, the key does not match it, or it is not valid at `now`.
        """
        try:
            cert_pem = Path(cert_file).read_bytes()
            key_pem = Path(key_file).read_bytes()
        except OSError as exc:
            raise CaError(f"ca.upstream: cannot read {exc.filename}: {exc.strerror or exc}") from None
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
        except ValueError:
            raise CaError(f"ca.upstream: {cert_file}: no PEM certificate in it") from None
        if len(certs) != 1:
            raise CaError(
                f"ca.upstream: {cert_file}: holds {len(certs)} certificates; give exactly one, the root"
            )
        cert = certs[0]
        try:
            key = signing_key(serialization.load_pem_private_key(key_pem, None))
        except (ValueError, TypeError, SvidgateError):
            # The exception text could quote the file; a key file's content never goes into a message.
            raise CaError(
                f"ca.upstream: {key_file}: not an unencrypted EC (P-256/P-384) or RSA private key in PEM"
            ) from None
        if key.public_key() != cert.public_key():
            raise CaError(f"ca.upstream: {key_file} is not the private key of {cert_file}")
        where = f"ca.upstream: {cert_file}"
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise CaError(f"{where}: not a CA certificate (no basicConstraints)") from None
        if not constraints.ca:
            raise CaError(f"{where}: not a CA certificate (basicConstraints CA:FALSE)")
        if constraints.path_length == 0:
            raise CaError(f"{where}: pathlen 0 forbids the intermediate CA svidgate issues under it")
        with contextlib.suppress(x509.ExtensionNotFound):
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not usage.key_cert_sign:
                raise CaError(f"{where}: its keyUsage does not allow keyCertSign")
        if cert.issuer != cert.subject:
            raise CaError(f"{where}: not self-signed; ca.upstream takes the root of the shared trust")
        try:
            cert.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CaError(f"{where}: its self-signature does not verify") from None
        upstream = cls(cert, key)
        if not upstream.not_before <= now < upstream.not_after:
            raise CaError(
                f"{where}: not valid now (valid {_iso(upstream.not_before)} to {_iso(upstream.not_after)})"
            )
        return upstream

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether `cert` was signed by this root."""
        if cert.issuer != self.certificate.subject:
            return False
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(int(epoch), tz=dt.UTC).isoformat()
