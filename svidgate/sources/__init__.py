"""Identity sources: where svidgate's SVIDs and trust bundles come from.

`IdentitySource` (base) is the protocol the runtime and services depend on; `BuiltinSource` (the built-in
CA), `FileSource` (watched PEM files) and `SpireSource` (`spire`, an upstream SPIRE agent's Workload API)
implement it, and `FederatedBundles` adds other trust domains' bundles to the built-in and file sources;
`bundle_server` serves the own trust domain's bundle to federation partners.

Layering (the import-linter contract in pyproject.toml): this package sits between the services
(`svidgate.sds`, `svidgate.extauthz`, `svidgate.workloadapi.server`) and `svidgate.identity`; it may use the
Workload API client (`svidgate.workloadapi.client`, for SPIRE) but never imports a service, the runtime or the
CLI.
"""

from __future__ import annotations

from svidgate.config import Config
from svidgate.errors import SourceError
from svidgate.identity.bundle import BundleRejectionSink
from svidgate.identity.ca import BuiltinCa, UpstreamAuthority
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


def create_source(
    config: Config, clock: Clock = system_clock, on_bundle_rejected: BundleRejectionSink | None = None
) -> BuiltinSource | FileSource:
    """Build the source `config.source.kind` names (builtin or files), with federation attached.

    Blocks briefly: the CA state is loaded (or created), the first SVIDs are minted and federated bundle files
    are read. Bundle endpoints are never waited for here: `run()` fetches them, each trust domain in its own
    task, so a slow partner cannot hold up start-up.

    Args:
        config: the configuration.
        clock: the time source.
        on_bundle_rejected: told of every rejected bundle update (own and federated; the runtime counts them).

    Returns:
        The source, its first snapshot already published.

    Raises:
        SourceError: the kind is ``spire`` (built by the runtime from `svidgate.sources.spire`) or the
            source cannot produce its first snapshot.
        CaError: the built-in CA state cannot be loaded or created.
    """
    # Always a watcher, empty when nothing is federated yet, so that a reload can add trust domains.
    federation = FederatedBundles(
        config.federation, clock, poll_interval=config.source.poll_interval, on_rejected=on_bundle_rejected
    )
    if config.source.kind == "builtin":
        ca = BuiltinCa.load_or_create(
            config.state_dir,
            config.trust_domain,
            config.ca.key_type,
            clock,
            ca_ttl=config.ca.ca_ttl,
            upstream=load_upstream(config, clock),
        )
        return BuiltinSource(
            ca,
            config.workloads,
            federation,
            clock,
            x509_svid_ttl=config.ca.x509_svid_ttl,
            jwt_svid_ttl=config.ca.jwt_svid_ttl,
            internal_ids=internal_ids(config),
        )
    if config.source.kind == "files":
        src = config.source
        assert src.cert_file is not None
        assert src.key_file is not None
        assert src.bundle_file is not None
        return FileSource(
            src.cert_file,
            src.key_file,
            src.bundle_file,
            config.trust_domain,
            federation,
            clock,
            poll_interval=src.poll_interval,
            on_bundle_rejected=on_bundle_rejected,
        )
    raise SourceError(f"source kind {config.source.kind!r} is not built here (see svidgate.workloadapi)")


__all__ = [
    "BuiltinSource",
    "FederatedBundles",
    "FileSource",
    "IdentitySource",
    "SourceHealth",
    "SourceStatus",
    "create_source",
    "federated_bundles",
    "fetch_bundle",
]
