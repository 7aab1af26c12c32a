"""Wiring: the composition root that builds the identity source and the services on top of it.

`build_source` is where the runtime gets its source; `Services` holds the gRPC services of one process,
registers them on each listener (`Services.register`: Check on every one) and applies what a reload changes.

Import direction: this module imports the sources and the services; only the runtime (`svidgate.runtime`)
imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from svidgate.attest.k8s import KubernetesAttestor
from svidgate.changes import ChangeSignal
from svidgate.config import Config, FederationConfig, KubernetesConfig, Workload
from svidgate.errors import SourceError
from svidgate.extauthz.inject import TokenInjector
from svidgate.extauthz.policy import compile_authz
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import AuthorizationServicer, new_sync_check_server
from svidgate.identity.bundle import BundleRejectionSink
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import Clock
from svidgate.identity.entitlement import CallerInfo
from svidgate.identity.spiffe_id import TrustDomain
from svidgate.metrics import Metrics
from svidgate.peercred import PeerRegistry
from svidgate.sds.servicer import SecretDiscoveryServicer
from svidgate.sources import internal_ids, load_upstream
from svidgate.sources.base import IdentitySource, TemplatedSvids
from svidgate.sources.builtin import BuiltinSource
from svidgate.sources.federation import BundleRefresher, FederatedBundles
from svidgate.sources.files import FileSource
from svidgate.sources.spire import SpireSource
from svidgate.workloadapi import SECURITY_HEADER
from svidgate.workloadapi.server import MintJwtSvid, WorkloadApiServicer

__all__ = [
    "AUTHZ_SERVICE",
    "HEALTH_SERVICE",
    "SDS_SERVICE",
    "WORKLOAD_API_SERVICE",
    "BuiltSource",
    "Services",
    "build_source",
]

HEALTH_SERVICE = "grpc.health.v1.Health"
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
WORKLOAD_API_SERVICE = "SpiffeWorkloadAPI"


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
    mint: MintJwtSvid
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


class Services:
    """The gRPC services of one process and what a reload swaps in them.

    Args:
        config: the configuration at start.
        built: the identity source and its capabilities (`build_source`).
        metrics: the process's metrics (each service gets its own part).
        clock: the time source.
    """

    def __init__(self, config: Config, built: BuiltSource, metrics: Metrics, clock: Clock) -> None:
        self._built = built
        source = built.source
        self._metrics = metrics
        self.peers = PeerRegistry()
        self._kubernetes: KubernetesConfig | None = None
        self._attestor: KubernetesAttestor | None = None
        self._set_kubernetes(config)
        # Only the built-in CA can mint an SVID per pod (config refuses templates with other sources).
        templated = built.templated
        self.policies = PolicyHolder(config.authz)
        # What a reload changes for entitlements (workloads[]) is one immutable value in one place, read by
        # SDS, the Workload API and token injection; swapping it wakes every stream once (one relay task).
        self.changes = ChangeSignal(source.feed, config.workloads)
        self.injector = TokenInjector(source.mint_jwt_svid, clock=clock, rules=self.changes)
        self.authz = AuthorizationServicer(
            source.feed,
            self.policies,
            metrics.authz,
            clock,
            injector=self.injector,
            peers=self.peers.lookup,
            refresh_bundle=built.refresh_bundle,
        )
        self.sds = SecretDiscoveryServicer(
            source.feed,
            config.workloads,
            config.sds,
            config.trust_domain,
            peers=self.peers,
            metrics=metrics.sds,
            clock=clock,
            templated=templated,
            changes=self.changes,
        )
        self.workload_api = WorkloadApiServicer(
            source.feed,
            config.workloads,
            self.peers,
            built.mint,
            metrics.workload_api,
            clock,
            leeway=config.authz.leeway,
            templated=templated,
            changes=self.changes,
        )

    async def attest(self, caller: CallerInfo) -> CallerInfo:
        """Kubernetes attestation of a unix-socket caller, when a workload has a `k8s:` selector (the
        peercred fronts run this on every connection)."""
        attestor = self._attestor
        return caller if attestor is None else await attestor.attest(caller)

    def _set_kubernetes(self, config: Config) -> None:
        wanted = config.kubernetes if config.attests_kubernetes else None
        if wanted != self._kubernetes or (wanted is not None and self._attestor is None):
            self._kubernetes = wanted
            self._attestor = None if wanted is None else KubernetesAttestor(wanted, self._metrics.attest)

    def register(self, server: grpc.aio.Server, listener: str) -> list[str]:
        """Put the services of one grpc.aio listener on its server: Check on every one, then its own.

        This and `check_server` are the only places services are put on a server, so no listener (and no
        combination of listeners) can lack Check: an Envoy pointed with ``failure_mode_allow: true`` at a
        listener that answered UNIMPLEMENTED would let every request through, unlogged and uncounted. Every
        listener answers with the one `AuthorizationServicer` (same policies, cache, metrics and decision
        log). On the Workload API socket Check also requires the Workload Endpoint's security header, as every
        call there must carry (SPIFFE_Workload_Endpoint.md 3); without it the answer is a denial, never an RPC
        error.

        Args:
            server: a grpc.aio server.
            listener: ``grpc`` (adds SDS) or ``workload_api`` (adds the SPIFFE Workload API).

        Returns:
            The full names of the services added (for health and reflection).
        """
        header = SECURITY_HEADER if listener == "workload_api" else None
        self.authz.add_to_server(server, required_metadata=header)
        if listener == "grpc":
            self.sds.add_to_server(server)
            return [AUTHZ_SERVICE, SDS_SERVICE]
        if listener == "workload_api":
            self.workload_api.add_to_server(server)
            return [AUTHZ_SERVICE, WORKLOAD_API_SERVICE]
        raise ValueError(f"unknown grpc.aio listener {listener!r}")

    def check_server(self, workers: int, options: list[tuple[str, int]]) -> grpc.Server:
        """The threaded server of ``listen.check`` with Check on it (`new_sync_check_server`, the one way it
        is built), not yet bound or started."""
        return new_sync_check_server(self.authz, workers, options=options)

    def prepare_reload(self, new: Config) -> Callable[[], None]:
        """Validate what a reload would apply; return the function that applies it.

        Everything that can fail runs here, before anything is swapped, so a reload is all or nothing.

        Raises:
            ConfigError: the new configuration cannot be applied (the old one stays).
        """
        compile_authz(new.authz)  # raises ConfigError: nothing swapped yet
        workloads = new.workloads
        federation = new.federation

        def apply() -> None:
            built = self._built
            if built.set_workloads is not None:  # the built-in CA mints for new IDs; SPIRE decides itself
                built.set_workloads(workloads)
            if built.set_federation is not None:  # a SPIRE agent delivers federated bundles itself
                built.set_federation(federation)
            self.policies.swap(new.authz)
            self.changes.swap_rules(workloads)  # SDS, the Workload API and token injection read these
            self._set_kubernetes(new)

        return apply
