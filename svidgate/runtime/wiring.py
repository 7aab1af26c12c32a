"""Wiring: the composition root that builds the identity source and the services on top of it.

`build_source` is where the runtime gets its source; `Services` holds the gRPC services of one process,
registers them on each listener (`Services.register`: Check on every one) and applies what a reload changes.

Import direction: this module imports the sources and the services; only the runtime (`svidgate.runtime`)
imports it.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio

from svidgate.attest.k8s import KubernetesAttestor
from svidgate.config import Config, KubernetesConfig
from svidgate.errors import SourceError
from svidgate.extauthz.inject import TokenInjector
from svidgate.extauthz.policy import compile_authz
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import AuthorizationServicer, new_sync_check_server
from svidgate.identity.bundle import BundleRejectionSink
from svidgate.identity.clock import Clock
from svidgate.identity.entitlement import CallerInfo
from svidgate.identity.sources import create_source
from svidgate.identity.sources.base import IdentitySource, TemplatedSvids
from svidgate.identity.sources.builtin import BuiltinSource
from svidgate.metrics import Metrics
from svidgate.peercred import PeerRegistry
from svidgate.sds.servicer import SecretDiscoveryServicer
from svidgate.workloadapi import SECURITY_HEADER
from svidgate.workloadapi.server import MintJwtSvid, WorkloadApiServicer
from svidgate.workloadapi.spire_source import SpireSource

__all__ = [
    "AUTHZ_SERVICE",
    "HEALTH_SERVICE",
    "SDS_SERVICE",
    "WORKLOAD_API_SERVICE",
    "Services",
    "build_source",
]

HEALTH_SERVICE = "grpc.health.v1.Health"
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
WORKLOAD_API_SERVICE = "SpiffeWorkloadAPI"


async def build_source(
    config: Config, clock: Clock, on_bundle_rejected: BundleRejectionSink | None = None
) -> IdentitySource:
    """The identity source `config.source.kind` names, its first snapshot published.

    Args:
        config: the configuration.
        clock: the time source.
        on_bundle_rejected: told of every rejected bundle update (`Metrics.bundle_update_rejected`).

    Raises:
        SvidgateError: the source cannot produce its first snapshot (CA state, files, SPIRE agent).
    """
    if config.source.kind == "spire":
        return await build_spire_source(config, clock, on_bundle_rejected)
    return create_source(config, clock, on_bundle_rejected)


async def build_spire_source(
    config: Config, clock: Clock, on_bundle_rejected: BundleRejectionSink | None = None
) -> SpireSource:
    """The SPIRE agent source (a Workload API client), for ``source.kind: spire``.

    Waits for the agent's first X.509-SVIDs (retrying with backoff) so that svidgate never serves an empty
    identity; a SPIRE agent provides federated bundles itself, so ``federation`` is not consulted.
    """
    endpoint = config.source.spire_socket
    if endpoint is None:  # the config loader guarantees it; keep mypy and a future refactor honest
        raise SourceError("source.spire_socket: required with kind: spire")
    return await SpireSource.connect(
        endpoint, clock=clock, trust_domain=config.trust_domain, on_bundle_rejected=on_bundle_rejected
    )


class Services:
    """The gRPC services of one process and what a reload swaps in them.

    Args:
        config: the configuration at start.
        source: the identity source (its feed and JWT minting).
        metrics: the process's metrics.
        clock: the time source.
    """

    def __init__(self, config: Config, source: IdentitySource, metrics: Metrics, clock: Clock) -> None:
        self.source = source
        self._metrics = metrics
        self.peers = PeerRegistry()
        self._kubernetes: KubernetesConfig | None = None
        self._attestor: KubernetesAttestor | None = None
        self._set_kubernetes(config)
        # Only the built-in CA can mint an SVID per pod (config refuses templates with other sources).
        templated: TemplatedSvids | None = source if isinstance(source, BuiltinSource) else None
        self.policies = PolicyHolder(config.authz)
        self.injector = TokenInjector(source.mint_jwt_svid, config.workloads, clock)
        self.authz = AuthorizationServicer(
            source.feed,
            self.policies,
            metrics.authz,
            clock,
            injector=self.injector,
            peers=self.peers.lookup,
            refresh_bundle=getattr(source, "request_bundle_refresh", None),
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
        )
        # The SPIRE source mints over gRPC: the Workload API servicer awaits its async variant so that a cache
        # miss never blocks the event loop.
        mint: MintJwtSvid = source.fetch_jwt_svid if isinstance(source, SpireSource) else source.mint_jwt_svid
        self.workload_api = WorkloadApiServicer(
            source.feed,
            config.workloads,
            self.peers,
            mint,
            metrics.workload_api,
            clock,
            leeway=config.authz.leeway,
            templated=templated,
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
            set_source_workloads = getattr(self.source, "set_workloads", None)
            if set_source_workloads is not None:  # the built-in CA mints for new IDs; SPIRE decides itself
                set_source_workloads(workloads)
            set_federation = getattr(self.source, "set_federation", None)
            if set_federation is not None:  # a SPIRE agent delivers federated bundles itself
                set_federation(federation)
            self.policies.swap(new.authz)
            self.injector.swap_workloads(workloads)
            self.workload_api.set_workloads(workloads)
            self.sds.update_workloads(workloads)
            self._set_kubernetes(new)

        return apply
