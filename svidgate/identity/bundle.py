"""Trust bundles: the X.509 and JWT authorities of one trust domain.

Parsing and writing of the SPIFFE bundle format (SPIFFE_Trust_Domain_and_Bundle.md, a JWKS with `use`
`x509-svid`/`jwt-svid`) and of PEM bundles lives here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from svidgate.identity.spiffe_id import TrustDomain


@dataclass(frozen=True, slots=True, eq=False)
class Bundle:
    """The trust bundle of one trust domain.

    Attributes:
        trust_domain: whose bundle this is; a key here never verifies an SVID of another trust domain.
        x509_authorities: root (or signing) certificates for X.509-SVID path validation.
        jwt_authorities: JWT-SVID verification keys by key ID (`kid`).
        sequence: `spiffe_sequence`, when the bundle carries one.
        refresh_hint: `spiffe_refresh_hint` in seconds, when the bundle carries one.
    """

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, PublicKeyTypes] = field(default_factory=dict)
    sequence: int | None = None
    refresh_hint: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))
