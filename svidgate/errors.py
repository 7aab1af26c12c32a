"""The one exception tree of svidgate.

Everything svidgate raises for bad input derives from `SvidgateError`; the edges (CLI, gRPC servicers, HTTP)
translate it into an exit code, a status or a deny response. Nothing here imports gRPC.
"""

from __future__ import annotations


class SvidgateError(Exception):
    """Root of every error svidgate raises on purpose."""


class ConfigError(SvidgateError):
    """A configuration file or value is invalid; the message names the key's path."""


class SpiffeIdError(SvidgateError):
    """A string is not a valid SPIFFE ID or trust domain name (SPIFFE-ID.md)."""


class BundleError(SvidgateError):
    """A trust bundle (SPIFFE JWKS or PEM) is malformed or violates the bundle spec."""


class X509SvidError(SvidgateError):
    """An X.509-SVID is malformed or does not verify (X509-SVID.md)."""


class JwtSvidError(SvidgateError):
    """A JWT-SVID is malformed or does not validate (JWT-SVID.md).

    `reason` is a short, stable code (for example ``expired`` or ``audience_mismatch``) that ext_authz reports
    in deny responses and metrics; the message is a human-readable detail that never contains the token.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CaError(SvidgateError):
    """The built-in CA cannot load, create or use its state."""


class SourceError(SvidgateError):
    """An identity source (SPIRE agent, files, federation endpoint) failed to deliver."""


class AttestationError(SvidgateError):
    """A caller could not be attested (not in a pod, unknown to the kubelet, the kubelet unreachable, ...).

    `reason` is a short, stable code for logs and the `svidgate_k8s_attestations_total` counter; the message
    is a human-readable detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
