"""The one place that decides which identity source to build (`build_source`), and what it hands the runtime.

`BuiltSource` is the source plus the narrow capabilities the services use, each present only where this
kind of source has it, so that nothing downstream asks a source what it is (no `isinstance`, no `getattr`).

Layering: this module sits in `svidgate.sources`; it imports the sources and the config, never a service,
the runtime or the CLI (`svidgate.runtime.wiring` calls it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from svidgate.config import Config, FederationConfig, Workload
from svidgate.errors import SourceError
from svidgate.identity.bundle import BundleRejectionSink
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import Clock
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.sources import internal_ids, load_upstream
from svidgate.sources.base import IdentitySource, TemplatedSvids
from svidgate.sources.builtin import BuiltinSource
from svidgate.sources.federation import BundleRefresher, FederatedBundles
from svidgate.sources.files import FileSource
from svidgate.sources.spire import SpireSource

__all__ = ["BuiltSource", "build_source"]

#: Mints a JWT-SVID for (SPIFFE ID, audience), synchronously or as an awaitable (the Workload API awaits it).
Mint: TypeAlias = Callable[[SpiffeId, Sequence[str]], "JwtSvid | Awaitable[JwtSvid]"]


@dataclass(frozen=True, slots=True)
class BuiltSource:
    """An identity source and the narrow capabilities the services use, each present only when this kind of
    source has it. `build_source` fills it in -- the one place that knows which source it built -- so that
    the wiring and the reload never ask a source what it is (no `isinstance`, no `getattr`).

    Attributes:
        source: the snapshot source: its feed, its loop (`run`), its health (`statuses`), and synchronous
            JWT-SVID minting (token injection runs on Check's threads).
        mint: what the Workload API awaits to mint a JWT-SVID (SPIRE: over gRPC, off the event loop).
        templated: mints templated workloads' SVIDs on demand (only the built-in CA can).
        refresh_bundle: an out-of-schedule fetch of a federated trust domain's bundle (an unknown `kid`).
        set_workloads: the workloads the source mints for, on reload (the built-in CA; SPIRE decides itself).
        set_federation: the federated trust domains, on reload (a SPIRE agent delivers them itself).
    """

    source: IdentitySource
    mint: Mint
    templated: TemplatedSvids | None = None
    refresh_bundle: BundleRefresher | None = None
    set_workloads: Callable[[Sequence[Workload]], object] | None = None
    set_federation: Callable[[Mapping[TrustDomain, FederationConfig]], object] | None = None


async def build_source(
    config: Config, clock: Clock, on_bundle_rejected: BundleRejectionSink | None = None
) -> BuiltSource:
    """The identity source `config.source.kind` names, its first snapshot published: the one place that
    decides which source is built.

    Blocks briefly for builtin and files: the CA state is loaded (or created), the first SVIDs are minted
    and federated bundle files are read. Bundle endpoints are never waited for here: the source's `run()`
    fetches them, each trust domain in its own task, so a slow partner cannot hold up start-up. A SPIRE
    source waits for the agent's first X.509-SVIDs (retrying with backoff) so that svidgate never serves an
    empty identity; a SPIRE agent provides federated bundles itself, so ``federation`` is not consulted.

    Args:
        config: the configuration.
        clock: the time source.
        on_bundle_rejected: told of every rejected bundle update (`Metrics.bundle_update_rejected`).

    Raises:
        SvidgateError: the source cannot produce its first snapshot (CA state, files, SPIRE agent).
    """
    kind = config.source.kind
    if kind == "spire":
        endpoint = config.source.spire_socket
        if endpoint is None:  # the config loader guarantees it; keep mypy and a future refactor honest
            raise SourceError("source.spire_socket: required with kind: spire")
        spire = await SpireSource.connect(
            endpoint, clock=clock, trust_domain=config.trust_domain, on_bundle_rejected=on_bundle_rejected
        )
        # The SPIRE source mints over gRPC: the Workload API awaits its async variant so that a cache miss
        # never blocks the event loop.
        return BuiltSource(spire, spire.fetch_jwt_svid)
    # Always a watcher, empty when nothing is federated yet, so that a reload can add trust domains.
    federation = FederatedBundles(
        config.federation, clock, poll_interval=config.source.poll_interval, on_rejected=on_bundle_rejected
    )
    if kind == "builtin":
        ca = BuiltinCa.load_or_create(
            config.state_dir,
            config.trust_domain,
            config.ca.key_type,
            clock,
            ca_ttl=config.ca.ca_ttl,
            upstream=load_upstream(config, clock),
        )
        builtin = BuiltinSource(
            ca,
            config.workloads,
            federation,
            clock,
            x509_svid_ttl=config.ca.x509_svid_ttl,
            jwt_svid_ttl=config.ca.jwt_svid_ttl,
            internal_ids=internal_ids(config),
        )
        return BuiltSource(
            builtin,
            builtin.mint_jwt_svid,
            templated=builtin,
            refresh_bundle=builtin.request_bundle_refresh,
            set_workloads=builtin.set_workloads,
            set_federation=builtin.set_federation,
        )
    if kind == "files":
        settings = config.source
        if settings.cert_file is None or settings.key_file is None or settings.bundle_file is None:
            raise SourceError("source: cert_file, key_file and bundle_file are required with kind: files")
        files = FileSource(
            settings.cert_file,
            settings.key_file,
            settings.bundle_file,
            config.trust_domain,
            federation,
            clock,
            poll_interval=settings.poll_interval,
            on_bundle_rejected=on_bundle_rejected,
        )
        return BuiltSource(
            files,
            files.mint_jwt_svid,
            refresh_bundle=files.request_bundle_refresh,
            set_federation=files.set_federation,
        )
    raise SourceError(f"source.kind: unknown source {kind!r}")
