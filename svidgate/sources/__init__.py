"""Identity sources: where svidgate's SVIDs and trust bundles come from.

`IdentitySource` (base) is the protocol the runtime and services depend on; `BuiltinSource` (the built-in
CA), `FileSource` (watched PEM files) and `SpireSource` (`spire`, an upstream SPIRE agent's Workload API)
implement it, and `FederatedBundles` adds other trust domains' bundles to the built-in and file sources;
`bundle_server` serves the own trust domain's bundle to federation partners.

Layering (the import-linter contract in pyproject.toml): this package sits between the services
(`svidgate.sds`, `svidgate.extauthz`, `svidgate.workloadapi.server`) and `svidgate.identity`; it may use the
Workload API client (`svidgate.workloadapi.client`, for SPIRE) but never imports a service, the runtime or the
CLI.
Which source to build is decided in one place, `svidgate.sources.factory.build_source`.
"""

from __future__ import annotations

from svidgate.config import Config
from svidgate.identity.bundle import BundleRejectionSink
from svidgate.identity.ca import UpstreamAuthority
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.spiffe_id import SpiffeId
from svidgate.sources.base import IdentitySource, SourceHealth, SourceStatus
from svidgate.sources.builtin import BuiltinSource
from svidgate.sources.federation import FederatedBundles, fetch_bundle
from svidgate.sources.files import FileSource


def load_upstream(config: Config, clock: Clock = system_clock) -> UpstreamAuthority | None:
    """The ``ca.upstream`` root the built-in CA issues its intermediates under, or None when it is not set.

    Raises:
        CaError: a file cannot be read, or the root or its key is not valid (`UpstreamAuthority.load`).
    """
    upstream = config.ca.upstream
    if upstream is None:
        return None
    return UpstreamAuthority.load(upstream.cert_file, upstream.key_file, clock())


def federated_bundles(
    config: Config, clock: Clock = system_clock, on_bundle_rejected: BundleRejectionSink | None = None
) -> FederatedBundles | None:
    """The federation watcher for `config.federation`, or None when nothing is federated."""
    if not config.federation:
        return None
    return FederatedBundles(
        config.federation, clock, poll_interval=config.source.poll_interval, on_rejected=on_bundle_rejected
    )


def internal_ids(config: Config) -> tuple[SpiffeId, ...]:
    """SPIFFE IDs svidgate presents itself: the bundle endpoint's with ``https_spiffe``."""
    endpoint = config.bundle_endpoint
    if config.listen.bundle_endpoint is None or endpoint.spiffe_id is None:
        return ()
    return (endpoint.spiffe_id,)


__all__ = [
    "BuiltinSource",
    "FederatedBundles",
    "FileSource",
    "IdentitySource",
    "SourceHealth",
    "SourceStatus",
    "federated_bundles",
    "fetch_bundle",
]
