"""The Kubernetes attestation metrics: attestations by result, kubelet pod list fetches by result.

This module imports only prometheus_client; `svidgate.attest.k8s.KubernetesAttestor` receives
`AttestMetrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

__all__ = ["AttestMetrics"]


class AttestMetrics:
    """The collectors of caller attestation, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attestations = Counter(
            "svidgate_k8s_attestations_total",
            "Kubernetes attestations of unix-socket callers, by result: attested, or why not (not_in_pod, "
            "pod_not_listed, container_not_listed, kubelet_unreachable, kubelet_error, pid_reused, ...).",
            ["result"],
            registry=registry,
        )
        self.pod_list_fetches = Counter(
            "svidgate_k8s_pod_list_fetches_total",
            "Pod list fetches from the kubelet, by result (ok, or the failure reason).",
            ["result"],
            registry=registry,
        )
