"""Wiring: the composition root that builds the identity source and the services on top of it.

`build_source` (`svidgate.sources.factory`, the one place that decides which source to build) gives the
runtime its source; `Services` holds the gRPC services of one process,
registers them on each listener (`Services.register`: Check on every one) and applies what a reload changes.

Import direction: this module imports the sources and the services; only the runtime (`svidgate.runtime`)
imports it.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio

from svidgate.attest.k8s import KubernetesAttestor
from svidgate.changes import ChangeSignal
from svidgate.config import Config, KubernetesConfig
from svidgate.extauthz.inject import TokenInjector
from svidgate.extauthz.policy import compile_authz
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import AuthorizationServicer, new_sync_check_server
from svidgate.identity.clock import Clock
from svidgate.identity.entitlement import CallerInfo
from svidgate.metrics import Metrics
from svidgate.peercred import PeerRegistry
from svidgate.sds.servicer import SecretDiscoveryServicer
from svidgate.sources.factory import BuiltSource, build_source
from svidgate.workloadapi import SECURITY_HEADER
from svidgate.workloadapi.server import WorkloadApiServicer

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
        # Compiled once, here, before anything is swapped: apply() installs exactly this object.
        authz = compile_authz(new.authz)
        workloads = new.workloads
        federation = new.federation

        def apply() -> None:
            built = self._built
            if built.set_workloads is not None:  # the built-in CA mints for new IDs; SPIRE decides itself
                built.set_workloads(workloads)
            if built.set_federation is not None:  # a SPIRE agent delivers federated bundles itself
                built.set_federation(federation)
            self.policies.install(authz)
            self.changes.swap_rules(workloads)  # SDS, the Workload API and token injection read these
            self._set_kubernetes(new)

        return apply
