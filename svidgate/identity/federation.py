"""Federation settings as values: where each federated trust domain's bundle comes from, and what the own
bundle endpoint presents.

The configuration builds these from ``federation.<trust domain>`` and ``bundle_endpoint``; the federation
watcher and the bundle endpoint server (`svidgate.sources`) receive them and nothing else of the
configuration. Their defaults are declared here, once. This module never imports the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from svidgate.identity.spiffe_id import SpiffeId

#: Seconds between checks of watched files (the files source, federation bundle files, https_web
#: certificates of the bundle endpoint) when the configuration does not say (`source.poll_interval`).
DEFAULT_POLL_INTERVAL = 5.0
#: Seconds between fetches of a bundle endpoint whose bundle carries no ``spiffe_refresh_hint``.
DEFAULT_BUNDLE_REFRESH = 300.0
#: Total deadline of one bundle endpoint fetch, seconds.
DEFAULT_FETCH_TIMEOUT = 10.0

Profile = Literal["https_web", "https_spiffe"]


@dataclass(frozen=True, slots=True)
class BundleEndpoint:
    """A SPIFFE federation bundle endpoint (SPIFFE_Federation.md).

    Attributes:
        url: ``https://`` URL of the endpoint.
        profile: ``https_web`` (WebPKI: system CAs, or `ca_file`) or ``https_spiffe`` (the server presents an
            X.509-SVID for `endpoint_spiffe_id`, validated against the bundle of that ID's trust domain).
        endpoint_spiffe_id: the SPIFFE ID the server must present (https_spiffe only).
        refresh: seconds between fetches when the bundle carries no ``spiffe_refresh_hint``.
        ca_file: PEM roots to trust instead of the system store (https_web only; for private PKIs).
        timeout: total deadline of one fetch, seconds: connect, TLS, request, headers and body together.
    """

    url: str
    profile: Profile
    endpoint_spiffe_id: SpiffeId | None = None
    refresh: float = DEFAULT_BUNDLE_REFRESH
    ca_file: Path | None = None
    timeout: float = DEFAULT_FETCH_TIMEOUT


@dataclass(frozen=True, slots=True)
class FederationSettings:
    """Where the bundle of one federated trust domain comes from.

    With both set, the file is the starting (bootstrap) bundle and the endpoint keeps it current.
    """

    bundle_file: Path | None = None
    bundle_endpoint: BundleEndpoint | None = None


@dataclass(frozen=True, slots=True)
class BundleEndpointServerSettings:
    """What the own SPIFFE bundle endpoint (``listen.bundle_endpoint``) presents and serves.

    Attributes:
        profile: ``https_spiffe`` (the server presents an X.509-SVID for `spiffe_id` from the own identity
            source, rotated like every SVID) or ``https_web`` (it presents `cert_file`/`key_file`, re-read
            when they change).
        spiffe_id: the endpoint's SPIFFE ID (https_spiffe; in the own trust domain).
        cert_file: PEM certificate chain, leaf first (https_web).
        key_file: PEM private key of the leaf (https_web).
        refresh_hint: ``spiffe_refresh_hint`` served, seconds; None: the own bundle's hint (the built-in
            CA's is min(5 m, ca_ttl / 12)), else 5 m.
        oidc_issuer: the ``issuer`` of an OpenID Connect discovery document and JWKS served beside the bundle
            (``<issuer path>/.well-known/openid-configuration`` and ``<issuer path>/keys``); None: not served.
    """

    profile: Profile = "https_spiffe"
    spiffe_id: SpiffeId | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    refresh_hint: float | None = None
    oidc_issuer: str | None = None


__all__ = [
    "DEFAULT_BUNDLE_REFRESH",
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_POLL_INTERVAL",
    "BundleEndpoint",
    "BundleEndpointServerSettings",
    "FederationSettings",
]
